"""How fast an update crosses the herd, idle and loaded; a storm until every table agrees.

Observers are herd.ini entries that are not herdservers but listeners in a
load worker: the server they neighbor connects to them like to any neighbor and
sends AT lines, which they time-stamp (CLOCK_MONOTONIC, the same clock as the
prober's) and keep as a table of the last line per client.
"""

from __future__ import annotations

from typing import Any

from bench.harness import FIVE, FIVE_LINKS, Herd, Lab, LoadWorker
from bench.report import Row, Section, Target, median
from bench.scenarios.common import JOB_SLACK, Context, check_errors, closed_loop, med, target

PROBE_OBSERVERS = {"ObsAlford": "Alford", "ObsHoliday": "Holiday"}
STORM_OBSERVERS = {f"Obs{name}": name for name in FIVE}
HERD_LINKS = 5
BACKGROUND_CLIENTS = 50


def observed_herd(lab: Lab, name: str, observers: dict[str, str]) -> tuple[Herd, LoadWorker]:
    """The five servers plus observer listeners (started first), all links up."""
    links = {**FIVE_LINKS, **{obs: [server] for obs, server in observers.items()}}
    herd = lab.herd(name, links)
    worker = lab.worker(f"{name}-observers")
    worker.call("listen", timeout=10, observers={obs: herd.ports[obs] for obs in observers})
    lab.start_servers(herd, FIVE)
    worker.call("wait_connected", timeout=15, names=list(observers), timeout_s=10)
    return herd, worker


def probe(observers: LoadWorker, herd: Herd, ctx: Context, prefix: str, loaded: bool) -> dict[str, Any]:
    s = ctx.settings
    return observers.call(
        "propagation", timeout=s.probe_seconds + JOB_SLACK, target=target(herd.ports["Alford"]),
        observers=list(PROBE_OBSERVERS), probes=s.probes, duration=s.probe_seconds, prefix=prefix,
        wait_traffic=loaded,
    )


def loaded_probe(observers: LoadWorker, load: LoadWorker, herd: Herd, ctx: Context, r: int) -> dict[str, Any]:
    """Probes while 50 clients send IAMATs to Alford (the load outlasts the probes)."""
    load.submit(
        "closed_loop", targets=[target(herd.ports["Alford"])], clients=BACKGROUND_CLIENTS,
        duration=ctx.settings.probe_seconds + 1, max_requests=10**7, prefix=f"bg-{r}",
    )
    result = probe(observers, herd, ctx, f"probe-loaded-{r}", loaded=True)
    result["background"] = load.result(ctx.settings.probe_seconds + JOB_SLACK)
    return result


def probe_rows(kind: str, runs: list[dict[str, Any]], rtt: float) -> list[Row]:
    def fig(who: str, key: str) -> float:
        return median([run[who][key] for run in runs])

    base = "echo RTT p50"
    one_hop, three_hop = fig("ObsAlford", "p50_ms"), fig("ObsHoliday", "p50_ms")
    return [
        Row(f"{kind}: IAMAT reply at Alford p50", fig("reply", "p50_ms"), "ms", rtt, base),
        Row(f"{kind}: to Alford's observer p50 (1 hop)", one_hop, "ms", rtt, base),
        Row(f"{kind}: to Alford's observer p99 (1 hop)", fig("ObsAlford", "p99_ms"), "ms", rtt, base),
        Row(f"{kind}: to Holiday's observer p50 (2+1 hops)", three_hop, "ms", rtt, base),
        Row(f"{kind}: to Holiday's observer p99 (2+1 hops)", fig("ObsHoliday", "p99_ms"), "ms", rtt, base),
        Row(f"{kind}: Holiday holds it p50 (estimate)", (one_hop + three_hop) / 2, "ms", rtt, base),
    ]


def probes(lab: Lab, ctx: Context, section: Section, rtt: float) -> None:
    herd, observers = observed_herd(lab, "probe", PROBE_OBSERVERS)
    load = lab.worker("background")
    probe(observers, herd, ctx, "warmup", loaded=False)
    idle, loaded = [], []
    for r in range(ctx.settings.runs):
        idle.append(probe(observers, herd, ctx, f"probe-idle-{r}", loaded=False))
        loaded.append(loaded_probe(observers, load, herd, ctx, r))
    background = [run["background"] for run in loaded]
    section.add(*probe_rows("idle", idle, rtt), *probe_rows(f"loaded ({BACKGROUND_CLIENTS} clients)", loaded, rtt))
    section.add(Row("loaded: background IAMAT throughput at Alford", med(background, "throughput"), "req/s"))
    check_errors(background, "background load", section.notes)
    section.raw.update(idle=idle, loaded=loaded)
    lab.stop_servers(herd)


def storm_run(load: LoadWorker, observers: LoadWorker, herd: Herd, ctx: Context, r: int) -> dict[str, Any]:
    s = ctx.settings
    observers.call("reset_observers", timeout=10)
    result = closed_loop(
        load, [herd.ports[name] for name in FIVE], s.storm_connections, s.storm_seconds, s.storm_updates,
        f"storm{r}", id_mod=s.storm_clients, keep_latest=True,
    )
    expected = result.pop("latest")
    converged = observers.call(
        "await_convergence", timeout=s.storm_seconds + JOB_SLACK, expected=expected,
        names=list(STORM_OBSERVERS), timeout_s=s.storm_seconds,
    )
    result.update(converged=converged["converged"], clients=len(expected), observer_lines=converged["lines"])
    if converged["converged"]:
        result["converge_ms"] = (converged["last_change"] - result["last_send"]) * 1000
    else:
        result["differing_clients"] = converged["differing_clients"]
    return result


def count_at_lines(herd: Herd) -> tuple[int, int]:
    """AT lines the five servers received from each other for storm clients; log bytes."""
    lines = size = 0
    for name in FIVE:
        path = herd.log_path(name)
        size += path.stat().st_size
        with open(path, "rb") as log:
            lines += sum(1 for line in log if b' event=in ' in line and b'line="AT ' in line and b" storm" in line)
    return lines, size


def storm(lab: Lab, ctx: Context, section: Section, rtt: float) -> None:
    s = ctx.settings
    herd, observers = observed_herd(lab, "storm", STORM_OBSERVERS)
    load = lab.worker("storm-load")
    runs = [storm_run(load, observers, herd, ctx, r) for r in range(s.runs)]
    lab.stop_servers(herd)  # flushes the logs
    at_lines, log_bytes = count_at_lines(herd)
    updates = sum(run["count"] for run in runs)
    observer_lines = sum(sum(run["observer_lines"].values()) for run in runs)
    all_converged = all(run["converged"] for run in runs)
    converge = [run["converge_ms"] for run in runs if run["converged"]]
    section.add(
        Row(f"storm: updates per run over 5 servers ({s.storm_clients} clients)", med(runs, "count"), "updates"),
        Row("storm: update throughput", med(runs, "throughput"), "upd/s"),
        Row("storm: last IAMAT sent -> all 5 tables identical", median(converge) if converge else None, "ms",
            rtt, "echo RTT p50",
            Target(f"all {s.runs} runs converge", all_converged, "spec")),
        Row("storm: AT lines per update per herd link (logs)", at_lines / updates / HERD_LINKS, "lines", 2.0,
            "1 each way", Target("<= 2", at_lines / updates / HERD_LINKS <= 2.0, "README")),
        Row("storm: AT lines per update per observer link", observer_lines / updates / len(STORM_OBSERVERS),
            "lines", 1.0, "1 per update"),
        Row("storm: server log bytes per update (5 logs)", log_bytes / updates, "bytes"),
    )
    check_errors(runs, "storm load", section.notes)
    section.raw["storm"] = runs


def echo_rtt(lab: Lab, ctx: Context) -> float:
    """The baseline: one loopback round trip, echo server, one client (median p50 over runs)."""
    _, port = lab.echo()
    worker = lab.worker("echo-load")
    s = ctx.settings
    runs = [closed_loop(worker, [port], 1, s.duration / 2, 2000, f"rtt-{r}") for r in range(s.runs)]
    return med(runs, "p50_ms")


def run(ctx: Context) -> Section:
    section = Section("propagation")
    lab = Lab(ctx.work_dir, "propagation", ctx.places_url)
    try:
        rtt = echo_rtt(lab, ctx)
        section.add(Row("baseline: echo round trip p50 (1 client)", rtt, "ms"))
        probes(lab, ctx, section, rtt)
        storm(lab, ctx, section, rtt)
        section.notes += [
            "probe = one IAMAT at Alford on a persistent connection, sequential; timed from its send until the AT "
            "line arrives at an observer (a bench listener configured as a neighbor of Alford, or of Holiday)",
            "'to Holiday's observer' = Alford -> Hamilton -> Holiday (2 herd hops), then Holiday's forwarder -> "
            "observer (1 more hop); 'Holiday holds it (estimate)' = midpoint of the 1-hop and 3-hop figures",
            f"loaded: {BACKGROUND_CLIENTS} closed-loop clients send IAMATs to Alford during the probes; the "
            "observers then also receive (and parse) their AT lines",
            f"storm: {ctx.settings.storm_updates} IAMATs from {ctx.settings.storm_connections} connections "
            f"spread over all 5 servers, {ctx.settings.storm_clients} client ids (concurrent updates of one client "
            "at different servers); identical = each server's observer holds, for every client, exactly the newest "
            "record the load created; time from the send of the last IAMAT to the arrival of the last line that "
            "made them so",
            "herd link lines counted from the servers' logs (event=in line=\"AT ...\"); 5 links",
        ]
    finally:
        lab.close()
    return section
