"""Processes, ports, herd files and /proc readings for the benchmark suite.

No gevent here: the runner only starts processes, polls ports with deadlines,
talks to load workers over pipes and reads /proc. Every child is registered in
``PROCESSES`` and stopped by PID (SIGTERM, then SIGKILL after a deadline) when
its lab closes, when the runner exits, and on Ctrl-C.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import random
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
KEY_ENV = "HERD_BENCH_PLACES_KEY"
KEY = "bench-places-key-0123456789"
CLK_TCK = os.sysconf("SC_CLK_TCK")
START_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0
POLL = 0.02  # seconds between polls of a port or /proc while waiting on a deadline

FIVE_LINKS: dict[str, list[str]] = {
    "Alford": ["Hamilton", "Welsh"],
    "Ball": ["Holiday", "Welsh"],
    "Hamilton": ["Holiday"],
    "Holiday": [],
    "Welsh": [],
}
FIVE = ("Alford", "Ball", "Hamilton", "Holiday", "Welsh")


class BenchError(Exception):
    """A measurement could not be made (a child died, a deadline passed, a job failed)."""


# -- ports and /proc -------------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports (all bound at once, then released)."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind((HOST, 0))
            socks.append(sock)
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def block_free(first: int, count: int, offsets: Iterable[int]) -> bool:
    """Whether ``first + i + offset`` binds on loopback for every i < count and offset."""
    socks = []
    try:
        for offset in offsets:
            for i in range(count):
                sock = socket.socket()
                socks.append(sock)
                sock.bind((HOST, first + i + offset))
        return True
    except OSError:
        return False
    finally:
        for sock in socks:
            sock.close()


def port_block(count: int, offsets: tuple[int, ...] = (0,), low: int = 20_000, high: int = 30_000,
               attempts: int = 50) -> int:
    """The first of ``count`` consecutive free loopback ports whose shifts by each of
    ``offsets`` are free too (a herd's client ports, HTTP ports at +1000, a range kept
    clear at +2000). Below the kernel's ephemeral range (32768 up by default), so no
    outgoing connection takes one meanwhile; bound and released, like ``free_ports``."""
    rng = random.Random()
    span = count + max(offsets)
    for _ in range(attempts):
        first = rng.randrange(low, high - span)
        if block_free(first, count, offsets):
            return first
    raise BenchError(f"no block of {count} free ports (offsets {offsets}) in {low}-{high} after {attempts} tries")


def port_open(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}")


def proc_times(pid: int) -> tuple[float, float]:
    """(utime + stime, cutime + cstime) of one process in seconds: its own CPU, and its
    waited-for children's (a server's cache builder, for instance)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()  # the name may hold spaces and ")"
    utime, stime, cutime, cstime = (int(value) for value in fields[11:15])  # fields 14-17 of proc(5)
    return (utime + stime) / CLK_TCK, (cutime + cstime) / CLK_TCK


def cpu_seconds(pids: Iterable[int]) -> float:
    """utime + stime of the processes, summed, in seconds."""
    return sum(proc_times(pid)[0] for pid in pids)


def settled(read: Callable[[], float], quiet: float, deadline_s: float, tolerance: float = 0.0) -> float:
    """Poll ``read()`` until two readings ``quiet`` seconds apart differ by at most
    ``tolerance``; the last reading (or the last one at the deadline)."""
    deadline = time.monotonic() + deadline_s
    last = read()
    while True:
        time.sleep(quiet)  # polling /proc against a deadline: there is no event to wait on
        now = read()
        if abs(now - last) <= tolerance or time.monotonic() > deadline:
            return float(now)
        last = now


def quiet_cpu(pids: list[int]) -> float:
    """CPU seconds once the processes have stopped working (floods finished)."""
    return settled(lambda: cpu_seconds(pids), quiet=0.1, deadline_s=10.0)


def stable_rss_kb(pid: int) -> int:
    return int(settled(lambda: rss_kb(pid), quiet=0.2, deadline_s=5.0, tolerance=64))


TCP_ESTABLISHED = "01"
TCP_LISTEN = "0A"


@dataclass(frozen=True)
class TcpRow:
    """One IPv4 socket of /proc/net/tcp (this network namespace's, whoever owns it)."""

    local_port: int
    remote_port: int
    state: str  # hex, as the kernel writes it: 01 ESTABLISHED, 06 TIME_WAIT, 0A LISTEN ...
    inode: int  # 0 once no process holds it (TIME_WAIT)


def tcp_table() -> list[TcpRow]:
    """Every loopback (127.0.0.1) socket of /proc/net/tcp."""
    rows = []
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            local, remote = fields[1].split(":"), fields[2].split(":")
            if local[0] == "0100007F":  # 127.0.0.1, little-endian hex
                rows.append(TcpRow(int(local[1], 16), int(remote[1], 16), fields[3], int(fields[9])))
    return rows


def socket_inodes(pids: Iterable[int]) -> set[int]:
    """The inodes of the sockets the processes hold (``socket:[N]`` links in /proc/PID/fd)."""
    inodes = set()
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        for fd in os.listdir(fd_dir):
            try:
                target = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue  # closed between the listing and the readlink
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    return inodes


def listening_ports(pids: Iterable[int]) -> set[int]:
    """The loopback ports the processes listen on, found by socket inode (no config read)."""
    mine = socket_inodes(pids)
    return {row.local_port for row in tcp_table() if row.state == TCP_LISTEN and row.inode in mine}


def tcp_queues(remote_port: int) -> list[tuple[int, int]]:
    """(tx_queue, rx_queue) bytes of every loopback IPv4 socket connected to ``remote_port``."""
    queues = []
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            if int(fields[2].split(":")[1], 16) == remote_port:
                tx, rx = fields[4].split(":")
                queues.append((int(tx, 16), int(rx, 16)))
    return queues


# -- processes -------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if the runner dies (even by SIGKILL)."""
    pr_set_pdeathsig = 1
    ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGTERM)


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, limit: int = 1500) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-limit:]
        except OSError:
            return ""


class ProcessSet:
    """Every child the suite started; stopped by PID, never by name."""

    def __init__(self) -> None:
        self.children: list[Child] = []

    def spawn(self, name: str, argv: list[str], log_path: Path, *, pipes: bool = False,
              code: Path = ROOT, env: Mapping[str, str] | None = None) -> Child:
        """Start ``argv``; ``code`` is the checkout it runs from (cwd and PYTHONPATH, so
        ``python -m herdserver`` imports that checkout's package: see ``Checkout``);
        ``env`` adds variables (``HERDSERVER_CACHE_DIR``, for instance)."""
        with open(log_path, "ab") as log:  # the child keeps its own copy of the descriptor
            process = subprocess.Popen(
                argv,
                cwd=code,
                stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
                stdout=subprocess.PIPE if pipes else log,
                stderr=log,
                env={**os.environ, KEY_ENV: KEY, **(env or {}), "PYTHONPATH": str(code)},
                start_new_session=True,  # Ctrl-C reaches the runner only; it stops the children
                preexec_fn=_die_with_parent,
            )
        child = Child(name, process, log_path)
        self.children.append(child)
        return child

    def stop(self, children: list[Child], timeout: float = STOP_TIMEOUT) -> None:
        for child in children:
            if child.alive():
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for child in children:
            try:
                child.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()
            for pipe in (child.process.stdin, child.process.stdout):
                if pipe is not None:
                    pipe.close()
            if child in self.children:
                self.children.remove(child)

    def stop_all(self) -> None:
        self.stop(list(self.children))


PROCESSES = ProcessSet()
atexit.register(PROCESSES.stop_all)


def wait_for_port(child: Child, port: int, timeout: float = START_TIMEOUT, poll: float = POLL) -> None:
    """Until ``port`` accepts; ``poll`` is also the resolution of a start-up time measured so."""
    deadline = time.monotonic() + timeout
    while not port_open(port):
        if not child.alive():
            raise BenchError(f"{child.name} exited ({child.process.returncode}) before listening: {child.log_tail()}")
        if time.monotonic() > deadline:
            raise BenchError(f"{child.name} not listening on {port} after {timeout:g}s")
        time.sleep(poll)  # polling a port for readiness against a deadline


def timed_run(argv: list[str], code: Path = ROOT, env: Mapping[str, str] | None = None) -> tuple[float, float]:
    """Run ``argv`` to its exit: (wall seconds from just before exec, its CPU seconds from wait4).
    A short-lived child waited for at once, so not registered in ``PROCESSES``."""
    started = time.perf_counter()
    process = subprocess.Popen(argv, cwd=code, env={**os.environ, **(env or {}), "PYTHONPATH": str(code)},
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, preexec_fn=_die_with_parent)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise BenchError(f"{argv} exited {process.returncode}")
    return wall, usage.ru_utime + usage.ru_stime


def read_line(child: Child, buffer: bytearray, timeout: float) -> bytes:
    """One line from the child's stdout pipe, or BenchError at the deadline or EOF."""
    assert child.process.stdout is not None
    fd = child.process.stdout.fileno()
    deadline = time.monotonic() + timeout
    while b"\n" not in buffer:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BenchError(f"{child.name}: no answer within {timeout:g}s")
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            data = os.read(fd, 1 << 20)
            if not data:
                raise BenchError(f"{child.name} exited: {child.log_tail()}")
            buffer += data
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return line


class LoadWorker:
    """A ``bench/load.py`` process: one JSON job per line in, one JSON result per line out."""

    def __init__(self, child: Child):
        self.child = child
        self._buffer = bytearray()

    def submit(self, job: str, **args: Any) -> None:
        stdin: IO[bytes] | None = self.child.process.stdin
        assert stdin is not None
        stdin.write(json.dumps({"job": job, "args": args}).encode() + b"\n")
        stdin.flush()

    def result(self, timeout: float) -> dict[str, Any]:
        reply = json.loads(read_line(self.child, self._buffer, timeout))
        if not reply["ok"]:
            raise BenchError(f"{self.child.name}: {reply['error']}")
        result: dict[str, Any] = reply["result"]
        return result

    def call(self, job: str, timeout: float, **args: Any) -> dict[str, Any]:
        self.submit(job, **args)
        return self.result(timeout)


# -- herd files ------------------------------------------------------------------------------


@dataclass
class Herd:
    """A herd.ini in the lab directory; ``servers`` run as herdserver processes, the
    other names in it (observers, sinks) are listeners owned by a load worker."""

    name: str
    path: Path
    ports: dict[str, int]
    log_dir: Path
    children: dict[str, Child] = field(default_factory=dict)
    http_ports: dict[str, int] = field(default_factory=dict)

    def pid(self, name: str) -> int:
        return self.children[name].pid

    def pids(self) -> list[int]:
        return [child.pid for child in self.children.values()]

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"


def herd_ini(links: Mapping[str, list[str]], ports: Mapping[str, int], log_dir: Path, places_url: str,
             http_ports: Mapping[str, int] | None = None, herd_keys: Mapping[str, str] | None = None,
             peer_keys: Mapping[str, str] | None = None, places_keys: Mapping[str, str] | None = None,
             foreign: Iterable[str] = (), limit_keys: Mapping[str, str] | None = None) -> str:
    """A herd.ini; ``herd_keys`` and ``peer_keys`` add ``[herd]`` and ``[peers]`` keys (only
    keys the code under test knows: an unknown key is an error to herdserver). ``places_keys``
    replace the ``[places]`` section (default: the fake Places server at ``places_url``).
    ``limit_keys`` add ``[limits]`` keys. ``http_ports`` None writes no ``http_port`` keys
    (code from before the HTTP side); else
    the servers not in it get ``http_port = 0``. ``foreign``: names marked ``foreign = yes``
    (the bench's own listeners: herdservers send them plain AT lines on their port)."""
    lines = ["[herd]", f"host = {HOST}", f"log_dir = {log_dir}"]
    lines += [f"{key} = {value}" for key, value in (herd_keys or {}).items()]
    places = places_keys or {"provider": "google", "api_key_env": KEY_ENV, "base_url": places_url, "timeout": "5"}
    lines += ["", "[places]", *(f"{key} = {value}" for key, value in places.items()), ""]
    if peer_keys:
        lines += ["[peers]", *(f"{key} = {value}" for key, value in peer_keys.items()), ""]
    if limit_keys:
        lines += ["[limits]", *(f"{key} = {value}" for key, value in limit_keys.items()), ""]
    for name, neighbors in links.items():
        lines += [f"[server:{name}]", f"port = {ports[name]}"]
        if http_ports is not None:
            lines.append(f"http_port = {http_ports.get(name, 0)}")
        if neighbors:
            lines.append(f"neighbors = {', '.join(neighbors)}")
        if name in foreign:
            lines.append("foreign = yes")
        lines.append("")
    return "\n".join(lines)


# -- a lab: one scenario's directory and children ----------------------------------------------


class Lab:
    """Owns a temp directory and every process a scenario starts; ``close()`` stops them."""

    def __init__(self, parent: Path, name: str, places_url: str):
        self.dir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=parent))
        self.places_url = places_url
        self.children: list[Child] = []

    def spawn(self, name: str, argv: list[str], *, pipes: bool = False, code: Path = ROOT,
              env: Mapping[str, str] | None = None) -> Child:
        child = PROCESSES.spawn(name, argv, self.dir / f"{name}.out", pipes=pipes, code=code, env=env)
        self.children.append(child)
        return child

    def herd(self, name: str, links: Mapping[str, list[str]], listeners: Iterable[str] = (), *,
             http: bool = False, old_code: bool = False, herd_keys: Mapping[str, str] | None = None,
             peer_keys: Mapping[str, str] | None = None, places_keys: Mapping[str, str] | None = None,
             ports: Mapping[str, int] | None = None, http_ports: Mapping[str, int] | None = None,
             foreign: Iterable[str] = (), limit_keys: Mapping[str, str] | None = None) -> Herd:
        """Write ``name``.ini for ``links`` (name -> neighbors) plus bench-owned ``listeners``;
        ``http``: the servers of ``links`` serve their HTTP side (metrics) too; ``old_code``:
        for a checkout from before ``http_port`` existed (no such key written). ``ports`` and
        ``http_ports`` given: used as they are (``port_block``), else free ports are picked.
        ``listeners`` and ``foreign`` are written ``foreign = yes``: a bench listener takes plain
        AT lines on its port, as another implementation would (it does no herd-port handshake)."""
        everyone = {**links, **{listener: [] for listener in listeners if listener not in links}}
        if ports is None:
            free = free_ports(len(everyone) + (len(links) if http else 0))
            ports = dict(zip(everyone, free, strict=False))
            http_ports = dict(zip(links, free[len(everyone):], strict=False)) if http else {}
        http_ports = dict(http_ports or {})
        log_dir = self.dir / f"{name}-logs"
        log_dir.mkdir()
        # Each herd.ini in a directory of its own: the default state dir ("state" beside
        # herd.ini) is then the herd's own, and two herds' Alfords never share a state file.
        home = self.dir / f"{name}-herd"
        home.mkdir()
        path = home / f"{name}.ini"
        written_http = None if old_code else http_ports
        path.write_text(herd_ini(everyone, ports, log_dir, self.places_url, written_http, herd_keys, peer_keys,
                                 places_keys, foreign={*listeners, *foreign}, limit_keys=limit_keys))
        return Herd(name, path, dict(ports), log_dir, http_ports=http_ports)

    def start_servers(self, herd: Herd, servers: Iterable[str], code: Path = ROOT, wait: bool = True,
                      env: Mapping[str, str] | None = None, timeout: float = START_TIMEOUT,
                      module: str = "herdserver") -> None:
        """Start ``servers`` of ``herd`` from the checkout ``code``; wait until each listens
        (``timeout`` seconds each, counted from when its wait begins). ``module``: what runs
        them (``python -m MODULE NAME --config HERD.INI``), herdserver unless a bench stand-in."""
        for server in servers:
            argv = [sys.executable, "-m", module, server, "--config", str(herd.path)]
            herd.children[server] = self.spawn(f"{herd.name}-{server}", argv, code=code, env=env)
        if wait:
            for server, child in herd.children.items():
                wait_for_port(child, herd.ports[server], timeout)

    def stop_servers(self, herd: Herd, timeout: float = STOP_TIMEOUT) -> None:
        """Graceful stop (SIGTERM) so every log is flushed before it is read; SIGKILL for
        any server still there ``timeout`` seconds later (a big herd needs more)."""
        PROCESSES.stop(list(herd.children.values()), timeout)

    def echo(self) -> tuple[Child, int]:
        [port] = free_ports(1)
        child = self.spawn("echo", [sys.executable, "-m", "bench.echo_server", str(port)])
        wait_for_port(child, port)
        return child, port

    def worker(self, name: str) -> LoadWorker:
        worker = LoadWorker(self.spawn(name, [sys.executable, "-m", "bench.load"], pipes=True))
        worker.call("hello", timeout=START_TIMEOUT)
        return worker

    def close(self) -> None:
        PROCESSES.stop(self.children)
        self.children.clear()


def start_places(parent: Path, latency: float) -> tuple[Child, str]:
    """The fake Google Places server (tests/fake_places.py) in its own process; its URL."""
    child = PROCESSES.spawn(
        "places", [sys.executable, "-m", "bench.places_server", "--latency", str(latency)],
        parent / "places.out", pipes=True,
    )
    url = read_line(child, bytearray(), START_TIMEOUT).decode().strip()
    if not url.startswith("http://"):
        raise BenchError(f"fake Places said {url!r}")
    return child, url


# -- a second checkout (bench/run.py --compare REV) ---------------------------------------------


class Checkout:
    """``git worktree add --detach`` of a revision in a temp dir, removed on ``close()``.

    Servers started with ``code=checkout.path`` run from it (cwd and PYTHONPATH), so
    ``python -m herdserver`` imports that revision's package, not this one's.
    """

    def __init__(self, parent: Path, rev: str):
        self.rev = rev
        self.path = Path(tempfile.mkdtemp(prefix="checkout-", dir=parent)) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(self.path), rev],
                       check=True, capture_output=True)
        self.commit = subprocess.run(["git", "-C", str(self.path), "rev-parse", "--short", "HEAD"], check=True,
                                     capture_output=True, text=True).stdout.strip()
        imported = subprocess.run(
            [sys.executable, "-c", "import herdserver; print(herdserver.__file__)"], cwd=self.path,
            env={**os.environ, "PYTHONPATH": str(self.path)}, capture_output=True, text=True, check=True,
        ).stdout.strip()
        if not imported.startswith(str(self.path)):
            self.close()
            raise BenchError(f"the checkout of {rev} imports herdserver from {imported}, not from itself")

    def close(self) -> None:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(self.path)],
                       capture_output=True)
