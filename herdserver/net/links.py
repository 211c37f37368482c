"""One link per neighbor: the link policy, the handshake, reconciliation, batches.

A *link* is the relation between two neighbors, not one TCP connection. The
link opens a connection only when it has something to send (records in
its outbox, or a reconciliation due) and closes it after ``[peers] link_idle``
seconds with nothing more to send. So a server holds no connection to a
neighbor's port while the herd is quiet, and ``lsof -ti:PORT | xargs kill``
(how the course's grading scripts stop a server) signals only that server.
Under sustained load the connection stays open and batches flow as before.

Each connection starts with a hello (``HELLO herdserver/1 NAME BOOT NONCE``).
A herdserver neighbor answers with its own; another implementation answers
``? HELLO ...`` (or nothing), and then gets plain AT lines only.

The outbox is a dict of the latest AT line per client, not a FIFO of every
update: while a neighbor is down, memory is bounded by the number of clients.

Reconciliation (``sync.py``) runs when this server starts, when a link comes
back after a failure, and every ``sync_interval`` seconds; never once per
connection. With a herdserver neighbor it compares digests and sends only
what differs, both ways; with another implementation it is a full push of
every record as plain AT lines (at start and after an outage only).
"""

from __future__ import annotations

import os
import random
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import gevent
from gevent.event import Event
from gevent.greenlet import Greenlet
from gevent.queue import Empty, SimpleQueue

from ..config import PeerSettings, ServerConfig
from ..core import handshake, protocol, sync
from ..core.protocol import At, LineSplitter, Overlong
from ..core.status import LinkState, PeerKind, RecentEvents
from ..core.store import Store
from ..logs import EventLog
from .sockets import send_nowait

SYNC_CHUNK_LINES = 4096  # a full push of a large table goes out in bounded writes
PEER_LINE_LIMIT = 1 << 20  # lines a herdserver neighbor sends back (sync answers) are short
HELLO_VERSION = handshake.PROTOCOL


class LinkDown(Exception):
    """The neighbor closed the connection, stopped reading, or broke the protocol."""


def new_token() -> str:
    return os.urandom(8).hex()


class Link:
    """Sends AT lines to one neighbor over connections opened on demand."""

    def __init__(
        self,
        neighbor: ServerConfig,
        settings: PeerSettings,
        me: bytes,
        store: Store,
        digests: Event,
        take_at: Callable[[At, bytes, str], object],
        persist: Callable[[], None],
        log: EventLog,
        events: RecentEvents,
        boot_id: str,
        secrets: tuple[bytes, ...] = (),
        rand: Callable[[], float] = random.random,
    ):
        self.neighbor = neighbor
        self.secrets = secrets
        self.name = neighbor.name
        self.name_bytes = neighbor.name.encode("utf-8")
        self.settings = settings
        self.me = me
        self.store = store
        self.digests = digests
        self.take_at = take_at
        self.persist = persist
        self.log = log
        self.events = events
        self.boot_id = boot_id
        self.rand = rand
        self.outbox: dict[bytes, bytes] = {}
        self.wake = Event()
        self.seen = Event()  # the neighbor said hello to us: a retry need not wait out its backoff
        self.up = Event()  # set while the last exchange with the neighbor worked
        self.need_sync = True  # a reconciliation is due (at start: yes)
        self.kind = PeerKind.UNKNOWN  # until a hello was answered (or not)
        self.peer_boot: str | None = None
        self.connected = False
        self.lines_sent = 0
        self.links_made = 0  # connections opened
        self.recoveries = 0  # times the link came back up after being down
        self.bytes_sent = 0  # AT lines' bytes (herd_at_bytes_total{direction="out"})
        self.syncs = 0
        self.full_pushes = 0
        self.sync_bytes_sent = 0
        self.sync_bytes_received = 0
        self._was_down = False  # the link went down after being up (its next up is a recovery)
        self._replies: SimpleQueue[Any] = SimpleQueue()
        self._awaiting_hello = False
        self._sockaddr: tuple[int, Any] | None = None  # (family, address), resolved once
        self._next_periodic = self._periodic_deadline()

    # -- called from the server's greenlets -------------------------------------------

    def offer(self, client: bytes, line: bytes) -> None:
        """Queue the latest line for ``client``; replaces any older one still waiting."""
        self.outbox[client] = line
        self.wake.set()

    def peer_seen(self) -> None:
        """The neighbor connected to us and said hello: it is up."""
        self.seen.set()
        if self.kind is PeerKind.UNKNOWN:
            self.kind = PeerKind.HERDSERVER  # it said HELLO
        self._mark_up()

    @property
    def pending(self) -> bool:
        return bool(self.outbox) or self.need_sync

    # -- the link greenlet ----------------------------------------------------------

    def run(self) -> None:
        delay = self.settings.backoff_initial
        failures = 0
        while True:
            self._wait_for_work()
            sock = self._connect(failures)
            if sock is None:
                failures += 1
                self._mark_down("connect failed")
                delay = self._back_off(delay)
                continue
            if failures:
                self.need_sync = True  # an outage ended: whatever was missed gets reconciled
            failures = 0
            broken = False
            try:
                self._session(sock)
                delay = self.settings.backoff_initial  # a clean end: the link works
            except (OSError, LinkDown, gevent.Timeout) as exc:
                self._mark_down(_describe(exc))
                failures = 1
                broken = True
                # What was in flight may be lost with the connection: reconcile as soon
                # as the neighbor can be reached again, not at the next update.
                self.need_sync = True
            finally:
                self.connected = False
                sock.close()
            if broken:
                delay = self._back_off(delay)  # a neighbor that drops every connection is not hammered

    def _back_off(self, delay: float) -> float:
        """Wait ``delay`` with full jitter in [delay/2, delay) (restarted herds do not
        reconnect in lockstep), cut short by a hello from the neighbor (it is back);
        the next delay."""
        self.seen.clear()
        self.seen.wait(delay * (0.5 + self.rand() / 2))
        return min(delay * 2, self.settings.backoff_max)

    def _periodic_deadline(self) -> float:
        interval = self.settings.sync_interval
        if not interval:
            return float("inf")
        return time.monotonic() + interval * (0.75 + self.rand() / 2)

    def _wait_for_work(self) -> None:
        while not self.pending:
            self.wake.clear()
            left = self._next_periodic - time.monotonic()
            if left <= 0:
                self._next_periodic = self._periodic_deadline()
                if self.kind is not PeerKind.FOREIGN:  # a periodic full push would cost too much
                    self.need_sync = True
                continue
            self.wake.wait(min(left, 3600.0))

    def _resolve(self) -> tuple[int, Any]:
        """The neighbor's socket address, looked up once (again after a failure).

        Links connect often (on demand), and gevent's resolver answers from a thread
        pool: a lookup per connection cost milliseconds on an idle link's first hop."""
        if self._sockaddr is None:
            family, _, _, _, address = socket.getaddrinfo(
                self.neighbor.host, self.neighbor.port, type=socket.SOCK_STREAM
            )[0]
            self._sockaddr = (family, address)
        return self._sockaddr

    def _connect(self, failures: int) -> socket.socket | None:
        sock = None
        try:
            family, address = self._resolve()
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.settimeout(self.settings.connect_timeout)
            sock.connect(address)
        except OSError as exc:
            if sock is not None:
                sock.close()
            self._sockaddr = None  # the name may point elsewhere by the next try
            if failures == 0:  # one line per outage, not one per retry
                self._event("link_retry", reason=_describe(exc))
            return None
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _mark_down(self, reason: str) -> None:
        """The link's state, not a connection's: logged once per change."""
        if self.up.is_set():  # a link never up (a neighbor not started yet) is not "lost"
            self._was_down = True
            self._event("link_down", reason=reason, level=self.log.warning)
        self.up.clear()

    def _mark_up(self) -> None:
        if not self.up.is_set():
            if self._was_down:
                self.recoveries += 1
                self._was_down = False
            address = f"{self.neighbor.host}:{self.neighbor.port}"
            self._event("link_up", address=address, herdserver=self.kind is PeerKind.HERDSERVER)
        self.up.set()

    def _event(self, event: str, level: Callable[..., None] | None = None, **values: object) -> None:
        """A change of the link: one log line, and one entry for the page's recent events."""
        (level or self.log.info)(event, neighbor=self.name, **values)
        self.events.add(time.time(), event, neighbor=self.name, **values)

    def state(self) -> LinkState:
        return LinkState(
            neighbor=self.name,
            address=f"{self.neighbor.host}:{self.neighbor.port}",
            up=self.up.is_set(),
            connected=self.connected,
            kind=self.kind,
            connections_made=self.links_made,
            recoveries=self.recoveries,
            lines_sent=self.lines_sent,
            bytes_sent=self.bytes_sent,
            syncs=self.syncs,
            full_pushes=self.full_pushes,
            queued=len(self.outbox),
        )

    def neighbor_left(self) -> None:
        """The neighbor said goodbye (it is stopping)."""
        self._mark_down("the neighbor stopped")

    def say_goodbye(self, timeout: float) -> None:
        """Tell a herdserver neighbor we are stopping, so it shows the link down at once
        (the link greenlet is already gone; this is its last connection)."""
        if self.kind is not PeerKind.HERDSERVER:
            return
        with gevent.Timeout(timeout, False):
            sock = self._connect(failures=1)  # quiet: a neighbor already gone is no news
            if sock is None:
                return
            try:
                with self._reading(sock) as reader:
                    self._hello(sock)
                    self._write(sock, b"BYE\n")
                    sock.shutdown(socket.SHUT_WR)
                    reader.join(timeout)  # until the neighbor closes: it has read the goodbye
            except (OSError, LinkDown):
                pass
            finally:
                sock.close()

    @contextmanager
    def _reading(self, sock: socket.socket) -> Iterator[Greenlet]:
        """A reader greenlet for one connection's answers, fresh queue, killed after."""
        self._replies = SimpleQueue()
        reader = gevent.spawn(self._read, sock)
        try:
            yield reader
        finally:
            reader.kill(block=False)

    def _session(self, sock: socket.socket) -> None:
        """One connection: hello, then send until ``link_idle`` s pass with nothing to send."""
        self.links_made += 1
        self.connected = True
        with self._reading(sock) as reader:
            self._hello(sock)
            self.log.info("link_open", neighbor=self.name, herdserver=self.kind is not PeerKind.FOREIGN)
            self._mark_up()
            while True:
                if reader.dead:
                    raise LinkDown("neighbor closed the connection")
                if self.outbox:
                    batch, self.outbox = self.outbox, {}
                    self._send(sock, list(batch.values()))
                elif self.need_sync:
                    self.need_sync = False
                    self._reconcile(sock)
                else:
                    self.wake.clear()
                    if not self.wake.wait(self.settings.link_idle) and not self.pending:
                        break  # idle: close; the next record opens a new connection
            self.log.info("link_idle", neighbor=self.name)
            sock.shutdown(socket.SHUT_WR)

    def _hello(self, sock: socket.socket) -> None:
        """Say who we are; learn whether the neighbor is a herdserver; with a secret,
        check its proof and send ours (the AT lines that follow need it)."""
        nonce = new_token().encode()
        me = self.me
        hello = b"HELLO %s %s %s %s" % (HELLO_VERSION, me, self.boot_id.encode(), nonce)
        if not self.secrets and self.kind is PeerKind.HERDSERVER:
            # A known herdserver, and no proof to wait for: the AT lines follow the hello
            # at once (the neighbor reads them in order), saving a round trip per
            # connection; the reader takes the answer when it comes.
            self._write(sock, hello + b"\n")
            return
        self._awaiting_hello = True  # its answer (HELLO, or "? HELLO ..." from another implementation) is next
        try:
            self._write(sock, hello + b"\n")
            reply = self._next_reply(self.settings.connect_timeout)
        finally:
            self._awaiting_hello = False
        if reply is None and self.kind is PeerKind.HERDSERVER:
            # A neighbor that has answered as a herdserver and is slow to answer now is
            # busy (or we are), not another implementation: taken for a foreign one, it
            # would get plain AT lines, refused without our proof, and no reconciliation.
            raise LinkDown("no answer to the hello")
        if reply is None or reply[0] == b"?":
            if self.kind is not PeerKind.FOREIGN:
                self.log.info("peer_foreign", neighbor=self.name)
            self.kind = PeerKind.FOREIGN  # another implementation: plain AT lines only
            return
        if reply[0] != b"HELLO" or len(reply) != 6 or reply[1] != HELLO_VERSION or reply[2] != self.name_bytes:
            raise LinkDown(f"unexpected hello answer {b' '.join(reply[:3])!r}")
        if self.secrets:
            their_nonce, their_proof = reply[4], reply[5]
            if not handshake.verify(self.secrets, their_proof, b"responder", me, self.name_bytes, nonce, their_nonce):
                self.log.error("auth_failed", neighbor=self.name, reason="the neighbor did not prove the secret")
                raise LinkDown("the neighbor did not prove the shared secret")
            ours = handshake.proof(self.secrets[0], b"initiator", me, self.name_bytes, nonce, their_nonce)
            self._write(sock, b"AUTH " + ours + b"\n")
        self.kind = PeerKind.HERDSERVER
        self._note_boot(reply[3])

    def _note_boot(self, boot_field: bytes) -> None:
        boot = boot_field.decode("ascii", "replace")
        if self.peer_boot is not None and boot != self.peer_boot:
            self.log.info("peer_restarted", neighbor=self.name)
        self.peer_boot = boot

    def _next_reply(self, timeout: float) -> list[bytes] | None:
        """The next non-AT line the neighbor sent (split), None on timeout."""
        try:
            item = self._replies.get(timeout=timeout)
        except Empty:
            return None
        if item is None:
            raise LinkDown("neighbor closed the connection")
        fields: list[bytes] = item
        return fields

    # -- reconciliation ------------------------------------------------------------------

    def _reconcile(self, sock: socket.socket) -> None:
        started = time.perf_counter()
        if self.kind is PeerKind.FOREIGN:
            lines = self.store.lines()
            for start in range(0, len(lines), SYNC_CHUNK_LINES):
                self._send(sock, lines[start : start + SYNC_CHUNK_LINES])
            self.full_pushes += 1
            self.log.info("sync", neighbor=self.name, kind="full", records=len(lines))
            return
        sent_before, received_before = self.sync_bytes_sent, self.sync_bytes_received
        self.digests.wait()  # after a large replay they take a moment
        reconciler = sync.Reconciler(self.store.levels)
        pushed = 0
        self._sync_write(sock, reconciler.start())
        while not reconciler.finished:
            reply = self._next_reply(self.settings.write_timeout)
            if reply is None:
                raise LinkDown("no answer to a sync question")
            command = sync.parse_sync(reply)
            if command is None:
                raise LinkDown(f"unexpected sync answer {b' '.join(reply[:3])!r}")
            if command.verb == b"HAVE":
                pulls = reconciler.on_have(command.level, command.numbers)
                self._sync_write(sock, pulls)
                if pulls:
                    # Ours for the same leaves; the neighbor keeps whichever is newer.
                    lines = list(self.store.lines_in(reconciler.differing_leaves))
                    pushed = len(lines)
                    self._sync_write(sock, lines)
            elif command.verb == b"DONE":
                reconciler.on_done()
            else:
                raise LinkDown(f"unexpected sync answer {command.verb!r}")
        self.syncs += 1
        self.log.info(
            "sync",
            neighbor=self.name,
            kind="digest",
            leaves=len(reconciler.differing_leaves),
            pushed=pushed,
            bytes_out=self.sync_bytes_sent - sent_before,
            bytes_in=self.sync_bytes_received - received_before,
            ms="%.1f" % ((time.perf_counter() - started) * 1000),
        )

    def _sync_write(self, sock: socket.socket, lines: list[bytes]) -> None:
        if lines:
            data = b"\n".join(lines) + b"\n"
            self.sync_bytes_sent += len(data)
            self._write(sock, data)

    # -- sending and reading -------------------------------------------------------------

    def _send(self, sock: socket.socket, lines: list[bytes]) -> None:
        if not lines:
            return
        data = b"\n".join(lines) + b"\n"
        self._write(sock, data)
        self.lines_sent += len(lines)
        self.bytes_sent += len(data)
        self.log.traffic("out", "neighbor", self.name, "line", lines)

    def _write(self, sock: socket.socket, data: bytes) -> None:
        sent = send_nowait(sock, data)  # nearly always all of it, and no timer to arm
        if sent < len(data):  # a full send buffer: wait for the neighbor, but not for ever
            with gevent.Timeout(self.settings.write_timeout, LinkDown("neighbor stopped reading")):
                sock.sendall(memoryview(data)[sent:])

    def _read(self, sock: socket.socket) -> None:
        """What the neighbor sends back: its hello, sync answers, and (in a
        reconciliation) the AT lines it has that we may lack."""
        splitter = LineSplitter(PEER_LINE_LIMIT)
        try:
            while True:
                data = sock.recv(65536)
                items = splitter.feed(data) if data else splitter.finish()
                self._take(items, len(data))
                if not data:
                    break
        except OSError:
            pass
        finally:
            self._replies.put(None)
            self.wake.set()  # let the sender notice the link is gone

    def _take(self, items: list[bytes | Overlong], size: int) -> None:
        if self.kind is PeerKind.HERDSERVER:
            self.sync_bytes_received += size
        stored = False
        for item in items:
            if isinstance(item, Overlong):
                self._event("peer_said", data=item.prefix, level=self.log.warning)
                continue
            fields = item.split()
            if not fields:
                continue
            if fields[0] == b"AT" and self.kind is PeerKind.HERDSERVER:
                msg = protocol.parse_fields(fields, item)
                if isinstance(msg, At):
                    self.log.traffic("in", "neighbor", self.name, "line", [item])
                    self.take_at(msg, item, self.name)
                    stored = True
                    continue
            if not self._awaiting_hello:
                if fields[0] == b"HELLO" and len(fields) == 6:  # the answer to a hello we did not wait for
                    self._note_boot(fields[3])
                    continue
                if fields[0] == b"?":
                    if fields[1:2] == [b"HELLO"]:  # replaced by another implementation
                        self.kind = PeerKind.FOREIGN
                        self.log.info("peer_foreign", neighbor=self.name)
                    else:
                        self._event("peer_said", data=item[:512], level=self.log.warning)
                    continue
            self._replies.put(fields)
        if stored:
            self.persist()


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


