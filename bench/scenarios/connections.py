"""Memory per idle client connection, and IAMAT latency with 10,000 idle clients open."""

from __future__ import annotations

from typing import Any

from bench.harness import Herd, Lab, LoadWorker, stable_rss_kb
from bench.report import Row, Section, Target
from bench.scenarios.common import JOB_SLACK, Context, check_errors, closed_loop, med, target

LATENCY_CLIENTS = (1, 50)
KB_PER_CONNECTION_LIMIT = 8.0  # issue: <= 8 KB RSS per idle connection
LATENCY_RATIO_LIMIT = 1.5  # issue: "answers at its normal latency"; the 1.5x tolerance is assumed
LATENCY_SOURCE = f"issue; {LATENCY_RATIO_LIMIT:g}x assumed"


def latency_runs(worker: LoadWorker, port: int, ctx: Context, tag: str) -> dict[int, list[dict[str, Any]]]:
    s = ctx.settings
    return {
        clients: [
            closed_loop(worker, [port], clients, s.duration / 2, s.max_requests, f"conn-{tag}-{clients}-{r}")
            for r in range(s.runs)
        ]
        for clients in LATENCY_CLIENTS
    }


def open_idle(idle: LoadWorker, herd: Herd, ctx: Context) -> dict[str, Any]:
    s = ctx.settings
    budget = 60.0 if s.idle_connections > 5000 else 20.0
    return idle.call(
        "open_idle", timeout=budget + JOB_SLACK, target=target(herd.ports["Alford"]),
        count=s.idle_connections, batch=s.idle_batch, duration=budget,
    )


def latency_rows(without: dict[int, list[dict[str, Any]]], with_idle: dict[int, list[dict[str, Any]]],
                 open_count: int) -> list[Row]:
    rows = []
    for clients in LATENCY_CLIENTS:
        for key, name in (("p50_ms", "p50"), ("p99_ms", "p99")):
            value, base = med(with_idle[clients], key), med(without[clients], key)
            goal = None
            if key == "p50_ms":
                goal = Target(f"<= {LATENCY_RATIO_LIMIT:g}x", value <= LATENCY_RATIO_LIMIT * base, LATENCY_SOURCE)
            rows.append(Row(f"IAMAT {name} c={clients}, {open_count} idle open", value, "ms", base, "no idle conns",
                            goal))
    return rows


def describe(ctx: Context, opened: dict[str, Any]) -> list[str]:
    s = ctx.settings
    notes = [
        f"idle connections opened {s.idle_batch} at a time by a second load process (RLIMIT_NOFILE raised to its "
        f"hard limit, {opened['fd_limit']}); after each batch one IAMAT on a fresh connection confirms the server "
        "accepted the batch; RSS = VmRSS, read once it is stable",
        f"latency baseline 'no idle conns' = the runs before opening and after closing them ({2 * s.runs} runs of "
        f"{s.duration / 2:g} s), median",
    ]
    if opened["open"] < s.idle_connections:
        notes.append(f"only {opened['open']} of {s.idle_connections} opened (fd hard limit {opened['fd_limit']}, "
                     f"errors: {opened['errors']}, first: {opened['first_error']})")
    return notes


def memory_rows(opened: dict[str, Any], rss_before: int, rss_after: int, wanted: int) -> list[Row]:
    count = opened["open"]
    per_conn = (rss_after - rss_before) / count if count else None
    return [
        Row("idle connections held open", count, "conns", wanted, "asked for",
            Target(f"all {wanted}", count >= wanted, "issue")),
        Row("seconds to open them", opened["seconds"], "s"),
        Row("server RSS with them open", rss_after / 1024, "MB", rss_before / 1024, "before"),
        Row("RSS per idle connection", per_conn, "KB", None, "",
            Target(f"<= {KB_PER_CONNECTION_LIMIT:g} KB",
                   per_conn is not None and per_conn <= KB_PER_CONNECTION_LIMIT, "issue")),
    ]


def run(ctx: Context) -> Section:
    section = Section("connections")
    lab = Lab(ctx.work_dir, "connections", ctx.places_url)
    try:
        # Every idle connection comes from 127.0.0.1: the per-address cap (1,000 by default,
        # against one client's crowd) is lifted, or the 1,001st would be refused.
        herd = lab.herd("solo", {"Alford": []}, limit_keys={"max_connections_per_ip": "1000000"})
        lab.start_servers(herd, ["Alford"])
        port, pid = herd.ports["Alford"], herd.pid("Alford")
        load, idle = lab.worker("load"), lab.worker("idle")
        before = latency_runs(load, port, ctx, "before")
        rss_before = stable_rss_kb(pid)
        opened = open_idle(idle, herd, ctx)
        rss_after = stable_rss_kb(pid)
        with_idle = latency_runs(load, port, ctx, "with")
        idle.call("close_idle", timeout=JOB_SLACK)
        after = latency_runs(load, port, ctx, "after")
        without = {clients: runs + after[clients] for clients, runs in before.items()}
        section.add(*memory_rows(opened, rss_before, rss_after, ctx.settings.idle_connections),
                    *latency_rows(without, with_idle, opened["open"]))
        section.notes += describe(ctx, opened)
        for tag, runs in (("without", without), ("with", with_idle)):
            for clients, samples in runs.items():
                check_errors(samples, f"latency {tag} idle c={clients}", section.notes)
        section.raw = {"opened": opened, "rss_before_kb": rss_before, "rss_after_kb": rss_after,
                       "without": without, "with": with_idle}
    finally:
        lab.close()
    return section
