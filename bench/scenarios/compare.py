"""The issue-4 figures of this working tree beside an earlier revision's, measured in one run.

``bench/run.py --compare REV`` (default ``HEAD~1``, the commit before the last; ``HEAD``
compares uncommitted changes with the last commit; ``70174fa`` is the last revision with
persistent links, the base of the "links on demand" issue) checks REV out with ``git
worktree add --detach`` into the lab (removed at the end) and runs the same measurements
against servers started from it (cwd and PYTHONPATH = the checkout, so ``python -m
herdserver`` imports that revision's package):

- IAMAT throughput of one server at 50 persistent clients (``iamat``);
- herd CPU per update, the five servers summed, at 50 persistent clients (``iamat``);
- two-hop propagation, Alford -> Holiday from Holiday's log: p50 idle and p99 with
  50 paced clients loading Alford (``propagation``).

Three sides: the base code (its herd.ini has only keys the base accepts: an unknown key
is an error to herdserver, so ``state_dir`` and ``http_port`` are first tried on one
server of the base; memory only if it knows ``state_dir``), this code memory-only
(``state_dir = -``, the fair comparison: code before the state file kept none), and this
code with the default state file (``fsync = interval``). Every run measures all three, in rotated order (A B C,
B C A, ...), so the VM's speed drift hits each side alike. The target: no figure
more than 10% worse than the base code's.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.harness import FIVE, FIVE_LINKS, ROOT, BenchError, Checkout, Herd, Lab, LoadWorker, port_open
from bench.report import Row, Section, Target, median
from bench.scenarios.common import JOB_SLACK, Context, check_errors, closed_loop, target, with_cpu
from bench.scenarios.propagation import HOLIDAY, add_holds, arrivals

WORSE_LIMIT = 0.10  # issue: no figure more than 10% worse than the previous code's
CLIENTS = 50
BACKGROUND_START_S = 0.3
DEFAULT_REV = "HEAD~1"  # "side by side with the previous commit"
LINKS_ON_DEMAND_BASE = "70174fa"  # the last revision with persistent links (named in the notes)
KEY_PROBE_TIMEOUT = 30.0  # seconds for one probe server to listen or refuse its herd.ini
CONFIG_ERROR = 2  # herdserver's exit status for a herd.ini it refuses (README, "Exit status")


@dataclass
class Side:
    key: str
    title: str
    code: Path
    herd_keys: dict[str, str]
    http_port: bool = True  # the code knows the http_port key (else none is written)
    one: Herd | None = None
    five: Herd | None = None
    probe: Herd | None = None
    samples: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))


def start_side(lab: Lab, side: Side, ctx: Context) -> None:
    old = not side.http_port  # a checkout from before http_port existed
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
                limit = f">= {1 - WORSE_LIMIT:.2f}x base" if higher_better else f"<= {1 + WORSE_LIMIT:.2f}x base"
                goal = Target(limit, met, "issue" if side.key == "mem" else "issue; with a state file")
            result.append(Row(f"{side.title}: {label}", value, unit, reference, old.title, goal))
    return result


# -- phases -----------------------------------------------------------------------------------


def accepts(lab: Lab, code: Path, name: str, herd_keys: dict[str, str], http: bool) -> bool:
    """Whether the code at ``code`` runs a server from a herd.ini with these keys (``http``:
    with ``http_port = 0``), or refuses it as a broken file; any other outcome is an error."""
    herd = lab.herd(name, {"Alford": []}, herd_keys=herd_keys, old_code=not http)
    lab.start_servers(herd, ["Alford"], code=code, wait=False)
    child = herd.children["Alford"]
    deadline = time.monotonic() + KEY_PROBE_TIMEOUT
    try:
        while time.monotonic() < deadline:
            if port_open(herd.ports["Alford"]):
                return True
            if not child.alive():
                if child.process.returncode == CONFIG_ERROR:
                    return False
                raise BenchError(f"{name}: exited {child.process.returncode}: {child.log_tail()}")
            time.sleep(0.02)  # polling a start-up against a deadline
        raise BenchError(f"{name}: neither listening nor refusing its herd.ini after {KEY_PROBE_TIMEOUT:g}s")
    finally:
        lab.stop_servers(herd)


def base_side(lab: Lab, checkout: Checkout) -> Side:
    """The base revision's side, with the keys it accepts: memory only when it can be told so."""
    memory_only = accepts(lab, checkout.path, "keys-state", {"state_dir": "-"}, http=False)
    http_port = accepts(lab, checkout.path, "keys-http", {}, http=True)
    herd_keys = {"state_dir": "-"} if memory_only else {}
    return Side("old", f"base {checkout.commit}", checkout.path, herd_keys, http_port=http_port)


def all_sides(lab: Lab, checkout: Checkout, ctx: Context) -> list[Side]:
    sides = [
        base_side(lab, checkout),
        Side("mem", "new, memory only", ROOT, {"state_dir": "-"}),
        Side("state", "new, state file", ROOT, {"fsync": "interval"}),
    ]
    for side in sides:
        start_side(lab, side, ctx)
    return sides


def measure_all(lab: Lab, sides: list[Side], ctx: Context) -> None:
    """A warm-up probe per side, then every run measures each side, in rotated order."""
    load, prober, background = lab.worker("load"), lab.worker("prober"), lab.worker("background")
    for side in sides:
        assert side.probe is not None
        holiday_probe(prober, side.probe, ctx, "warmup")
    for r in range(ctx.settings.iamat_runs):
        for side in sides[r % 3:] + sides[:r % 3]:  # A B C, B C A, C A B, ...
            measure_side(side, load, prober, background, ctx, r)


def collect(lab: Lab, sides: list[Side], section: Section) -> None:
    """Stop the probe herds (flushing their logs) and add Holiday's arrivals to the probes."""
    for side in sides:
        assert side.probe is not None
        lab.stop_servers(side.probe)
        first = arrivals(side.probe, HOLIDAY)
        missing = sum(add_holds(side.samples[kind], first) for kind in ("idle", "paced"))
        if missing:
            section.notes.append(f"{side.title}: {missing} probes had no AT line in Holiday's log")
        check_errors(side.samples["one"] + side.samples["five"], f"{side.title} IAMAT load", section.notes)
        check_errors([run["background"] for run in side.samples["paced"]], f"{side.title} background",
                     section.notes)


def notes(sides: list[Side], rev: str, ctx: Context) -> list[str]:
    base = sides[0]
    paced = {side.title: median([run["background"]["throughput"] for run in side.samples["paced"]])
             for side in sides}
    base_state = "memory only (state_dir = -)" if base.herd_keys else "its defaults (it knows no state_dir)"
    return [
        f"base = git revision {rev} ({base.title.split()[-1]}), checked out with git worktree add --detach and run "
        f"from there (cwd and PYTHONPATH), {base_state}; new = this working tree; every figure a median of "
        f"{ctx.settings.iamat_runs} runs, the three sides measured in rotated order within each run "
        f"(--compare {LINKS_ON_DEMAND_BASE} is the base of the links-on-demand figures)",
        "new, memory only: [herd] state_dir = -; new, state file: the default state file beside herd.ini, "
        "fsync = interval",
        f"IAMAT: {CLIENTS} persistent closed-loop clients at Alford, {ctx.settings.duration:g} s per measurement; "
        "CPU from /proc/PID/stat after the herd went quiet, divided by the IAMATs answered",
        "propagation: sequential probe IAMATs at Alford, delay to the first event=in line of the probe's client "
        f"in Holiday's log; paced = {CLIENTS} background clients at {ctx.settings.loaded_rate:,.0f} IAMAT/s in "
        "all; background rate achieved: " + ", ".join(f"{k} {v:,.0f}/s" for k, v in paced.items()),
        f"target: each figure at most {WORSE_LIMIT:.0%} worse than the base code's (throughput >= "
        f"{1 - WORSE_LIMIT:.2f}x, CPU and latency <= {1 + WORSE_LIMIT:.2f}x); the links-on-demand issue's rows are "
        "throughput, herd CPU/update, idle p50, paced p99",
    ]


def run(ctx: Context) -> Section:
    section = Section("compare")
    rev = ctx.compare_rev or DEFAULT_REV
    lab = Lab(ctx.work_dir, "compare", ctx.places_url)
    checkout: Checkout | None = None
    try:
        checkout = Checkout(lab.dir, rev)
        sides = all_sides(lab, checkout, ctx)
        measure_all(lab, sides, ctx)
        collect(lab, sides, section)
        section.add(*rows(sides[0], sides[1:]))
        section.notes += notes(sides, rev, ctx)
        section.raw = {side.key: dict(side.samples) for side in sides}
    finally:
        lab.close()
        if checkout is not None:
            checkout.close()
    return section
