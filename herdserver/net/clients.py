"""The client connection machinery: accept, park, bounded reads, ordered replies.

A client gets its greenlet when its bytes (or its EOF) arrive: until then it
is parked on an io watcher, so an idle connection costs a socket and a few small
objects (under 1 KB) instead of a greenlet and its stacks (about 9 KB). A client
that goes quiet for ``[limits] park_after`` seconds is parked again by a sweeper; the hot
path pays one flag per batch for it.

What a line *does* is ``commands.Commands``' business; this module only moves bytes.
"""

from __future__ import annotations

import errno
import itertools
import socket
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gevent
from gevent.event import Event
from gevent.greenlet import Greenlet
from gevent.pool import Group
from gevent.server import StreamServer

from ..config import Limits
from ..core.limits import evictable, read_deadline
from ..core.protocol import LineSplitter, Overlong
from ..core.trust import canonical_ip
from ..logs import EventLog
from .commands import Commands
from .sockets import RECV_BYTES, send_nowait, unsent

MAX_PIPELINED_WHATSAT = 20  # Places calls in flight for one connection at once
# WHATSATs of one read that ask Places at once; the rest share whatsat.DEEP_LANE_CALLS, and
# so does all of the next read of a connection whose last read went past it (a pipeline).
FAST_PER_BATCH = 4
REPLY_BUFFER_BYTES = 65536  # replies held for one connection before writing
# Replies a client has not taken yet, as the kernel's send queue counts them (written,
# not acknowledged), past which it gets no more Places calls until it reads.
UNREAD_BOUND = 64 << 10
DRAIN_POLL_SECONDS = 0.01
SWEEP_SECONDS = 1.0  # how often the sweeper looks for clients past their deadlines
# The kernel's buffers per client, fixed (no autotuning up to tens of megabytes):
# with REPLY_BUFFER_BYTES they bound what a client that reads nothing can leave
# queued, and what a client that pipelines without end can have waiting unread.
# Set on the listener, so accepted sockets inherit them with no syscall each.
CLIENT_SNDBUF = 128 << 10
CLIENT_RCVBUF = 64 << 10
# Errors that mean "the client went away": logged as a plain close, no traceback.
QUIET_ERRNOS = {errno.EPIPE, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT, errno.ENOTCONN}
# close_after_reply: after the FIN, what the client still sends is read and dropped
# until it closes, for at most this long and this much, so that closing with unread
# bytes does not reset the connection (which can destroy the reply before it is read).
LINGER_SECONDS = 1.0
LINGER_BYTES = 1 << 16


class _Park(Exception):
    """Thrown into a handler waiting for bytes: hand the connection back to a watcher."""


class _Done(Exception):
    """The server ends this connection, for ``reason``: a timeout, ``close_after_reply``,
    or, the quietest of a full server, it makes room for a newcomer (``evicted``)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


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
    last_command: float = 0.0  # time.monotonic() of the last complete command (idle timeout)
    line_started: float | None = None  # when the unfinished line's first byte came (line timeout)
    ip: str = ""
    may_send_at: bool = False  # a foreign neighbor's address, or one in [peers] trusted
    pipelining: bool = False  # its last read with WHATSATs had more than FAST_PER_BATCH


class ClientPort:
    """The listening port and every client connection on it."""

    def __init__(
        self,
        commands: Commands,
        limits: Limits,
        log: EventLog,
        listener: Any,
        backlog: int | None,
        max_connections: int,
    ):
        self.commands = commands
        self.max_connections = max_connections
        self.per_ip: dict[str, int] = {}
        self.refused = 0
        self.evicted = 0  # quiet connections closed to make room for a newcomer
        self.dropped_slow = 0
        self.held_back = 0  # times a client that did not read was made to wait
        self.stats = commands.stats
        self.limits = limits
        self.log = log
        # Oldest complete command first (a connection moves to the end on each batch with
        # a command): the front is what a full server closes to make room.
        self.connections: OrderedDict[int, Connection] = OrderedDict()
        self._clients_present = Event()  # set while a client is connected: the sweeper sleeps without one
        self._conn_ids = itertools.count(1)
        self.handlers = Group()  # client handlers (parked connections have none)
        self.stopping = False
        self._server = _ClientServer(self, listener, self._park, backlog=backlog)

    @property
    def address(self) -> tuple[str, int]:
        return self._server.server_host, self._server.server_port

    @property
    def listening(self) -> bool:
        return bool(self._server.started) and not self.stopping

    def start(self) -> None:
        self._server.start()
        listener = self._server.socket
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, CLIENT_SNDBUF)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, CLIENT_RCVBUF)

    def close(self) -> None:
        """Refuse new clients, drop the idle ones, let busy ones finish."""
        self.stopping = True
        self._server.close()
        for conn in list(self.connections.values()):
            if conn.watcher is not None:
                self._unpark(conn)
                self._close(conn, "server_stop")
            elif conn.greenlet is not None and not conn.busy:
                conn.greenlet.kill(block=False)

    # -- parking -------------------------------------------------------------------------

    def _park(self, sock: socket.socket, address: Any) -> None:
        """A new client (in the hub, from the accept loop): wait for its first bytes.

        Past ``max_connections_per_ip`` from one address the connection is closed at
        once (a reset): refused quickly, never left hanging in the accept queue. At
        ``max_connections`` the connection longest without a complete command is closed
        to make room (refused only if every connection looked at is being served):
        the process never runs out of descriptors, and a crowd of quiet sockets from
        many addresses cannot lock newcomers out."""
        ip = canonical_ip(address[0]) if isinstance(address, tuple) and address else str(address)
        if self.per_ip.get(ip, 0) >= self.limits.max_connections_per_ip:
            self._refuse(sock, ip, "per_ip")
            return
        if len(self.connections) >= self.max_connections and not self._make_room(ip):
            self._refuse(sock, ip, "full")
            return
        conn = Connection(next(self._conn_ids), _format_address(address), sock, last_command=time.monotonic(), ip=ip)
        conn.may_send_at = self.commands.trust.allows_by_address(ip)
        self.connections[conn.id] = conn
        self._clients_present.set()
        self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass  # already reset by the client: the watcher sees it at once, the handler closes it
        self.log.info("open", conn=conn.id, peer=conn.peer)
        self._watch(conn)

    def _refuse(self, sock: socket.socket, ip: str, reason: str) -> None:
        self.refused += 1
        if self.refused & (self.refused - 1) == 0:  # 1, 2, 4, 8 ...: a flood logs a few lines, not one each
            self.log.warning("refused", peer=ip, reason=reason, refused_so_far=self.refused)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        except OSError:
            pass
        sock.close()

    def _make_room(self, newcomer: str) -> bool:
        """Close the connection longest without a complete command (idle or trickling);
        False when the connections looked at are all being served."""
        conn = evictable(self.connections, _evictable)
        if conn is None:
            return False
        self.evicted += 1
        if self.evicted & (self.evicted - 1) == 0:  # 1, 2, 4, 8 ...: a crowd logs a few lines
            quiet = time.monotonic() - conn.last_command
            self.log.warning(
                "evicted", conn=conn.id, peer=conn.peer, quiet_s="%.1f" % quiet, newcomer=newcomer,
                evicted_so_far=self.evicted,
            )  # fmt: skip
        if conn.watcher is not None:
            self._unpark(conn)
            self._close(conn, "evicted")
        else:
            assert conn.greenlet is not None
            # In the hub: the handler, waiting in recv, ends and closes now, before
            # the newcomer is counted (as _park_now parks one).
            conn.greenlet.throw(_Done("evicted"))
        return True

    def _deadline(self, conn: Connection) -> tuple[float | None, str]:
        return read_deadline(
            time.monotonic(), conn.last_command, conn.line_started, self.limits.idle_timeout, self.limits.line_timeout
        )

    def _watch(self, conn: Connection) -> None:
        loop = gevent.get_hub().loop
        conn.watcher = loop.io(conn.sock.fileno(), 1)
        conn.watcher.start(self._wake, conn)
        left, reason = self._deadline(conn)
        if left is not None:
            # What is left of the time: parking again does not restart the clock.
            conn.timer = loop.timer(left)
            conn.timer.start(self._timed_out_parked, conn, reason)

    def _unpark(self, conn: Connection) -> None:
        conn.watcher.close()
        conn.watcher = None
        if conn.timer is not None:
            conn.timer.close()
            conn.timer = None

    def _wake(self, conn: Connection) -> None:
        """The parked client sent something (or closed): its handler takes over."""
        self._unpark(conn)
        self.handlers.spawn(self._handle, conn)

    def _timed_out_parked(self, conn: Connection, reason: str) -> None:
        self._unpark(conn)
        self._close(conn, reason)

    def _close(self, conn: Connection, reason: str) -> None:
        if self.connections.pop(conn.id, None) is not None:
            if not self.connections:
                self._clients_present.clear()
            left = self.per_ip.get(conn.ip, 1) - 1
            if left:
                self.per_ip[conn.ip] = left
            else:
                self.per_ip.pop(conn.ip, None)
        self.log.info("close", conn=conn.id, reason=reason)
        conn.sock.close()

    def park_quiet_clients(self) -> None:
        """The sweeper. Every ``park_after`` s: park handlers that waited for bytes
        all along (so a client is parked after one to two periods of quiet). More
        often (``SWEEP_SECONDS``): close handlers waiting past their idle or line
        deadline. A timer per recv would cost every command a few microseconds;
        this costs one pass over the connections a second. (Parked clients have a
        timer of their own, armed once per park.) With no client connected it sleeps
        until one comes, so a server without clients does not wake up for it."""
        hub = gevent.get_hub()
        period = min(self.limits.park_after, SWEEP_SECONDS)
        next_park = time.monotonic() + self.limits.park_after
        while True:
            if not self.connections:
                self._clients_present.wait()
                next_park = time.monotonic() + self.limits.park_after  # quiet is counted from now
            gevent.sleep(period)
            now = time.monotonic()
            park = now >= next_park
            if park:
                next_park = now + self.limits.park_after
            for conn in list(self.connections.values()):
                if not conn.waiting:
                    if park:
                        conn.active = False
                    continue
                left, reason = self._deadline(conn)
                if left is not None and left <= 0:
                    hub.loop.run_callback(self._time_out_now, conn, reason)
                elif park:
                    if not conn.active:
                        hub.loop.run_callback(self._park_now, conn)
                    conn.active = False

    def _park_now(self, conn: Connection) -> None:
        # In the hub. Checked again here: the handler may have woken up since the
        # sweep; if it still waits in recv, _Park lands there and no bytes are lost
        # (they stay in the kernel until the watcher sees them).
        if conn.waiting and not conn.active and conn.greenlet is not None and not self.stopping:
            conn.greenlet.throw(_Park)

    def _time_out_now(self, conn: Connection, reason: str) -> None:
        if conn.waiting and conn.greenlet is not None and not self.stopping:
            conn.greenlet.throw(_Done(reason))

    # -- one connection ------------------------------------------------------------------

    def _handle(self, conn: Connection) -> None:
        sock = conn.sock
        conn.greenlet = gevent.getcurrent()
        reason = "eof"
        parked = False
        try:
            if self.stopping:
                raise gevent.GreenletExit
            parked = self._serve(sock, conn)
        except _Done as exc:
            reason = exc.reason
            if reason == "write_timeout":
                self.dropped_slow += 1
                self.log.warning("write_timeout", conn=conn.id, peer=conn.peer)
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
            if parked and not self.stopping:
                self._watch(conn)
            else:
                self._close(conn, "server_stop" if parked else reason)

    def _serve(self, sock: socket.socket, conn: Connection) -> bool:
        """Answer the client until EOF (False) or until the sweeper parks it (True)."""
        if conn.splitter is None:
            conn.splitter = LineSplitter(self.limits.max_line_bytes)
        splitter = conn.splitter
        while True:
            conn.waiting = True  # the sweeper parks it, or closes it past its deadlines
            try:
                data = sock.recv(RECV_BYTES)
            except _Park:
                return True
            finally:
                conn.waiting = False
            conn.active = True
            items = splitter.feed(data) if data else splitter.finish()
            now = time.monotonic()
            if splitter.buffer or splitter.discarding:
                if conn.line_started is None or items:
                    conn.line_started = now  # a new unfinished line began in this chunk
            else:
                conn.line_started = None
            if items:
                if any(item for item in items):  # blank lines are not commands
                    conn.last_command = now
                    self.connections.move_to_end(conn.id)  # the last a full server would close
                conn.busy = True
                replied = self._answer(sock, items, conn)
                conn.busy = False
                if replied and self.limits.close_after_reply:
                    self._close_after_reply(sock)
            if not data:
                return False  # EOF: everything owed has been written

    def _close_after_reply(self, sock: socket.socket) -> None:
        """``[limits] close_after_reply``: the batch's replies are written; FIN after them,
        drop what the client still sends until it closes (bounded), then end the connection."""
        sock.shutdown(socket.SHUT_WR)
        dropped = 0
        with gevent.Timeout(LINGER_SECONDS, False):  # False: the timeout just ends the block
            while dropped <= LINGER_BYTES:
                chunk = sock.recv(RECV_BYTES)
                if not chunk:
                    break
                dropped += len(chunk)
        raise _Done("close_after_reply")

    def _answer(self, sock: socket.socket, items: list[bytes | Overlong], conn: Connection) -> bool:
        """Reply to a batch of lines in order; the batch's Places calls overlap. True if it had a reply.

        Replies are written as soon as those before them are ready, and no more
        than MAX_PIPELINED_WHATSAT calls or REPLY_BUFFER_BYTES wait at once: a
        client pipelining thousands of WHATSATs and reading nothing is held back
        by its own TCP window, not by the server's memory. Records the batch
        stored are handed to the state file before any reply goes out.
        """
        self._log_in(items, conn)
        pending: list[bytes | Greenlet] = []
        in_flight = buffered = calls = 0
        replied = False
        # A pipeline's later reads go all to the deep lane: a client that pipelines and
        # never reads then holds no Places call (and its stack) of its own while it
        # waits, and does not queue ahead of honest WHATSATs for the Places pool.
        fast = 0 if conn.pipelining else FAST_PER_BATCH
        for item in items:
            reply = self.commands.handle(item, conn, calls >= fast)
            if reply is None:
                continue
            pending.append(reply)
            replied = True
            if isinstance(reply, bytes):
                buffered += len(reply)
            else:
                in_flight += 1
                calls += 1
            if in_flight >= MAX_PIPELINED_WHATSAT or buffered >= REPLY_BUFFER_BYTES:
                self._write_replies(sock, pending, conn)
                pending, in_flight, buffered = [], 0, 0
            elif not isinstance(reply, bytes) and unsent(sock) > UNREAD_BOUND:
                # A Places call just started for a client whose earlier replies sit
                # unread in the kernel: write what is due, then read nothing more from
                # it (and start no more calls) until it reads (or write_timeout ends it).
                self._write_replies(sock, pending, conn)
                pending, in_flight, buffered = [], 0, 0
                self._wait_read_by_client(sock)
        if pending:
            self._write_replies(sock, pending, conn)
        if calls:
            conn.pipelining = calls > FAST_PER_BATCH
        self.commands.persist_received()  # AT lines get no reply, but are stored all the same
        return replied

    def _wait_read_by_client(self, sock: socket.socket) -> None:
        """Until the client has taken most of what waits for it in the kernel; a client
        that makes no progress for ``write_timeout`` s is dropped."""
        self.held_back += 1
        deadline = time.monotonic() + self.limits.write_timeout
        while unsent(sock) > UNREAD_BOUND // 2:
            if time.monotonic() > deadline:
                raise _Done("write_timeout")
            gevent.sleep(DRAIN_POLL_SECONDS)  # no event says "the peer acknowledged": look again

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
        self.commands.persist()  # acknowledged records are in the state file first
        replies = [reply if isinstance(reply, bytes) else reply.get() for reply in pending]
        # A client that reads nothing fills its send buffer: this write then waits, so
        # the handler reads no more commands and starts no Places calls (TCP back-
        # pressure), and after write_timeout s without progress the client is dropped.
        data = b"".join(replies)
        sent = send_nowait(sock, data)  # nearly always all of it, and no timer to arm
        if sent < len(data):
            with gevent.Timeout(self.limits.write_timeout, _Done("write_timeout")):
                sock.sendall(memoryview(data)[sent:])
        self.log.replies(conn.id, replies)  # a WHATSAT's JSON is logged whole only at DEBUG


class _ClientServer(StreamServer):  # type: ignore[misc]  # gevent has no type stubs
    """Hands each accepted socket to ``ClientPort._park`` in the accept loop (no greenlet
    yet). It never stops accepting: past the limits ``_park`` refuses at once."""

    def __init__(self, port: ClientPort, listener: Any, park: Callable[[Any, Any], None], **kwargs: Any):
        super().__init__(listener, park, **kwargs)
        self.port = port

    def do_handle(self, *args: Any) -> None:
        try:
            self._handle(*args)
        except BaseException:
            self.do_close(*args)
            raise

    def full(self) -> bool:
        return False


def _evictable(conn: Connection) -> bool:
    """Parked, or waiting in recv: not being served, and closed at once (neighbors'
    links are on the herd port: every connection here is a client's)."""
    if conn.busy:
        return False
    return conn.watcher is not None or (conn.waiting and conn.greenlet is not None)


def _format_address(address: Any) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address)
