"""The offline Places provider's index (herdserver/offline.py): query cost and memory.

On the shipped GeoNames data:

1. query cost of the strip index (latitude strips bisected on longitude) over
   ``offline_queries`` random locations, radius 10 km and 50 km, next to a
   latitude-sorted ``bisect`` band (the simpler index) and a linear scan of the same
   arrays (the baseline, on ``offline_linear_queries`` locations: ~100 ms each);
2. resident memory of a fresh server-like process before and after loading (VmRSS
   and the peak VmHWM from /proc/self/status), against a 40 MB budget;
3. load time (in that process, so nothing is warm but the OS page cache).

Two location mixes: ``world`` is uniform on the sphere (mostly ocean, cheap),
``populated`` is a random place moved by ~10 km (what clients send; dense areas cost
the most).

The one scenario that imports herdserver in the runner: its subject is an in-process
data structure, not a server. It uses the module's public names only, imported inside the
functions so a change there fails this scenario alone, not the import of the whole suite.
"""

from __future__ import annotations

import bisect
import json
import math
import random
import sys
import time
from array import array
from collections.abc import Callable
from typing import Any

from bench.harness import Lab, read_line
from bench.report import Row, Section, Target
from bench.scenarios.common import Context

BUDGET_MB = 40.0  # the offline provider's own memory budget (per server)
RADII_M = (10_000, 50_000)
SEED = 131
PROBE_TIMEOUT = 120.0  # seconds: a cold page cache and a slow moment of the VM
Query = Callable[[float, float, float], list[tuple[float, int]]]

# Runs in a fresh interpreter: import what a server imports, then load; one JSON line out.
RSS_PROBE = r"""
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
                  "error": provider.error}), flush=True)
"""


# -- memory --------------------------------------------------------------------------------------


def measure_memory(lab: Lab) -> dict[str, Any]:
    child = lab.spawn("rss-probe", [sys.executable, "-c", RSS_PROBE], pipes=True)
    probe = json.loads(read_line(child, bytearray(), PROBE_TIMEOUT))
    before, after = probe["before"]["VmRSS"], probe["after"]
    return {
        "rss_before_mb": round(before, 1),
        "rss_after_mb": round(after["VmRSS"], 1),
        "rss_delta_mb": round(after["VmRSS"] - before, 1),
        "peak_delta_mb": round(after["VmHWM"] - before, 1),
        "budget_mb": BUDGET_MB,
        "within_budget": after["VmHWM"] - before < BUDGET_MB,
        "load_s": round(probe["load_s"], 3),
        "places": probe["places"],
        "error": probe["error"],
    }


# -- queries -------------------------------------------------------------------------------------


class LatBand:
    """The plain alternative: rows sorted by latitude, bisect the band, scan it."""

    def __init__(self, ds: Any) -> None:
        order = sorted(range(len(ds)), key=ds.lat.__getitem__)
        self.lat = array("i", (ds.lat[i] for i in order))
        self.lon = array("i", (ds.lon[i] for i in order))

    def query(self, lat: float, lon: float, radius_m: float) -> list[tuple[float, int]]:
        from herdserver.places import geonames as offline

        delta = radius_m / offline.EARTH_RADIUS_M
        lat_lo, lat_hi, windows = offline.search_box(lat, lon, delta)
        phi, lam, rad = math.radians(lat), math.radians(lon), math.radians(1 / offline.SCALE)
        cos_phi, limit = math.cos(phi), math.sin(delta / 2) ** 2
        lats, lons, found = self.lat, self.lon, []
        for i in range(bisect.bisect_left(lats, lat_lo), bisect.bisect_right(lats, lat_hi)):
            x = lons[i]
            if any(lo <= x <= hi for lo, hi in windows):
                p = lats[i] * rad
                h = math.sin((p - phi) / 2) ** 2 + cos_phi * math.cos(p) * math.sin((x * rad - lam) / 2) ** 2
                if h <= limit:
                    found.append((2 * offline.EARTH_RADIUS_M * math.asin(math.sqrt(h)), i))
        found.sort()
        return found


def locations(ds: Any, n: int, rng: random.Random) -> dict[str, list[tuple[float, float]]]:
    from herdserver.places import geonames as offline

    world = [(math.degrees(math.asin(rng.uniform(-1, 1))), rng.uniform(-180, 180)) for _ in range(n)]
    populated = []
    for _ in range(n):
        i = rng.randrange(len(ds))
        lat = min(90.0, max(-90.0, ds.lat[i] / offline.SCALE + rng.gauss(0, 0.1)))
        lon = (ds.lon[i] / offline.SCALE + rng.gauss(0, 0.1) + 180) % 360 - 180
        populated.append((lat, lon))
    return {"world": world, "populated": populated}


def timed(fn: Query, points: list[tuple[float, float]],
          radius: float) -> tuple[list[float], list[list[tuple[float, int]]]]:
    """Each query's cost in microseconds, and its answer."""
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


def query_row(ds: Any, band: LatBand, mix: str, points: list[tuple[float, float]], radius: int,
              n_linear: int) -> dict[str, Any]:
    """One mix and radius: the index, the band and the linear scan on the same points."""
    index_costs, answers = timed(ds.query, points, radius)
    band_costs, _ = timed(band.query, points, radius)
    linear_costs, oracle = timed(ds.linear, points[:n_linear], radius)
    index, linear = stats(index_costs), stats(linear_costs)
    return {
        "mix": mix, "radius_km": radius // 1000, "queries": len(points), "linear_queries": n_linear,
        "index": index, "lat_band": stats(band_costs), "linear": linear,
        "speedup": round(linear["avg_us"] / index["avg_us"]),
        "mean_results": round(sum(map(len, answers)) / len(points), 1),
        "same_as_linear": answers[:n_linear] == oracle,
    }


def measure_queries(n: int, n_linear: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The dataset's facts, and one row per mix and radius."""
    from herdserver.places import geonames as offline

    ds = offline.load_dataset()
    band = LatBand(ds)
    mixes = locations(ds, n, random.Random(SEED))
    rows = [query_row(ds, band, mix, points, radius, n_linear) for mix, points in mixes.items() for radius in RADII_M]
    return {"data_file": offline.DATA_FILE, "strip_deg": offline.DEFAULT_STRIP_DEG}, rows


# -- report ------------------------------------------------------------------------------------


def rows(result: dict[str, Any]) -> list[Row]:
    memory = result["memory"]
    out = [
        Row("offline: RSS added by loading the data", memory["peak_delta_mb"], "MB peak", memory["budget_mb"],
            "budget", Target(f"<= {memory['budget_mb']:g} MB", bool(memory["within_budget"]), "offline budget")),
        Row("offline: load time (fresh process)", memory["load_s"], "s"),
    ]
    for q in result["queries"]:
        label = f"offline query {q['mix']} r={q['radius_km']}km"
        out += [
            Row(f"{label} avg", q["index"]["avg_us"], "us", q["linear"]["avg_us"], "linear scan"),
            Row(f"{label} p99", q["index"]["p99_us"], "us", q["lat_band"]["p99_us"], "lat-band p99"),
        ]
    return out


def notes(result: dict[str, Any]) -> list[str]:
    data, memory, first = result["data"], result["memory"], result["queries"][0]
    out = [
        f"{memory['places']} places from {data['data_file']}, strips of {data['strip_deg']} deg; RSS "
        f"{memory['rss_before_mb']} MB -> {memory['rss_after_mb']} MB (+{memory['rss_delta_mb']} MB, peak "
        f"+{memory['peak_delta_mb']} MB) in a fresh process that imports what a server imports",
        f"index and lat-band: {first['queries']} queries per row; linear scan: {first['linear_queries']}; "
        "world = uniform on the sphere, populated = a random place moved by ~10 km",
    ]
    for q in result["queries"]:
        out.append(
            f"{q['mix']} r={q['radius_km']}km: lat-band avg {q['lat_band']['avg_us']:.0f} us, index "
            f"{q['speedup']}x faster than linear, {q['mean_results']} results on average, same answers as the "
            f"linear scan: {'yes' if q['same_as_linear'] else 'NO'}"
        )
    if memory["error"]:
        out.append(f"the provider reported: {memory['error']}")
    return out


def run(ctx: Context) -> Section:
    section = Section("offline")
    lab = Lab(ctx.work_dir, "offline", ctx.places_url)
    try:
        memory = measure_memory(lab)
    finally:
        lab.close()
    data, queries = measure_queries(ctx.settings.offline_queries, ctx.settings.offline_linear_queries)
    result = {"memory": memory, "data": data, "queries": queries}
    section.add(*rows(result))
    section.notes += notes(result)
    section.raw["offline"] = result
    return section
