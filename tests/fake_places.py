"""A fake Google Places server on loopback, speaking both Nearby Search APIs.

``FakePlaces`` is a gevent ``WSGIServer`` (one greenlet per connection, HTTP/1.1
keep-alive) that answers

* ``POST /v1/places:searchNearby`` -- Places API (New), and
* ``GET /maps/api/place/nearbysearch/json`` -- the legacy Nearby Search,

closely enough to Google that the providers in ``herdserver/places.py`` cannot
tell the difference. Shapes, limits and error envelopes follow Google's pages:

* Nearby Search (New) request, response, field mask, maxResultCount, radius:
  https://developers.google.com/maps/documentation/places/web-service/nearby-search
  https://developers.google.com/maps/documentation/places/web-service/reference/rest/v1/places/searchNearby
  https://developers.google.com/maps/documentation/places/web-service/reference/rest/v1/Circle
  ("radius must be within [0.0, 50000.0]"; the Nearby page adds that it must be > 0)
* Legacy request parameters, response, status codes, 20-result pages, next_page_token:
  https://developers.google.com/maps/documentation/places/web-service/search-nearby
* Old/new field names (place_id/id, name/displayName, vicinity/shortFormattedAddress ...):
  https://developers.google.com/maps/documentation/places/web-service/migrate-response
  https://developers.google.com/maps/documentation/places/web-service/migrate-nearby
* Error envelope ``{"error": {"code", "message", "status", "details"}}``, with an
  ``ErrorInfo`` detail whose reason is ``API_KEY_INVALID`` for a bad key:
  https://cloud.google.com/apis/design/errors

Deliberate simplifications: the place data is a fixed list (``PLACES``); Google's
opaque "prominence"/"popularity" ranking is modelled as most-rated-first; a
legacy page token is valid at once (Google makes you wait a moment).

The fake must run in a gevent-patched process (tests/conftest.py patches first).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import secrets
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import gevent
import gevent.event
import gevent.pool
from gevent.pywsgi import WSGIServer

NEW_PATH = "/v1/places:searchNearby"
LEGACY_PATH = "/maps/api/place/nearbysearch/json"
UCLA = (34.068930, -118.445127)  # the spec's example client, +34.068930-118.445127
EARTH_RADIUS_M = 6_371_008.8  # mean Earth radius (IUGG)
HANG_SECONDS = 300.0  # "hang": far past any client timeout; stop() cuts it short
FAIL_MODES = (None, "http500", "http429", "badjson", "hang", "denied", "invalid")

Json = dict[str, Any]
StartResponse = Callable[..., Any]


# ---------------------------------------------------------------- geometry


def haversine_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance in metres."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(a)))


def destination(lat: float, lon: float, distance_m: float, bearing_deg: float) -> tuple[float, float]:
    """The point ``distance_m`` away from (lat, lon) along ``bearing_deg``."""
    d = distance_m / EARTH_RADIUS_M
    p1, l1, b = math.radians(lat), math.radians(lon), math.radians(bearing_deg)
    p2 = math.asin(math.sin(p1) * math.cos(d) + math.cos(p1) * math.sin(d) * math.cos(b))
    l2 = l1 + math.atan2(math.sin(b) * math.sin(d) * math.cos(p1), math.cos(d) - math.sin(p1) * math.sin(p2))
    return math.degrees(p2), (math.degrees(l2) + 540) % 360 - 180


_OLC_ALPHABET = "23456789CFGHJMPQRVWX"


def plus_code(lat: float, lon: float) -> str:
    """A 10-digit Open Location Code (what Google's plusCode.globalCode holds)."""
    lat, lon = min(max(lat, -90.0), 89.9999999) + 90, (lon + 180) % 360
    code, resolution = "", 20.0
    for pair in range(5):
        dlat, dlon = int(lat // resolution), int(lon // resolution)
        lat, lon = lat - dlat * resolution, lon - dlon * resolution
        code += _OLC_ALPHABET[dlat] + _OLC_ALPHABET[dlon]
        if pair == 3:
            code += "+"
        resolution /= 20
    return code


# ---------------------------------------------------------------- the place data

# (metres from UCLA, bearing, name, types (primary first), street, city, status, ratings, price)
# Every place is put at an exact distance from the UCLA point, so a test knows
# which places a radius takes in: 9 within 1 km, 18 within 5 km, 22 within
# 10 km, 29 within 50 km, and one (60 km) outside every legal radius.
_ROSTER: tuple[tuple[float, float, str, tuple[str, ...], str, str, str, int, str | None], ...] = (
    (120, 20, "Boelter Hall", ("university",), "580 Portola Plaza", "Los Angeles", "OPERATIONAL", 96, None),
    (180, 100, "Court of Sciences Student Center", ("food_court", "restaurant", "food"),
     "Court of Sciences", "Los Angeles", "OPERATIONAL", 412, "PRICE_LEVEL_INEXPENSIVE"),
    (260, 330, "Engineering VI", ("university",), "404 Westwood Plaza", "Los Angeles", "OPERATIONAL", 57, None),
    (340, 250, "Ackerman Union", ("shopping_mall", "store"), "308 Westwood Plaza", "Los Angeles",
     "OPERATIONAL", 1288, None),
    (430, 300, "Powell Library", ("library",), "10740 Dickson Plaza", "Los Angeles", "OPERATIONAL", 933, None),
    (520, 315, "Royce Hall", ("performing_arts_theater", "event_venue"), "10745 Dickson Plaza", "Los Angeles",
     "OPERATIONAL", 1710, None),
    (640, 240, "Kerckhoff Coffee House", ("cafe", "coffee_shop", "food"), "308 Westwood Plaza", "Los Angeles",
     "CLOSED_TEMPORARILY", 301, "PRICE_LEVEL_INEXPENSIVE"),
    (760, 280, "Pauley Pavilion", ("arena", "stadium"), "301 Westwood Plaza", "Los Angeles", "OPERATIONAL",
     5521, None),
    (910, 170, "Ronald Reagan UCLA Medical Center", ("hospital",), "757 Westwood Plaza", "Los Angeles",
     "OPERATIONAL", 2270, None),
    (1150, 185, "Diddy Riese", ("bakery", "dessert_shop", "food"), "926 Broxton Ave", "Los Angeles",
     "OPERATIONAL", 6789, "PRICE_LEVEL_INEXPENSIVE"),
    (1400, 175, "Regency Village Theatre", ("movie_theater",), "961 Broxton Ave", "Los Angeles",
     "OPERATIONAL", 3021, None),
    (1700, 160, "Hammer Museum", ("art_gallery", "museum"), "10899 Wilshire Blvd", "Los Angeles",
     "OPERATIONAL", 4410, None),
    (2100, 165, "Westwood Village Memorial Park Cemetery", ("cemetery",), "1218 Glendon Ave", "Los Angeles",
     "OPERATIONAL", 1650, None),
    (2500, 140, "Los Angeles California Temple", ("church", "place_of_worship"), "10777 Santa Monica Blvd",
     "Los Angeles", "OPERATIONAL", 2890, None),
    (2900, 200, "Trader Joe's", ("grocery_store", "supermarket", "food"), "1000 Glendon Ave", "Los Angeles",
     "OPERATIONAL", 1502, "PRICE_LEVEL_MODERATE"),
    (3400, 120, "Westfield Century City", ("shopping_mall",), "10250 Santa Monica Blvd", "Los Angeles",
     "OPERATIONAL", 21034, None),
    (4100, 350, "Bel-Air Country Club", ("golf_course",), "10768 Bellagio Rd", "Los Angeles", "OPERATIONAL",
     388, "PRICE_LEVEL_VERY_EXPENSIVE"),
    (4800, 95, "Beverly Hills City Hall", ("city_hall", "local_government_office"), "455 N Rexford Dr",
     "Beverly Hills", "OPERATIONAL", 210, None),
    (5600, 300, "Getty Center", ("museum", "tourist_attraction"), "1200 Getty Center Dr", "Los Angeles",
     "OPERATIONAL", 41230, "PRICE_LEVEL_FREE"),
    (6900, 85, "Rodeo Drive", ("tourist_attraction",), "Rodeo Dr", "Beverly Hills", "OPERATIONAL", 30120, None),
    (8200, 250, "Santa Monica Airport", ("airport",), "3223 Donald Douglas Loop S", "Santa Monica",
     "OPERATIONAL", 402, None),
    (9600, 100, "Los Angeles County Museum of Art", ("art_museum", "museum"), "5905 Wilshire Blvd",
     "Los Angeles", "OPERATIONAL", 38720, "PRICE_LEVEL_MODERATE"),
    (11800, 235, "Santa Monica Pier", ("tourist_attraction", "amusement_park"), "200 Santa Monica Pier",
     "Santa Monica", "OPERATIONAL", 89011, None),
    (14500, 165, "Los Angeles International Airport", ("international_airport", "airport"), "1 World Way",
     "Los Angeles", "OPERATIONAL", 101503, None),
    (18000, 70, "Griffith Observatory", ("observatory", "tourist_attraction"), "2800 E Observatory Rd",
     "Los Angeles", "OPERATIONAL", 52344, "PRICE_LEVEL_FREE"),
    (23000, 80, "Dodger Stadium", ("stadium", "sports_complex"), "1000 Vin Scully Ave", "Los Angeles",
     "OPERATIONAL", 61877, None),
    (29000, 70, "Rose Bowl Stadium", ("stadium",), "1001 Rose Bowl Dr", "Pasadena", "OPERATIONAL", 24503, None),
    (36000, 280, "Point Dume State Beach", ("beach", "park"), "Westward Beach Rd", "Malibu", "OPERATIONAL",
     3310, None),
    (44000, 330, "Six Flags Magic Mountain", ("amusement_park",), "26101 Magic Mountain Pkwy", "Valencia",
     "OPERATIONAL", 48102, "PRICE_LEVEL_EXPENSIVE"),
    (60000, 115, "Disneyland Park", ("amusement_park", "tourist_attraction"), "1313 Disneyland Dr", "Anaheim",
     "OPERATIONAL", 190440, "PRICE_LEVEL_VERY_EXPENSIVE"),
)


def _place_id(name: str) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(name.encode()).digest()).decode()
    return "ChIJ" + digest[:23]


def _coordinate(value: float) -> float:
    return round(value, 7)  # Google sends about 7 decimals


def make_place(distance_m: float, bearing: float, name: str, types: Iterable[str], street: str, city: str,
               status: str = "OPERATIONAL", ratings: int = 100, price: str | None = None) -> Json:
    """One place in the Places API (New) ``Place`` shape."""
    lat, lon = destination(*UCLA, distance_m, bearing)
    place_id = _place_id(name)
    types = [*types, "point_of_interest", "establishment"]
    state_zip = "CA 90095" if city == "Los Angeles" else "CA"
    code = plus_code(lat, lon)
    place: Json = {
        "name": f"places/{place_id}",
        "id": place_id,
        "types": types,
        "primaryType": types[0],
        "formattedAddress": f"{street}, {city}, {state_zip}, USA",
        "shortFormattedAddress": f"{street}, {city}",
        "plusCode": {"globalCode": code, "compoundCode": f"{code[4:]} {city}, CA, USA"},
        "location": {"latitude": _coordinate(lat), "longitude": _coordinate(lon)},
        "viewport": {
            "low": {"latitude": _coordinate(lat - 0.0013), "longitude": _coordinate(lon - 0.0013)},
            "high": {"latitude": _coordinate(lat + 0.0013), "longitude": _coordinate(lon + 0.0013)},
        },
        "rating": round(3.6 + (ratings % 13) / 10, 1),
        "userRatingCount": ratings,
        "googleMapsUri": f"https://maps.google.com/?cid={int(hashlib.sha256(name.encode()).hexdigest()[:15], 16)}",
        "businessStatus": status,
        "utcOffsetMinutes": -480,
        "displayName": {"text": name, "languageCode": "en"},
        "iconMaskBaseUri": "https://maps.gstatic.com/mapfiles/place_api/icons/v2/generic_pinlet",
        "iconBackgroundColor": "#7B9EB0",
    }
    if price is not None:
        place["priceLevel"] = price
    return place


PLACES: list[Json] = [make_place(*row) for row in _ROSTER]

# Every field of the Place resource (REST v1), for validating field masks.
PLACE_FIELDS = frozenset("""
    name id displayName types primaryType primaryTypeDisplayName nationalPhoneNumber internationalPhoneNumber
    formattedAddress shortFormattedAddress postalAddress addressComponents plusCode location viewport rating
    googleMapsUri websiteUri reviews regularOpeningHours timeZone photos adrFormatAddress businessStatus
    priceLevel attributions iconMaskBaseUri iconBackgroundColor currentOpeningHours
    currentSecondaryOpeningHours regularSecondaryOpeningHours editorialSummary paymentOptions parkingOptions
    subDestinations fuelOptions evChargeOptions generativeSummary containingPlaces addressDescriptor
    googleMapsLinks priceRange reviewSummary evChargeAmenitySummary neighborhoodSummary consumerAlert
    movedPlace movedPlaceId utcOffsetMinutes userRatingCount takeout delivery dineIn curbsidePickup reservable
    servesBreakfast servesLunch servesDinner servesBeer servesWine servesBrunch servesVegetarianFood
    outdoorSeating liveMusic menuForChildren servesCocktails servesDessert servesCoffee goodForChildren
    allowsDogs restroom goodForGroups goodForWatchingSports accessibilityOptions pureServiceAreaBusiness
""".split())
SEARCH_NEARBY_FIELDS = frozenset({
    "includedTypes", "excludedTypes", "includedPrimaryTypes", "excludedPrimaryTypes", "maxResultCount",
    "locationRestriction", "rankPreference", "languageCode", "regionCode", "routingParameters",
})
_PRICE_LEVELS = {
    "PRICE_LEVEL_FREE": 0, "PRICE_LEVEL_INEXPENSIVE": 1, "PRICE_LEVEL_MODERATE": 2,
    "PRICE_LEVEL_EXPENSIVE": 3, "PRICE_LEVEL_VERY_EXPENSIVE": 4,
}


def to_legacy(place: Json) -> Json:
    """A full ``Place`` as the legacy Nearby Search would have returned it.

    Written from Google's documents independently of ``places.legacy_result``,
    so the two can be checked against each other.
    """
    loc, view = place["location"], place["viewport"]
    result: Json = {
        "business_status": place["businessStatus"],
        "geometry": {
            "location": {"lat": loc["latitude"], "lng": loc["longitude"]},
            "viewport": {
                "northeast": {"lat": view["high"]["latitude"], "lng": view["high"]["longitude"]},
                "southwest": {"lat": view["low"]["latitude"], "lng": view["low"]["longitude"]},
            },
        },
        "icon": "https://maps.gstatic.com/mapfiles/place_api/icons/v1/png_71/generic_business-71.png",
        "icon_background_color": place["iconBackgroundColor"],
        "icon_mask_base_uri": place["iconMaskBaseUri"],
        "name": place["displayName"]["text"],
        "place_id": place["id"],
        "plus_code": {
            "compound_code": place["plusCode"]["compoundCode"],
            "global_code": place["plusCode"]["globalCode"],
        },
        "rating": place["rating"],
        "reference": place["id"],
        "scope": "GOOGLE",
        "types": place["types"],
        "user_ratings_total": place["userRatingCount"],
        "vicinity": place["shortFormattedAddress"],
    }
    if "priceLevel" in place:
        result["price_level"] = _PRICE_LEVELS[place["priceLevel"]]
    return result


# ---------------------------------------------------------------- requests and replies


@dataclass
class Request:
    """One request as the fake saw it, and what it answered."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names: "x-goog-api-key", "x-goog-fieldmask", "content-type"
    json: Any  # the parsed body, or None when absent or not JSON
    body: bytes = b""
    client_port: int = 0
    status: int = 0  # the HTTP status answered (0 while in flight)
    response: Any = None  # the JSON answered (None for a non-JSON answer)


@dataclass
class Reply:
    """One HTTP answer of the fake (public: bench/places_server.py keeps them in its memo)."""

    status: int
    body: bytes
    content_type: str = "application/json; charset=UTF-8"
    payload: Any = None

    @classmethod
    def json(cls, status: int, payload: Any) -> Reply:
        return cls(status, json.dumps(payload, indent=2).encode(), payload=payload)


_REASONS = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found", 429: "Too Many Requests",
            500: "Internal Server Error", 503: "Service Unavailable"}
_GRPC_STATUS = {400: "INVALID_ARGUMENT", 403: "PERMISSION_DENIED", 404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED",
                500: "INTERNAL", 503: "UNAVAILABLE"}


def google_error(code: int, message: str, *details: Json) -> Reply:
    """Google's JSON error envelope (AIP-193), as places.googleapis.com sends it."""
    error: Json = {"code": code, "message": message, "status": _GRPC_STATUS[code]}
    if details:
        error["details"] = list(details)
    return Reply.json(code, {"error": error})


def _error_info(reason: str, **metadata: str) -> Json:
    return {
        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
        "reason": reason,
        "domain": "googleapis.com",
        "metadata": {"service": "places.googleapis.com", **metadata},
    }


def _bad_request(field_name: str, description: str) -> Json:
    return {
        "@type": "type.googleapis.com/google.rpc.BadRequest",
        "fieldViolations": [{"field": field_name, "description": description}],
    }


def _html_error(status: int) -> Reply:
    """What Google's front end sends for an HTTP-level failure: a page, not JSON."""
    reason = _REASONS.get(status, "Error")
    page = (f"<!DOCTYPE html>\n<html lang=en><title>Error {status} ({reason})!!1</title>\n"
            f"<p><b>{status}.</b> <ins>That's an error.</ins>\n<p>Please try again later.</p></html>\n")
    return Reply(status, page.encode(), "text/html; charset=UTF-8")


def _legacy(status: str, results: list[Json] | None = None, error_message: str | None = None,
            next_page_token: str | None = None) -> Reply:
    payload: Json = {"html_attributions": []}
    if next_page_token:
        payload["next_page_token"] = next_page_token
    payload["results"] = results or []
    payload["status"] = status
    if error_message is not None:
        payload["error_message"] = error_message
    return Reply.json(200, payload)


class _Invalid(Exception):
    """A request Google would refuse as INVALID_ARGUMENT."""

    def __init__(self, message: str, field_name: str = ""):
        super().__init__(message)
        self.message = message
        self.field_name = field_name


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _Invalid(f"Invalid value at '{what}': expected a number", what)
    return float(value)


# ---------------------------------------------------------------- the server


class _NoDelayWSGIServer(WSGIServer):  # type: ignore[misc]  # gevent is untyped
    """pywsgi writes the headers and the body separately: without TCP_NODELAY,
    Nagle's algorithm and the client's delayed ACK add ~40 ms to every reply."""

    def handle(self, sock: socket.socket, address: tuple[str, int]) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().handle(sock, address)


class FakePlaces:
    """A loopback Google Places server. ``start()`` it, point ``base_url`` at ``url``."""

    def __init__(self, places: list[Json] | None = None, latency: float = 0.0, api_key: str = "test-key"):
        self.places: list[Json] = PLACES if places is None else places
        self.latency = latency
        self.api_key = api_key
        self.fail: str | None = None
        self.requests: list[Request] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.url = ""
        self._server: _NoDelayWSGIServer | None = None
        self._stopping = gevent.event.Event()
        self._page_tokens: dict[str, list[Json]] = {}

    # ------------------------------------------------------------ lifecycle

    def start(self) -> FakePlaces:
        # An unbounded Pool: every connection served at once, and stop() can kill them.
        self._stopping.clear()
        self._server = _NoDelayWSGIServer(("127.0.0.1", 0), self._app, spawn=gevent.pool.Pool(None), log=None,
                                  error_log=None)
        self._server.start()
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        return self

    def stop(self) -> None:
        self._stopping.set()  # wakes "hang" handlers at once
        if self._server is not None:
            # No grace: idle keep-alive connections would otherwise hold stop() up.
            self._server.stop(timeout=0)
            self._server = None

    def __enter__(self) -> FakePlaces:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reset(self) -> None:
        """Forget the requests seen so far and the in-flight high-water mark."""
        self.requests.clear()
        self.max_in_flight = self.in_flight

    def client_ports(self) -> set[int]:
        """Distinct client ports seen: one per TCP connection the client opened."""
        return {r.client_port for r in self.requests}

    # ------------------------------------------------------------ helpers for tests

    def within(self, lat: float, lon: float, radius_m: float) -> list[Json]:
        """The places inside the circle, most-rated first (the fake's "popularity")."""
        inside = [p for p in self.places if self._distance(p, lat, lon) <= radius_m]
        return sorted(inside, key=lambda p: (-p.get("userRatingCount", 0), self._distance(p, lat, lon)))

    @staticmethod
    def _distance(place: Json, lat: float, lon: float) -> float:
        loc = place["location"]
        return haversine_m(lat, lon, loc["latitude"], loc["longitude"])

    # ------------------------------------------------------------ WSGI

    def _app(self, environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            request = self._record(environ)
            reply = self._answer(request)
            request.status, request.response = reply.status, reply.payload
            start_response(
                f"{reply.status} {_REASONS.get(reply.status, 'Error')}",
                [("Content-Type", reply.content_type), ("Content-Length", str(len(reply.body)))],
            )
            return [reply.body]
        finally:
            self.in_flight -= 1

    def _record(self, environ: dict[str, Any]) -> Request:
        headers = {
            key[5:].replace("_", "-").lower(): value for key, value in environ.items() if key.startswith("HTTP_")
        }
        for key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            if environ.get(key):
                headers[key.replace("_", "-").lower()] = environ[key]
        body = environ["wsgi.input"].read() if environ.get("REQUEST_METHOD") == "POST" else b""
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = None
        request = Request(
            method=environ["REQUEST_METHOD"],
            path=environ.get("PATH_INFO", ""),
            query=dict(parse_qsl(environ.get("QUERY_STRING", ""), keep_blank_values=True)),
            headers=headers,
            json=parsed,
            body=body,
            client_port=int(environ.get("REMOTE_PORT") or 0),
        )
        self.requests.append(request)
        return request

    def _answer(self, request: Request) -> Reply:
        new_api = request.path == NEW_PATH
        legacy_api = request.path == LEGACY_PATH
        if not (new_api and request.method == "POST") and not (legacy_api and request.method == "GET"):
            return google_error(404, f"Method not found: {request.method} {request.path}")
        if self.fail == "hang":
            self._stopping.wait(HANG_SECONDS)
            return _html_error(503)
        if self.latency > 0:
            gevent.sleep(self.latency)
        if self.fail is not None:
            return self._failure(self.fail, new_api)
        return self.search_nearby(request) if new_api else self._nearby_legacy(request)

    def _failure(self, mode: str, new_api: bool) -> Reply:
        if mode == "badjson":
            return Reply(200, b'{\n  "places": [\n    {\n      "id": "ChIJ' if new_api else b'{"results": [{')
        if mode in ("http500", "http429"):
            code = 500 if mode == "http500" else 429
            if not new_api:
                return _html_error(code)
            if code == 500:
                return google_error(500, "Internal error encountered.")
            return google_error(
                429,
                "Quota exceeded for quota metric 'SearchNearby requests' and limit 'SearchNearby requests per "
                "minute' of service 'places.googleapis.com' for consumer 'project_number:123456789012'.",
                _error_info("RATE_LIMIT_EXCEEDED", quota_metric="places.googleapis.com/search_nearby_requests"),
            )
        if mode == "denied":
            if not new_api:
                return _legacy("REQUEST_DENIED", error_message="This API project is not authorized to use this API.")
            return google_error(
                403,
                "Requests to this API places.googleapis.com method google.maps.places.v1.Places.SearchNearby "
                "are blocked.",
                _error_info("API_KEY_SERVICE_BLOCKED", methodName="google.maps.places.v1.Places.SearchNearby"),
            )
        if mode == "invalid":
            if not new_api:
                return _legacy("INVALID_REQUEST")  # Google sends no error_message with this one
            return google_error(400, "Invalid request.", _bad_request("location_restriction", "Invalid request."))
        raise ValueError(f"unknown fail mode {mode!r}; use one of {FAIL_MODES}")

    # ------------------------------------------------------------ Places API (New)

    def search_nearby(self, request: Request) -> Reply:
        """The answer to one Nearby Search (New) request, after latency and failure modes; public
        so a subclass may wrap it (bench/places_server.py answers repeated searches from memory)."""
        key = request.headers.get("x-goog-api-key") or request.query.get("key")
        if not key:
            return google_error(
                403,
                "Method doesn't allow unregistered callers (callers without established identity). "
                "Please use API Key or other form of API consumer identity to call this API.",
            )
        if key != self.api_key:
            return google_error(
                400, "API key not valid. Please pass a valid API key.", _error_info("API_KEY_INVALID")
            )
        mask = request.headers.get("x-goog-fieldmask") or request.query.get("fields") or request.query.get("$fields")
        if not mask:
            return google_error(
                400,
                "FieldMask is a required parameter. See https://cloud.google.com/apis/docs/system-parameters on "
                "how to provide it. As an example, you can set the header 'X-Goog-FieldMask' to value "
                "'places.displayName', 'places.id' to ask for the display name and the place id of a place. "
                "You can also set the value to '*' in manual testing to get all the available response fields.",
            )
        try:
            tree = _mask_tree(mask)
            lat, lon, radius, count, rank, included, excluded = _nearby_arguments(request)
        except _Invalid as exc:
            details = [_bad_request(exc.field_name, exc.message)] if exc.field_name else []
            return google_error(400, exc.message, *details)
        found = [
            p for p in self.places
            if self._distance(p, lat, lon) <= radius
            and (not included or included & set(p.get("types", ())))
            and not (excluded & set(p.get("types", ())))
        ]
        if rank == "DISTANCE":
            found.sort(key=lambda p: self._distance(p, lat, lon))
        else:
            found.sort(key=lambda p: (-p.get("userRatingCount", 0), self._distance(p, lat, lon)))
        places = [_project(p, tree) for p in found[:count]]
        # proto3 JSON leaves out an empty repeated field: "nothing found" is {}.
        return Reply.json(200, {"places": places} if places else {})

    # ------------------------------------------------------------ legacy Nearby Search

    def _nearby_legacy(self, request: Request) -> Reply:
        query = request.query
        if not query.get("key"):
            return _legacy(
                "REQUEST_DENIED",
                error_message="You must use an API key to authenticate each request to Google Maps Platform APIs. "
                "For additional information, please refer to http://g.co/dev/maps-no-account",
            )
        if query["key"] != self.api_key:
            return _legacy("REQUEST_DENIED", error_message="The provided API key is invalid. ")
        if "pagetoken" in query:
            rest = self._page_tokens.pop(query["pagetoken"], None)
            return _legacy("INVALID_REQUEST") if rest is None else self._legacy_page(rest)
        try:
            lat_text, lon_text = query["location"].split(",")
            lat, lon = float(lat_text), float(lon_text)
            by_distance = query.get("rankby") == "distance"
            if by_distance == ("radius" in query):  # rankby=distance excludes radius; otherwise it is required
                raise ValueError("radius")
            radius = min(float(query.get("radius", 50_000)), 50_000.0)  # Google clamps at 50 km
            if not (-90 <= lat <= 90 and -180 <= lon <= 180 and radius > 0 and math.isfinite(radius)):
                raise ValueError("range")
        except (KeyError, ValueError):
            return _legacy("INVALID_REQUEST")
        found = self.within(lat, lon, radius)
        if by_distance:
            found.sort(key=lambda p: self._distance(p, lat, lon))
        if query.get("type"):
            found = [p for p in found if query["type"] in p.get("types", ())]
        if query.get("keyword"):
            found = [p for p in found if query["keyword"].lower() in p["displayName"]["text"].lower()]
        if not found:
            return _legacy("ZERO_RESULTS")
        return self._legacy_page(found[:60])  # at most 60 results over 3 pages

    def _legacy_page(self, found: list[Json]) -> Reply:
        page, rest = found[:20], found[20:]
        token = None
        if rest:
            token = secrets.token_urlsafe(48)
            self._page_tokens[token] = rest
        return _legacy("OK", [to_legacy(p) for p in page], next_page_token=token)


# ---------------------------------------------------------------- request parsing


def _nearby_arguments(request: Request) -> tuple[float, float, float, int, str, set[str], set[str]]:
    body = request.json
    if not isinstance(body, dict):
        raise _Invalid("Invalid JSON payload received. Expected an object.")
    for name in body:
        if name not in SEARCH_NEARBY_FIELDS:
            raise _Invalid(f'Invalid JSON payload received. Unknown name "{name}": Cannot find field.', name)
    count: Any = body.get("maxResultCount", 20)
    if isinstance(count, bool) or not isinstance(count, (int, float)) or count != int(count):
        raise _Invalid("Invalid value at 'max_result_count' (TYPE_INT32)", "max_result_count")
    if not 1 <= count <= 20:
        raise _Invalid("max_result_count must be between 1 and 20.", "max_result_count")
    circle = (body.get("locationRestriction") or {}).get("circle")
    if not isinstance(circle, dict):
        raise _Invalid("location_restriction is required.", "location_restriction")
    center = circle.get("center") or {}
    lat = _number(center.get("latitude", 0.0), "location_restriction.circle.center.latitude")
    lon = _number(center.get("longitude", 0.0), "location_restriction.circle.center.longitude")
    if not (-90 <= lat <= 90 and -180 <= lon <= 180):
        raise _Invalid("Invalid location_restriction.circle.center.", "location_restriction.circle.center")
    radius = _number(circle.get("radius", 0.0), "location_restriction.circle.radius")
    if not 0 < radius <= 50_000:
        raise _Invalid("location_restriction.circle.radius must be greater than 0 and at most 50000.",
                       "location_restriction.circle.radius")
    rank = body.get("rankPreference", "POPULARITY")
    if rank not in ("RANK_PREFERENCE_UNSPECIFIED", "DISTANCE", "POPULARITY"):
        raise _Invalid(f"Invalid value at 'rank_preference': {rank!r}", "rank_preference")
    included, excluded = set(body.get("includedTypes") or ()), set(body.get("excludedTypes") or ())
    return lat, lon, radius, int(count), rank, included, excluded


def _mask_tree(mask: str) -> Any:
    """The field mask as a tree over one Place: True means "all of it"."""
    tree: dict[str, Any] = {}
    for path in (p.strip() for p in mask.split(",")):
        if path == "*":
            return True
        parts = path.split(".")
        if parts[0] == "routingSummaries" and len(parts) == 1:
            continue
        if parts[0] != "places" or (len(parts) > 1 and parts[1] not in PLACE_FIELDS) or not all(parts):
            raise _Invalid(f"Error expanding 'fields' parameter. Cannot find matching fields for path '{path}'.")
        if len(parts) == 1:
            return True
        node = tree
        for part in parts[1:-1]:
            child = node.setdefault(part, {})
            if child is True:
                break
            node = child
        else:
            node[parts[-1]] = True
    return tree


def _project(value: Any, tree: Any) -> Any:
    if tree is True or not isinstance(value, dict):
        return value
    return {name: _project(value[name], sub) for name, sub in tree.items() if name in value}


__all__ = [
    "FAIL_MODES", "LEGACY_PATH", "NEW_PATH", "PLACES", "UCLA", "FakePlaces", "Request", "haversine_m",
    "make_place", "to_legacy",
]
