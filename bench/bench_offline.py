"""Benchmark of the offline Places provider (herdserver/places/offline.py and geonames.py).

    .venv/bin/python bench/bench_offline.py [--json PATH] [--queries N] [--linear-queries M]

Measures, on the shipped GeoNames data:
1. query cost of the strip index (latitude strips bisected on longitude) over N
   random locations, radius 10 km and 50 km, next to a latitude-sorted ``bisect``
   band (the simpler index DESIGN.md sketches) and a linear scan of the same
   arrays (the baseline, on fewer queries: it costs ~100 ms each);
2. resident memory of a fresh server-like subprocess before and after loading
   (VmRSS and the peak VmHWM from /proc/self/status), against the 40 MB budget;
3. load time (in that subprocess, so nothing is warm but the OS page cache).

Two location mixes: ``world`` is uniform on the sphere (mostly ocean, cheap),
``populated`` is a random place moved by ~10 km (what clients send; dense
areas cost the most). ``run()`` is the entry point for a suite runner.
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from herdserver.places import geonames  # noqa: E402

BUDGET_MB = 40.0
RADII_M = (10_000, 50_000)
SEED = 131

# Runs in a fresh interpreter: import what a server imports, then load.
_RSS_PROBE = r"""
import json, sys, time
from gevent import monkey
monkey.patch_all()
import requests  # noqa: F401
import herdserver.places  # noqa: F401
from herdserver.places import offline

def status():
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024
    return fields

before = status()
started = time.perf_counter()
provider = offline.OfflineProvider()
load_s = time.perf_counter() - started
after = status()
print(json.dumps({"before": before, "after": after, "load_s": load_s,
                  "places": len(provider.dataset) if provider.dataset else 0,
                  "error": provider.error}))
"""


def measure_memory() -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", _RSS_PROBE],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    before = probe["before"]["VmRSS"]
    return {
        "rss_before_mb": round(before, 1),
        "rss_after_mb": round(probe["after"]["VmRSS"], 1),
        "rss_delta_mb": round(probe["after"]["VmRSS"] - before, 1),
        "peak_delta_mb": round(probe["after"]["VmHWM"] - before, 1),
        "budget_mb": BUDGET_MB,
        "within_budget": probe["after"]["VmHWM"] - before < BUDGET_MB,
        "load_s": round(probe["load_s"], 3),
        "places": probe["places"],
        "error": probe["error"],
    }


class LatBand:
    """The plain alternative: rows sorted by latitude, bisect the band, scan it."""

    def __init__(self, ds: geonames.Dataset) -> None:
        order = sorted(range(len(ds)), key=ds.lat.__getitem__)
        self.lat = array("i", (ds.lat[i] for i in order))
        self.lon = array("i", (ds.lon[i] for i in order))

    def query(self, lat: float, lon: float, radius_m: float) -> list[tuple[float, int]]:
        delta = radius_m / geonames.EARTH_RADIUS_M
        lat_lo, lat_hi, windows = geonames.search_box(lat, lon, delta)
        phi, lam, rad = math.radians(lat), math.radians(lon), geonames.RAD_PER_UNIT
        cos_phi, limit = math.cos(phi), math.sin(delta / 2) ** 2
        lats, lons, found = self.lat, self.lon, []
        for i in range(bisect.bisect_left(lats, lat_lo), bisect.bisect_right(lats, lat_hi)):
            x = lons[i]
            if any(lo <= x <= hi for lo, hi in windows):
                p = lats[i] * rad
                h = math.sin((p - phi) / 2) ** 2 + cos_phi * math.cos(p) * math.sin((x * rad - lam) / 2) ** 2
                if h <= limit:
                    found.append((2 * geonames.EARTH_RADIUS_M * math.asin(math.sqrt(h)), i))
        found.sort()
        return found


def locations(ds: geonames.Dataset, n: int, rng: random.Random) -> dict[str, list[tuple[float, float]]]:
    world = [(math.degrees(math.asin(rng.uniform(-1, 1))), rng.uniform(-180, 180)) for _ in range(n)]
    populated = []
    for _ in range(n):
        i = rng.randrange(len(ds))
        lat = min(90.0, max(-90.0, ds.lat[i] / geonames.SCALE + rng.gauss(0, 0.1)))
        lon = (ds.lon[i] / geonames.SCALE + rng.gauss(0, 0.1) + 180) % 360 - 180
        populated.append((lat, lon))
    return {"world": world, "populated": populated}


def timed(
    fn: Callable[[float, float, float], list[tuple[float, int]]], points: list[tuple[float, float]], radius: float
) -> tuple[list[float], list[list[tuple[float, int]]]]:
    costs, answers = [], []
    for lat, lon in points:
        t0 = time.perf_counter_ns()
        answers.append(fn(lat, lon, radius))
        costs.append((time.perf_counter_ns() - t0) / 1000)
    return costs, answers


def stats(costs_us: list[float]) -> dict[str, float]:
    ordered = sorted(costs_us)
    return {
        "avg_us": round(sum(ordered) / len(ordered), 1),
        "p99_us": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 1),
    }


def measure_queries(ds: geonames.Dataset, n: int, n_linear: int) -> list[dict[str, Any]]:
    band = LatBand(ds)
    rows = []
    for mix, points in locations(ds, n, random.Random(SEED)).items():
        for radius in RADII_M:
            index_costs, answers = timed(ds.query, points, radius)
            band_costs, _ = timed(band.query, points, radius)
            linear_costs, oracle = timed(ds.linear, points[:n_linear], radius)
            index, linear = stats(index_costs), stats(linear_costs)
            rows.append(
                {
                    "mix": mix,
                    "radius_km": radius // 1000,
                    "queries": n,
                    "linear_queries": n_linear,
                    "index": index,
                    "lat_band": stats(band_costs),
                    "linear": linear,
                    "speedup": round(linear["avg_us"] / index["avg_us"]),
                    "mean_results": round(sum(map(len, answers)) / n, 1),
                    "same_as_linear": answers[:n_linear] == oracle,
                }
            )
    return rows


def header() -> dict[str, Any]:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "data_file": geonames.DATA_FILE,
        "strip_deg": geonames.DEFAULT_STRIP_DEG,
    }


def print_report(result: dict[str, Any]) -> None:
    h, m = result["machine"], result["memory"]
    print(
        f"offline provider benchmark: {h['cores']} cores ({h['cpu']}), Python {h['python']}, "
        f"{h['data_file']}, strips of {h['strip_deg']} deg"
    )
    print(f"load: {m['places']} places in {m['load_s']:.2f} s (fresh subprocess)")
    print(
        f"RSS: {m['rss_before_mb']} MB -> {m['rss_after_mb']} MB, +{m['rss_delta_mb']} MB "
        f"(peak +{m['peak_delta_mb']} MB), budget {m['budget_mb']:.0f} MB: "
        f"{'OK' if m['within_budget'] else 'OVER'}"
    )
    print(
        f"{'mix':<10}{'r km':>5}{'index avg':>11}{'p99':>9}{'lat-band avg':>14}{'p99':>9}"
        f"{'linear avg':>12}{'speedup':>9}{'hits':>7}  same"
    )
    for r in result["queries"]:
        print(
            f"{r['mix']:<10}{r['radius_km']:>5}{r['index']['avg_us']:>9.0f}us{r['index']['p99_us']:>7.0f}us"
            f"{r['lat_band']['avg_us']:>12.0f}us{r['lat_band']['p99_us']:>7.0f}us"
            f"{r['linear']['avg_us'] / 1000:>10.1f}ms{r['speedup']:>8}x{r['mean_results']:>7}  "
            f"{'yes' if r['same_as_linear'] else 'NO'}"
        )
    q = result["queries"][0]
    print(f"(index and lat-band: {q['queries']} queries per row; linear: {q['linear_queries']})")


def run(json_path: str | None = None, queries: int = 2000, linear_queries: int = 50) -> dict[str, Any]:
    """Measure everything; print the table; write JSON to json_path if given."""
    memory = measure_memory()
    ds = geonames.load_dataset()
    result = {"machine": header(), "memory": memory, "queries": measure_queries(ds, queries, linear_queries)}
    print_report(result)
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--queries", type=int, default=2000, help="index queries per row (default 2000)")
    parser.add_argument("--linear-queries", type=int, default=50, help="linear-scan queries per row (default 50)")
    args = parser.parse_args(argv)
    run(args.json, args.queries, args.linear_queries)
    return 0


if __name__ == "__main__":
    sys.exit(main())
