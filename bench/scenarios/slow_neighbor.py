"""A neighbor that accepts but never reads: client latency and memory of the server next to it.

Two one-link herds run side by side: ``Slow`` whose only neighbor is a sink
(a bench listener with a tiny receive buffer that never reads), and
``Healthy`` whose only neighbor is an observer that reads everything.
"""

from __future__ import annotations

from typing import Any

from bench.harness import Herd, Lab, LoadWorker, stable_rss_kb, tcp_queues
from bench.report import Row, Section, Target
from bench.scenarios.common import Context, check_errors, closed_loop, med

CLIENTS = 50
SERVERS = ("Slow", "Healthy")
RSS_GROWTH_LIMIT_MB = 20.0  # issue: server memory stays bounded; the 20 MB figure is assumed
LATENCY_RATIO_LIMIT = 1.5  # issue: client latency must not change; the 1.5x tolerance is assumed
LATENCY_SOURCE = f"issue; {LATENCY_RATIO_LIMIT:g}x assumed"
RSS_SOURCE = f"issue; {RSS_GROWTH_LIMIT_MB:g} MB assumed"
PUSH_SECONDS = 30.0
PUSH_CHUNK = 10_000


def start(lab: Lab) -> tuple[Herd, LoadWorker]:
    herd = lab.herd("pair", {"Slow": ["Sink"], "Healthy": ["Reader"]}, listeners=["Sink", "Reader"])
    listeners = lab.worker("listeners")
    listeners.call("listen", timeout=10, observers={"Sink": herd.ports["Sink"]}, reading=False)
    listeners.call("listen", timeout=10, observers={"Reader": herd.ports["Reader"]})
    lab.start_servers(herd, SERVERS)
    listeners.call("wait_connected", timeout=15, names=["Sink", "Reader"], timeout_s=10)
    return herd, listeners


def push(load: LoadWorker, herd: Herd, server: str, count: int, ctx: Context) -> tuple[int, list[int]]:
    """``count`` more IAMATs (over ``slow_clients`` client ids), in chunks; after each, the
    bytes queued toward the sink. Returns (updates pushed, queued bytes per chunk)."""
    pushed, queued = 0, []
    while pushed < count:
        chunk = min(PUSH_CHUNK, count - pushed)
        result = closed_loop(load, [herd.ports[server]], CLIENTS, PUSH_SECONDS, chunk, f"{server}-push{pushed}",
                             id_mod=ctx.settings.slow_clients)
        if not result["count"]:
            raise RuntimeError(f"push to {server} made no progress: {result['first_error']}")
        pushed += result["count"]
        queued.append(sink_queue(herd))
    return pushed, queued


def sink_queue(herd: Herd) -> int:
    return sum(tx + rx for tx, rx in tcp_queues(herd.ports["Sink"]))


def link_downs(herd: Herd, server: str) -> int:
    with open(herd.log_path(server), "rb") as log:
        return sum(1 for line in log if b" event=link_down " in line)


def latency_rows(samples: dict[str, list[dict[str, Any]]]) -> list[Row]:
    slow, healthy = samples["Slow"], samples["Healthy"]
    p50, base = med(slow, "p50_ms"), med(healthy, "p50_ms")
    return [
        Row(f"IAMAT p50, {CLIENTS} clients, neighbor never reads", p50, "ms", base, "reading neighbor",
            Target(f"<= {LATENCY_RATIO_LIMIT:g}x", p50 <= LATENCY_RATIO_LIMIT * base, LATENCY_SOURCE)),
        Row(f"IAMAT p99, {CLIENTS} clients, neighbor never reads", med(slow, "p99_ms"), "ms",
            med(healthy, "p99_ms"), "reading neighbor"),
        Row("IAMAT throughput, neighbor never reads", med(slow, "throughput"), "req/s",
            med(healthy, "throughput"), "reading neighbor"),
    ]


def memory_rows(before: dict[str, int], after: dict[str, int], pushed: dict[str, int]) -> list[Row]:
    growth = {name: (after[name] - before[name]) / 1024 for name in SERVERS}
    return [
        Row("RSS before, Slow server", before["Slow"] / 1024, "MB", before["Healthy"] / 1024, "Healthy server"),
        Row(f"RSS after {pushed['Slow']} updates, Slow server", after["Slow"] / 1024, "MB",
            after["Healthy"] / 1024, "Healthy server"),
        Row("RSS growth, Slow server", growth["Slow"], "MB", growth["Healthy"], "Healthy server",
            Target(f"<= {RSS_GROWTH_LIMIT_MB:g} MB (bounded)", growth["Slow"] <= RSS_GROWTH_LIMIT_MB, RSS_SOURCE)),
    ]


def latency_runs(load: LoadWorker, herd: Herd, ctx: Context, sink: list[int]) -> dict[str, list[dict[str, Any]]]:
    """Interleaved runs on both servers; each pushes an equal share of half the updates."""
    s = ctx.settings
    share = max(1, s.slow_updates // (2 * s.runs))
    samples: dict[str, list[dict[str, Any]]] = {name: [] for name in SERVERS}
    for r in range(s.runs):
        for name in SERVERS:
            samples[name].append(closed_loop(load, [herd.ports[name]], CLIENTS, s.duration, share, f"{name}-{r}",
                                             id_mod=s.slow_clients))
        sink.append(sink_queue(herd))
    return samples


def describe(ctx: Context, pushed: dict[str, int], sink: list[int], link_down_count: int) -> list[str]:
    blocked = len(sink) >= 2 and sink[-1] == sink[-2] > 0
    state = ("was blocked by the end (the queue stopped growing while updates went on)" if blocked else
             "was NOT blocked by the end (the kernel buffers took everything): the outbox bound was not exercised")
    return [
        f"client ids: {ctx.settings.slow_clients} distinct, reused round-robin; updates pushed: {pushed}",
        "the sink has SO_RCVBUF 4096 and never reads; bytes queued toward it (/proc/net/tcp Send-Q+Recv-Q) after "
        f"each push: {sink}; the forwarder to the sink {state}",
        f"Slow's link_down events (herd.ini write_timeout, default 30 s): {link_down_count}",
    ]


def run(ctx: Context) -> Section:
    section = Section("slow-neighbor")
    lab = Lab(ctx.work_dir, "slow-neighbor", ctx.places_url)
    try:
        herd, _listeners = start(lab)
        load = lab.worker("load")
        before = {name: stable_rss_kb(herd.pid(name)) for name in SERVERS}
        sink: list[int] = []
        samples = latency_runs(load, herd, ctx, sink)
        pushed = {name: sum(x["count"] for x in samples[name]) for name in SERVERS}
        for name in SERVERS:  # top up to slow_updates updates in all
            extra, queued = push(load, herd, name, ctx.settings.slow_updates - pushed[name], ctx)
            pushed[name] += extra
            sink += queued if name == "Slow" else []
        after = {name: stable_rss_kb(herd.pid(name)) for name in SERVERS}
        section.add(*latency_rows(samples), *memory_rows(before, after, pushed),
                    Row("bytes queued toward the sink at the end", sink[-1], "bytes"))
        lab.stop_servers(herd)
        section.notes += describe(ctx, pushed, sink, link_downs(herd, "Slow"))
        for name, runs in samples.items():
            check_errors(runs, name, section.notes)
        section.raw = {"samples": samples, "rss_before_kb": before, "rss_after_kb": after, "pushed": pushed,
                       "sink_queued": sink}
    finally:
        lab.close()
    return section
