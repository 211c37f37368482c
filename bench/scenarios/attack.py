"""Honest clients under attack: every attack of the security issue at once, against one server.

A two-server herd (``Target`` and its neighbor ``Peer``, an authenticated link:
``[herd] secret_env`` set) with short timeouts. While ``Target`` holds ~20,000
idle and trickling connections from 100 loopback addresses, 100 clients pipeline
WHATSATs and read nothing, and a forger sends AT lines and far-future IAMATs for
a victim client, one honest client measures IAMAT latency; the same honest
measurement runs before and after the attack on the same server. Then the
victim's record is read back from both servers, and a last variant opens the
same number of connections from one address (the per-address cap).
"""

from __future__ import annotations

import os
import resource
import sys
import time
import urllib.request
from typing import Any

from bench.harness import HOST, BenchError, Herd, Lab, LoadWorker, cpu_seconds, rss_kb, stable_rss_kb
from bench.report import Row, Section, Target
from bench.scenarios.common import JOB_SLACK, QUICK, Context, closed_loop, target
from herdserver.core.limits import max_connections

SECRET_ENV = "HERD_BENCH_SECRET"
LIMITS = {"line_timeout": 2, "write_timeout": 3, "idle_timeout": 300, "max_connections_per_ip": 1000,
          "max_clock_skew": 60}
WANTED = 20_000  # idle + trickling connections the issue asks for
FD_MARGIN = 400  # descriptors left to the pipeliners, the forger, the honest client and reconnects
SOURCES = [f"127.0.0.{i}" for i in range(2, 102)]  # 100 loopback addresses: 200 or so each, under the cap
PIPELINERS = 100
PIPELINE_SOURCE = "127.0.0.250"
FORGER_SOURCES = ["127.0.0.1", "127.0.0.251"]  # the herd's own address, and another
VICTIM = "victim.example"
P99_RATIO_LIMIT = 5.0  # issue: honest IAMAT p99 within 5x of the same server unattacked
KB_PER_CONN_LIMIT = 8.0  # the issue states "bounded by a stated figure"; 8 KB (the idle-connection target) assumed
KB_SOURCE = f"issue; {KB_PER_CONN_LIMIT:g} KB assumed"
TRICKLE_EVERY = (2.0, 3.0)  # seconds between a trickler's bytes
CROWD_SHARE = 90  # the server's max_connections, as a share (%) of the idle + trickling crowd
NEWCOMERS = 10
NEWCOMER_SOURCE = "127.0.0.252"
STUCK_KB_LIMIT = 256  # issue: server memory per client that pipelines WHATSATs and never reads
STUCK_SECONDS = 10.0  # stuck readers alone: long enough for their Places calls to pile up


def herd(lab: Lab, slots: int = 0) -> Herd:
    """Target <-> Peer with HTTP sides (metrics), a shared secret and short timeouts;
    ``slots``: their ``max_connections`` (0: derived from the descriptor limit)."""
    h = lab.herd("attack", {"Target": ["Peer"], "Peer": []}, http=True)
    text = h.path.read_text().replace("[herd]\n", f"[herd]\nsecret_env = {SECRET_ENV}\n", 1)
    limits = {**LIMITS, "max_connections": slots}
    text += "\n[limits]\n" + "".join(f"{key} = {value}\n" for key, value in limits.items())
    h.path.write_text(text)
    return h


def metrics(h: Herd, server: str) -> dict[str, float]:
    """The server's /metrics, as ``name{labels}`` -> value."""
    with urllib.request.urlopen(f"http://{HOST}:{h.http_ports[server]}/metrics", timeout=10) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def open_conns(m: dict[str, float]) -> int:
    # The states partition the open connections: their sum is all of them.
    return int(sum(m.get(f'herd_connections{{state="{state}"}}', 0) for state in ("active", "parked")))


def evicted(m: dict[str, float]) -> int:
    return int(m.get("herd_connections_evicted_total", 0))


def refused(m: dict[str, float]) -> int:
    return int(m.get("herd_connections_refused_total", 0))


def dropped_slow(m: dict[str, float]) -> int:
    return int(m.get("herd_clients_dropped_slow_total", 0))


def forged(m: dict[str, float]) -> int:
    return int(m.get('herd_dropped_lines_total{reason="forged"}', 0))


def whatsats(m: dict[str, float]) -> int:
    return int(m.get('herd_commands_total{command="WHATSAT",result="ok"}', 0))


def server_queues(port: int) -> int:
    """Bytes in the kernel queues (send + receive) of the server's sockets on ``port``:
    kernel memory, not the process's RSS."""
    total = 0
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            if int(fields[1].split(":")[1], 16) == port and fields[3] == "01":  # ESTABLISHED
                tx, rx = fields[4].split(":")
                total += int(tx, 16) + int(rx, 16)
    return total


def stuck_readers(h: Herd, worker: LoadWorker, server: str) -> dict[str, Any]:
    """``PIPELINERS`` clients pipelining WHATSATs and reading nothing, alone against a server
    nothing else has loaded yet: the peak of its RSS over them (process memory: queued
    replies, Places calls in flight, lines read), and apart from it the peak of its
    sockets' kernel queues. They are dropped at ``write_timeout``; no reconnects."""
    pid, port = h.pid(server), h.ports[server]
    rss0 = stable_rss_kb(pid)
    seconds = STUCK_SECONDS
    worker.call("pipeline_start", timeout=JOB_SLACK, name="stuck", target=target(port), clients=PIPELINERS,
                prefix="stuck", source=PIPELINE_SOURCE, duration=seconds, max_reconnects=0)
    peak, kernel = rss0, 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.05)  # sampling /proc for the peak: no event says "the most is held now"
        peak, kernel = max(peak, rss_kb(pid)), max(kernel, server_queues(port))
    status = worker.call("attack_stop", timeout=JOB_SLACK, name="stuck")
    return {"rss0_kb": rss0, "peak_kb": peak, "per_reader_kb": (peak - rss0) / PIPELINERS,
            "kernel_per_reader_kb": kernel / 1024 / PIPELINERS, "seconds": seconds, "pipeliners": status}


def honest_whatsat(worker: LoadWorker, port: int, seconds: float, tag: str) -> dict[str, Any]:
    result: dict[str, Any] = worker.call("honest_whatsat", timeout=seconds + JOB_SLACK, target=target(port),
                                         client=f"honest-whatsat-{tag}", seconds=seconds, max_requests=100_000)
    return result


def honest(worker: LoadWorker, port: int, seconds: float, tag: str) -> dict[str, Any]:
    result = closed_loop(worker, [port], 1, seconds, 1_000_000, f"honest-{tag}")
    if result["errors"]:
        raise BenchError(f"honest client {tag}: {result['errors']} errors, first: {result['first_error']}")
    return result


def wait_opened(workers: list[LoadWorker], name: str, timeout: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        statuses = [w.call("attack_status", timeout=JOB_SLACK, name=name) for w in workers]
        if all("opened_all_at" in s for s in statuses):
            return statuses
        if time.monotonic() > deadline:
            raise BenchError(f"{name}: connections not all opened within {timeout:g}s: {statuses}")
        time.sleep(0.5)  # polling the attackers' counters against a deadline


def log_count(h: Herd, server: str, needle: bytes) -> int:
    with open(h.log_path(server), "rb") as log:
        return sum(1 for line in log if needle in line)


def bad_records(held: list[str], honest_lines: list[str]) -> dict[str, int]:
    """Classify what the servers hold for the victim: ``forged`` = a record no honest
    IAMAT produced; ``pinned`` = a time beyond the clock-skew limit; ``stale`` = an
    older honest record (the newest had not reached that server); ``absent``."""
    counts = {"forged": 0, "pinned": 0, "stale": 0, "absent": 0, "current": 0}
    for line in held:
        fields = line.split()
        if line.startswith("? "):
            counts["absent"] += 1
            continue
        if line not in honest_lines:
            counts["forged"] += 1
        elif line != honest_lines[-1]:
            counts["stale"] += 1
        else:
            counts["current"] += 1
        if len(fields) == 6 and float(fields[5]) > time.time() + LIMITS["max_clock_skew"]:
            counts["pinned"] += 1
    return counts


def run(ctx: Context) -> Section:
    section = Section("attack")
    quick = ctx.settings is QUICK
    honest_s = 2.0 if quick else 8.0
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    cap = max_connections(0, hard, 1, 100)  # the server's own derived max_connections (1 neighbor, pool 100)
    count = min(2_000 if quick else WANTED, (cap - FD_MARGIN) // 100 * 100)
    slots = count * CROWD_SHARE // 100  # the crowd is more than the server holds: it fills every slot
    os.environ[SECRET_ENV] = "bench-attack-secret-0123456789"
    lab = Lab(ctx.work_dir, "attack", ctx.places_url)
    try:
        h = herd(lab, slots)
        lab.start_servers(h, ["Target", "Peer"])
        port, pid = h.ports["Target"], h.pid("Target")
        targets = [target(h.ports[s]) for s in ("Target", "Peer")]
        good = lab.worker("honest")
        floods = [LoadWorker(lab.spawn(f"flood{i}", [sys.executable, "-m", "bench.attack_load"], pipes=True))
                  for i in range(2)]
        other = LoadWorker(lab.spawn("attackers", [sys.executable, "-m", "bench.attack_load"], pipes=True))
        for w in (*floods, other):
            w.call("hello", timeout=30)
        victim0 = other.call("honest_iamat", timeout=JOB_SLACK, target=target(port), client=VICTIM)["reply"]

        judge = LoadWorker(lab.spawn("honest-whatsat", [sys.executable, "-m", "bench.attack_load"], pipes=True))
        judge.call("hello", timeout=30)
        # Stuck readers alone, against Peer (nothing has loaded it yet: no allocator high-water mark)
        stuck = stuck_readers(h, other, "Peer")
        before = honest(good, port, honest_s, "before")
        whatsat_before = honest_whatsat(judge, port, honest_s, "before")
        rss_before = stable_rss_kb(pid)
        m0 = metrics(h, "Target")

        attack_s = 150.0
        half = len(SOURCES) // 2
        started = time.monotonic()
        for i, w in enumerate(floods):
            w.call("flood_start", timeout=JOB_SLACK, name="flood", target=target(port), count=count // 2,
                   sources=SOURCES[i * half:(i + 1) * half], trickle_every=2, batch=250, duration=attack_s,
                   every=list(TRICKLE_EVERY), max_reconnects=1_000_000)
        wait_opened(floods, "flood", 90.0)
        newcomers = other.call("newcomers", timeout=JOB_SLACK, target=target(port), count=NEWCOMERS,
                               source=NEWCOMER_SOURCE, timeout_s=1.0)
        open_s = time.monotonic() - started
        rss_open = stable_rss_kb(pid)
        m1 = metrics(h, "Target")
        flood_only = honest(good, port, honest_s, "flood-only")  # attribution: the floods alone
        other.call("pipeline_start", timeout=JOB_SLACK, name="pipe", target=target(port), clients=PIPELINERS,
                   prefix="pipe", source=PIPELINE_SOURCE, duration=attack_s, max_reconnects=100_000)
        other.call("forge_start", timeout=JOB_SLACK, name="forge", targets=targets,
                   servers=["Target", "Peer", "Nobody"],
                   victim=VICTIM, sources=FORGER_SOURCES, duration=attack_s, max_lines=1_000_000)
        time.sleep(2.0)  # the pipeliners' buffers fill
        cpu0, wall0, w0 = cpu_seconds([pid]), time.monotonic(), whatsats(metrics(h, "Target"))
        attacked = honest(good, port, honest_s, "attacked")
        whatsat_attacked = honest_whatsat(judge, port, honest_s, "attacked")
        cpu_share = (cpu_seconds([pid]) - cpu0) / (time.monotonic() - wall0)
        whatsat_rate = (whatsats(metrics(h, "Target")) - w0) / (time.monotonic() - wall0)
        victim1 = other.call("honest_iamat", timeout=JOB_SLACK, target=target(port), client=VICTIM)["reply"]
        time.sleep(1.0)  # the forger keeps going after the honest update
        rss_end = stable_rss_kb(pid)
        m2 = metrics(h, "Target")
        flood_st = [w.call("attack_stop", timeout=JOB_SLACK, name="flood") for w in floods]
        pipe_st = other.call("attack_stop", timeout=JOB_SLACK, name="pipe")
        forge_st = other.call("attack_stop", timeout=JOB_SLACK, name="forge")
        m3 = metrics(h, "Target")
        held1 = other.call("record_of", timeout=JOB_SLACK, targets=targets, client=VICTIM)["held"]
        victim2 = other.call("honest_iamat", timeout=JOB_SLACK, target=target(port), client=VICTIM)["reply"]
        time.sleep(0.5)  # one hop to Peer
        held2 = other.call("record_of", timeout=JOB_SLACK, targets=targets, client=VICTIM)["held"]

        time.sleep(LIMITS["line_timeout"] + 1)  # the server is done closing what the attack left
        after = honest(good, port, honest_s, "after")

        # the same number of idle connections from one address: the per-address cap
        m4 = metrics(h, "Target")
        rss_after = stable_rss_kb(pid)
        floods[0].call("flood_start", timeout=JOB_SLACK, name="one", target=target(port), count=count // 2,
                       sources=[SOURCES[0]], trickle_every=0, batch=250, duration=60.0, every=list(TRICKLE_EVERY),
                       max_reconnects=0)
        floods[1].call("flood_start", timeout=JOB_SLACK, name="one", target=target(port), count=count - count // 2,
                       sources=[SOURCES[0]], trickle_every=0, batch=250, duration=60.0, every=list(TRICKLE_EVERY),
                       max_reconnects=0)
        wait_opened(floods, "one", 60.0)
        time.sleep(0.5)
        one_honest = honest(good, port, honest_s / 2, "one-address")
        m5 = metrics(h, "Target")
        for w in floods:
            w.call("attack_stop", timeout=JOB_SLACK, name="one")
        lab.stop_servers(h)

        logs = {key: log_count(h, "Target", needle) for key, needle in (
            ("line_timeout", b"reason=line_timeout"), ("write_timeout_events", b"event=write_timeout"),
            ("refused_log_lines", b"event=refused"), ("at_refused_log_lines", b"event=at_refused"))}
        b1 = bad_records(held1, [victim0, victim1])
        b2 = bad_records(held2, [victim0, victim1, victim2])
        bad = b1["forged"] + b1["pinned"] + b2["forged"] + b2["pinned"]
        held_flood = open_conns(m1) - open_conns(m0)
        held = open_conns(m2) - open_conns(m0)
        per_flood = (rss_open - rss_before) / held_flood if held_flood > 0 else None
        per_conn = (rss_end - rss_before) / held if held > 0 else None
        base = {k: min(before[k], after[k]) for k in ("p50_ms", "p99_ms")}  # the stricter baseline
        ratio = attacked["p99_ms"] / base["p99_ms"] if base["p99_ms"] else None
        unattacked = "unattacked (better of before/after)"
        section.add(
            Row("honest IAMAT p50 under attack", attacked["p50_ms"], "ms", base["p50_ms"], unattacked),
            Row("honest IAMAT p99 under attack", attacked["p99_ms"], "ms", base["p99_ms"], unattacked,
                Target(f"<= {P99_RATIO_LIMIT:g}x", ratio is not None and ratio <= P99_RATIO_LIMIT, "issue")),
            Row("honest IAMATs answered under attack", attacked["count"], "req", before["count"], "before"),
            Row("server CPU while all attacks run", cpu_share * 100, "% core"),
            Row("WHATSATs answered/s meanwhile (pipeliners)", whatsat_rate, "req/s"),
            Row("  honest p50, floods alone", flood_only["p50_ms"], "ms", base["p50_ms"], unattacked),
            Row("  honest p99, floods alone", flood_only["p99_ms"], "ms", base["p99_ms"], unattacked),
            Row("idle+trickling connections held (server's open count)", held_flood, "conns", count, "asked"),
            Row("  honest newcomers answered within 1 s, the crowd filling every slot", newcomers["answered"],
                "clients", newcomers["asked"], "asked",
                Target(f"{NEWCOMERS} of {NEWCOMERS}", newcomers["answered"] == NEWCOMERS, "issue")),
            Row("honest WHATSAT p99 under attack", whatsat_attacked["p99_ms"], "ms", whatsat_before["p99_ms"],
                "unattacked", Target("< 1000 ms", whatsat_attacked["p99_ms"] < 1000, "issue")),
            Row("  honest WHATSAT p50 under attack", whatsat_attacked["p50_ms"], "ms", whatsat_before["p50_ms"],
                "unattacked"),
            Row(f"server RSS, {PIPELINERS} stuck readers alone (peak)", stuck["peak_kb"] / 1024, "MB",
                stuck["rss0_kb"] / 1024, "unattacked"),
            Row("RSS growth per stuck reader (process memory)", stuck["per_reader_kb"], "KB", None, "",
                Target(f"<= {STUCK_KB_LIMIT} KB", stuck["per_reader_kb"] <= STUCK_KB_LIMIT, "issue")),
            Row("  kernel socket queues per stuck reader (not RSS, not counted)", stuck["kernel_per_reader_kb"],
                "KB"),
            Row("seconds to open them", open_s, "s"),
            Row("attacking connections held, all attacks", held, "conns"),
            Row("server RSS, all attacks", rss_end / 1024, "MB", rss_before / 1024, "before the attack"),
            Row("RSS growth per attacking connection", per_conn, "KB", None, "",
                Target(f"<= {KB_PER_CONN_LIMIT:g} KB", per_conn is not None and per_conn <= KB_PER_CONN_LIMIT,
                       KB_SOURCE)),
            Row("  the same, floods alone", per_flood, "KB"),
            Row("server RSS after the attack", rss_after / 1024, "MB", rss_before / 1024, "before the attack"),
            Row("connections open after the attack (leak check)", open_conns(m4), "conns", open_conns(m0), "before",
                Target("as before", open_conns(m4) <= open_conns(m0), "issue; no leak")),
            Row("connections refused during the attack", refused(m3) - refused(m0), "conns"),
            Row("quiet connections evicted for newcomers during the attack", evicted(m3) - evicted(m0), "conns"),
            Row("trickling connections dropped (line_timeout, log)", logs["line_timeout"], "conns"),
            Row("pipeliners dropped for write_timeout (metrics)", dropped_slow(m3) - dropped_slow(m0), "clients"),
            Row("forged AT lines refused (metrics, Target)", forged(m3) - forged(m0), "lines"),
            Row("forged or pinned victim records, both servers", bad, "records", None, "",
                Target("0", bad == 0, "issue")),
            Row("  victim record stale (older honest) right after the attack", b1["stale"], "servers"),
            Row("one address: connections held", open_conns(m5) - open_conns(m4), "conns", count, "asked",
                Target(f"<= {LIMITS['max_connections_per_ip']}",
                       open_conns(m5) - open_conns(m4) <= LIMITS["max_connections_per_ip"], "issue")),
            Row("one address: refused", refused(m5) - refused(m4), "conns"),
            Row("one address: honest IAMAT p99", one_honest["p99_ms"], "ms", base["p99_ms"], "unattacked"),
        )
        section.notes += [
            f"herd: Target <-> Peer, authenticated link ([herd] secret_env = {SECRET_ENV}); [limits] "
            + ", ".join(f"{k} = {v}" for k, v in LIMITS.items())
            + f"; max_connections = {slots} ({CROWD_SHARE}% of the crowd, so it fills every slot; the derived "
            f"limit would be {cap} from RLIMIT_NOFILE {hard})",
            f"newcomers: {NEWCOMERS} connections from {NEWCOMER_SOURCE}, one after another once the crowd is in, "
            "each one IAMAT with a 1 s deadline",
            f"honest WHATSAT: 1 client from another process, 'WHATSAT id 10 5' one at a time, {honest_s:g} s before "
            "the attack and under it",
            f"stuck readers: {PIPELINERS} pipeliners alone against Peer for {stuck['seconds']:g} s before anything "
            "else, no reconnects; RSS peak (sampled every 50 ms) less Peer's RSS before, over the readers; the "
            "kernel's queues of Peer's sockets (send + receive: socket buffers, not process memory) reported apart; "
            f"pipeliners: {stuck['pipeliners']}",
            f"idle+trickling: {count} (wanted {WANTED}; the server's descriptor hard limit {hard} leaves it {cap} "
            f"clients, less {FD_MARGIN} for the rest of the attack) from {len(SOURCES)} addresses "
            f"{SOURCES[0]}-{SOURCES[-1]}, 2 load processes (RLIMIT_NOFILE raised to the hard limit); every 2nd "
            f"trickles one byte every {TRICKLE_EVERY[0]:g}-{TRICKLE_EVERY[1]:g} s, never a newline, and reconnects "
            "when dropped",
            f"pipeliners: {PIPELINERS} from {PIPELINE_SOURCE}, each IAMAT then 'WHATSAT id 10 5' without end, reading "
            "nothing (fake Places, 200 ms); reconnect when dropped",
            f"forger from {', '.join(FORGER_SOURCES)} to both servers: 'AT <Target|Peer|Nobody> +0.0 {VICTIM} "
            "+66.666666+066.666666 <now|253402300799>' and 'IAMAT victim ... 253402300799'",
            f"honest: 1 persistent closed-loop client, {honest_s:g} s per phase: before; floods alone; "
            "all attacks at once (the target row); after the attack",
            f"victim record, after the attack: {held1} (honest, newest: {victim1}) -> {b1}; after a new honest "
            f"IAMAT: {held2} -> {b2}",
            f"flood attackers: {flood_st}; pipeliners: {pipe_st}; forger: {forge_st}",
            f"Target log: {logs}; refused counts come from /metrics (the log has one line per power of 2)",
            f"honest before {before['p50_ms']:.3f}/{before['p99_ms']:.3f} ms, after {after['p50_ms']:.3f}/"
            f"{after['p99_ms']:.3f} ms (p50/p99)",
            f"victim's first honest record: {victim0}",
        ]
        section.raw = {"before": before, "attacked": attacked, "after": after, "one_address": one_honest,
                       "flood_only": flood_only, "stuck": stuck, "newcomers": newcomers,
                       "whatsat": {"before": whatsat_before, "attacked": whatsat_attacked},
                       "rss_kb": {"before": rss_before, "open": rss_open, "end": rss_end, "after": rss_after},
                       "metrics": {"m0": m0, "m1": m1, "m2": m2, "m3": m3, "m4": m4, "m5": m5},
                       "floods": flood_st, "pipe": pipe_st, "forge": forge_st, "logs": logs,
                       "held": [held1, held2], "victim_checks": [b1, b2]}
    finally:
        lab.close()
        os.environ.pop(SECRET_ENV, None)
    return section
