"""One herd server: a gevent StreamServer, a greenlet per client, a forwarder per neighbor.

A client gets its greenlet when its bytes (or its EOF) arrive: until then it
is parked on an io watcher, so an idle connection costs a socket and a few small
objects (under 1 KB) instead of a greenlet and its stacks (about 9 KB). A client
that goes quiet for ``[limits] park_after`` seconds is parked again by a sweeper; the hot
path pays one flag per batch for it.

Everything protocol-shaped is delegated to ``protocol`` (pure); this module
only moves bytes between sockets, the store, the forwarders and Places.
"""

from __future__ import annotations

import errno
import itertools
import logging
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gevent
from gevent.event import Event
from gevent.greenlet import Greenlet
from gevent.pool import Group
from gevent.server import StreamServer

from . import http, logs, metrics, protocol
from .config import HerdConfig
from .peers import Forwarder
from .places import Provider, make_provider
from .protocol import At, IAmAt, Invalid, LineSplitter, Overlong, WhatsAt
from .sockets import recv_chunk, write_all
from .store import Store

LOG_FLUSH_SECONDS = 0.05  # short: each flush formats what came in since, holding the loop that long
MAX_PIPELINED_WHATSAT = 20  # Places calls in flight for one connection at once
REPLY_BUFFER_BYTES = 65536  # replies held for one connection before writing
# Errors that mean "the client went away": logged as a plain close, no traceback.
QUIET_ERRNOS = {errno.EPIPE, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT, errno.ENOTCONN}


class _Park(Exception):
    """Thrown into a handler waiting for bytes: hand the connection back to a watcher."""


@dataclass(slots=True, eq=False)
class Connection:
    """Per-client state; ``busy`` while a batch of commands is being answered.

    Parked: ``watcher`` (and ``timer`` with an idle timeout) wait for bytes.
    Served: ``greenlet`` runs the handler; ``waiting`` while it waits in recv,
    ``active`` once it got bytes since the sweeper last looked. The splitter
    (with any half-received line) survives parking.
    """

    id: int
    peer: str
    sock: Any = None
    busy: bool = False
    watcher: Any = None
    timer: Any = None
    greenlet: Greenlet | None = None
    splitter: LineSplitter | None = None
    waiting: bool = False
    active: bool = False
    last_bytes: float = 0.0  # time.monotonic() of the last bytes, for the idle timeout


@dataclass
class Stats:
    iamat: int = 0
    whatsat: int = 0
    at_received: int = 0
    at_stored: int = 0
    invalid: int = 0
    crashes: list[str] = field(default_factory=list)
    # -- read by metrics.py at scrape time (plain ints on the hot path, no prometheus calls) --
    at_bytes_in: int = 0  # bytes of AT lines received (their newline included)
    at_duplicate: int = 0  # AT lines dropped unparsed: byte-identical to the record held
    overlong: int = 0  # lines over max_line_bytes
    invalid_by: Counter[str] = field(default_factory=Counter)  # invalid commands by word (metrics.command_word)
    durations: dict[str, metrics.Histogram] = field(default_factory=metrics.command_histograms)
    places: metrics.PlacesStats = field(default_factory=metrics.PlacesStats)


class HerdServer:
    """Owns its listener, its greenlets and its log; can be started and stopped in-process."""

    def __init__(
        self,
        config: HerdConfig,
        name: str,
        *,
        listener: socket.socket | None = None,
        provider: Provider | None = None,
        clock: Callable[[], int] = time.time_ns,
    ):
        self.config = config
        self.me = config.server(name)
        self.name = name
        self.name_bytes = name.encode("utf-8")
        self.clock = clock
        self.limits = config.limits
        self.store = Store()
        self.stats = Stats()
        self.log = logs.setup(name, config.log_path(name), config.log_level)
        self.provider = provider if provider is not None else make_provider(config.places)
        self.forwarders = {
            neighbor: Forwarder(config.servers[neighbor], config.peers, self.store.lines, self.log)
            for neighbor in self.me.neighbors
        }
        self.connections: dict[int, Connection] = {}
        self._conn_ids = itertools.count(1)
        self._workers = Group()  # forwarders and the log flusher
        self._calls = Group()  # WHATSATs waiting on Places
        self._clients = Group()  # client handlers (parked connections have none)
        self._stopped = Event()
        self._stopping = False
        self._server = _ClientServer(
            self,
            listener if listener is not None else (self.me.host, self.me.port),
            self._park,
            backlog=None if listener is not None else 1024,
        )
        # observe: metrics, /status and the herd page on [server:X] http_port (None when it is 0)
        self.http = http.HttpFront(self) if self.me.http_port else None

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        return self._server.server_host, self._server.server_port

    def start(self) -> None:
        if self.http is not None:  # observe: first, so a taken http_port stops the start before anything runs
            self.http.start()
        self._server.start()
        self.log.info(
            "start",
            address="%s:%d" % self.address,
            neighbors=",".join(self.me.neighbors) or "-",
            provider=self.provider.name,
        )
        for forwarder in self.forwarders.values():
            self._spawn_worker(forwarder.run)
        self._spawn_worker(self._flush_logs)
        self._spawn_worker(self._park_quiet_clients)

    def _spawn_worker(self, func: Callable[[], None]) -> None:
        greenlet = self._workers.spawn(func)
        greenlet.link_exception(self._worker_died)

    def _worker_died(self, greenlet: Greenlet) -> None:
        # Long-lived greenlets never end by themselves: a death is a bug, made loud.
        self.stats.crashes.append(repr(greenlet.exception))
        self.log.error("worker_crashed", worker=str(greenlet), error=repr(greenlet.exception))

    def serve_forever(self) -> None:
        self.start()
        self._stopped.wait()

    def stop(self, grace: float | None = None) -> None:
        """Graceful stop: refuse new clients, drop idle ones, let busy ones finish."""
        if self._stopped.is_set():
            return
        grace = self.limits.shutdown_grace if grace is None else grace
        self._stopping = True
        self._server.close()
        for conn in list(self.connections.values()):
            if conn.watcher is not None:
                self._unpark(conn)
                self._close(conn, "server_stop")
            elif conn.greenlet is not None and not conn.busy:
                conn.greenlet.kill(block=False)
        self._clients.join(timeout=grace)
        self._clients.kill(timeout=1)
        self._calls.kill(timeout=1)
        self._workers.kill(timeout=1)
        if self.http is not None:  # observe
            self.http.stop()
        self.provider.close()
        self.log.info("stop", clients_left=len(self.connections), records=len(self.store))
        self.log.close()
        self._stopped.set()

    def _flush_logs(self) -> None:
        while True:
            gevent.sleep(LOG_FLUSH_SECONDS)
            self.log.flush()

    # -- one client connection -----------------------------------------------------------

    def _park(self, sock: socket.socket, address: Any) -> None:
        """A new client (in the hub, from the accept loop): wait for its first bytes."""
        conn = Connection(next(self._conn_ids), _format_address(address), sock, last_bytes=time.monotonic())
        self.connections[conn.id] = conn
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass  # already reset by the client: the watcher sees it at once, the handler closes it
        self.log.info("open", conn=conn.id, peer=conn.peer)
        self._watch(conn)

    def _watch(self, conn: Connection) -> None:
        loop = gevent.get_hub().loop
        conn.watcher = loop.io(conn.sock.fileno(), 1)
        conn.watcher.start(self._wake, conn)
        if self.limits.idle_timeout:
            # What is left of the idle time: parking again does not restart the clock.
            left = self.limits.idle_timeout - (time.monotonic() - conn.last_bytes)
            conn.timer = loop.timer(max(0.0, left))
            conn.timer.start(self._idle_parked, conn)

    def _unpark(self, conn: Connection) -> None:
        conn.watcher.close()
        conn.watcher = None
        if conn.timer is not None:
            conn.timer.close()
            conn.timer = None

    def _wake(self, conn: Connection) -> None:
        """The parked client sent something (or closed): its handler takes over."""
        self._unpark(conn)
        self._clients.spawn(self._handle, conn)

    def _idle_parked(self, conn: Connection) -> None:
        self._unpark(conn)
        self.log.info("idle_timeout", conn=conn.id)
        self._close(conn, "eof")

    def _close(self, conn: Connection, reason: str) -> None:
        self.connections.pop(conn.id, None)
        self.log.info("close", conn=conn.id, reason=reason)
        conn.sock.close()
        self._server.resume()

    def _park_quiet_clients(self) -> None:
        """Every ``park_after`` s: park handlers that waited for bytes all along
        (so a client is parked after one to two periods of quiet)."""
        hub = gevent.get_hub()
        while True:
            gevent.sleep(self.limits.park_after)
            for conn in list(self.connections.values()):
                if conn.waiting and not conn.active:
                    hub.loop.run_callback(self._park_now, conn)
                conn.active = False

    def _park_now(self, conn: Connection) -> None:
        # In the hub. Checked again here: the handler may have woken up since the
        # sweep; if it still waits in recv, _Park lands there and no bytes are lost
        # (they stay in the kernel until the watcher sees them).
        if conn.waiting and not conn.active and conn.greenlet is not None and not self._stopping:
            conn.greenlet.throw(_Park)

    def _handle(self, conn: Connection) -> None:
        sock = conn.sock
        conn.greenlet = gevent.getcurrent()
        reason = "eof"
        parked = False
        try:
            if self._stopping:
                raise gevent.GreenletExit
            parked = self._serve(sock, conn)
        except OSError as exc:
            reason = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
            if exc.errno not in QUIET_ERRNOS:
                self.log.exception("connection_error", conn=conn.id)
        except gevent.GreenletExit:
            reason = "server_stop"
            raise
        except Exception as exc:  # a bug: log it loudly, keep serving everyone else
            reason = "crash"
            self.stats.crashes.append(repr(exc))
            self.log.exception("connection_crashed", conn=conn.id)
        finally:
            conn.greenlet = None
            if parked and not self._stopping:
                self._watch(conn)
            else:
                self._close(conn, "server_stop" if parked else reason)

    def _serve(self, sock: socket.socket, conn: Connection) -> bool:
        """Answer the client until EOF (False) or until the sweeper parks it (True)."""
        if conn.splitter is None:
            conn.splitter = LineSplitter(self.limits.max_line_bytes)
        splitter = conn.splitter
        idle = self.limits.idle_timeout or None
        while True:
            conn.waiting = True
            try:
                data = recv_chunk(sock, idle)
            except _Park:
                return True
            finally:
                conn.waiting = False
            conn.active = True
            if idle:
                conn.last_bytes = time.monotonic()
            if data is None:
                self.log.info("idle_timeout", conn=conn.id)
                return False
            items = splitter.feed(data) if data else splitter.finish()
            if items:
                conn.busy = True
                self._answer(sock, items, conn)
                conn.busy = False
            if not data:
                return False  # EOF: everything owed has been written

    def _answer(self, sock: socket.socket, items: list[bytes | Overlong], conn: Connection) -> None:
        """Reply to a batch of lines in order; the batch's Places calls overlap.

        Replies are written as soon as those before them are ready, and no more
        than MAX_PIPELINED_WHATSAT calls or REPLY_BUFFER_BYTES wait at once: a
        client pipelining thousands of WHATSATs and reading nothing is held back
        by its own TCP window, not by the server's memory.
        """
        self._log_in(items, conn)
        pending: list[bytes | Greenlet] = []
        in_flight = buffered = 0
        for item in items:
            reply = self._dispatch(item, conn)
            if reply is None:
                continue
            pending.append(reply)
            if isinstance(reply, bytes):
                buffered += len(reply)
            else:
                in_flight += 1
            if in_flight >= MAX_PIPELINED_WHATSAT or buffered >= REPLY_BUFFER_BYTES:
                self._write_replies(sock, pending, conn)
                pending, in_flight, buffered = [], 0, 0
        if pending:
            self._write_replies(sock, pending, conn)

    def _log_in(self, items: list[bytes | Overlong], conn: Connection) -> None:
        """Every non-blank line of one read, in order (an over-long one by its first bytes)."""
        lines: list[bytes] = []
        for item in items:
            if isinstance(item, Overlong):
                self.log.traffic("in", "conn", conn.id, "line", lines)
                self.log.traffic("in", "conn", conn.id, "overlong", [item.prefix])
                lines = []
            elif item and not item.isspace():  # bytes.isspace: the spec's six white-space bytes
                lines.append(item)
        self.log.traffic("in", "conn", conn.id, "line", lines)

    def _write_replies(self, sock: socket.socket, pending: list[bytes | Greenlet], conn: Connection) -> None:
        """Write replies in command order, waiting for Places calls as they come."""
        replies = [reply if isinstance(reply, bytes) else reply.get() for reply in pending]
        write_all(sock, b"".join(replies))
        self.log.replies(conn.id, replies)  # observe: WHATSAT JSON whole only at DEBUG (was log.traffic("out", ...))

    def _dispatch(self, item: bytes | Overlong, conn: Connection) -> bytes | Greenlet | None:
        if isinstance(item, Overlong):
            self.stats.invalid += 1
            self.stats.overlong += 1  # observe
            self.stats.invalid_by["other"] += 1  # observe
            return protocol.overlong_reply(item)
        fields = item.split()
        if not fields:
            return None  # blank: no reply
        echo = protocol.at_identity(fields) if fields[0] == b"AT" else None
        if echo is not None and self.store.holds(*echo):
            # Flooding brings most AT lines to a server twice; the second copy is
            # byte-identical to what it holds, so it is dropped without a parse.
            self.stats.at_received += 1
            self.stats.at_duplicate += 1  # observe
            self.stats.at_bytes_in += len(item) + 1  # observe
            if self.log.level <= logging.DEBUG:  # no kwargs dict on the hot path at INFO
                self.log.debug("at_dropped", conn=conn.id, client=echo[0])
            return None
        started = time.perf_counter()  # observe: herd_command_duration_seconds
        msg = protocol.parse_fields(fields, item)
        if isinstance(msg, IAmAt):
            reply = self._iamat(msg)
            self.stats.durations["IAMAT"].observe(time.perf_counter() - started)  # observe
            return reply
        if isinstance(msg, At):
            self.stats.at_bytes_in += len(item) + 1  # observe
            self._at(msg, conn)
            self.stats.durations["AT"].observe(time.perf_counter() - started)  # observe
            return None
        if isinstance(msg, WhatsAt):
            record = self.store.get(msg.client)
            if record is not None:
                self.stats.whatsat += 1
                return self._calls.spawn(self._whatsat, msg, record)
            msg = Invalid(item.strip(), "unknown client")
        self.stats.invalid += 1
        self.stats.invalid_by[metrics.command_word(fields[0])] += 1  # observe
        self.log.info("invalid", conn=conn.id, reason=msg.reason)
        return protocol.format_invalid(msg.line)

    # -- the three commands ------------------------------------------------------------

    def _iamat(self, msg: IAmAt) -> bytes:
        self.stats.iamat += 1
        record = protocol.make_at(self.name_bytes, msg, self.clock())
        if self.store.offer(record):
            self._flood(record)
        return record.line + b"\n"

    def _at(self, msg: At, conn: Connection) -> None:
        self.stats.at_received += 1
        if self.store.offer(msg):
            self.stats.at_stored += 1
            self._flood(msg)
        else:
            self.log.debug("at_dropped", conn=conn.id, client=msg.client)

    def _flood(self, record: At) -> None:
        # Not back to the server that made the record: it holds it, or (restarted
        # and empty) gets it in the full sync when its links come up.
        for forwarder in self.forwarders.values():
            if forwarder.name_bytes != record.server:
                forwarder.offer(record.client, record.line)

    def _whatsat(self, msg: WhatsAt, record: At) -> bytes:
        started = time.perf_counter()  # observe
        payload = self.places_call(record, msg.radius_m, msg.bound)
        reply = protocol.format_whatsat_reply(record.line, payload)
        self.stats.durations["WHATSAT"].observe(time.perf_counter() - started)  # observe
        return reply

    def places_call(self, record: At, radius_m: float, bound: int) -> dict[str, Any]:
        """Ask the provider; whatever happens, a payload in the legacy shape comes back."""
        started = time.perf_counter()
        # The provider has its own HTTP timeouts; this bounds the whole call as well
        # (a server that trickles bytes resets a per-read timeout forever).
        deadline = self.config.places.timeout * 2 + 1
        payload: dict[str, Any] | None = None
        try:
            with gevent.Timeout(deadline, False):
                payload = self.provider.nearby(record.location.lat, record.location.lon, radius_m, bound)
        except Exception:
            self.log.exception("places_crashed", provider=self.provider.name)
            payload = protocol.places_error("UNKNOWN_ERROR", "internal error while asking Places")
        if payload is None:
            payload = protocol.places_error("UNKNOWN_ERROR", f"Places did not answer within {deadline:g} s")
        payload = protocol.cut_results(payload, bound)
        elapsed = time.perf_counter() - started
        self.stats.places.observe(self.provider.name, str(payload.get("status")), elapsed)  # observe
        self.log.info(
            "places",
            provider=self.provider.name,
            status=payload.get("status"),
            results=len(payload.get("results") or []),
            ms="%.1f" % (elapsed * 1000),
        )
        return payload


class _ClientServer(StreamServer):  # type: ignore[misc]  # gevent has no type stubs
    """Hands each accepted socket to ``HerdServer._park`` in the accept loop (no greenlet
    yet) and stops accepting while ``max_connections`` clients are open (the rest wait
    in the accept queue)."""

    def __init__(self, herd: HerdServer, listener: Any, park: Callable[[Any, Any], None], **kwargs: Any):
        super().__init__(listener, park, **kwargs)
        self.herd = herd
        self.paused = False

    def do_handle(self, *args: Any) -> None:
        try:
            self._handle(*args)
        except BaseException:
            self.do_close(*args)
            raise

    def full(self) -> bool:
        self.paused = len(self.herd.connections) >= self.herd.limits.max_connections
        return self.paused

    def resume(self) -> None:
        if self.paused and self.started:
            self.paused = False
            self.start_accepting()


def _format_address(address: Any) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address)
