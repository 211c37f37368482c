"""IAMAT throughput, latency and CPU: echo server vs one server vs the five-server herd."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from bench.harness import FIVE, FIVE_LINKS, Lab, LoadWorker
from bench.report import Row, Section, Target
from bench.scenarios.common import Context, check_errors, closed_loop, med, with_cpu

SYSTEMS = ("echo", "one", "five")
THROUGHPUT_SHARE = 0.6  # issue: one server's IAMAT throughput at 50 persistent clients >= 60% of echo
THROUGHPUT_CLIENTS = 50
P50_RATIO_LIMIT = 1.5  # issue: one server's p50 at 1 persistent client within 1.5x of echo
P50_CLIENTS = 1
HERD_CPU_RATIO_LIMIT = 3.0  # issue: herd CPU per update (sum of 5) <= 3x one server's CPU per request ...
HERD_CPU_LIMIT_US = 400.0  # ... and <= 0.4 ms (persistent-client modes; c=50 is the headline)


@dataclass(frozen=True)
class Mode:
    clients: int
    per_request: bool

    @property
    def label(self) -> str:
        return f"{'per-request' if self.per_request else 'persistent'} c={self.clients}"


@dataclass
class System:
    name: str
    port: int
    pids: list[int]


def modes(ctx: Context) -> list[Mode]:
    s = ctx.settings
    return [Mode(c, False) for c in s.persistent_clients] + [Mode(c, True) for c in s.per_request_clients]


def measure(worker: LoadWorker, system: System, mode: Mode, ctx: Context, prefix: str) -> dict[str, Any]:
    s = ctx.settings
    limit = s.per_request_max if mode.per_request else s.max_requests
    return with_cpu(system.pids, lambda: closed_loop(
        worker, [system.port], mode.clients, s.duration, limit, prefix, per_request=mode.per_request,
    ))


def start_systems(lab: Lab) -> list[System]:
    echo, echo_port = lab.echo()
    one = lab.herd("one", {"Alford": []})
    lab.start_servers(one, ["Alford"])
    five = lab.herd("five", FIVE_LINKS)
    lab.start_servers(five, FIVE)
    return [
        System("echo", echo_port, [echo.pid]),
        System("one", one.ports["Alford"], one.pids()),
        System("five", five.ports["Alford"], five.pids()),
    ]


def goal(condition: bool, text: str, when: bool = True) -> Target | None:
    return Target(text, condition, "issue") if when else None


def mode_rows(mode: Mode, samples: dict[str, list[dict[str, Any]]]) -> list[Row]:
    echo, one, five = (samples[name] for name in SYSTEMS)
    persistent = not mode.per_request
    rows = []
    for runs, title in ((one, "one server"), (five, "5-server herd")):
        on_one = runs is one and persistent
        throughput, echo_throughput = med(runs, "throughput"), med(echo, "throughput")
        p50, echo_p50 = med(runs, "p50_ms"), med(echo, "p50_ms")
        rows += [
            Row(f"{mode.label} {title} throughput", throughput, "req/s", echo_throughput, "echo, same c",
                goal(throughput >= THROUGHPUT_SHARE * echo_throughput, f">= {THROUGHPUT_SHARE:g}x echo",
                     on_one and mode.clients == THROUGHPUT_CLIENTS)),
            Row(f"{mode.label} {title} p50", p50, "ms", echo_p50, "echo, same c",
                goal(p50 <= P50_RATIO_LIMIT * echo_p50, f"<= {P50_RATIO_LIMIT:g}x echo",
                     on_one and mode.clients == P50_CLIENTS)),
            Row(f"{mode.label} {title} p99", med(runs, "p99_ms"), "ms", med(echo, "p99_ms"), "echo, same c"),
        ]
    herd_cpu, one_cpu = med(five, "cpu_us_per_req"), med(one, "cpu_us_per_req")
    rows += [
        Row(f"{mode.label} one server CPU/request", one_cpu, "us", med(echo, "cpu_us_per_req"), "echo CPU/request"),
        Row(f"{mode.label} herd CPU/update (sum of 5)", herd_cpu, "us", one_cpu, "one server CPU/req",
            goal(herd_cpu <= HERD_CPU_RATIO_LIMIT * one_cpu and herd_cpu <= HERD_CPU_LIMIT_US,
                 f"<= {HERD_CPU_RATIO_LIMIT:g}x and <= {HERD_CPU_LIMIT_US:g} us", persistent)),
    ]
    return rows


def run(ctx: Context) -> Section:
    section = Section("iamat")
    lab = Lab(ctx.work_dir, "iamat", ctx.places_url)
    try:
        systems = start_systems(lab)
        worker = lab.worker("load")
        samples: dict[Mode, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
        for r in range(ctx.settings.iamat_runs):
            for mode in modes(ctx):
                order = systems[r % 3:] + systems[:r % 3]  # rotate who goes first
                for system in order:
                    prefix = f"client-{r}-{system.name}-{mode.clients}{'r' if mode.per_request else 'p'}"
                    samples[mode][system.name].append(measure(worker, system, mode, ctx, prefix))
        for mode, by_system in samples.items():
            section.add(*mode_rows(mode, by_system))
            for name, runs in by_system.items():
                check_errors(runs, f"{mode.label} {name}", section.notes)
        section.raw = {m.label: dict(by) for m, by in samples.items()}
        section.notes += [
            "closed loop: each client sends one IAMAT (distinct client id, real current time) and waits for the "
            f"reply; {ctx.settings.duration:g} s or the request cap per measurement; load at Alford",
            "per-request: connect, write, half-close, read to EOF; latency includes the connect",
            "CPU: utime+stime from /proc/PID/stat before/after, after the herd went quiet (floods included), "
            "divided by the IAMATs answered; herd = sum over the five processes",
            f"herd CPU/update target (<= {HERD_CPU_RATIO_LIMIT:g}x one server's CPU/request and <= "
            f"{HERD_CPU_LIMIT_US:g} us) is on every persistent-client mode; c={THROUGHPUT_CLIENTS} is the headline",
        ]
    finally:
        lab.close()
    return section
