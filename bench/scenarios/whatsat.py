"""Concurrent WHATSATs against a slow Places server (the offline provider has its own scenario)."""

from __future__ import annotations

from typing import Any

from bench.harness import Lab, LoadWorker, quiet_cpu
from bench.report import Row, Section, Target, median
from bench.scenarios.common import JOB_SLACK, Context, med, target

RADIUS_KM = "10"
BOUND = 5
TARGET_RATIO = 1.5  # issue: 100 concurrent WHATSATs, 200 ms upstream, <= 1.5x the ideal


def burst(worker: LoadWorker, port: int, server_pid: int, ctx: Context, prefix: str) -> dict[str, Any]:
    """One burst, with the CPU the server and the fake Places server spent on it."""
    pids = {"server": server_pid, "places": ctx.places_pid}
    before = {name: quiet_cpu([pid]) for name, pid in pids.items()}
    result = worker.call("whatsat_burst", timeout=JOB_SLACK * 2, target=target(port),
                         clients=ctx.settings.whatsat_clients, radius=RADIUS_KM, bound=BOUND, prefix=prefix)
    for name, pid in pids.items():
        result[f"{name}_cpu_ms"] = (quiet_cpu([pid]) - before[name]) * 1000
    return result


def burst_rows(runs: list[dict[str, Any]], ctx: Context) -> list[Row]:
    ideal = ctx.places_latency * 1000
    clients = ctx.settings.whatsat_clients
    total = median([run["total_s"] * 1000 for run in runs])
    return [
        Row(f"{clients} concurrent WHATSAT: all answered", total, "ms", ideal, "Places latency",
            Target(f"<= {TARGET_RATIO:g}x", total <= TARGET_RATIO * ideal, "issue")),
        Row(f"{clients} concurrent WHATSAT: p50 answer", med(runs, "p50_ms"), "ms", ideal, "Places latency"),
        Row(f"{clients} concurrent WHATSAT: p99 answer", med(runs, "p99_ms"), "ms", ideal, "Places latency"),
        Row("first run (cold Places connection pool)", runs[0]["total_s"] * 1000, "ms", ideal, "Places latency"),
        Row(f"server CPU for the {clients} WHATSATs (+ IAMATs)", med(runs, "server_cpu_ms"), "ms", total,
            "wall time, all answered"),
        Row(f"fake Places CPU for its {clients} answers", med(runs, "places_cpu_ms"), "ms", total,
            "wall time, all answered"),
    ]


def bursts(ctx: Context, section: Section) -> None:
    lab = Lab(ctx.work_dir, "whatsat", ctx.places_url)
    try:
        herd = lab.herd("solo", {"Alford": []})
        lab.start_servers(herd, ["Alford"])
        worker = lab.worker("load")
        port, pid = herd.ports["Alford"], herd.pid("Alford")
        runs = [burst(worker, port, pid, ctx, f"w{r}") for r in range(ctx.settings.whatsat_runs)]
    finally:
        lab.close()
    section.add(*burst_rows(runs, ctx))
    statuses: dict[str, int] = {}
    for run in runs:
        for status, n in run["statuses"].items():
            statuses[status] = statuses.get(status, 0) + n
    section.notes.append(
        f"each of {ctx.settings.whatsat_clients} connections IAMATs its own client, then all send "
        f"'WHATSAT <id> {RADIUS_KM} {BOUND}' at one moment; fake Places (tests/fake_places.py, own process) "
        f"answers after {ctx.places_latency * 1000:.0f} ms; statuses seen: {statuses}"
    )
    section.raw["bursts"] = runs


def run(ctx: Context) -> Section:
    section = Section("whatsat")
    bursts(ctx, section)
    return section
