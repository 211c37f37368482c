"""How fast an update crosses the herd, idle and loaded; a storm until every table agrees.

Observers are herd.ini entries that are not herdservers but listeners in a
load worker: the server they neighbor connects to them like to any neighbor and
sends AT lines, which they time-stamp (CLOCK_MONOTONIC, the same clock as the
prober's) and keep as a table of the last line per client. "Holiday holds it"
comes from Holiday's own log instead: the time stamp of the first AT line
carrying a probe's client, minus the probe's wall-clock send time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from bench.harness import FIVE, FIVE_LINKS, Herd, Lab, LoadWorker
from bench.report import Row, Section, Target, median
from bench.scenarios.common import JOB_SLACK, Context, check_errors, closed_loop, med, percentiles, target

PROBE_OBSERVERS = {"ObsAlford": "Alford", "ObsHoliday": "Holiday"}
STORM_OBSERVERS = {f"Obs{name}": name for name in FIVE}
HERD_LINKS = 5
BACKGROUND_CLIENTS = 50
HOLIDAY = "Holiday"
IDLE_P50_LIMIT_MS = 1.0  # issue: two-hop propagation p50 idle
LOADED_P99_LIMIT_MS = 5.0  # issue: two-hop propagation p99 while 50 clients load the origin
CONVERGE_LIMIT_MS = 2000.0  # issue: storm, all five identical within 2 s of the last update
LINES_PER_LINK_LIMIT = 2.0  # issue: storm, AT lines per link per update
# time stamp, then the client of an AT line a server read: '<stamp> INFO Holiday event=in conn=3 line="AT
# Alford +0.0079 probe-idle-0-17 +34.06-118.44 1795543228.716537891"'
# A server holds a record once it logs the AT line coming in (a client port), or once it
# forwards it to a neighbor (``event=out neighbor=``: stored first, then flooded). Lines
# read on the herd port (links since the herd-port work) are not logged as ``event=in``, so
# there the first forward is the earliest trace: later than the store by one send. Every
# server of the bench's herds has >= 2 links, so one that stores an update forwards it.
LOG_AT_HELD = re.compile(rb'^(\S+) \S+ \S+ event=(?:in|out neighbor=\S+) .*?line="AT \S+ \S+ (\S+) ')


@dataclass(frozen=True)
class Variant:
    """A probe run: idle, or with background load at Alford (paced at a rate, or saturating)."""

    key: str
    loaded: bool
    paced: bool = False

    def rate(self, ctx: Context) -> float:
        return ctx.settings.loaded_rate if self.paced else 0.0

    def title(self, ctx: Context) -> str:
        if not self.loaded:
            return "idle"
        if self.paced:
            return f"loaded, paced ({BACKGROUND_CLIENTS} clients, {self.rate(ctx):,.0f}/s)"
        return f"loaded, saturating ({BACKGROUND_CLIENTS} closed-loop)"


VARIANTS = (Variant("idle", False), Variant("paced", True, paced=True), Variant("saturated", True))


@dataclass(frozen=True)
class Baselines:
    """Echo server figures from this run: 1-client round trip p50, and 50 closed-loop clients."""

    rtt: float
    echo50: dict[str, Any]


def observed_herd(lab: Lab, name: str, observers: dict[str, str]) -> tuple[Herd, LoadWorker]:
    """The five servers plus observer listeners (started first), all links up."""
    links = {**FIVE_LINKS, **{obs: [server] for obs, server in observers.items()}}
    herd = lab.herd(name, links, foreign=observers)
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


def loaded_probe(observers: LoadWorker, load: LoadWorker, herd: Herd, ctx: Context, variant: Variant,
                 r: int) -> dict[str, Any]:
    """Probes while 50 clients send IAMATs to Alford, paced or not (the load outlasts the probes)."""
    load.submit(
        "closed_loop", targets=[target(herd.ports["Alford"])], clients=BACKGROUND_CLIENTS,
        duration=ctx.settings.probe_seconds + 1, max_requests=10**7, prefix=f"bg-{variant.key}-{r}",
        rate=variant.rate(ctx),
    )
    result = probe(observers, herd, ctx, f"probe-{variant.key}-{r}", loaded=True)
    result["background"] = load.result(ctx.settings.probe_seconds + JOB_SLACK)
    return result


def log_time(stamp: bytes) -> float:
    """A server log's time stamp (``2026-11-24T18:00:28.726101Z``, UTC) as ``time.time()`` seconds."""
    return datetime.strptime(stamp.decode(), "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


def arrivals(herd: Herd, server: str, marker: bytes = b"probe-") -> dict[str, float]:
    """For every client whose id holds ``marker``, the log time of the first AT line carrying
    it that ``server`` read or forwarded (``LOG_AT_HELD``)."""
    first: dict[str, float] = {}
    with open(herd.log_path(server), "rb") as log:
        for line in log:
            if marker not in line or (b" event=in " not in line and b" event=out neighbor=" not in line):
                continue
            match = LOG_AT_HELD.match(line)
            if match is not None:
                client, when = match.group(2).decode(), log_time(match.group(1))
                first[client] = min(when, first.get(client, when))
    return first


def add_holds(runs: list[dict[str, Any]], first: dict[str, float]) -> int:
    """Each run's delays from a probe's send to Holiday's log line; how many probes were not there."""
    missing = 0
    for run in runs:
        sent: dict[str, float] = run.pop("sent")
        delays = [first[client] - when for client, when in sent.items() if client in first]
        missing += len(sent) - len(delays)
        run[HOLIDAY] = {**percentiles(delays), "count": len(delays)}
    return missing


def probe_rows(variant: Variant, runs: list[dict[str, Any]], base: Baselines, ctx: Context) -> list[Row]:
    def fig(who: str, key: str) -> float:
        return median([run[who][key] for run in runs])

    kind = variant.title(ctx)
    rtt = (base.rtt, "echo RTT p50")
    holds = f"{kind}: Holiday holds it (2 hops, its log)"
    found = all(run[HOLIDAY]["count"] for run in runs)  # else no figure, and no target is met
    p50 = fig(HOLIDAY, "p50_ms") if found else None
    p99 = fig(HOLIDAY, "p99_ms") if found else None
    hold_base = {"p50": rtt, "p99": rtt}
    if variant.key == "saturated":  # the same closed loop against the bare echo server
        hold_base = {"p50": (base.echo50["p50_ms"], "echo c=50 p50"), "p99": (base.echo50["p99_ms"], "echo c=50 p99")}
    p50_goal = p99_goal = None
    if variant.key == "idle":
        p50_goal = Target(f"<= {IDLE_P50_LIMIT_MS:g} ms", p50 is not None and p50 <= IDLE_P50_LIMIT_MS, "issue")
    if variant.key == "paced":
        p99_goal = Target(f"<= {LOADED_P99_LIMIT_MS:g} ms", p99 is not None and p99 <= LOADED_P99_LIMIT_MS, "issue")
    return [
        Row(f"{kind}: IAMAT reply at Alford p50", fig("reply", "p50_ms"), "ms", *rtt),
        Row(f"{kind}: to Alford's observer p50 (1 hop)", fig("ObsAlford", "p50_ms"), "ms", *rtt),
        Row(f"{kind}: to Alford's observer p99 (1 hop)", fig("ObsAlford", "p99_ms"), "ms", *rtt),
        Row(f"{kind}: to Holiday's observer p50 (2+1 hops)", fig("ObsHoliday", "p50_ms"), "ms", *rtt),
        Row(f"{kind}: to Holiday's observer p99 (2+1 hops)", fig("ObsHoliday", "p99_ms"), "ms", *rtt),
        Row(f"{holds} p50", p50, "ms", *hold_base["p50"], p50_goal),
        Row(f"{holds} p99", p99, "ms", *hold_base["p99"], p99_goal),
    ]


def background_rows(variant: Variant, runs: list[dict[str, Any]], base: Baselines, ctx: Context) -> list[Row]:
    background = [run["background"] for run in runs]
    kind = variant.title(ctx)
    p99 = med(background, "p99_ms")
    if variant.key == "paced":
        return [
            Row(f"{kind}: background IAMAT rate achieved", med(background, "throughput"), "req/s",
                variant.rate(ctx), "asked for"),
            Row(f"{kind}: background IAMAT p99 (its clients)", p99, "ms", base.rtt, "echo RTT p50"),
        ]
    return [
        Row(f"{kind}: background IAMAT throughput", med(background, "throughput"), "req/s",
            base.echo50["throughput"], "echo, c=50"),
        Row(f"{kind}: background IAMAT p99 (its clients)", p99, "ms", base.echo50["p99_ms"], "echo c=50 p99"),
    ]


def probe_notes(runs: dict[str, list[dict[str, Any]]], base: Baselines, ctx: Context, missing: int) -> list[str]:
    paced = [run["background"] for run in runs["paced"]]
    saturated = [run["background"] for run in runs["saturated"]]
    sends = sum(b["count"] for b in paced)
    late = sum(b.get("late", 0) for b in paced)
    throughput = med(saturated, "throughput")
    little = BACKGROUND_CLIENTS / throughput * 1000 if throughput else 0.0
    notes = [
        "probe = one IAMAT at Alford on a persistent connection, sequential; timed from its send until the AT "
        "line arrives at an observer (a bench listener configured as a neighbor of Alford, or of Holiday)",
        "'to Holiday's observer' = Alford -> Hamilton -> Holiday (2 herd hops), then Holiday's forwarder -> "
        "observer (1 more hop)",
        "'Holiday holds it (2 hops, its log)' = from the probe's send (wall clock, time.time() in the prober) to "
        "the time stamp of the first event=in line carrying the probe's client in Holiday's log (UTC, microseconds, "
        "the same machine clock; written as Holiday reads the line, just before it stores the record); Holiday "
        "gets each update twice (via Hamilton and via Ball), the first one counts; logs read after the probe herd "
        "stopped",
        f"loaded, paced: {BACKGROUND_CLIENTS} persistent clients send IAMATs to Alford at "
        f"{ctx.settings.loaded_rate:,.0f}/s in all, each on its own fixed schedule (one every "
        f"{BACKGROUND_CLIENTS / ctx.settings.loaded_rate * 1000:g} ms, start times staggered), waiting for each "
        f"reply and sending at once when late; {late} of {sends} sends were more than 1 ms behind schedule. The "
        "issue's p99 <= 5 ms applies here. The observers also receive (and parse) the background's AT lines",
        f"loaded, saturating: {BACKGROUND_CLIENTS} closed-loop clients (each sends as soon as its reply arrives) "
        "keep Alford and the machine's cores saturated; then by Little's law mean latency is just clients / "
        "throughput "
        f"({BACKGROUND_CLIENTS} / {throughput:,.0f} req/s = {little:.1f} ms) whatever the herd does: the bare echo "
        f"server itself has p99 {base.echo50['p99_ms']:.2f} ms at {BACKGROUND_CLIENTS} closed-loop clients "
        "(baseline row). Reported without a target",
    ]
    if missing:
        notes.append(f"{missing} probes had no AT line in Holiday's log (left out of 'Holiday holds it')")
    return notes


def probes(lab: Lab, ctx: Context, section: Section, base: Baselines) -> None:
    herd, observers = observed_herd(lab, "probe", PROBE_OBSERVERS)
    load = lab.worker("background")
    probe(observers, herd, ctx, "warmup", loaded=False)
    runs: dict[str, list[dict[str, Any]]] = {variant.key: [] for variant in VARIANTS}
    for r in range(ctx.settings.runs):
        for variant in VARIANTS:
            if variant.loaded:
                runs[variant.key].append(loaded_probe(observers, load, herd, ctx, variant, r))
            else:
                runs[variant.key].append(probe(observers, herd, ctx, f"probe-{variant.key}-{r}", loaded=False))
    lab.stop_servers(herd)  # flushes the logs
    first = arrivals(herd, HOLIDAY)
    missing = sum(add_holds(variant_runs, first) for variant_runs in runs.values())
    for variant in VARIANTS:
        section.add(*probe_rows(variant, runs[variant.key], base, ctx))
        if variant.loaded:
            section.add(*background_rows(variant, runs[variant.key], base, ctx))
            check_errors([run["background"] for run in runs[variant.key]], f"{variant.key} background load",
                         section.notes)
    section.notes += probe_notes(runs, base, ctx, missing)
    section.raw.update(runs)


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
    lines_per_link = at_lines / updates / HERD_LINKS
    section.add(
        Row(f"storm: updates per run over 5 servers ({s.storm_clients} clients)", med(runs, "count"), "updates"),
        Row("storm: update throughput", med(runs, "throughput"), "upd/s"),
        Row("storm: last IAMAT sent -> all 5 tables identical", median(converge) if converge else None, "ms",
            rtt, "echo RTT p50"),
        Row(f"storm: the same, slowest of {s.runs} runs", max(converge) if all_converged else None, "ms", rtt,
            "echo RTT p50",
            Target(f"all {s.runs} converge, each <= {CONVERGE_LIMIT_MS:,.0f} ms",
                   all_converged and max(converge) <= CONVERGE_LIMIT_MS, "issue")),
        Row("storm: AT lines per update per herd link (logs)", lines_per_link, "lines", 2.0, "1 each way",
            Target(f"<= {LINES_PER_LINK_LIMIT:g}", lines_per_link <= LINES_PER_LINK_LIMIT, "issue")),
        Row("storm: AT lines per update per observer link", observer_lines / updates / len(STORM_OBSERVERS),
            "lines", 1.0, "1 per update"),
        Row("storm: server log bytes per update (5 logs)", log_bytes / updates, "bytes"),
    )
    check_errors(runs, "storm load", section.notes)
    section.raw["storm"] = runs


def echo_rtt(lab: Lab, ctx: Context) -> Baselines:
    """The baselines: one loopback round trip (echo server, one client, median p50 over runs), and the echo
    server under the saturating background load's shape (50 closed-loop clients)."""
    _, port = lab.echo()
    worker = lab.worker("echo-load")
    s = ctx.settings
    rtt = [closed_loop(worker, [port], 1, s.duration / 2, 2000, f"rtt-{r}") for r in range(s.runs)]
    loaded = [closed_loop(worker, [port], BACKGROUND_CLIENTS, s.duration / 2, s.max_requests, f"rtt50-{r}")
              for r in range(s.runs)]
    return Baselines(med(rtt, "p50_ms"), {key: med(loaded, key) for key in ("p50_ms", "p99_ms", "throughput")})


def run(ctx: Context) -> Section:
    section = Section("propagation")
    lab = Lab(ctx.work_dir, "propagation", ctx.places_url)
    try:
        base = echo_rtt(lab, ctx)
        section.add(
            Row("baseline: echo round trip p50 (1 client)", base.rtt, "ms"),
            Row(f"baseline: echo p99, {BACKGROUND_CLIENTS} closed-loop clients", base.echo50["p99_ms"], "ms",
                base.echo50["p50_ms"], "its p50"),
        )
        probes(lab, ctx, section, base)
        storm(lab, ctx, section, base.rtt)
        section.notes += [
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
