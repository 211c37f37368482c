"""The herd port: where neighbors' links connect, and the answering side of each.

A connection is read only through the handshake (``core.handshake``) until the peer
has proven the secret: short lines, a deadline, nothing else believed. A failed proof
is logged (``auth_failed``) and the connection closed; an unproven peer changes no
link, no record, no backoff and no counter but the refusals. Once proven, the
connection carries the neighbor's AT lines (stored as coming from it, so they are not
flooded back to it), its ``SYNC`` questions (answered here) and its ``BYE``.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable
from typing import Any

import gevent
from gevent.event import Event
from gevent.pool import Group
from gevent.server import StreamServer

from ..core import handshake, sync
from ..core.handshake import ResponderHandshake
from ..core.protocol import Overlong
from ..core.store import Store
from ..logs import EventLog
from .lines import LineReader
from .links import PEER_LINE_LIMIT, TakeLine, new_token
from .sockets import send_nowait

MAX_UNPROVEN = 64  # connections still in their handshake; more are closed at once
QUIET_ERRNOS = {errno.EPIPE, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT, errno.ENOTCONN}


class HerdPort:
    """The listening herd port and every neighbor connection on it."""

    def __init__(
        self,
        listener: Any,
        me: bytes,
        neighbors: tuple[str, ...],
        boot_id: str,
        secrets: tuple[bytes, ...],
        store: Store,
        digests: Event,
        take_line: TakeLine,
        persist: Callable[[], None],
        log: EventLog,
        handshake_timeout: float,
        write_timeout: float,
        on_proven: Callable[[str], None] = lambda name: None,
        on_bye: Callable[[str], None] = lambda name: None,
    ):
        self.me = me
        self.names = {name.encode("utf-8"): name for name in neighbors}
        self.boot_id = boot_id.encode("ascii")
        self.secrets = secrets
        self.store = store
        self.digests = digests
        self.take_line = take_line
        self.persist = persist
        self.log = log
        self.handshake_timeout = handshake_timeout
        self.write_timeout = write_timeout
        self.on_proven = on_proven
        self.on_bye = on_bye
        self.auth_failures = 0
        self.unproven = 0
        self.peer_boots: dict[str, bytes] = {}
        self.handlers = Group()
        self.sockets: set[socket.socket] = set()
        backlog = None if isinstance(listener, socket.socket) else 128  # a bound socket has its own
        self._server = StreamServer(listener, self._accept, backlog=backlog)

    @property
    def address(self) -> tuple[str, int]:
        return self._server.server_host, self._server.server_port

    def start(self) -> None:
        self._server.start()

    def close(self) -> None:
        """Stop accepting; end every neighbor connection (they see EOF and show the link down)."""
        self._server.close()
        for sock in list(self.sockets):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.handlers.kill(timeout=1)

    def _accept(self, sock: socket.socket, address: Any) -> None:
        # In a greenlet of the StreamServer's own; the handler is tracked so close() ends it.
        if self.unproven >= MAX_UNPROVEN:
            sock.close()
            return
        self.handlers.add(gevent.getcurrent())
        self.sockets.add(sock)
        peer = "%s:%s" % address[:2] if isinstance(address, tuple) else str(address)
        try:
            name, reader = self._prove(sock, peer)
            if name is not None:
                self._serve(sock, reader, name)
        except OSError as exc:
            if exc.errno not in QUIET_ERRNOS:
                self.log.warning("herd_connection_error", peer=peer, error=str(exc))
        finally:
            self.sockets.discard(sock)
            sock.close()

    # -- before the proof -----------------------------------------------------------------

    def _prove(self, sock: socket.socket, peer: str) -> tuple[str | None, LineReader]:
        """The handshake under a deadline: the neighbor's name once it proved the secret."""
        reader = LineReader(sock, handshake.MAX_LINE)
        shake = ResponderHandshake(self.secrets, self.me, self.names, self.boot_id, new_token().encode())
        self.unproven += 1
        try:
            failure = "no hello in time"
            with gevent.Timeout(self.handshake_timeout, False):
                failure = self._run_handshake(sock, reader, shake)
        finally:
            self.unproven -= 1
        if failure:
            self._refuse(peer, shake.peer, failure)
            return None, reader
        name = self.names[shake.peer]
        self._note_boot(name, shake.peer_boot)
        reader.splitter.limit = PEER_LINE_LIMIT
        self.log.info("peer_authenticated", neighbor=name, peer=peer)
        self.on_proven(name)
        return name, reader

    def _run_handshake(self, sock: socket.socket, reader: LineReader, shake: ResponderHandshake) -> str:
        """'' once established, else why not."""
        while True:
            line = reader.next_line(self.handshake_timeout)
            if line is None:
                return "closed before the proof" if reader.eof else "no proof in time"
            if isinstance(line, Overlong):
                return "over-long handshake line"
            step = shake.receive(line)
            if step.send:
                sock.sendall(step.send)
            if step.failure:
                return step.failure
            if step.established:
                return ""

    def _refuse(self, peer: str, claimed: bytes, reason: str) -> None:
        self.auth_failures += 1
        if self.auth_failures & (self.auth_failures - 1) == 0:  # 1, 2, 4 ...: a flood logs a few lines
            self.log.warning(
                "auth_failed", peer=peer, claimed=claimed or "-", reason=reason, failures_so_far=self.auth_failures
            )

    def _note_boot(self, name: str, boot: bytes) -> None:
        previous = self.peer_boots.get(name)
        if previous is not None and previous != boot:
            self.log.info("peer_restarted", neighbor=name)
        self.peer_boots[name] = boot

    # -- after the proof ------------------------------------------------------------------

    def _serve(self, sock: socket.socket, reader: LineReader, name: str) -> None:
        while True:
            items = reader.read_some()
            if not items and reader.eof:
                return
            stored, answers = self._take(items, name)
            if stored:
                self.persist()  # the neighbors' records to the OS; their floods leave at the end of the turn
            if answers:
                self._answer(sock, b"".join(answers))

    def _take(self, items: list[bytes | Overlong], name: str) -> tuple[bool, list[bytes]]:
        stored = False
        answers: list[bytes] = []
        self.log.traffic("in", "neighbor", name, "line", [i for i in items if isinstance(i, bytes) and i.strip()])
        for item in items:
            if isinstance(item, Overlong):
                self.log.warning("peer_said", neighbor=name, data=item.prefix)
                continue
            fields = item.split()
            if not fields:
                continue
            if fields[0] == b"AT":
                stored = self.take_line(item, fields, name) or stored
            elif fields == [b"BYE"]:
                self.log.info("peer_bye", neighbor=name)
                self.on_bye(name)
            else:
                answers.append(self._sync_answer(fields, item, name))
        return stored, answers

    def _sync_answer(self, fields: list[bytes], item: bytes, name: str) -> bytes:
        command = sync.parse_sync(fields)
        if command is not None and command.verb == b"ASK":
            self.digests.wait()  # after a large replay they take a moment
            return sync.answer_ask(self.store.levels, command.level, command.numbers) + b"\n"
        if command is not None and command.verb == b"PULL":
            lines = list(self.store.lines_in(command.numbers))
            lines.append(sync.format_done(len(lines)))
            return b"\n".join(lines) + b"\n"
        self.log.warning("peer_said", neighbor=name, data=item[:512])
        return b"? " + item.strip()[:512] + b"\n"

    def _answer(self, sock: socket.socket, data: bytes) -> None:
        sent = send_nowait(sock, data)
        if sent < len(data):
            with gevent.Timeout(self.write_timeout, False):  # a neighbor that never reads is dropped
                sock.sendall(memoryview(data)[sent:])
                return
            raise OSError(errno.ETIMEDOUT, "neighbor stopped reading")
