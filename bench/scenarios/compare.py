"""The issue-4 figures of this code beside a previous revision's, measured in one run.

``bench/run.py --compare REV`` (default ``70174fa``, the last revision with persistent
links) checks REV out with ``git worktree add --detach`` into the lab (removed at the
end) and runs the same measurements against servers started from it (cwd and
PYTHONPATH = the checkout, so ``python -m herdserver`` imports the old package):

- IAMAT throughput of one server at 50 persistent clients (``iamat``);
- herd CPU per update, the five servers summed, at 50 persistent clients (``iamat``);
- two-hop propagation, Alford -> Holiday from Holiday's log: p50 idle and p99 with
  50 paced clients loading Alford (``propagation``).

Three sides: the old code (its herd.ini has only keys the old config knows: an
unknown key is an error there), this code memory-only (``state_dir = -``, the fair
comparison: the old code kept no state file), and this code with the default state
file (``fsync = interval``). Every run measures all three, in rotated order (A B C,
B C A, ...), so the VM's speed drift hits each side alike. The target: no figure
more than 10% worse than the old code's.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.harness import FIVE, FIVE_LINKS, ROOT, Checkout, Herd, Lab, LoadWorker
from bench.report import Row, Section, Target, median
from bench.scenarios.common import JOB_SLACK, Context, check_errors, closed_loop, target, with_cpu
from bench.scenarios.propagation import HOLIDAY, add_holds, arrivals

WORSE_LIMIT = 0.10  # issue: no figure more than 10% worse than the previous code's
CLIENTS = 50
BACKGROUND_START_S = 0.3
DEFAULT_REV = "70174fa"  # the last revision with persistent links between neighbors


@dataclass
class Side:
    key: str
    title: str
    code: Path
    herd_keys: dict[str, str]
    one: Herd | None = None
    five: Herd | None = None
    probe: Herd | None = None
    samples: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))


def start_side(lab: Lab, side: Side, ctx: Context) -> None:
    old = side.code != ROOT  # a checkout from before http_port existed
    side.one = lab.herd(f"{side.key}-one", {"Alford": []}, herd_keys=side.herd_keys, old_code=old)
    lab.start_servers(side.one, ["Alford"], code=side.code)
    side.five = lab.herd(f"{side.key}-five", FIVE_LINKS, herd_keys=side.herd_keys, old_code=old)
    lab.start_servers(side.five, FIVE, code=side.code)
    side.probe = lab.herd(f"{side.key}-probe", FIVE_LINKS, herd_keys=side.herd_keys, old_code=old)
    lab.start_servers(side.probe, FIVE, code=side.code)


def holiday_probe(prober: LoadWorker, herd: Herd, ctx: Context, prefix: str) -> dict[str, Any]:
    """Sequential probe IAMATs at Alford; the delays come later from Holiday's log.

    No observers here (unlike ``propagation``): this code's forwarder waits out its
    connect_timeout (2 s) for a hello answer on every connection to a neighbor already
    known not to be a herdserver (the ``? HELLO`` answer is dropped once ``foreign`` is
    set), so an observer would pace the idle probes at one per 2 s and bias nothing
    else: Holiday's log is the figure.
    """
    s = ctx.settings
    return prober.call(
        "propagation", timeout=s.probe_seconds + JOB_SLACK, target=target(herd.ports["Alford"]), observers=[],
        probes=s.probes, duration=s.probe_seconds, prefix=prefix,
    )


def paced_probe(prober: LoadWorker, background: LoadWorker, herd: Herd, ctx: Context, prefix: str,
                r: int) -> dict[str, Any]:
    """Probes while 50 clients send 2,000 IAMAT/s in all to Alford (the load outlasts them by 1 s)."""
    s = ctx.settings
    background.submit(
        "closed_loop", targets=[target(herd.ports["Alford"])], clients=CLIENTS, duration=s.probe_seconds + 1,
        max_requests=10**7, prefix=f"bg-{prefix}", rate=s.loaded_rate,
    )
    time.sleep(BACKGROUND_START_S)  # let the background clients connect and start before the first probe
    result = holiday_probe(prober, herd, ctx, prefix)
    result["background"] = background.result(s.probe_seconds + JOB_SLACK)
    return result


def measure_side(side: Side, load: LoadWorker, prober: LoadWorker, background: LoadWorker, ctx: Context,
                 r: int) -> None:
    s = ctx.settings
    assert side.one and side.five and side.probe
    one, five = side.one, side.five
    side.samples["one"].append(with_cpu(one.pids(), lambda: closed_loop(
        load, [one.ports["Alford"]], CLIENTS, s.duration, s.max_requests, f"c{r}-{side.key}-one")))
    side.samples["five"].append(with_cpu(five.pids(), lambda: closed_loop(
        load, [five.ports["Alford"]], CLIENTS, s.duration, s.max_requests, f"c{r}-{side.key}-five")))
    side.samples["idle"].append(holiday_probe(prober, side.probe, ctx, f"probe-idle-{r}"))
    side.samples["paced"].append(paced_probe(prober, background, side.probe, ctx, f"probe-paced-{r}", r))


def figures(side: Side) -> dict[str, float | None]:
    def med(kind: str, key: str) -> float:
        return median([float(sample[key]) for sample in side.samples[kind]])

    def hold(kind: str, key: str) -> float | None:
        runs = side.samples[kind]
        if not runs or not all(run[HOLIDAY]["count"] for run in runs):
            return None
        return median([run[HOLIDAY][key] for run in runs])

    return {
        "throughput": med("one", "throughput"),
        "one_p50": med("one", "p50_ms"),
        "one_cpu": med("one", "cpu_us_per_req"),
        "herd_cpu": med("five", "cpu_us_per_req"),
        "idle_p50": hold("idle", "p50_ms"),
        "idle_p99": hold("idle", "p99_ms"),
        "paced_p50": hold("paced", "p50_ms"),
        "paced_p99": hold("paced", "p99_ms"),
    }


# figure key, label, unit, higher is better, issue target on it
FIGURES = (
    ("throughput", f"one server IAMAT throughput, c={CLIENTS} persistent", "req/s", True, True),
    ("one_p50", f"one server IAMAT p50, c={CLIENTS}", "ms", False, False),
    ("one_cpu", f"one server CPU/request, c={CLIENTS}", "us", False, False),
    ("herd_cpu", f"herd CPU/update (sum of 5), c={CLIENTS}", "us", False, True),
    ("idle_p50", "idle: Holiday holds it (2 hops, its log) p50", "ms", False, True),
    ("idle_p99", "idle: Holiday holds it (2 hops, its log) p99", "ms", False, False),
    ("paced_p50", "loaded, paced: Holiday holds it (2 hops) p50", "ms", False, False),
    ("paced_p99", "loaded, paced: Holiday holds it (2 hops) p99", "ms", False, True),
)


def rows(old: Side, new: list[Side]) -> list[Row]:
    base = figures(old)
    result = []
    for side in new:
        mine = figures(side)
        for key, label, unit, higher_better, targeted in FIGURES:
            value, reference = mine[key], base[key]
            goal = None
            if targeted:
                if value is None or reference is None:
                    met = False
                elif higher_better:
                    met = value >= (1 - WORSE_LIMIT) * reference
                else:
                    met = value <= (1 + WORSE_LIMIT) * reference
                limit = f">= {1 - WORSE_LIMIT:.2f}x old" if higher_better else f"<= {1 + WORSE_LIMIT:.2f}x old"
                goal = Target(limit, met, "issue" if side.key == "mem" else "issue; with a state file")
            result.append(Row(f"{side.title}: {label}", value, unit, reference, old.title, goal))
    return result


def run(ctx: Context) -> Section:
    section = Section("compare")
    rev = ctx.compare_rev or DEFAULT_REV
    lab = Lab(ctx.work_dir, "compare", ctx.places_url)
    checkout: Checkout | None = None
    try:
        checkout = Checkout(lab.dir, rev)
        sides = [
            Side("old", f"old {checkout.commit}", checkout.path, {}),
            Side("mem", "new, memory only", ROOT, {"state_dir": "-"}),
            Side("state", "new, state file", ROOT, {"fsync": "interval"}),
        ]
        for side in sides:
            start_side(lab, side, ctx)
        load = lab.worker("load")
        prober = lab.worker("prober")
        background = lab.worker("background")
        for side in sides:
            assert side.probe is not None
            holiday_probe(prober, side.probe, ctx, "warmup")
        runs = ctx.settings.iamat_runs
        for r in range(runs):
            for side in sides[r % 3:] + sides[:r % 3]:  # A B C, B C A, C A B, ...
                measure_side(side, load, prober, background, ctx, r)
        for side in sides:
            assert side.probe is not None
            lab.stop_servers(side.probe)  # flushes the logs
            first = arrivals(side.probe, HOLIDAY)
            missing = sum(add_holds(side.samples[kind], first) for kind in ("idle", "paced"))
            if missing:
                section.notes.append(f"{side.title}: {missing} probes had no AT line in Holiday's log")
            check_errors(side.samples["one"] + side.samples["five"], f"{side.title} IAMAT load", section.notes)
            check_errors([run["background"] for run in side.samples["paced"]], f"{side.title} background",
                         section.notes)
        section.add(*rows(sides[0], sides[1:]))
        paced = {side.title: median([run["background"]["throughput"] for run in side.samples["paced"]])
                 for side in sides}
        section.notes += [
            f"old = git revision {rev} ({checkout.commit}), checked out with git worktree add --detach and run "
            "from there (cwd and PYTHONPATH); new = this checkout; every figure a median of "
            f"{runs} runs, the three sides measured in rotated order within each run",
            "new, memory only: [herd] state_dir = - (the old code had no state file); new, state file: the default "
            "state file beside herd.ini, fsync = interval",
            f"IAMAT: {CLIENTS} persistent closed-loop clients at Alford, {ctx.settings.duration:g} s per measurement; "
            "CPU from /proc/PID/stat after the herd went quiet, divided by the IAMATs answered",
            "propagation: sequential probe IAMATs at Alford, delay to the first event=in line of the probe's client "
            f"in Holiday's log; paced = {CLIENTS} background clients at {ctx.settings.loaded_rate:,.0f} IAMAT/s in "
            "all; background rate achieved: " + ", ".join(f"{k} {v:,.0f}/s" for k, v in paced.items()),
            f"target: each figure at most {WORSE_LIMIT:.0%} worse than the old code's (throughput >= "
            f"{1 - WORSE_LIMIT:.2f}x, CPU and latency <= {1 + WORSE_LIMIT:.2f}x); the issue's rows are throughput, "
            "herd CPU/update, idle p50, paced p99",
        ]
        section.raw = {side.key: dict(side.samples) for side in sides}
    finally:
        lab.close()
        if checkout is not None:
            checkout.close()
    return section
