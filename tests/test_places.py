"""The Google providers against a fake Places server on loopback (never Google itself).

What is checked: the exact requests each provider sends, the mapping of a
Places API (New) place onto a legacy result, cutting to the bound, every
failure mapped to a Google status word in the spec's error shape, that the key
never leaks, that HTTP connections are pooled, that one provider serves many
greenlets at once, and how ``choose`` picks a provider. The fake itself is
checked too, since other tests rely on it behaving like Google.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, quote_plus

import gevent
import pytest
import requests

from herdserver.config import PlacesSettings
from herdserver.places import choose, make_provider
from herdserver.places.google import DEFAULT_FIELD_MASK, GoogleLegacyProvider, GoogleNewProvider, legacy_result
from herdserver.places.offline import OfflineProvider

from .conftest import wait_until
from .fake_places import LEGACY_PATH, NEW_PATH, PLACES, UCLA, FakePlaces, haversine_m, to_legacy

KEY = "test-key-Zq8_places"
LAT, LON = UCLA
PACIFIC = (0.0, -150.0)  # nothing within 50 km
ERROR_KEYS = {"html_attributions", "results", "status", "error_message"}
# The Nearby Search Pro fields, one for each legacy field we fill; nothing dearer.
MINIMAL_MASK = {
    "places.id", "places.displayName", "places.location", "places.viewport", "places.types",
    "places.shortFormattedAddress", "places.businessStatus",
}

HttpProvider = GoogleNewProvider | GoogleLegacyProvider
KINDS = {"google": GoogleNewProvider, "google-legacy": GoogleLegacyProvider}


@pytest.fixture
def fake() -> Iterator[FakePlaces]:
    server = FakePlaces(api_key=KEY).start()
    yield server
    server.stop()


def settings(base_url: str, **overrides: Any) -> PlacesSettings:
    values: dict[str, Any] = {"base_url": base_url, "timeout": 2.0, **overrides}
    return PlacesSettings(**values)


@pytest.fixture
def open_provider(fake: FakePlaces) -> Iterator[Any]:
    """Build providers of either kind; all are closed before the fake stops."""
    made: list[HttpProvider] = []

    def build(kind: str, key: str | None = KEY, base_url: str | None = None, **overrides: Any) -> HttpProvider:
        provider = KINDS[kind](settings(base_url or fake.url, **overrides), key)
        made.append(provider)
        return provider

    yield build
    for provider in made:
        provider.close()


def closed_port_url() -> str:
    """A loopback URL nobody listens on: connecting is refused at once."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}"


def assert_error(payload: dict[str, Any], status: str) -> None:
    assert payload["status"] == status, payload
    assert set(payload) == ERROR_KEYS
    assert payload["results"] == [] and payload["html_attributions"] == []
    assert isinstance(payload["error_message"], str) and payload["error_message"].strip()


def names(results: list[dict[str, Any]]) -> list[str]:
    return [r["name"] for r in results]


# ------------------------------------------------------------------ request shape


@pytest.mark.parametrize(
    ("lat", "lon", "radius_m", "bound"),
    [(LAT, LON, 10_000.0, 5), (-33.8587, 151.2140, 250.5, 1), (89.5, -179.25, 50_000.0, 20)],
)
def test_new_api_request_is_exactly_what_google_documents(
    fake: FakePlaces, open_provider: Any, lat: float, lon: float, radius_m: float, bound: int
) -> None:
    open_provider("google").nearby(lat, lon, radius_m, bound)
    [request] = fake.requests
    assert (request.method, request.path, request.query) == ("POST", NEW_PATH, {})  # the key is not in the URL
    assert request.headers["x-goog-api-key"] == KEY
    assert request.headers["content-type"] == "application/json"
    assert request.headers["x-goog-fieldmask"] == DEFAULT_FIELD_MASK
    assert set(DEFAULT_FIELD_MASK.split(",")) == MINIMAL_MASK
    assert request.json == {
        "maxResultCount": bound,
        "locationRestriction": {"circle": {"center": {"latitude": lat, "longitude": lon}, "radius": radius_m}},
    }
    assert request.status == 200


def test_new_api_sends_a_configured_field_mask(fake: FakePlaces, open_provider: Any) -> None:
    mask = "places.id,places.displayName,places.location,places.rating,places.priceLevel"
    payload = open_provider("google", field_mask=mask).nearby(LAT, LON, 5_000.0, 20)
    assert fake.requests[0].headers["x-goog-fieldmask"] == mask
    diddy = next(r for r in payload["results"] if r["name"] == "Diddy Riese")
    source = next(p for p in PLACES if p["displayName"]["text"] == "Diddy Riese")
    assert (diddy["rating"], diddy["price_level"]) == (source["rating"], 1)  # PRICE_LEVEL_INEXPENSIVE
    assert "vicinity" not in diddy and "types" not in diddy  # not asked for, not invented


@pytest.mark.parametrize(
    ("lat", "lon", "radius_m", "radius_param"),
    [(LAT, LON, 10_000.0, "10000"), (-33.8587, 151.214, 250.5, "250.5"), (0.0, -0.5, 50_000.0, "50000")],
)
def test_legacy_request_is_a_get_with_location_radius_and_key(
    fake: FakePlaces, open_provider: Any, lat: float, lon: float, radius_m: float, radius_param: str
) -> None:
    open_provider("google-legacy").nearby(lat, lon, radius_m, 5)
    [request] = fake.requests
    assert (request.method, request.path) == ("GET", LEGACY_PATH)
    assert request.query == {"location": f"{lat!r},{lon!r}", "radius": radius_param, "key": KEY}
    assert float(request.query["location"].split(",")[0]) == lat
    assert "x-goog-api-key" not in request.headers and "x-goog-fieldmask" not in request.headers


# ------------------------------------------------------------------ mapping New -> legacy

SAMPLE = {
    "name": "places/ChIJ-sample",
    "id": "ChIJ-sample",
    "displayName": {"text": "Royce Hall", "languageCode": "en"},
    "location": {"latitude": 34.0722367, "longitude": -118.4420161},
    "viewport": {
        "low": {"latitude": 34.0709367, "longitude": -118.4433161},
        "high": {"latitude": 34.0735367, "longitude": -118.4407161},
    },
    "types": ["performing_arts_theater", "point_of_interest", "establishment"],
    "shortFormattedAddress": "10745 Dickson Plaza, Los Angeles",
    "formattedAddress": "10745 Dickson Plaza, Los Angeles, CA 90095, USA",
    "businessStatus": "CLOSED_TEMPORARILY",
    "rating": 4.7,
    "userRatingCount": 1710,
    "priceLevel": "PRICE_LEVEL_EXPENSIVE",
    "plusCode": {"globalCode": "85633HF5+V5", "compoundCode": "3HF5+V5 Los Angeles, CA, USA"},
    "iconMaskBaseUri": "https://maps.gstatic.com/mapfiles/place_api/icons/v2/generic_pinlet",
    "iconBackgroundColor": "#7B9EB0",
    "currentOpeningHours": {"openNow": False},
    "utcOffsetMinutes": -480,
}


@pytest.mark.parametrize(
    ("legacy_path", "expected"),
    [
        ("geometry.location.lat", 34.0722367),
        ("geometry.location.lng", -118.4420161),
        ("geometry.viewport.northeast.lat", 34.0735367),
        ("geometry.viewport.northeast.lng", -118.4407161),
        ("geometry.viewport.southwest.lat", 34.0709367),
        ("geometry.viewport.southwest.lng", -118.4433161),
        ("name", "Royce Hall"),
        ("place_id", "ChIJ-sample"),
        ("reference", "ChIJ-sample"),
        ("business_status", "CLOSED_TEMPORARILY"),
        ("types", ["performing_arts_theater", "point_of_interest", "establishment"]),
        ("vicinity", "10745 Dickson Plaza, Los Angeles"),
        ("rating", 4.7),
        ("user_ratings_total", 1710),
        ("price_level", 3),
        ("plus_code.global_code", "85633HF5+V5"),
        ("plus_code.compound_code", "3HF5+V5 Los Angeles, CA, USA"),
        ("icon_mask_base_uri", "https://maps.gstatic.com/mapfiles/place_api/icons/v2/generic_pinlet"),
        ("icon_background_color", "#7B9EB0"),
        ("opening_hours.open_now", False),
    ],
)
def test_a_new_place_maps_field_by_field_onto_a_legacy_result(legacy_path: str, expected: Any) -> None:
    value: Any = legacy_result(SAMPLE)
    for part in legacy_path.split("."):
        value = value[part]
    assert value == expected


def test_mapping_adds_nothing_that_was_not_asked_for() -> None:
    result = legacy_result({"id": "X", "location": {"latitude": 1.5, "longitude": -2.25}})
    assert result == {"geometry": {"location": {"lat": 1.5, "lng": -2.25}}, "place_id": "X", "reference": "X"}
    assert set(legacy_result(SAMPLE)) == {
        "geometry", "name", "place_id", "reference", "business_status", "types", "vicinity", "rating",
        "user_ratings_total", "price_level", "plus_code", "icon_mask_base_uri", "icon_background_color",
        "opening_hours",
    }


def test_vicinity_falls_back_to_the_formatted_address() -> None:
    place = {"id": "X", "formattedAddress": "1 World Way, Los Angeles, CA 90045, USA"}
    assert legacy_result(place)["vicinity"] == "1 World Way, Los Angeles, CA 90045, USA"
    assert legacy_result(dict(place, shortFormattedAddress="1 World Way, LA"))["vicinity"] == "1 World Way, LA"


@pytest.mark.parametrize("place", PLACES, ids=[p["displayName"]["text"] for p in PLACES])
def test_mapping_agrees_with_what_the_legacy_api_returns_for_the_same_place(place: dict[str, Any]) -> None:
    mapped, legacy = legacy_result(place), to_legacy(place)
    assert mapped == {key: legacy[key] for key in mapped}


def test_both_providers_return_the_same_places_for_the_same_question(
    fake: FakePlaces, open_provider: Any
) -> None:
    new = open_provider("google").nearby(LAT, LON, 5_000.0, 7)
    old = open_provider("google-legacy").nearby(LAT, LON, 5_000.0, 7)
    assert new["status"] == old["status"] == "OK"
    expected = [p["displayName"]["text"] for p in fake.within(LAT, LON, 5_000.0)[:7]]
    assert names(new["results"]) == names(old["results"]) == expected
    for mine, google in zip(new["results"], old["results"], strict=True):
        assert mine == {key: google[key] for key in mine}


# ------------------------------------------------------------------ radius, bound, ZERO_RESULTS


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("radius_m", "inside"), [(1_000.0, 9), (2_000.0, 12), (5_000.0, 18)])
def test_radius_limits_the_results(fake: FakePlaces, open_provider: Any, kind: str, radius_m: float,
                                   inside: int) -> None:
    payload = open_provider(kind).nearby(LAT, LON, radius_m, 20)
    assert payload["status"] == "OK"
    assert len(payload["results"]) == inside
    for result in payload["results"]:
        where = result["geometry"]["location"]
        assert haversine_m(LAT, LON, where["lat"], where["lng"]) <= radius_m


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bound", [1, 3, 19, 20])
def test_results_are_cut_to_the_bound(fake: FakePlaces, open_provider: Any, kind: str, bound: int) -> None:
    payload = open_provider(kind).nearby(LAT, LON, 50_000.0, bound)
    expected = [p["displayName"]["text"] for p in fake.within(LAT, LON, 50_000.0)[:bound]]
    assert payload["status"] == "OK"
    assert names(payload["results"]) == expected
    if kind == "google-legacy":  # the legacy API always sends a full page: the provider cuts
        assert len(fake.requests[0].response["results"]) == 20


@pytest.mark.parametrize("kind", KINDS)
def test_nothing_nearby_is_zero_results(fake: FakePlaces, open_provider: Any, kind: str) -> None:
    payload = open_provider(kind).nearby(*PACIFIC, 50_000.0, 5)
    assert payload == {"html_attributions": [], "results": [], "status": "ZERO_RESULTS"}
    if kind == "google":
        assert fake.requests[0].response == {}  # what Google (New) sends when nothing is found


# ------------------------------------------------------------------ failures


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("key", [None, ""])
def test_no_key_is_request_denied_without_any_request(
    fake: FakePlaces, open_provider: Any, kind: str, key: str | None
) -> None:
    payload = open_provider(kind, key=key).nearby(LAT, LON, 1_000.0, 5)
    assert_error(payload, "REQUEST_DENIED")
    assert "GOOGLE_PLACES_API_KEY" in payload["error_message"]
    assert fake.requests == []


@pytest.mark.parametrize(
    ("kind", "http_status"), [("google", 400), ("google-legacy", 200)]  # as Google answers a wrong key
)
def test_a_refused_key_is_request_denied(fake: FakePlaces, open_provider: Any, kind: str, http_status: int) -> None:
    payload = open_provider(kind, key="not-the-key").nearby(LAT, LON, 1_000.0, 5)
    assert_error(payload, "REQUEST_DENIED")
    [request] = fake.requests
    assert request.status == http_status
    if kind == "google":  # 400 INVALID_ARGUMENT: only the ErrorInfo reason tells it from a bad request
        assert request.response["error"]["details"][0]["reason"] == "API_KEY_INVALID"
    assert "not-the-key" not in json.dumps(payload)


@pytest.mark.parametrize(
    ("kind", "fail", "http_status", "status"),
    [
        ("google", "denied", 403, "REQUEST_DENIED"),
        ("google", "invalid", 400, "INVALID_REQUEST"),
        ("google", "http429", 429, "OVER_QUERY_LIMIT"),
        ("google", "http500", 500, "UNKNOWN_ERROR"),
        ("google", "badjson", 200, "UNKNOWN_ERROR"),
        ("google-legacy", "denied", 200, "REQUEST_DENIED"),
        ("google-legacy", "invalid", 200, "INVALID_REQUEST"),  # Google sends no error_message: we add one
        ("google-legacy", "http429", 429, "OVER_QUERY_LIMIT"),  # an HTML error page, not JSON
        ("google-legacy", "http500", 500, "UNKNOWN_ERROR"),
        ("google-legacy", "badjson", 200, "UNKNOWN_ERROR"),
    ],
)
def test_upstream_failures_map_to_google_status_words(
    fake: FakePlaces, open_provider: Any, kind: str, fail: str, http_status: int, status: str
) -> None:
    fake.fail = fail
    payload = open_provider(kind).nearby(LAT, LON, 1_000.0, 5)
    assert_error(payload, status)
    [request] = fake.requests
    assert request.status == http_status


@pytest.mark.parametrize("kind", KINDS)
def test_a_hung_service_times_out_as_unknown_error(fake: FakePlaces, open_provider: Any, kind: str) -> None:
    fake.fail = "hang"
    provider = open_provider(kind, timeout=0.3)
    started = time.monotonic()
    payload = provider.nearby(LAT, LON, 1_000.0, 5)
    elapsed = time.monotonic() - started
    assert_error(payload, "UNKNOWN_ERROR")
    assert "0.3 s" in payload["error_message"]
    assert 0.25 <= elapsed < 2.0
    assert len(fake.requests) == 1 and fake.requests[0].status == 0  # the fake never answered


@pytest.mark.parametrize("kind", KINDS)
def test_connection_refused_is_unknown_error(open_provider: Any, kind: str) -> None:
    payload = open_provider(kind, base_url=closed_port_url()).nearby(LAT, LON, 1_000.0, 5)
    assert_error(payload, "UNKNOWN_ERROR")
    assert payload["error_message"].startswith("cannot reach Places: ConnectionError")


# ------------------------------------------------------------------ key hygiene


def assert_no_key(payload: dict[str, Any], key: str) -> None:
    text = json.dumps(payload, ensure_ascii=False)
    for spelling in {key, quote(key, safe=""), quote_plus(key, safe="")}:
        assert spelling not in text


@pytest.mark.parametrize("key", ["s3cr3t-KEY-0123456789", "k3y with space+plus/slash"])
def test_legacy_key_never_leaks_from_a_connection_error(open_provider: Any, key: str) -> None:
    base_url = closed_port_url()
    provider = open_provider("google-legacy", key=key, base_url=base_url)
    # The hazard is real: requests puts the whole URL, key included, in its message.
    with pytest.raises(requests.ConnectionError) as raised:
        provider.session.get(base_url + LEGACY_PATH, params={"key": key}, timeout=2)
    assert quote_plus(key, safe="") in str(raised.value)
    payload = provider.nearby(LAT, LON, 1_000.0, 5)
    assert_error(payload, "UNKNOWN_ERROR")
    assert "<redacted>" in payload["error_message"]
    assert_no_key(payload, key)


def test_legacy_key_never_leaks_from_a_timeout(fake: FakePlaces, open_provider: Any) -> None:
    fake.fail = "hang"
    payload = open_provider("google-legacy", timeout=0.3).nearby(LAT, LON, 1_000.0, 5)
    assert_error(payload, "UNKNOWN_ERROR")
    assert fake.requests[0].query["key"] == KEY  # it was on the wire, in the URL
    assert_no_key(payload, KEY)


@pytest.mark.parametrize("kind", KINDS)
def test_key_never_leaks_from_any_failure(fake: FakePlaces, open_provider: Any, kind: str) -> None:
    provider = open_provider(kind)
    for fail in ("denied", "invalid", "http429", "http500", "badjson"):
        fake.fail = fail
        assert_no_key(provider.nearby(LAT, LON, 1_000.0, 5), KEY)


# ------------------------------------------------------------------ pooling and concurrency


@pytest.mark.parametrize("kind", KINDS)
def test_one_connection_serves_many_sequential_calls(fake: FakePlaces, open_provider: Any, kind: str) -> None:
    provider = open_provider(kind)
    for _ in range(25):
        assert provider.nearby(LAT, LON, 1_000.0, 3)["status"] == "OK"
    assert len(fake.requests) == 25
    assert len(fake.client_ports()) == 1


def test_the_pool_is_sized_from_settings_and_uses_gevent_queues(fake: FakePlaces, open_provider: Any) -> None:
    provider = open_provider("google", pool_size=37)
    provider.nearby(LAT, LON, 1_000.0, 3)
    adapter = provider.session.get_adapter(fake.url)
    assert adapter.max_retries.total == 0
    pool = adapter.poolmanager.connection_from_url(fake.url)
    assert pool.pool.maxsize == 37
    # A stdlib queue here deadlocks under gevent (gevent#1957, urllib3#3289).
    assert type(pool.pool).__module__.startswith("gevent")


@pytest.mark.parametrize("kind", KINDS)
def test_one_provider_serves_a_hundred_greenlets_at_once(fake: FakePlaces, open_provider: Any, kind: str) -> None:
    provider = open_provider(kind)
    fake.latency = 0.2
    calls = [gevent.spawn(provider.nearby, LAT, LON, 1_000.0, 5) for _ in range(100)]
    gevent.joinall(calls, timeout=10, raise_error=True)
    assert all(call.successful() and call.value["status"] == "OK" for call in calls)
    assert len(fake.requests) == 100
    assert fake.max_in_flight >= 50
    # Those connections go back to the pool: later calls open none.
    ports = fake.client_ports()
    fake.latency = 0.0
    for _ in range(5):
        provider.nearby(LAT, LON, 1_000.0, 5)
    assert fake.client_ports() == ports


# ------------------------------------------------------------------ choosing a provider


def test_auto_is_google_with_a_key_in_the_environment_and_offline_without() -> None:
    auto = PlacesSettings(provider="auto")
    assert choose(auto, {"GOOGLE_PLACES_API_KEY": "k"}) == "google"
    assert choose(auto, {}) == "offline"
    assert choose(auto, {"GOOGLE_PLACES_API_KEY": ""}) == "offline"
    assert choose(auto, {"OTHER": "k"}) == "offline"
    custom = PlacesSettings(provider="auto", api_key_env="MY_PLACES_KEY")
    assert choose(custom, {"MY_PLACES_KEY": "k"}) == "google"
    assert choose(custom, {"GOOGLE_PLACES_API_KEY": "k"}) == "offline"


@pytest.mark.parametrize("provider", ["offline", "google", "google-legacy"])
def test_an_explicit_provider_is_kept_whatever_the_environment(provider: str) -> None:
    for environ in ({}, {"GOOGLE_PLACES_API_KEY": "k"}):
        assert choose(PlacesSettings(provider=provider), environ) == provider


@pytest.mark.parametrize(
    ("provider", "cls"),
    [("auto", GoogleNewProvider), ("google", GoogleNewProvider), ("google-legacy", GoogleLegacyProvider)],
)
def test_make_provider_passes_the_key_from_the_environment(provider: str, cls: type) -> None:
    made = make_provider(PlacesSettings(provider=provider), {"GOOGLE_PLACES_API_KEY": "k-123"})
    try:
        assert type(made) is cls
        assert isinstance(made, GoogleNewProvider | GoogleLegacyProvider) and made.api_key == "k-123"
    finally:
        made.close()


@pytest.mark.usefixtures("warm_offline_cache")
def test_make_provider_makes_a_background_provider_waiting_up_to_the_places_timeout() -> None:
    made = make_provider(PlacesSettings(provider="offline", timeout=3.5), {})
    assert isinstance(made, OfflineProvider) and made.wait_seconds == 3.5
    assert made.ready(0)  # the warm cache: loaded in make_provider, no child


# ------------------------------------------------------------------ the fake behaves like Google


def search_nearby(fake: FakePlaces, body: dict[str, Any], mask: str | None = "places.id",
                  key: str = KEY) -> requests.Response:
    headers = {"X-Goog-Api-Key": key}
    if mask is not None:
        headers["X-Goog-FieldMask"] = mask
    return requests.post(fake.url + NEW_PATH, json=body, headers=headers, timeout=5)


def circle(radius: float, count: int = 20) -> dict[str, Any]:
    center = {"latitude": LAT, "longitude": LON}
    return {"maxResultCount": count, "locationRestriction": {"circle": {"center": center, "radius": radius}}}


def test_fake_new_api_demands_a_field_mask_and_a_valid_key(fake: FakePlaces) -> None:
    no_mask = search_nearby(fake, circle(1_000), mask=None)
    assert no_mask.status_code == 400 and no_mask.json()["error"]["status"] == "INVALID_ARGUMENT"
    assert "FieldMask is a required parameter" in no_mask.json()["error"]["message"]
    wrong = search_nearby(fake, circle(1_000), key="wrong")
    assert wrong.status_code == 400
    assert wrong.json()["error"]["details"][0]["reason"] == "API_KEY_INVALID"
    missing = requests.post(fake.url + NEW_PATH, json=circle(1_000), headers={"X-Goog-FieldMask": "*"}, timeout=5)
    assert missing.status_code == 403 and missing.json()["error"]["status"] == "PERMISSION_DENIED"


@pytest.mark.parametrize(
    ("radius", "count", "http_status"),
    [(1_000, 0, 400), (1_000, 21, 400), (1_000, 1, 200), (0, 5, 400), (50_000.5, 5, 400), (50_000, 20, 200)],
)
def test_fake_new_api_checks_limits(fake: FakePlaces, radius: float, count: int, http_status: int) -> None:
    response = search_nearby(fake, circle(radius, count))
    assert response.status_code == http_status
    if http_status == 400:
        assert response.json()["error"]["status"] == "INVALID_ARGUMENT"
    else:
        assert len(response.json()["places"]) == min(count, len(fake.within(LAT, LON, radius)))


def test_fake_new_api_returns_only_the_masked_fields(fake: FakePlaces) -> None:
    only_ids = search_nearby(fake, circle(1_000), mask="places.id,places.location.latitude").json()
    assert len(only_ids["places"]) == 9
    assert all(set(p) == {"id", "location"} and set(p["location"]) == {"latitude"} for p in only_ids["places"])
    everything = search_nearby(fake, circle(1_000), mask="*").json()
    assert set(everything["places"][0]) >= {"id", "displayName", "rating", "formattedAddress"}
    unknown = search_nearby(fake, circle(1_000), mask="places.nonsense")
    assert unknown.status_code == 400


def test_fake_legacy_api_pages_by_twenty_and_answers_errors_with_http_200(fake: FakePlaces) -> None:
    url = fake.url + LEGACY_PATH
    first = requests.get(url, params={"location": f"{LAT},{LON}", "radius": 50_000, "key": KEY}, timeout=5).json()
    assert first["status"] == "OK" and len(first["results"]) == 20 and first["next_page_token"]
    second = requests.get(url, params={"pagetoken": first["next_page_token"], "key": KEY}, timeout=5).json()
    assert len(second["results"]) == 9 and "next_page_token" not in second
    denied = requests.get(url, params={"location": f"{LAT},{LON}", "radius": 10}, timeout=5)
    assert denied.status_code == 200 and denied.json()["status"] == "REQUEST_DENIED"
    invalid = requests.get(url, params={"radius": 10, "key": KEY}, timeout=5)
    assert invalid.status_code == 200 and invalid.json()["status"] == "INVALID_REQUEST"


def test_fake_stops_promptly_with_a_request_hanging(fake: FakePlaces) -> None:
    fake.fail = "hang"

    def hung_call() -> BaseException | int:
        try:
            return search_nearby(fake, circle(1_000)).status_code
        except requests.RequestException as exc:
            return exc

    call = gevent.spawn(hung_call)
    wait_until(lambda: fake.in_flight == 1, what="the request to reach the fake")
    started = time.monotonic()
    fake.stop()
    assert time.monotonic() - started < 1.0
    call.join(timeout=5)
    assert call.ready() and fake.in_flight == 0
