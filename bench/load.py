"""Load worker: a gevent process that runs benchmark jobs sent by the runner.

    python -m bench.load        # reads one JSON job per line on stdin

Each job is ``{"job": NAME, "args": {...}}``; the answer is one JSON line on
stdout, ``{"ok": true, "result": {...}}`` or ``{"ok": false, "error": "..."}``.
Jobs are bounded in count and in time. Besides clients, a worker can own
*listeners* named in a herd.ini: observers (read AT lines from a server's
forwarder and time-stamp them) and sinks (accept, never read).

All times are ``time.monotonic()`` (CLOCK_MONOTONIC: one clock for every
process on the machine), latencies are reported in milliseconds; the one
exception is the probes' ``sent`` times, wall-clock ``time.time()`` like the
time stamps of the servers' logs they are compared with.
"""

from gevent import monkey

monkey.patch_all(thread=True, socket=True)

import itertools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
import gevent.os  # noqa: E402
from gevent.event import AsyncResult, Event  # noqa: E402
from gevent.pool import Group  # noqa: E402
from gevent.server import StreamServer  # noqa: E402

HOST = "127.0.0.1"
LOCATION = b"+34.068930-118.445127"
IO_TIMEOUT = 10.0  # seconds any single read or connect may take before it counts as an error
SINK_RCVBUF = 4096
LATE_SLACK = 0.001  # seconds a paced send may lag its schedule before it counts as late

Job = Callable[..., dict[str, Any]]
JOBS: dict[str, Job] = {}


def job(func: Job) -> Job:
    JOBS[func.__name__] = func
    return func


# -- lines and statistics ----------------------------------------------------------------------


def iamat(client: str) -> bytes:
    """An IAMAT line with the current real time."""
    now = time.time_ns()
    return b"IAMAT %s %s %d.%09d\n" % (client.encode(), LOCATION, now // 10**9, now % 10**9)


def order_key(fields: list[bytes]) -> tuple[int, bytes]:
    """The herd's total order of AT records: client time in ns, then the line."""
    seconds, _, fraction = fields[5].partition(b".")
    return int(seconds) * 10**9 + int((fraction + b"000000000")[:9]), b" ".join(fields)


def summary(latencies: list[float]) -> dict[str, float]:
    """p50/p99/mean in ms by nearest rank; zeros when there is nothing."""
    if not latencies:
        return {"p50_ms": 0.0, "p99_ms": 0.0, "mean_ms": 0.0}
    ordered = sorted(latencies)

    def rank(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))] * 1000

    return {"p50_ms": rank(0.50), "p99_ms": rank(0.99), "mean_ms": sum(ordered) / len(ordered) * 1000}


class Reader:
    """Lines (or blocks) from a socket over a plain buffer."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buffer = b""

    def until(self, end: bytes) -> bytes:
        while True:
            cut = self.buffer.find(end)
            if cut >= 0:
                cut += len(end)
                data, self.buffer = self.buffer[:cut], self.buffer[cut:]
                return data
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("server closed the connection")
            self.buffer += chunk

    def to_eof(self) -> bytes:
        while True:
            chunk = self.sock.recv(65536)
            if not chunk:
                return self.buffer
            self.buffer += chunk


def connect(target: list[Any] | tuple[str, int]) -> socket.socket:
    sock = socket.create_connection((target[0], target[1]), timeout=IO_TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class Errors:
    def __init__(self) -> None:
        self.count = 0
        self.first = ""

    def add(self, exc: BaseException) -> None:
        self.count += 1
        self.first = self.first or f"{type(exc).__name__}: {exc}"


# -- closed-loop clients -------------------------------------------------------------------------


class Run:
    """Shared state of one closed-loop run: budget, deadline, samples, errors."""

    def __init__(self, clients: int, max_requests: int, prefix: str, id_mod: int, keep_latest: bool,
                 rate: float = 0.0):
        self.sequence = itertools.count()
        self.rate = rate  # total requests/s across the clients; 0: as fast as replies come
        self.interval = clients / rate if rate > 0 else 0.0  # each paced client's own period
        self.started = 0.0  # set when the clock starts
        self.late = 0  # paced sends that were already overdue (more than LATE_SLACK) when their turn came
        self.max_requests = max_requests
        self.deadline = math.inf  # set when the clock starts
        self.prefix = prefix
        self.id_mod = id_mod
        self.keep_latest = keep_latest
        self.latencies: list[float] = []
        self.latest: dict[bytes, tuple[int, bytes]] = {}
        self.errors = Errors()
        self.last_reply = 0.0
        self.last_send = 0.0
        self.go = Event()
        self.ready = Event()
        self.waiting = clients

    def arrive(self) -> None:
        """A client is connected (or gave up): the clock starts when all have."""
        self.waiting -= 1
        if self.waiting <= 0:
            self.ready.set()

    def next_client(self) -> str | None:
        """The client id for the next request, or None when the budget or the time is spent."""
        seq = next(self.sequence)
        if seq >= self.max_requests or time.monotonic() >= self.deadline:
            return None
        return f"{self.prefix}-{seq % self.id_mod if self.id_mod else seq}"

    def record(self, started: float, reply: bytes) -> None:
        now = time.monotonic()
        self.latencies.append(now - started)
        self.last_reply = now
        self.last_send = max(self.last_send, started)
        if self.keep_latest:
            fields = reply.split()
            if len(fields) == 6:
                key = order_key(fields)
                if key > self.latest.get(fields[3], (0, b"")):
                    self.latest[fields[3]] = key


def paced(run: Run, k: int) -> Iterator[None]:
    """Client ``k``'s fixed schedule: one turn every ``run.interval`` seconds, client k
    starting ``k / rate`` after the clock (so the clients' sends are staggered evenly).
    A turn that is already overdue comes at once and the schedule restarts from now:
    no catch-up burst. Ends at the run's deadline (or never yields when not paced)."""
    if not run.interval:
        while True:
            yield
    next_at = run.started + k / run.rate
    while next_at < run.deadline:
        delay = next_at - time.monotonic()
        if delay > 0:
            gevent.sleep(delay)
        elif delay < -LATE_SLACK:
            run.late += 1
            next_at = time.monotonic()
        yield
        next_at += run.interval


def persistent_client(run: Run, target: list[Any], k: int = 0) -> None:
    try:
        sock = connect(target)
    except OSError as exc:
        run.errors.add(exc)
        return
    finally:
        run.arrive()
    reader = Reader(sock)
    run.go.wait()
    try:
        for _ in paced(run, k):
            if (client := run.next_client()) is None:
                break
            started = time.monotonic()
            sock.sendall(iamat(client))
            run.record(started, reader.until(b"\n"))
    except (OSError, EOFError) as exc:
        run.errors.add(exc)
    finally:
        sock.close()


def per_request_client(run: Run, target: list[Any]) -> None:
    """Connect, write, half-close, read to EOF: one connection per request."""
    run.arrive()
    run.go.wait()
    while (client := run.next_client()) is not None:
        started = time.monotonic()
        try:
            with connect(target) as sock:
                sock.sendall(iamat(client))
                sock.shutdown(socket.SHUT_WR)
                reply = Reader(sock).to_eof()
        except OSError as exc:
            run.errors.add(exc)
            continue
        run.record(started, reply)


@job
def closed_loop(
    targets: list[list[Any]],
    clients: int,
    duration: float,
    max_requests: int,
    prefix: str,
    id_mod: int = 0,
    per_request: bool = False,
    keep_latest: bool = False,
    rate: float = 0.0,
) -> dict[str, Any]:
    """``clients`` closed-loop clients (client k talks to ``targets[k % len]``), each
    sending one IAMAT and waiting for its reply, until ``max_requests`` or ``duration``.
    Client ids are ``prefix-SEQ`` (or ``prefix-(SEQ mod id_mod)``).

    With ``rate`` (total requests/s, persistent clients only) each client sends on its
    own fixed schedule, one request every ``clients / rate`` s, start times staggered;
    it still waits for each reply, and when that makes it late it sends the next at once."""
    if rate and per_request:
        raise ValueError("rate is for persistent clients only")
    run = Run(clients, max_requests, prefix, id_mod, keep_latest, rate)
    group = Group()
    for k in range(clients):
        if per_request:
            group.spawn(per_request_client, run, targets[k % len(targets)])
        else:
            group.spawn(persistent_client, run, targets[k % len(targets)], k)
    run.ready.wait(IO_TIMEOUT)  # every persistent client connected before the clock starts
    started = time.monotonic()
    run.started = started
    run.deadline = started + duration
    run.go.set()
    if not group.join(timeout=duration + IO_TIMEOUT + 5):
        group.kill(block=False)
        run.errors.add(TimeoutError("clients still running after the deadline"))
    elapsed = time.monotonic() - started
    result: dict[str, Any] = {
        "count": len(run.latencies),
        "elapsed": elapsed,
        "throughput": len(run.latencies) / elapsed if elapsed else 0.0,
        "errors": run.errors.count,
        "first_error": run.errors.first,
        "last_reply": run.last_reply,
        "last_send": run.last_send,
        **summary(run.latencies),
    }
    if rate:
        result.update(rate_asked=rate, late=run.late)
    if keep_latest:
        result["latest"] = {client.decode(): key[1].decode() for client, key in run.latest.items()}
    return result


# -- observers and sinks: listeners named in a herd.ini ------------------------------------------


class Observer:
    """Plays a herd neighbor: accepts the forwarder's connections and reads AT lines (a
    server's ``HELLO`` gets the ``? `` answer of a neighbor that is not a herdserver)."""

    def __init__(self, name: str, port: int, reading: bool = True):
        self.name = name
        self.reading = reading
        self.connected = Event()
        self.closed = Event()
        self.held: list[socket.socket] = []
        self.reset()
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if not reading:  # a small window: the server's send buffer fills sooner
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SINK_RCVBUF)
        listener.bind((HOST, port))
        listener.listen(64)
        self.server = StreamServer(listener, self._handle)
        self.server.start()

    def reset(self) -> None:
        self.lines = 0
        self.table: dict[bytes, bytes] = {}
        self.last_change = 0.0
        self.watches: dict[bytes, AsyncResult] = {}

    def _handle(self, sock: socket.socket, address: object) -> None:
        self.connected.set()
        if not self.reading:
            self.held.append(sock)
            self.closed.wait()
            return
        pending = b""
        while True:
            try:
                data = sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            now = time.monotonic()
            *lines, pending = (pending + data).split(b"\n")
            for line in lines:
                if line.startswith(b"HELLO "):
                    # Answer as another implementation would (``? `` + the line): the forwarder
                    # then sends plain AT lines at once instead of waiting out its connect_timeout
                    # for a hello answer on every connection it opens.
                    try:
                        sock.sendall(b"? " + line + b"\n")
                    except OSError:
                        return
                    continue
                self.take(line, now)

    def take(self, line: bytes, now: float) -> None:
        fields = line.split()
        if len(fields) != 6 or fields[0] != b"AT":
            return
        self.lines += 1
        client, canonical = fields[3], b" ".join(fields)
        if self.table.get(client) != canonical:
            self.table[client] = canonical
            self.last_change = now
        waiter = self.watches.pop(client, None)
        if waiter is not None:
            waiter.set(now)

    def close(self) -> None:
        self.closed.set()
        self.server.stop(timeout=1)


OBSERVERS: dict[str, Observer] = {}


@job
def listen(observers: dict[str, int], reading: bool = True) -> dict[str, Any]:
    """Start listeners (observers, or sinks when ``reading`` is false) on the given ports."""
    for name, port in observers.items():
        OBSERVERS[name] = Observer(name, port, reading)
    return {"listening": sorted(observers)}


@job
def wait_connected(names: list[str], timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    for name in names:
        if not OBSERVERS[name].connected.wait(max(0.0, deadline - time.monotonic())):
            raise TimeoutError(f"no server connected to {name} within {timeout_s:g}s")
    return {"connected": names}


@job
def reset_observers() -> dict[str, Any]:
    for observer in OBSERVERS.values():
        observer.reset()
    return {}


@job
def observer_lines() -> dict[str, Any]:
    return {name: observer.lines for name, observer in OBSERVERS.items()}


@job
def await_convergence(expected: dict[str, str], names: list[str], timeout_s: float) -> dict[str, Any]:
    """Poll until every observer's table (last AT line per client) equals ``expected``."""
    want = {client.encode(): line.encode() for client, line in expected.items()}
    watched = [OBSERVERS[name] for name in names]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(observer.table == want for observer in watched):
            return {
                "converged": True,
                "last_change": max(observer.last_change for observer in watched),
                "lines": {observer.name: observer.lines for observer in watched},
            }
        gevent.sleep(0.005)  # polling tables against a deadline
    differ = {o.name: sum(o.table.get(c) != line for c, line in want.items()) for o in watched}
    return {"converged": False, "differing_clients": differ, "lines": {o.name: o.lines for o in watched}}


# -- propagation probes --------------------------------------------------------------------------


@job
def propagation(
    target: list[Any], observers: list[str], probes: int, duration: float, prefix: str, wait_traffic: bool = False
) -> dict[str, Any]:
    """Sequential IAMATs at ``target``; for each, the time until every observer has the AT line.
    ``sent`` maps each probe's client id to the wall-clock time (``time.time()``) of its send,
    to compare with the time stamps of the servers' logs."""
    watched = [OBSERVERS[name] for name in observers]
    if wait_traffic:  # start once the background load reaches the observers
        seen = watched[0].lines
        deadline = time.monotonic() + IO_TIMEOUT
        while watched[0].lines == seen and time.monotonic() < deadline:
            gevent.sleep(0.001)
    delays: dict[str, list[float]] = {o.name: [] for o in watched}
    replies: list[float] = []
    sent: dict[str, float] = {}
    deadline = time.monotonic() + duration
    with connect(target) as sock:
        reader = Reader(sock)
        for i in range(probes):
            if time.monotonic() > deadline:
                break
            client = f"{prefix}-{i}"
            waits = {o.name: o.watches.setdefault(client.encode(), AsyncResult()) for o in watched}
            line = iamat(client)
            started = time.monotonic()
            sent[client] = time.time()
            sock.sendall(line)
            reader.until(b"\n")
            replies.append(time.monotonic() - started)
            for name, waiter in waits.items():
                delays[name].append(waiter.get(timeout=IO_TIMEOUT) - started)
    return {
        "probes": len(replies), "reply": summary(replies), "sent": sent,
        **{name: summary(d) for name, d in delays.items()},
    }


# -- idle connections ---------------------------------------------------------------------------

IDLE: list[socket.socket] = []


def fd_room() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; how many descriptors that allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def confirm_accepted(target: list[Any]) -> None:
    """One IAMAT on a fresh connection: once answered, the server has accepted every
    connection queued before it (the accept queue is FIFO)."""
    with connect(target) as sock:
        sock.sendall(iamat(f"idle-ping-{time.monotonic_ns()}"))
        Reader(sock).until(b"\n")


@job
def open_idle(target: list[Any], count: int, batch: int, duration: float) -> dict[str, Any]:
    """Open ``count`` connections that never send anything, ``batch`` at a time."""
    room = fd_room() - 200  # descriptors left for everything else in this process
    want = min(count, room)
    errors = Errors()
    deadline = time.monotonic() + duration
    started = time.monotonic()

    def opener() -> None:
        try:
            IDLE.append(connect(target))
        except OSError as exc:
            errors.add(exc)

    while len(IDLE) < want and time.monotonic() < deadline and errors.count < 100:
        group = Group()
        for _ in range(min(batch, want - len(IDLE))):
            group.spawn(opener)
        group.join(timeout=IO_TIMEOUT)
        confirm_accepted(target)
    return {
        "open": len(IDLE), "wanted": count, "fd_limit": room + 200, "seconds": time.monotonic() - started,
        "errors": errors.count, "first_error": errors.first,
    }


@job
def close_idle() -> dict[str, Any]:
    closed = len(IDLE)
    for sock in IDLE:
        sock.close()
    IDLE.clear()
    return {"closed": closed}


# -- WHATSAT burst ------------------------------------------------------------------------------


@job
def whatsat_burst(target: list[Any], clients: int, radius: str, bound: int, prefix: str) -> dict[str, Any]:
    """``clients`` connections each IAMAT their own client, then all WHATSAT at one moment."""
    conns = [(f"{prefix}-{k}", connect(target)) for k in range(clients)]
    readers = [Reader(sock) for _, sock in conns]
    for (client, sock), reader in zip(conns, readers, strict=True):
        sock.sendall(iamat(client))
        reader.until(b"\n")
    release = Event()
    finished: list[float] = []
    statuses: dict[str, int] = {}

    def ask(client: str, sock: socket.socket, reader: Reader) -> None:
        release.wait()
        sock.sendall(f"WHATSAT {client} {radius} {bound}\n".encode())
        reply = reader.until(b"\n\n")
        finished.append(time.monotonic())
        status = json.loads(reply.split(b"\n", 1)[1]).get("status", "?")
        statuses[status] = statuses.get(status, 0) + 1

    group = Group()
    for (client, sock), reader in zip(conns, readers, strict=True):
        group.spawn(ask, client, sock, reader)
    gevent.sleep(0)
    started = time.monotonic()
    release.set()
    group.join(timeout=30)
    for _, sock in conns:
        sock.close()
    return {
        "answered": len(finished),
        "total_s": (max(finished) - started) if finished else 0.0,
        "statuses": statuses,
        **summary([t - started for t in finished]),
    }


# -- the job loop ---------------------------------------------------------------------------------


@job
def hello() -> dict[str, Any]:
    return {"pid": os.getpid()}


def read_lines(fd: int) -> Iterator[bytes]:
    """Lines from stdin without blocking the hub (listeners keep serving meanwhile)."""
    gevent.os.make_nonblocking(fd)
    pending = b""
    while True:
        data = gevent.os.nb_read(fd, 65536)
        if not data:
            return
        *lines, pending = (pending + data).split(b"\n")
        yield from lines


def answer(request: dict[str, Any]) -> dict[str, Any]:
    try:
        return {"ok": True, "result": JOBS[request["job"]](**request["args"])}
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        return {"ok": False, "error": f"{request.get('job')}: {type(exc).__name__}: {exc}"}


def main() -> int:
    fd_room()
    for line in read_lines(sys.stdin.fileno()):
        reply = json.dumps(answer(json.loads(line))).encode() + b"\n"
        sys.stdout.buffer.write(reply)
        sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
