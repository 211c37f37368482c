"""Settings and helpers shared by the scenarios."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.harness import HOST, LoadWorker, quiet_cpu
from bench.report import median

JOB_SLACK = 30.0  # seconds a job may take beyond its own bound before the runner gives up


@dataclass(frozen=True)
class Settings:
    runs: int = 3
    duration: float = 2.0  # seconds per closed-loop measurement (or max_requests, whichever first)
    max_requests: int = 30_000
    persistent_clients: tuple[int, ...] = (1, 50, 200)
    per_request_clients: tuple[int, ...] = (1, 50)
    per_request_max: int = 4_000  # bounds TIME_WAIT sockets on loopback
    probes: int = 200
    probe_seconds: float = 4.0
    loaded_rate: float = 2_000.0  # IAMAT/s in all from propagation's paced background clients
    storm_updates: int = 10_000
    storm_clients: int = 1_000
    storm_connections: int = 100
    storm_seconds: float = 40.0
    idle_connections: int = 10_000
    idle_batch: int = 500
    whatsat_clients: int = 100
    whatsat_runs: int = 5  # bursts are short (~0.3 s) and this 2-core VM is noisy: more runs, a steadier median
    iamat_runs: int = 5  # the CPU ratios compare separate measurements: more runs, steadier medians
    slow_updates: int = 60_000  # ~40,000 AT lines fit in loopback buffers before a forwarder blocks
    slow_clients: int = 1_000
    offline_queries: int = 2_000  # per mix and radius, on the strip index and the lat band
    offline_linear_queries: int = 50  # the linear scan costs ~100 ms a query
    startup_runs: int = 5  # the start-up targets are medians of 5 starts
    herd_sizes: tuple[int, ...] = (50, 100)  # servers in the big herd (bench/run.py --herd-sizes)
    herd_updates: int = 50
    herd_gap: float = 0.25  # seconds between the big herd's updates: each one's traffic is its own
    herd_idle_seconds: float = 10.0


FULL = Settings()
QUICK = Settings(
    runs=1, duration=0.5, per_request_max=1_000, probes=50, probe_seconds=1.0, storm_updates=2_000,
    storm_clients=200, storm_seconds=15.0, idle_connections=2_000, slow_updates=50_000,
    offline_queries=200, offline_linear_queries=5, whatsat_runs=2, iamat_runs=1, startup_runs=2,
    herd_sizes=(20,), herd_updates=20, herd_idle_seconds=3.0,
)


@dataclass
class Context:
    """What every scenario gets: settings, where to put its lab, the fake Places server."""

    settings: Settings
    work_dir: Path
    places_url: str
    places_latency: float
    places_pid: int
    compare_rev: str | None = None  # bench/run.py --compare REV (None: the compare scenario's default)


def target(port: int) -> list[Any]:
    return [HOST, port]


def closed_loop(worker: LoadWorker, ports: list[int], clients: int, duration: float, max_requests: int,
                prefix: str, **options: Any) -> dict[str, Any]:
    return worker.call(
        "closed_loop", timeout=duration + JOB_SLACK, targets=[target(p) for p in ports], clients=clients,
        duration=duration, max_requests=max_requests, prefix=prefix, **options,
    )


def with_cpu(pids: list[int], measure: Any) -> dict[str, Any]:
    """Run ``measure()``; add the CPU seconds the processes spent, floods included."""
    before = quiet_cpu(pids)
    result: dict[str, Any] = measure()
    result["cpu_s"] = quiet_cpu(pids) - before
    result["cpu_us_per_req"] = result["cpu_s"] / result["count"] * 1e6 if result["count"] else 0.0
    return result


def percentiles(samples: list[float]) -> dict[str, float]:
    """p50/p99 in ms of samples in seconds, by nearest rank (as bench/load.py's summary)."""
    if not samples:
        return {"p50_ms": 0.0, "p99_ms": 0.0}
    ordered = sorted(samples)

    def rank(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))] * 1000

    return {"p50_ms": rank(0.50), "p99_ms": rank(0.99)}


def med(samples: list[dict[str, Any]], key: str) -> float:
    return median([float(s[key]) for s in samples])


def check_errors(samples: list[dict[str, Any]], what: str, notes: list[str]) -> None:
    errors = sum(s.get("errors", 0) for s in samples)
    if errors:
        first = next(s["first_error"] for s in samples if s.get("errors"))
        notes.append(f"{what}: {errors} client errors (first: {first})")
