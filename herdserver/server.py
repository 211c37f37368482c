"""One herd server: the composition root. Makes the parts, wires them, starts and
stops them, and builds the status snapshot the ops side reads.

| part | module |
|---|---|
| the client port and its connections | ``net.clients.ClientPort`` |
| what each line does, counted once; persist before replying | ``net.commands.Commands`` |
| newer wins, journal, flood to every link but the source | ``core.replica.Replica`` |
| WHATSAT's Places calls | ``net.whatsat.WhatsatLanes`` |
| one link per neighbor, and the answering side of theirs | ``net.links``, ``net.responder`` |
| the state file | ``statefile.StateFile`` |
| metrics, health, status, the page | ``ops.web.HttpFront`` (reads ``status()``) |
"""

from __future__ import annotations

import os
import resource
import socket
import time
from collections.abc import Callable, Mapping

import gevent
from gevent.event import Event
from gevent.greenlet import Greenlet
from gevent.lock import Semaphore
from gevent.pool import Group

from . import __version__, logs
from .config import HerdConfig
from .core import limits
from .core.replica import Replica
from .core.stats import Stats
from .core.status import RecentEvents, ServerStatus
from .core.store import Store, time_of
from .core.trust import Trust, canonical_ip
from .herdsecret import load_secret
from .net.clients import ClientPort, Connection
from .net.commands import Commands
from .net.links import MAX_CONCURRENT_SYNCS, ForeignLink, Link, new_token
from .net.responder import HerdPort
from .net.whatsat import WhatsatLanes
from .ops.web import HttpFront
from .places import Provider, make_provider
from .statefile import MAX_RECORD_LINE, StateFile

COMPACT_CHECK_SECONDS = 5.0
COMPACT_BACKOFF_MAX_SECONDS = 300.0  # a compaction that failed (disk full) is tried again, at most this far apart
GOODBYE_SECONDS = 0.5  # at most this long telling neighbors we stop

__all__ = ["Connection", "HerdServer", "Stats"]


class HerdServer:
    """Owns its listener, its greenlets and its log; can be started and stopped in-process."""

    def __init__(
        self,
        config: HerdConfig,
        name: str,
        *,
        listener: socket.socket | None = None,
        herd_listener: socket.socket | None = None,
        provider: Provider | None = None,
        clock: Callable[[], int] = time.time_ns,
        environ: Mapping[str, str] | None = None,
    ):
        self.config = config
        self.me = config.server(name)
        self.name = name
        self.clock = clock
        self.limits = config.limits
        self.boot_id = new_token()
        self.log = logs.setup(name, config.log_path(name), config.log_level)
        state_path = config.state_path(name)
        self.stats = Stats()
        # The lock first: a second process on the same state stops here (StateLocked).
        self.state = (
            StateFile(
                state_path, config.fsync, self.log, stats=self.stats,
                servers=frozenset(server.encode("utf-8") for server in config.servers),
                # An AT line is at most max_line_bytes: a record line longer than this is garbage.
                max_line=max(MAX_RECORD_LINE, self.limits.max_line_bytes + 1024),
            )
            if state_path
            else None
        )
        self.store = Store()
        self.provider = provider if provider is not None else make_provider(config.places)
        self.events = RecentEvents()
        self.secret = load_secret(config, os.environ if environ is None else environ)
        self.trust = client_port_trust(config)
        self.replica = Replica(self.store, config.servers, self.limits.max_clock_skew, self.state)
        self.whatsat = WhatsatLanes(self.provider, config.places.timeout, self.stats, self.log)
        self.commands = Commands(
            name, self.replica, self.whatsat, self.stats, self.log, self.state, self.trust,
            refresh_trust=lambda: client_port_trust(config), clock=clock,
        )
        self.links = self._make_links()
        self.replica.outlets = list(self.links.values())
        self.herd_port = HerdPort(
            herd_listener if herd_listener is not None else (self.me.host, self.me.herd_port),
            name.encode("utf-8"), self.me.neighbors, self.boot_id, self.secret.secrets, self.store,
            self.commands.digests, self.commands.take_line, self.commands.persist_received, self.log,
            handshake_timeout=config.peers.connect_timeout, write_timeout=config.peers.write_timeout,
            on_proven=self._peer_proven, on_bye=self._peer_said_bye,
        )
        fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.max_connections = limits.max_connections(
            self.limits.max_connections, fd_limit, len(self.me.neighbors), config.places.pool_size
        )
        self.clients = ClientPort(
            self.commands,
            self.limits,
            self.log,
            listener if listener is not None else (self.me.host, self.me.port),
            backlog=None if listener is not None else 1024,
            max_connections=self.max_connections,
        )
        self._workers = Group()  # links, the sweeper, compaction
        self._log_idle = gevent.get_hub().loop.idle()
        self.log.on_pending = self._flush_log_when_idle
        self._stopped = Event()
        self.started_at = 0.0
        self._started_monotonic = 0.0
        self.state_loaded = False
        # Metrics, /status and the herd page on [server:X] http_port (None when it is 0).
        self.http = (
            HttpFront(self.status, config, self.me, self.store.get, self.log) if self.me.http_port else None
        )

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        return self.clients.address

    @property
    def connections(self) -> dict[int, Connection]:
        return self.clients.connections

    @property
    def listening(self) -> bool:
        return self.clients.listening

    def start(self) -> None:
        """Replay the state file, then listen, then start the forwarders."""
        self.started_at = time.time()
        self._started_monotonic = time.monotonic()
        if self.http is not None:  # first: a taken http_port stops the start before anything runs
            _bind("http_port", self.me.http_port, self.http.start)
        if self.state is not None:
            started = time.perf_counter()
            report = self.state.replay(self.store.load)
            level = self.log.warning if report.corrupt or report.torn_tail else self.log.info
            level(
                "state_loaded",
                path=self.state.path,
                records=len(self.store),
                lines=report.records,
                corrupt=report.corrupt,
                overlong=report.overlong,
                first_bad_line=report.first_bad_line or "-",
                torn_tail=report.torn_tail,
                ms="%.1f" % ((time.perf_counter() - started) * 1000),
            )
            self.state.start()
            self._spawn_worker(self._compact_when_needed)
            self.commands.digests.clear()
            self._workers.spawn(self.commands.compute_digests).link_exception(self._worker_died)
        self.state_loaded = True
        _bind("port", self.me.port, self.clients.start)
        _bind("herd_port", self.me.herd_port, self.herd_port.start)
        if not self.secret.secrets:
            self.log.warning("links_unauthenticated", reason="secret_file = - and no secret in the environment")
        self.log.info(
            "start",
            address="%s:%d" % self.address,
            neighbors=",".join(self.me.neighbors) or "-",
            provider=self.provider.name,
            boot=self.boot_id,
            herd_port=self.me.herd_port or "-",
            links="authenticated" if self.secret.secrets else "UNAUTHENTICATED",
            secret=self.secret.source,
            max_connections=self.max_connections,
        )
        for link in self.links.values():
            self._spawn_worker(link.run)
        self._spawn_worker(self.clients.park_quiet_clients)

    def _make_links(self) -> dict[str, Link | ForeignLink]:
        """One link per neighbor: to its herd port, or plain AT lines to a foreign one's client port."""
        config, peers = self.config, self.config.peers
        sync_slots = Semaphore(MAX_CONCURRENT_SYNCS)
        links: dict[str, Link | ForeignLink] = {}
        for name in self.me.neighbors:
            neighbor = config.servers[name]
            if neighbor.foreign:
                links[name] = ForeignLink(
                    neighbor, peers, self.store, self.commands.persist_received, self.log, self.events
                )
            else:
                links[name] = Link(
                    neighbor, peers, self.name.encode("utf-8"), self.store, self.commands.digests,
                    self.commands.take_line, self.commands.persist_received, self.log, self.events, self.boot_id,
                    self.secret.secrets, sync_slots,
                )
        return links

    def _peer_proven(self, name: str) -> None:
        link = self.links.get(name)
        if link is not None:
            link.peer_seen()

    def _peer_said_bye(self, name: str) -> None:
        link = self.links.get(name)
        if link is not None:
            link.neighbor_left()

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
        self.clients.close()
        self.clients.handlers.join(timeout=grace)
        self.clients.handlers.kill(timeout=1)
        self.whatsat.close()
        goodbyes = Group()
        for link in self.links.values():
            goodbyes.spawn(link.say_goodbye, GOODBYE_SECONDS)
        goodbyes.join(timeout=GOODBYE_SECONDS + 0.1)
        self._workers.kill(timeout=1)
        self.herd_port.close()
        if self.http is not None:
            self.http.stop()
        self.provider.close()
        if self.state is not None:
            self.state.close()
        self.log.info("stop", clients_left=len(self.connections), records=len(self.store))
        self._log_idle.stop()
        self.log.close()
        self._stopped.set()

    def _flush_log_when_idle(self) -> None:
        """The first line since the last flush: the log is written once the event loop
        has nothing else to do (a libev idle watcher). A flush then never costs a wake-up
        of its own (an idle server sleeps), and lines reach the file as soon as the server
        is idle; under sustained load the log's size and age bounds flush it."""
        if not self._log_idle.active:
            self._log_idle.start(self._flush_log)

    def _flush_log(self) -> None:
        self._log_idle.stop()
        self.log.flush()

    def _compact_when_needed(self) -> None:
        """Compact when the file holds mostly dead lines. A compaction that fails (the
        disk full, an I/O error) leaves the old file in place and is tried again,
        backing off up to COMPACT_BACKOFF_MAX_SECONDS: never a dead worker."""
        assert self.state is not None
        wait = COMPACT_CHECK_SECONDS
        while True:
            gevent.sleep(wait)
            if not self.state.needs_compaction(len(self.store)):
                wait = COMPACT_CHECK_SECONDS
                continue
            try:
                self.compact()
            except OSError as exc:
                wait = min(2 * wait, COMPACT_BACKOFF_MAX_SECONDS)
                self.log.error("state_compact_failed", path=self.state.path, error=os.strerror(exc.errno or 0),
                               retry_in_s=wait)
            else:
                wait = COMPACT_CHECK_SECONDS

    def compact(self) -> None:
        """Rewrite the state file from the live records (tests call it directly)."""
        if self.state is not None:
            snapshot = [(time_of(line), line) for line in self.store.lines()]
            self.state.compact(snapshot)


    def status(self) -> ServerStatus:
        """A snapshot of this server for the metrics and the HTTP side."""
        connections = list(self.clients.connections.values())
        return ServerStatus(
            name=self.name,
            address="%s:%d" % self.address,
            http=f"{self.me.host}:{self.me.http_port}" if self.me.http_port else None,
            time=time.time(),
            uptime_s=time.monotonic() - self._started_monotonic if self._started_monotonic else 0.0,
            provider=self.provider.name,
            records=len(self.store),
            listening=self.listening,
            state_loaded=self.state_loaded,
            state_writable=self.state is None or self.state.writable,
            open_connections=len(connections),
            parked_connections=sum(1 for conn in connections if conn.watcher is not None),
            links=tuple(link.state() for link in self.links.values()),
            stats=self.stats,
            refused=self.clients.refused,
            evicted=self.clients.evicted,
            dropped_slow=self.clients.dropped_slow,
            log_lines=self.log.lines_written,
            log_lines_dropped=self.log.lines_dropped,
            events=tuple(self.events.snapshot()),
            herd_port_auth_failures=self.herd_port.auth_failures,
            version=__version__,
        )


def client_port_trust(config: HerdConfig) -> Trust:
    """Who may send AT lines on a client port: foreign neighbors' addresses and [peers] trusted."""
    return Trust(herd_addresses(config, foreign_only=True), frozenset(config.peers.trusted))


def herd_addresses(config: HerdConfig, foreign_only: bool = False) -> frozenset[str]:
    """The addresses of the servers of herd.ini (host names resolved now)."""
    found: set[str] = set()
    for server in config.servers.values():
        if foreign_only and not server.foreign:
            continue
        try:
            infos = socket.getaddrinfo(server.host, server.port, type=socket.SOCK_STREAM)
        except OSError:
            continue  # not resolvable now: that server's lines are not accepted by address
        found.update(canonical_ip(str(info[4][0])) for info in infos)
    return frozenset(found)


def _bind(key: str, port: int, start: Callable[[], None]) -> None:
    """Start a listener; a failure names the herd.ini key (``herd_port 14000: Address already in use``)."""
    try:
        start()
    except OSError as exc:
        raise OSError(exc.errno, f"{key} {port}: {exc.strerror or exc}") from None
