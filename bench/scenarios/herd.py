"""A big herd (50 and 100 servers): what one update costs the whole herd.

For each size N (``herd_sizes``), N servers on loopback from a generated herd.ini: a ring
plus a second, random Hamiltonian cycle edge-disjoint from it (seeded), so every server
has 4 links and the diameter is small; the offline Places provider (the cache built once,
beforehand), memory only (``state_dir = -``), an HTTP side per server (``/readyz``,
``/status``, ``/metrics``). Client ports are one block, HTTP ports the block + 1000, and the
block + 2000 is checked free (the default herd port, client port + 2000, where a base
revision from before it opens nothing). Once every server is ready and the herd's CPU is quiet:

(d) idle: the herd's CPU (utime+stime of every server, /proc/PID/stat) over
    ``herd_idle_seconds`` of quiet, as % of one core; connections opened meanwhile
    (periodic reconciliations);
then ``herd_updates`` IAMATs, each at a random server on a connection of its own, one
every ``herd_gap`` seconds (so each update's traffic is its own), until the herd is
quiet again:
(a) TCP connections opened between herd processes per update, from /proc: a socket of
    /proc/net/tcp with one end on a port a server listens on (found by socket inode in
    /proc/PID/fd, no config read; HTTP ports left out) and the other not a socket of the
    bench's; sampled every 50 ms and at the end, closed ones still seen in TIME_WAIT (60 s),
    so none is missed; minus the idle rate over the same time. Beside it the same from the
    servers' own ``herd_link_connections_total`` (/metrics), where the code has it;
(b) herd CPU per update: the CPU of all N servers over the update phase minus the idle
    rate over the same time, divided by the updates;
(c) time until every server holds an update: from the IAMAT's reply (wall clock, read by
    the bench) to the latest of the other N-1 servers' first AT line carrying that client
    in its log, read (``event=in``) or forwarded (``event=out neighbor=``: herd-port links
    log no ``event=in``, so with them it is the first forward, one send after the store;
    UTC stamps in microseconds, the same machine clock; read after a graceful stop flushed
    the logs). p50/p99 over updates.

With ``--compare REV`` (and ``--only herd``) each size runs on REV's code too, first, from a
``git worktree`` checkout (a revision that knows ``state_dir`` and ``http_port``), and this
tree's rows carry the base's figures as their baselines: side by side in one run.

Targets (the herd-port issue): no connection opened per update once links are up, and at
100 servers herd CPU per update <= 15 ms, every server holding an update within p99 <= 20 ms,
an idle herd under 2% of one core.
"""

from __future__ import annotations

import json
import os
import random
import socket
import sys
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.harness import (
    HOST,
    ROOT,
    TCP_LISTEN,
    BenchError,
    Checkout,
    Herd,
    Lab,
    cpu_seconds,
    listening_ports,
    port_block,
    settled,
    tcp_table,
    timed_run,
)
from bench.report import Row, Section, Target
from bench.scenarios.common import Context, percentiles
from bench.scenarios.propagation import arrivals

DEGREE = 4  # links per server: the ring's 2 and the random cycle's 2
HTTP_OFFSET = 1000  # herd.ini's default http_port offset, written out (the bench reads /status)
RESERVED_OFFSET = 2000  # checked free: the default herd_port (client port + 2000)
SEED = 8
TOPOLOGY_TRIES = 100_000  # random cycles drawn until one shares no edge with the ring
OFFLINE = {"provider": "offline", "timeout": "5"}
UCLA = "+34.068930-118.445127"
SAMPLE_S = 0.05  # /proc/net/tcp samples during the update phase (a link lives >= link_idle)
IDLE_SAMPLE_S = 0.5
START_S = 180.0  # N servers start at once on 2 cores: ~0.3 s of CPU each
READY_S = 60.0
QUIET_S = 0.5  # CPU readings this far apart ...
QUIET_DEADLINE_S = 60.0  # ... until the herd is quiet, or this long
STOP_S = 60.0  # graceful stop of N servers (their logs are flushed on the way out)
IO_TIMEOUT = 5.0
STARTUP_IDLE_RATE = 0.003  # CPU s/s per idle server (0.2% of a core measured), to wait out the start-up syncs


@dataclass(frozen=True)
class Side:
    """The code a herd runs: this working tree, or a base revision's checkout (``--compare REV``)."""

    key: str
    title: str
    code: Path
    module: str = "herdserver"  # bench.flood_floor for the floor side
    http: bool = True  # serves /readyz, /status, /metrics on port + HTTP_OFFSET (the floor does not)


# -- the herd.ini ---------------------------------------------------------------------------------


def name(i: int) -> str:
    return f"S{i:03d}"


def ring_and_cycle(n: int, rng: random.Random) -> set[frozenset[int]]:
    """The ring 0-1-...-(n-1)-0 plus a random Hamiltonian cycle sharing no edge with it:
    4 links each (a 4-regular graph), diameter ~log n instead of the ring's n/2."""
    ring = {frozenset((i, (i + 1) % n)) for i in range(n)}
    order = list(range(n))
    for _ in range(TOPOLOGY_TRIES):
        rng.shuffle(order)
        cycle = {frozenset((order[i], order[(i + 1) % n])) for i in range(n)}
        if not cycle & ring:
            return ring | cycle
    raise BenchError(f"no random cycle of {n} edge-disjoint from the ring in {TOPOLOGY_TRIES} tries")


def diameter(n: int, edges: set[frozenset[int]]) -> int:
    """Breadth-first from every server: the most hops an update needs."""
    adjacent: dict[int, list[int]] = {i: [] for i in range(n)}
    for a, b in (tuple(edge) for edge in edges):
        adjacent[a].append(b)
        adjacent[b].append(a)
    longest = 0
    for source in range(n):
        hops = {source: 0}
        queue = deque([source])
        while queue:
            here = queue.popleft()
            for there in adjacent[here]:
                if there not in hops:
                    hops[there] = hops[here] + 1
                    queue.append(there)
        if len(hops) < n:
            raise BenchError("the generated herd is not connected")
        longest = max(longest, max(hops.values()))
    return longest


def topology(n: int, seed: int) -> tuple[dict[str, list[str]], int]:
    """herd.ini links (each written once, on its lower-numbered end: herdserver takes a link
    named on one side as both ways) and the diameter."""
    edges = ring_and_cycle(n, random.Random(seed))
    links: dict[str, list[str]] = {name(i): [] for i in range(n)}
    for a, b in sorted(tuple(sorted(edge)) for edge in edges):
        links[name(a)].append(name(b))
    return links, diameter(n, edges)


# -- /proc: connections between herd processes ------------------------------------------------------


@dataclass
class ConnectionWatch:
    """Connections seen with one end on a herd server's port (``server_ports``) and the other
    not one of the bench's own sockets (``ours``), counted from one sample to later ones."""

    server_ports: set[int]
    ours: set[int] = field(default_factory=set)
    held: set[tuple[int, int, int]] = field(default_factory=set)  # (server port, other port, inode)
    pairs: set[tuple[int, int]] = field(default_factory=set)  # (server port, other port), in any state
    start: int = 0

    def sample(self) -> None:
        for row in tcp_table():
            if row.state == TCP_LISTEN:
                continue
            if row.local_port in self.server_ports:
                pair = (row.local_port, row.remote_port)
            elif row.remote_port in self.server_ports:
                pair = (row.remote_port, row.local_port)  # the connecting side (TIME_WAIT when it closed first)
            else:
                continue
            if pair[1] in self.ours:
                continue
            self.pairs.add(pair)
            if row.inode and pair[0] == row.local_port:  # the accepting server's socket, while it holds it
                self.held.add((*pair, row.inode))

    def total(self) -> int:
        """Distinct connections: each held socket, and each pair never seen held (it came and
        went between two samples; its TIME_WAIT row stays 60 s)."""
        held_pairs = {(port, other) for port, other, _ in self.held}
        return len(self.held) + len(self.pairs - held_pairs)

    def restart(self) -> None:
        self.sample()
        self.start = self.total()

    def opened(self) -> int:
        self.sample()
        return self.total() - self.start


def server_ports(herd: Herd) -> set[int]:
    """The ports the servers listen on for clients and peers (today one each; a herd port
    later), not their HTTP ports."""
    return listening_ports(herd.pids()) - set(herd.http_ports.values())


# -- HTTP side -------------------------------------------------------------------------------------


def http_get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=IO_TIMEOUT) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_ready(herd: Herd) -> None:
    """Until every server's /readyz says 200 (listening, state loaded, a link up)."""
    deadline = time.monotonic() + READY_S
    for server, port in herd.http_ports.items():
        while http_get(port, "/readyz")[0] != 200:
            if time.monotonic() > deadline:
                raise BenchError(f"{server} not ready after {READY_S:g}s: {http_get(port, '/readyz')[1]!r}")
            time.sleep(0.1)  # polling readiness against a deadline


def links_up(herd: Herd) -> int:
    """Links the servers' /status call up (implementation's view; reported, not relied on)."""
    up = 0
    for port in herd.http_ports.values():
        links = json.loads(http_get(port, "/status")[1]).get("links", {})
        up += sum(1 for link in links.values() if link.get("up"))
    return up


def link_connections(herd: Herd) -> float | None:
    """herd_link_connections_total summed over the herd's /metrics (None where no server has it)."""
    total, found = 0.0, False
    for port in herd.http_ports.values():
        for line in http_get(port, "/metrics")[1].decode().splitlines():
            if line.startswith("herd_link_connections_total"):
                total += float(line.rsplit(None, 1)[1])
                found = True
    return total if found else None


# -- phases ------------------------------------------------------------------------------------------


def start_herd(lab: Lab, n: int, side: Side) -> tuple[Herd, int]:
    links, hops = topology(n, SEED)
    first = port_block(n, (0, HTTP_OFFSET, RESERVED_OFFSET))
    ports = {server: first + i for i, server in enumerate(links)}
    # Without an HTTP side: none in its herd.ini, none polled (wait_ready, /status, /metrics).
    http_ports = {server: port + HTTP_OFFSET for server, port in ports.items()} if side.http else {}
    herd = lab.herd(f"{side.key}{n}", links, herd_keys={"state_dir": "-"}, places_keys=OFFLINE, ports=ports,
                    http_ports=http_ports)
    lab.start_servers(herd, list(links), code=side.code, env={"HERDSERVER_CACHE_DIR": str(lab.dir / "cache")},
                      timeout=START_S, module=side.module)
    return herd, hops


def quiet(herd: Herd, idle_rate: float) -> float:
    """CPU seconds once the herd is back to its idle rate (a reading QUIET_S apart within 50%)."""
    slack = idle_rate * QUIET_S * 1.5 + 0.01
    return settled(lambda: cpu_seconds(herd.pids()), QUIET_S, QUIET_DEADLINE_S, slack)


def idle_window(herd: Herd, watch: ConnectionWatch, seconds: float) -> dict[str, float]:
    """The herd left alone: its CPU and the connections it opens (reconciliations)."""
    watch.restart()
    cpu, started = cpu_seconds(herd.pids()), time.monotonic()
    while time.monotonic() - started < seconds:
        time.sleep(IDLE_SAMPLE_S)  # pacing the samples of a quiet herd
        watch.sample()
    elapsed = time.monotonic() - started
    return {"seconds": elapsed, "cpu_s": cpu_seconds(herd.pids()) - cpu, "connections": watch.opened()}


def iamat(port: int, client: str, watch: ConnectionWatch) -> tuple[float, float]:
    """One IAMAT on a connection of its own: (send, reply) wall-clock times."""
    with socket.create_connection((HOST, port), timeout=IO_TIMEOUT) as sock:
        watch.ours.add(sock.getsockname()[1])
        sent = time.time()
        sock.sendall(f"IAMAT {client} {UCLA} {sent:.9f}\n".encode())
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = sock.recv(4096)
            if not chunk:
                raise BenchError(f"{client}: EOF before the IAMAT reply")
            reply += chunk
        replied = time.time()
    if not reply.startswith(b"AT "):
        raise BenchError(f"{client}: {reply!r}")
    return sent, replied


def send_updates(herd: Herd, watch: ConnectionWatch, ctx: Context, tag: str) -> list[dict[str, Any]]:
    """``herd_updates`` IAMATs at random servers, one per ``herd_gap``; /proc sampled between."""
    rng = random.Random(SEED)
    servers = list(herd.ports)
    sends = []
    next_at = time.monotonic()
    for k in range(ctx.settings.herd_updates):
        origin = rng.choice(servers)
        client = f"{tag}{k}"
        sent, replied = iamat(herd.ports[origin], client, watch)
        sends.append({"client": client, "origin": origin, "sent": sent, "replied": replied})
        next_at += ctx.settings.herd_gap
        while time.monotonic() < next_at:
            watch.sample()
            time.sleep(max(0.0, min(SAMPLE_S, next_at - time.monotonic())))  # pacing the updates
    return sends


def update_phase(herd: Herd, watch: ConnectionWatch, ctx: Context, tag: str,
                 idle: dict[str, float]) -> dict[str, Any]:
    idle_rate = idle["cpu_s"] / idle["seconds"]
    metrics_before = link_connections(herd)
    watch.restart()
    cpu, started = cpu_seconds(herd.pids()), time.monotonic()
    sends = send_updates(herd, watch, ctx, tag)
    cpu_after = quiet(herd, idle_rate)
    elapsed = time.monotonic() - started
    connections = watch.opened()
    metrics_after = link_connections(herd)
    metrics = None if metrics_before is None or metrics_after is None else metrics_after - metrics_before
    return {"sends": sends, "seconds": elapsed, "cpu_s": cpu_after - cpu, "connections": connections,
            "metrics_connections": metrics}


def hold_times(herd: Herd, sends: list[dict[str, Any]], tag: str) -> tuple[list[float], int]:
    """Per update, the last other server's first receipt minus the IAMAT reply (seconds);
    how many updates some server never logged."""
    first = {server: arrivals(herd, server, tag.encode()) for server in herd.ports}
    delays, incomplete = [], 0
    for send in sends:
        times = [first[server].get(send["client"]) for server in herd.ports if server != send["origin"]]
        if None in times:
            incomplete += 1
            continue
        delays.append(max(t for t in times if t is not None) - send["replied"])
    return delays, incomplete


def measure_size(lab: Lab, n: int, ctx: Context, side: Side) -> dict[str, Any]:
    tag = f"herd{n}u"
    herd, hops = start_herd(lab, n, side)
    try:
        wait_ready(herd)
        watch = ConnectionWatch(server_ports(herd))
        up = links_up(herd)
        quiet(herd, STARTUP_IDLE_RATE * n)  # the start-up reconciliations are over before any window
        idle = idle_window(herd, watch, ctx.settings.herd_idle_seconds)
        phase = update_phase(herd, watch, ctx, tag, idle)
    finally:
        lab.stop_servers(herd, STOP_S)
    delays, incomplete = hold_times(herd, phase["sends"], tag)
    return {"n": n, "diameter": hops, "links": n * DEGREE // 2, "links_up_at_start": up, "http": bool(herd.http_ports),
            "server_ports": len(watch.server_ports), "idle": idle, "phase": phase,
            "holds": percentiles(delays), "held": len(delays), "incomplete": incomplete}


# -- figures ----------------------------------------------------------------------------------------


def figures(result: dict[str, Any]) -> dict[str, float | None]:
    idle, phase = result["idle"], result["phase"]
    updates = len(phase["sends"])
    idle_cpu_rate, idle_conn_rate = idle["cpu_s"] / idle["seconds"], idle["connections"] / idle["seconds"]
    metrics = phase["metrics_connections"]
    return {
        "connections": (phase["connections"] - idle_conn_rate * phase["seconds"]) / updates,
        "metrics_connections": None if metrics is None else (metrics - idle_conn_rate * phase["seconds"]) / updates,
        "cpu_ms": (phase["cpu_s"] - idle_cpu_rate * phase["seconds"]) / updates * 1000,
        "hold_p50": result["holds"]["p50_ms"] if result["held"] else None,
        "hold_p99": result["holds"]["p99_ms"] if result["held"] else None,
        "idle_cpu_pct": idle_cpu_rate * 100,
        "idle_connections": idle_conn_rate,
    }


FIGURES = (  # key, label ({n}: the size), unit
    ("connections", "TCP connections opened per update (/proc)", "conns"),
    ("metrics_connections", "the same, herd_link_connections_total (/metrics)", "conns"),
    ("cpu_ms", "herd CPU per update (all {n} servers)", "ms"),
    ("hold_p50", "IAMAT reply -> every server holds it p50", "ms"),
    ("hold_p99", "IAMAT reply -> every server holds it p99", "ms"),
    ("idle_cpu_pct", "idle herd CPU (all {n} servers)", "% core"),
    ("idle_connections", "idle: connections opened per second", "conns/s"),
)


# figure key -> (at most this, the smallest herd it applies to): the herd-port issue's targets
CONNECTION_EPSILON = 0.01  # "0 per update", after subtracting the idle rate (a float)
TARGETS: dict[str, tuple[float, int]] = {
    "connections": (CONNECTION_EPSILON, 0),
    "metrics_connections": (CONNECTION_EPSILON, 0),
    "cpu_ms": (15.0, 100),
    "hold_p99": (20.0, 100),
    "idle_cpu_pct": (2.0, 100),
}


def target(key: str, n: int, value: float | None) -> Target | None:
    if key not in TARGETS or n < TARGETS[key][1]:
        return None
    limit = TARGETS[key][0]
    text = "0" if limit == CONNECTION_EPSILON else f"<= {limit:g}"
    return Target(text, value is not None and value <= limit, "issue")


def rows(result: dict[str, Any], base: dict[str, Any] | None, base_title: str, prefix: str) -> list[Row]:
    """One row per figure; beside it the base revision's (when compared), else the link count
    for the connection rows."""
    n, mine = result["n"], figures(result)
    theirs = figures(base) if base is not None else None
    out = []
    for key, label, unit in FIGURES:
        row = Row(f"{prefix}N={n}: {label.format(n=n)}", mine[key], unit, target=target(key, n, mine[key]))
        if theirs is not None:
            row.baseline, row.baseline_label = theirs[key], base_title
        elif key.endswith("connections") and key != "idle_connections":
            row.baseline, row.baseline_label = result["links"], "herd links"
        out.append(row)
    return out


def notes(result: dict[str, Any], ctx: Context) -> list[str]:
    n, idle, phase = result["n"], result["idle"], result["phase"]
    s = ctx.settings
    out = [
        f"N={n}: ring + a random edge-disjoint cycle (seed {SEED}): {result['links']} links, {DEGREE} per server, "
        f"diameter {result['diameter']} hops; {result['server_ports']} server ports found listening"
        + (f"; {result['links_up_at_start']} of {2 * result['links']} link ends 'up' in /status once ready"
           if result["http"] else " (no HTTP side: ready once its client port listens, after every link)"),
        f"N={n}: {len(phase['sends'])} IAMATs, one per {s.herd_gap:g} s at random servers, "
        f"{phase['seconds']:.1f} s until the herd was quiet again: {phase['cpu_s']:.2f} s CPU, "
        f"{phase['connections']} connections seen; idle {idle['seconds']:.1f} s: {idle['cpu_s']:.2f} s CPU, "
        f"{idle['connections']} connections (subtracted at that rate)",
    ]
    if result["incomplete"]:
        out.append(f"N={n}: {result['incomplete']} updates not in every server's log (left out of the hold times)")
    return out


def build_cache(lab: Lab) -> None:
    """Once per scenario, so no server of the herd builds it (or waits for it)."""
    timed_run([sys.executable, "-m", "herdserver.offline", "build-cache"],
              env={"HERDSERVER_CACHE_DIR": str(lab.dir / "cache")})


FLOOR = Side("floor", "the flood floor (bench/flood_floor.py)", ROOT, module="bench.flood_floor", http=False)
FLOOR_FIGURES = ("cpu_ms", "hold_p50", "hold_p99", "idle_cpu_pct")


def floor_rows(result: dict[str, Any], floor: dict[str, Any]) -> list[Row]:
    """This tree's CPU and hold times beside the flood floor's, on the same graph in the same run:
    how far herdserver is from the least the SPEC's flood costs in one Python process per server."""
    n, mine, theirs = result["n"], figures(result), figures(floor)
    return [Row(f"N={n}: {label.format(n=n)}, beside the flood floor", mine[key], unit, baseline=theirs[key],
                baseline_label="flood floor")
            for key, label, unit in FIGURES if key in FLOOR_FIGURES]


def floor_notes(floor: dict[str, Any]) -> list[str]:
    """Say so when the floor itself misses a target: no herdserver change could meet it then,
    short of flooding less than the SPEC asks."""
    n, theirs = floor["n"], figures(floor)
    return [f"N={n}: the flood floor itself misses the target on '{label.format(n=n)}' ({theirs[key]:.3g} {unit} "
            f"against {TARGETS[key][0]:g}): the SPEC's flood costs that much on this machine before any server code"
            for key, label, unit in FIGURES
            if key in FLOOR_FIGURES and (t := target(key, n, theirs[key])) is not None and not t.met]


def measure_sides(lab: Lab, sides: list[Side], ctx: Context, section: Section) -> None:
    """Each size on each side (the floor, then the base when there is one, then this tree); the
    rows of this tree's, beside the base's, then beside the floor's."""
    base_title = sides[-1].title if len(sides) > 1 else ""
    prefix = "new, " if len(sides) > 1 else ""
    for n in ctx.settings.herd_sizes:
        everyone = [FLOOR, *reversed(sides)]
        results = {side.key: measure_size(lab, n, ctx, side) for side in everyone}
        section.add(*rows(results["new"], results.get("base"), base_title, prefix))
        section.add(*floor_rows(results["new"], results["floor"]))
        section.notes += floor_notes(results["floor"])
        for side in everyone:
            section.notes += [f"{side.title}, {note}" for note in notes(results[side.key], ctx)]
            section.raw[f"{side.key}-n{n}"] = {**results[side.key], "figures": figures(results[side.key])}


def run(ctx: Context) -> Section:
    section = Section("herd")
    lab = Lab(ctx.work_dir, "herd", ctx.places_url)
    checkout: Checkout | None = None
    try:
        build_cache(lab)
        sides = [Side("new", "this working tree", ROOT)]
        if ctx.compare_rev:  # --compare REV --only herd: the base's herd beside this one's
            checkout = Checkout(lab.dir, ctx.compare_rev)
            sides.append(Side("base", f"base {checkout.commit}", checkout.path))
        measure_sides(lab, sides, ctx, section)
    finally:
        lab.close()
        if checkout is not None:
            checkout.close()
    section.notes += [
        "connections: sockets in /proc/net/tcp with one end on a port a server listens on (by inode, HTTP ports "
        "excluded) and the other end not the bench's, sampled every 50 ms and at the end (a closed one stays in "
        "TIME_WAIT for 60 s); per update = (seen - idle rate x phase time) / updates; baseline = the herd's links "
        "(the base's figure with --compare)",
        "CPU: utime+stime of every server (/proc/PID/stat), update phase minus the idle rate over the same time; "
        "hold time: IAMAT reply (bench's wall clock) to the latest other server's first AT line for that client "
        "in its log, read (event=in) or forwarded (event=out neighbor=; herd-port links log no event=in, so there "
        "the first forward, one send after the store) (microsecond UTC stamps, same clock)",
        f"this machine has {len(os.sched_getaffinity(0))} cores for all N servers and the bench: "
        "a flood through N processes queues for them, so hold times grow with N for that reason alone",
    ]
    return section
