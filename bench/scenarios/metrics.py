"""Metrics on vs off: one server's IAMAT throughput at 50 persistent clients, side by side.

"off" runs with ``http_port = 0``; "on" serves its HTTP side and is scraped at
/metrics every second while it is measured (as Prometheus would). The counters
themselves are plain ints in both (they cost the same either way); what "on" adds
is the HTTP server and the scrapes. The two servers are measured in turns, the
order rotated each run, medians over ``iamat_runs``.
"""

from __future__ import annotations

import threading
import urllib.request
from collections import defaultdict
from typing import Any

from bench.harness import HOST, Herd, Lab, LoadWorker
from bench.report import Row, Section, Target
from bench.scenarios.common import Context, check_errors, closed_loop, med, with_cpu

CLIENTS = 50
COST_LIMIT = 0.05  # issue: counting costs at most 5% of IAMAT throughput
SCRAPE_SECONDS = 1.0


class Scraper:
    """GET /metrics every SCRAPE_SECONDS from a thread of the runner while ``running``."""

    def __init__(self, port: int):
        self.url = f"http://{HOST}:{port}/metrics"
        self.stop = threading.Event()
        self.scrapes = 0
        self.bytes = 0
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Scraper:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=5)

    def _loop(self) -> None:
        while not self.stop.is_set():
            with urllib.request.urlopen(self.url, timeout=5) as response:
                self.bytes += len(response.read())
            self.scrapes += 1
            self.stop.wait(SCRAPE_SECONDS)


def turn(worker: LoadWorker, herd: Herd, scraped: bool, prefix: str, ctx: Context) -> tuple[dict[str, Any], int]:
    """One measurement of one server (its /metrics scraped meanwhile if ``scraped``); the scrapes made."""
    s = ctx.settings

    def measure() -> dict[str, Any]:
        return closed_loop(worker, [herd.ports["Alford"]], CLIENTS, s.duration, s.max_requests, prefix)

    if not scraped:
        return with_cpu(herd.pids(), measure), 0
    with Scraper(herd.http_ports["Alford"]) as scraper:
        sample = with_cpu(herd.pids(), measure)
    return sample, scraper.scrapes


def measure_turns(lab: Lab, off: Herd, on: Herd, ctx: Context) -> tuple[dict[str, list[dict[str, Any]]], int]:
    """Off and on in alternating order, ``iamat_runs`` times; the samples and the scrapes made."""
    worker = lab.worker("load")
    samples: dict[str, list[dict[str, Any]]] = defaultdict(list)
    scrapes = 0
    for r in range(ctx.settings.iamat_runs):
        for name in (("off", "on") if r % 2 == 0 else ("on", "off")):
            sample, scraped = turn(worker, on if name == "on" else off, name == "on", f"m{r}-{name}", ctx)
            samples[name].append(sample)
            scrapes += scraped
    return samples, scrapes


def rows(samples: dict[str, list[dict[str, Any]]]) -> list[Row]:
    on_tp, off_tp = med(samples["on"], "throughput"), med(samples["off"], "throughput")
    return [
        Row(f"persistent c={CLIENTS} metrics on throughput", on_tp, "req/s", off_tp, "metrics off (http_port = 0)",
            Target(f">= {1 - COST_LIMIT:g}x off (counting costs <= {COST_LIMIT:.0%})",
                   on_tp >= (1 - COST_LIMIT) * off_tp, "issue")),
        Row(f"persistent c={CLIENTS} metrics on p50", med(samples["on"], "p50_ms"), "ms",
            med(samples["off"], "p50_ms"), "metrics off"),
        Row(f"persistent c={CLIENTS} metrics on CPU/request", med(samples["on"], "cpu_us_per_req"), "us",
            med(samples["off"], "cpu_us_per_req"), "metrics off"),
    ]


def run(ctx: Context) -> Section:
    section = Section("metrics")
    lab = Lab(ctx.work_dir, "metrics", ctx.places_url)
    s = ctx.settings
    try:
        off = lab.herd("off", {"Alford": []})
        on = lab.herd("on", {"Alford": []}, http=True)
        lab.start_servers(off, ["Alford"])
        lab.start_servers(on, ["Alford"])
        samples, scrapes = measure_turns(lab, off, on, ctx)
        section.add(*rows(samples))
        for name, runs in samples.items():
            check_errors(runs, f"metrics {name}", section.notes)
        section.raw = dict(samples)
        section.notes += [
            f"one server each, {CLIENTS} persistent clients sending IAMATs in a closed loop; "
            f"{s.duration:g} s or the request cap per measurement, turns alternated, medians of {s.iamat_runs}",
            f"on: HTTP side up and /metrics scraped every {SCRAPE_SECONDS:g} s while measured ({scrapes} scrapes); "
            "off: http_port = 0. Both count (plain ints on Stats): the cost of counting itself is measured "
            "against the code before it in bench/RESULTS.md",
        ]
    finally:
        lab.close()
    return section
