"""One link per neighbor: a persistent, authenticated connection to its herd port.

A herdserver neighbor is reached on its herd port (never on its client port), over
one connection kept open for good: ``lsof -ti:PORT | xargs kill`` on a server's client
port then never finds a neighbor's socket, and an update crosses a link as one write,
with no connect, no hello and no idle timer. The connection opens with the handshake
(``core.handshake``): nothing else moves until both ends have proven the secret. Then
the link carries our AT lines, our reconciliation questions (``SYNC``) and, when we
stop, ``BYE``; the neighbor answers only our questions. Its own records come to us
over its own link to our herd port (``responder.py``).

An IAMAT's AT line is written to every live link before the client's reply goes out:
the first record offered to a live link in a turn of the event loop schedules a loop
callback that writes everything offered in that turn at once, and the dispatcher lets
those callbacks run before it writes a reply. A client that has its reply finds the
record at a neighbor it asks next; a flood relayed through a server costs it one
write per link, with no wake-up of the link's own greenlet.

The outbox is a dict of the latest AT line per client, not a FIFO of every update:
while a neighbor is down, memory is bounded by the number of clients.

A neighbor configured as another implementation (``foreign = yes``) gets a
``ForeignLink``: plain AT lines on its client port, over connections opened when there
is something to send and closed after ``[peers] link_idle`` seconds, and a full push of
every record at start and after an outage. While its connection is open, it is written
before replies like a herdserver link (the same outbox, callback and pending bytes).
"""

from __future__ import annotations

import os
import random
import socket
import time
from collections.abc import Callable
from typing import Any

import gevent
from gevent.event import Event
from gevent.greenlet import Greenlet
from gevent.lock import Semaphore
from gevent.queue import Empty, SimpleQueue

from ..config import PeerSettings, ServerConfig
from ..core import sync
from ..core.handshake import InitiatorHandshake
from ..core.protocol import Overlong
from ..core.status import LinkState, PeerKind, RecentEvents
from ..core.store import Store
from ..logs import EventLog
from .lines import LineReader
from .sockets import send_nowait

SYNC_CHUNK_LINES = 4096  # a full push of a large table goes out in bounded writes
PEER_LINE_LIMIT = 1 << 20  # lines a neighbor sends back (sync answers) are short
MAX_CONCURRENT_SYNCS = 2  # digest reconciliations one server runs at once (a restart syncs with every neighbor)

# A line a neighbor sent us: (the line, its fields, the neighbor's name) -> stored?
TakeLine = Callable[[bytes, list[bytes], str], bool]


class LinkDown(Exception):
    """The neighbor closed the connection, stopped reading, failed the proof or broke the protocol."""


def new_token() -> str:
    return os.urandom(8).hex()


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class _LinkBase:
    """What every kind of link shares: outbox, state, events, counters, backoff, connect."""

    kind = PeerKind.UNKNOWN

    def __init__(
        self,
        neighbor: ServerConfig,
        settings: PeerSettings,
        store: Store,
        persist: Callable[[], None],
        log: EventLog,
        events: RecentEvents,
        rand: Callable[[], float] = random.random,
    ):
        self.neighbor = neighbor
        self.name = neighbor.name
        self.settings = settings
        self.store = store
        self.persist = persist
        self.log = log
        self.events = events
        self.rand = rand
        self.outbox: dict[bytes, bytes] = {}
        self.wake = Event()
        self.seen = Event()  # the neighbor proved itself on our herd port: a retry need not wait out its backoff
        self.up = Event()  # set while the link works
        self.need_sync = True  # a reconciliation is due (at start: yes)
        self.connected = False
        self.lines_sent = 0
        self.links_made = 0  # connections opened
        self.recoveries = 0  # times the link came back up after being down
        self.bytes_sent = 0
        self.syncs = 0
        self.full_pushes = 0
        self.sync_bytes_sent = 0
        self.sync_bytes_received = 0
        self.auth_failures = 0
        self._was_down = False
        self._sockaddr: tuple[int, Any] | None = None
        # Floods before replies: set while the link can take a write (a herdserver link once
        # its handshake is done), so a loop callback writes what was offered in a turn.
        self.sock: socket.socket | None = None
        self._pending = b""  # bytes flush_now could not write at once; the link greenlet finishes them
        self._writing = False  # the link greenlet is inside a blocking write: flush_now must not interleave
        self._loop = gevent.get_hub().loop
        self._flush_scheduled = False  # a loop callback will write the outbox in this turn

    # -- called from the server's greenlets -------------------------------------------

    def offer(self, client: bytes, line: bytes) -> None:
        """Queue the latest line for ``client``. On a connected, idle link (a herdserver
        link once its handshake is done) it is written by a loop callback at the end of
        this turn, with everything else offered in it; otherwise the link greenlet sends
        it when it can."""
        self.outbox[client] = line
        if self.sock is None or self._writing or self._pending:
            self.wake.set()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.run_callback(self._scheduled_flush)

    def has_queued(self) -> bool:
        """Records that a loop callback will write in this turn (a reply waits for them)."""
        return self._flush_scheduled

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        self.flush_now()

    def flush_now(self) -> None:
        """Write the outbox to the socket now if the link is connected and idle; what the
        kernel does not take at once, or what cannot be written now, is left to the link
        greenlet."""
        sock = self.sock
        if not self.outbox:
            return
        if sock is None or self._writing or self._pending:
            self.wake.set()
            return
        lines = list(self.outbox.values())
        self.outbox = {}
        data = b"\n".join(lines) + b"\n"
        try:
            sent = send_nowait(sock, data)
        except OSError:
            sent = 0  # the link greenlet finds the broken socket when it writes the rest
        if sent < len(data):
            self._pending = data[sent:]
            self.wake.set()
        self._count_sent(lines, len(data))

    def _send_queued(self, sock: socket.socket) -> None:
        lines = list(self.outbox.values())
        self.outbox = {}
        self._send_lines(sock, lines)

    def _send_lines(self, sock: socket.socket, lines: list[bytes]) -> None:
        """AT lines (counted and logged as sent) in one blocking write."""
        data = b""
        if lines:
            data = b"\n".join(lines) + b"\n"
            self._count_sent(lines, len(data))
        self._blocking_write(sock, data)

    def _blocking_write(self, sock: socket.socket, data: bytes) -> None:
        """``data`` after whatever flush_now left unwritten (so lines keep their order),
        waiting for the neighbor to read; flush_now writes nothing meanwhile."""
        data, self._pending = self._pending + data, b""
        self._writing = True
        try:
            self._write(sock, data)
        finally:
            self._writing = False

    def peer_seen(self) -> None:
        """The neighbor proved itself on our herd port: it is up, retry at once."""
        self.seen.set()

    def neighbor_left(self) -> None:
        """The neighbor said goodbye (it is stopping)."""
        self._mark_down("the neighbor stopped")

    def say_goodbye(self, timeout: float) -> None:
        """Tell the neighbor we are stopping (a herdserver link only)."""

    def state(self) -> LinkState:
        return LinkState(
            neighbor=self.name,
            address=f"{self.neighbor.host}:{self.neighbor.link_port}",
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
            auth_failures=self.auth_failures,
        )

    # -- state changes -------------------------------------------------------------------

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
            address = f"{self.neighbor.host}:{self.neighbor.link_port}"
            self._event("link_up", address=address, herdserver=self.kind is PeerKind.HERDSERVER)
        self.up.set()

    def _event(self, event: str, level: Callable[..., None] | None = None, **values: object) -> None:
        """A change of the link: one log line, and one entry for the page's recent events."""
        (level or self.log.info)(event, neighbor=self.name, **values)
        self.events.add(time.time(), event, neighbor=self.name, **values)

    # -- connecting ------------------------------------------------------------------------

    def _back_off(self, delay: float) -> float:
        """Wait ``delay`` with full jitter in [delay/2, delay) (restarted herds do not
        reconnect in lockstep), cut short when the neighbor proves itself on our herd
        port (it is back); the next delay."""
        self.seen.clear()
        self.seen.wait(delay * (0.5 + self.rand() / 2))
        return min(delay * 2, self.settings.backoff_max)

    def _resolve(self) -> tuple[int, Any]:
        """The neighbor's socket address, looked up once (again after a failure)."""
        if self._sockaddr is None:
            family, _, _, _, address = socket.getaddrinfo(
                self.neighbor.host, self.neighbor.link_port, type=socket.SOCK_STREAM
            )[0]
            self._sockaddr = (family, address)
        return self._sockaddr

    def _connect(self, quiet: bool) -> socket.socket | None:
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
            if not quiet:  # one line per outage, not one per retry
                self._event("link_retry", reason=describe(exc))
            return None
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.links_made += 1
        return sock

    def _connect_or_back_off(self, failures: int, delay: float) -> tuple[socket.socket | None, int, float]:
        """A connection, or (after a failed connect) None once the backoff has been waited out;
        the failures so far and the next delay."""
        sock = self._connect(quiet=failures > 0)
        if sock is None:
            self._mark_down("connect failed")
            return None, failures + 1, self._back_off(delay)
        return sock, failures, delay

    def _write(self, sock: socket.socket, data: bytes) -> None:
        sent = send_nowait(sock, data)  # nearly always all of it, and no timer to arm
        if sent < len(data):  # a full send buffer: wait for the neighbor, but not for ever
            with gevent.Timeout(self.settings.write_timeout, LinkDown("neighbor stopped reading")):
                sock.sendall(memoryview(data)[sent:])

    def _count_sent(self, lines: list[bytes], size: int) -> None:
        self.lines_sent += len(lines)
        self.bytes_sent += size
        self.log.traffic("out", "neighbor", self.name, "line", lines)

    def _periodic_deadline(self) -> float:
        interval = self.settings.sync_interval
        if not interval:
            return float("inf")
        return time.monotonic() + interval * (0.75 + self.rand() / 2)


class Link(_LinkBase):
    """A herdserver neighbor: one persistent, proven connection to its herd port."""

    kind = PeerKind.HERDSERVER

    def __init__(
        self,
        neighbor: ServerConfig,
        settings: PeerSettings,
        me: bytes,
        store: Store,
        digests: Event,
        take_line: TakeLine,
        persist: Callable[[], None],
        log: EventLog,
        events: RecentEvents,
        boot_id: str,
        secrets: tuple[bytes, ...],
        sync_slots: Semaphore,
        rand: Callable[[], float] = random.random,
    ):
        super().__init__(neighbor, settings, store, persist, log, events, rand)
        self.me = me
        self.name_bytes = neighbor.name.encode("utf-8")
        self.digests = digests
        self.take_line = take_line
        self.boot_id = boot_id.encode("ascii")
        self.secrets = secrets
        self.sync_slots = sync_slots
        self.peer_boot: bytes | None = None
        self._established = False  # the current connection passed the handshake
        self._replies: SimpleQueue[Any] = SimpleQueue()
        self._next_periodic = self._periodic_deadline()

    # -- the link greenlet ---------------------------------------------------------------

    def run(self) -> None:
        delay = self.settings.backoff_initial
        failures = 0
        while True:
            sock, failures, delay = self._connect_or_back_off(failures, delay)
            if sock is None:
                continue
            self._established = False
            try:
                self._session(sock)
            except (OSError, LinkDown, gevent.Timeout) as exc:
                self._mark_down(describe(exc))
            finally:
                self._close(sock)
            if self._established:  # it worked until it broke: retry soon, not at the last backoff
                delay = self.settings.backoff_initial
            failures = 1
            # Whatever was in flight may be lost with the connection: reconcile at the next link-up.
            self.need_sync = True
            delay = self._back_off(delay)

    def _close(self, sock: socket.socket) -> None:
        self.sock = None
        self.connected = False
        self._pending = b""
        sock.close()

    def _session(self, sock: socket.socket) -> None:
        """One connection: the handshake, then send until it breaks."""
        self.connected = True
        reader = LineReader(sock, PEER_LINE_LIMIT)
        self._handshake(sock, reader)
        self._established = True
        self._replies = SimpleQueue()
        listener = gevent.spawn(self._read, reader)
        try:
            self.sock = sock
            self._mark_up()
            self.need_sync = True
            self._serve(sock, listener)
        finally:
            listener.kill(block=False)

    def _handshake(self, sock: socket.socket, reader: LineReader) -> None:
        shake = InitiatorHandshake(self.secrets, self.me, self.name_bytes, self.boot_id, new_token().encode())
        self._write(sock, shake.hello())
        deadline = time.monotonic() + self.settings.connect_timeout
        while True:
            line = reader.next_line(max(0.0, deadline - time.monotonic()))
            if line is None or isinstance(line, Overlong):
                raise LinkDown("no answer to the hello" if not reader.eof else "closed during the handshake")
            step = shake.receive(line)
            if step.failure:
                self.auth_failures += 1
                self.log.error("auth_failed", neighbor=self.name, reason=step.failure)
                raise LinkDown(step.failure)
            if step.send:
                self._write(sock, step.send)
            if step.established:
                self._note_boot(shake.peer_boot)
                return

    def _note_boot(self, boot: bytes) -> None:
        if self.peer_boot is not None and boot != self.peer_boot:
            self.log.info("peer_restarted", neighbor=self.name)
        self.peer_boot = boot

    def _serve(self, sock: socket.socket, listener: Greenlet) -> None:
        while True:
            if listener.dead:
                raise LinkDown("neighbor closed the connection")
            if self._pending or self.outbox:
                self._send_queued(sock)
            elif self.need_sync:
                self.need_sync = False
                with self.sync_slots:
                    self._reconcile(sock)
            else:
                self.wake.clear()
                left = self._next_periodic - time.monotonic()
                if left <= 0:
                    self._next_periodic = self._periodic_deadline()
                    self.need_sync = True
                    continue
                self.wake.wait(min(left, 3600.0))

    def say_goodbye(self, timeout: float) -> None:
        """Tell the neighbor we are stopping, so it shows the link down at once."""
        sock = self.sock
        if sock is None:
            return
        with gevent.Timeout(timeout, False):
            try:
                self._blocking_write(sock, b"BYE\n")
                sock.shutdown(socket.SHUT_WR)
            except (OSError, LinkDown):
                pass

    # -- reconciliation ------------------------------------------------------------------

    def _reconcile(self, sock: socket.socket) -> None:
        started = time.perf_counter()
        sent_before, received_before = self.sync_bytes_sent, self.sync_bytes_received
        self.digests.wait()  # after a large replay they take a moment
        reconciler = sync.Reconciler(self.store.levels)
        pushed = 0
        self._sync_write(sock, reconciler.start())
        while not reconciler.finished:
            reply = self._next_reply(self.settings.write_timeout)
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
        for start in range(0, len(lines), SYNC_CHUNK_LINES):
            data = b"\n".join(lines[start : start + SYNC_CHUNK_LINES]) + b"\n"
            self.sync_bytes_sent += len(data)
            self._blocking_write(sock, data)

    def _next_reply(self, timeout: float) -> list[bytes]:
        """The next sync answer the neighbor sent (split)."""
        try:
            item = self._replies.get(timeout=timeout)
        except Empty:
            raise LinkDown("no answer to a sync question") from None
        if item is None:
            raise LinkDown("neighbor closed the connection")
        fields: list[bytes] = item
        return fields

    def _read(self, reader: LineReader) -> None:
        """What the neighbor sends back: sync answers, and the AT lines of a PULL's answer."""
        try:
            while True:
                before = reader.bytes_read
                items = reader.read_some()
                self.sync_bytes_received += reader.bytes_read - before
                if not items and reader.eof:
                    break
                self._take(items)
        except OSError:
            pass
        finally:
            self._replies.put(None)
            self.wake.set()  # let the sender notice the link is gone

    def _take(self, items: list[bytes | Overlong]) -> None:
        stored = False
        for item in items:
            if isinstance(item, Overlong):
                self._event("peer_said", data=item.prefix, level=self.log.warning)
                continue
            fields = item.split()
            if not fields:
                continue
            if fields[0] == b"AT":
                stored = self.take_line(item, fields, self.name) or stored
            else:
                self._replies.put(fields)
        if stored:
            self.persist()


class ForeignLink(_LinkBase):
    """Another implementation: plain AT lines on its client port, connections on demand."""

    kind = PeerKind.FOREIGN

    def run(self) -> None:
        delay = self.settings.backoff_initial
        failures = 0
        while True:
            self._wait_for_work()
            sock, failures, delay = self._connect_or_back_off(failures, delay)
            if sock is None:
                continue
            if failures:
                self.need_sync = True  # an outage ended: a full push brings it up to date
            failures = 0
            try:
                self._session(sock)
                delay = self.settings.backoff_initial
            except (OSError, LinkDown, gevent.Timeout) as exc:
                self._mark_down(describe(exc))
                failures = 1
                self.need_sync = True
            finally:
                self.connected = False
                sock.close()
            if failures:
                delay = self._back_off(delay)

    def _wait_for_work(self) -> None:
        while not (self.outbox or self.need_sync):
            self.wake.clear()
            self.wake.wait(3600.0)

    def _session(self, sock: socket.socket) -> None:
        """Send until ``link_idle`` s pass with nothing to send; what it says back is logged.
        While the connection is open, an IAMAT's AT line is written to it before the reply
        (``flush_now``), as on a herdserver link."""
        self.connected = True
        listener = gevent.spawn(self._read, sock)
        try:
            self._mark_up()
            self.sock = sock
            while True:
                if listener.dead:
                    raise LinkDown("neighbor closed the connection")
                if self.need_sync:
                    self.need_sync = False
                    self._push_everything(sock)
                elif self.outbox or self._pending:
                    self._send_queued(sock)
                else:
                    self.wake.clear()
                    if not self.wake.wait(self.settings.link_idle) and not (self.outbox or self._pending):
                        break  # idle: close; the next record opens a new connection
            sock.shutdown(socket.SHUT_WR)  # no switch since the check above: nothing was offered meanwhile
        finally:
            self.sock = None
            self._pending = b""  # a broken connection: run() pushes everything at the next one
            listener.kill(block=False)

    def _push_everything(self, sock: socket.socket) -> None:
        lines = self.store.lines()
        for start in range(0, len(lines), SYNC_CHUNK_LINES):
            self._send_lines(sock, lines[start : start + SYNC_CHUNK_LINES])
        self.full_pushes += 1
        self.log.info("sync", neighbor=self.name, kind="full", records=len(lines))

    def _read(self, sock: socket.socket) -> None:
        """A foreign server may answer our AT lines (``? ...``): logged, never obeyed."""
        reader = LineReader(sock, 4096)
        try:
            while True:
                items = reader.read_some()
                if not items and reader.eof:
                    return
                for item in items:
                    said = item.prefix if isinstance(item, Overlong) else item[:512]
                    if said.strip():
                        self._event("peer_said", data=said, level=self.log.warning)
        except OSError:
            return
