"""One forwarder greenlet per neighbor: outbox, connect with backoff, full sync, batches.

The outbox is a dict of the latest AT line per client, not a FIFO of every
update: while a neighbor is down, memory is bounded by the number of clients.
A gevent ``Event`` wakes the forwarder; each wakeup sends everything waiting in
one ``sendall``. When a link comes up the forwarder first sends every record
the server holds (one AT line per client), so a neighbor that was down catches
up without waiting for new updates.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Callable, Iterable

import gevent
from gevent.event import Event

from .config import PeerSettings, ServerConfig
from .logs import EventLog
from .sockets import send_nowait

SYNC_CHUNK_LINES = 4096  # a full sync of a large table goes out in bounded writes


class LinkDown(Exception):
    """The neighbor closed the link or stopped reading."""


class Forwarder:
    """Sends AT lines to one neighbor over one persistent outgoing connection."""

    def __init__(
        self,
        neighbor: ServerConfig,
        settings: PeerSettings,
        snapshot: Callable[[], Iterable[bytes]],
        log: EventLog,
        rand: Callable[[], float] = random.random,
    ):
        self.neighbor = neighbor
        self.name_bytes = neighbor.name.encode("utf-8")
        self.settings = settings
        self.snapshot = snapshot  # every line the server holds, for the full sync
        self.log = log
        self.rand = rand
        self.outbox: dict[bytes, bytes] = {}
        self.wake = Event()
        self.up = Event()  # set while the link is up (tests wait on it)
        self.lines_sent = 0
        self.links_made = 0
        self.bytes_sent = 0  # observe: herd_at_bytes_total{direction="out"}

    # -- called from the server's greenlets -------------------------------------------

    def offer(self, client: bytes, line: bytes) -> None:
        """Queue the latest line for ``client``; replaces any older one still waiting."""
        self.outbox[client] = line
        self.wake.set()

    # -- the forwarder greenlet ----------------------------------------------------------

    def run(self) -> None:
        delay = self.settings.backoff_initial
        failures = 0
        while True:
            sock = self._connect(failures)
            if sock is None:
                failures += 1
                # Full jitter in [delay/2, delay): restarted herds do not reconnect in lockstep.
                gevent.sleep(delay * (0.5 + self.rand() / 2))
                delay = min(delay * 2, self.settings.backoff_max)
                continue
            failures = 0
            delay = self.settings.backoff_initial
            try:
                self._serve(sock)
            except (OSError, LinkDown, gevent.Timeout) as exc:
                self.log.warning("link_down", neighbor=self.neighbor.name, reason=_describe(exc))
            finally:
                self.up.clear()
                sock.close()

    def _connect(self, failures: int) -> socket.socket | None:
        address = (self.neighbor.host, self.neighbor.port)
        try:
            sock = socket.create_connection(address, timeout=self.settings.connect_timeout)
        except OSError as exc:
            if failures == 0:  # one line per outage, not one per retry
                self.log.info("link_retry", neighbor=self.neighbor.name, reason=_describe(exc))
            return None
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        return sock

    def _serve(self, sock: socket.socket) -> None:
        self.links_made += 1
        # Clear before the snapshot with no yield in between: everything queued so
        # far is also in the snapshot, so nothing is lost and nothing sent twice.
        self.outbox.clear()
        self.wake.clear()
        lines = list(self.snapshot())
        peer = "%s:%d" % sock.getpeername()[:2]
        self.log.info("link_up", neighbor=self.neighbor.name, address=peer, sync_records=len(lines))
        reader = gevent.spawn(self._drain, sock)
        try:
            for start in range(0, len(lines), SYNC_CHUNK_LINES):
                self._send(sock, lines[start:start + SYNC_CHUNK_LINES])
            self.up.set()
            while True:
                self.wake.wait()
                self.wake.clear()
                if reader.dead:
                    raise LinkDown("neighbor closed the connection")
                if self.outbox:
                    batch, self.outbox = self.outbox, {}
                    self._send(sock, list(batch.values()))
        finally:
            reader.kill(block=False)

    def _send(self, sock: socket.socket, lines: list[bytes]) -> None:
        if not lines:
            return
        data = b"\n".join(lines) + b"\n"
        sent = send_nowait(sock, data)  # nearly always all of it, and no timer to arm
        if sent < len(data):  # a full send buffer: wait for the neighbor, but not for ever
            with gevent.Timeout(self.settings.write_timeout, LinkDown("neighbor stopped reading")):
                sock.sendall(memoryview(data)[sent:])
        self.lines_sent += len(lines)
        self.bytes_sent += len(data)  # observe
        self.log.traffic("out", "neighbor", self.neighbor.name, "line", lines)

    def _drain(self, sock: socket.socket) -> None:
        """Read what the neighbor says (nothing, unless it rejects a line) until EOF."""
        try:
            while True:
                data = sock.recv(4096)
                if not data:
                    break
                self.log.warning("peer_said", neighbor=self.neighbor.name, data=data[:512])
        except OSError:
            pass
        finally:
            self.wake.set()  # let the sender notice the link is gone


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
