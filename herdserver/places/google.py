"""The Google Places providers: Places API (New) mapped to the legacy shape, and the legacy API.

``provider.nearby(lat, lon, radius_m, bound)`` never raises for an upstream
problem: it returns the legacy JSON shape, with ``status`` and
``error_message`` on failure (``places_error``). HTTP goes through one pooled
``requests.Session`` per provider. The API key is sent only in a header (new
API) or the query string (legacy API) and is scrubbed from every message that
could reach a log or a client.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, quote_plus, urlencode

import requests
from requests.adapters import HTTPAdapter

from ..config import PlacesSettings
from ..core.places_json import cut_results, places_error

GOOGLE_ORIGIN = "https://places.googleapis.com"
GOOGLE_LEGACY_ORIGIN = "https://maps.googleapis.com"
NEW_PATH = "/v1/places:searchNearby"
LEGACY_PATH = "/maps/api/place/nearbysearch/json"

# Only fields of the Nearby Search Pro SKU (the cheapest tier of Nearby Search
# (New)); each maps onto a field of the legacy result, see README.
DEFAULT_FIELD_MASK = ",".join(
    "places." + f
    for f in ("id", "displayName", "location", "viewport", "types", "shortFormattedAddress", "businessStatus")
)


@dataclass(frozen=True)
class UpstreamError(Exception):
    """A failure already mapped to a Google status word and a key-free message."""

    status: str
    message: str


def redact(text: str, secret: str | None) -> str:
    if secret:
        # Raw, percent-encoded (URL paths) and form-encoded (query strings, as
        # requests builds them from ``params``) spellings of the key.
        for spelling in (secret, quote(secret, safe=""), quote_plus(secret, safe="")):
            text = text.replace(spelling, "<redacted>")
    return text


def make_session(settings: PlacesSettings) -> requests.Session:
    session = requests.Session()
    adapter = HTTPAdapter(pool_connections=4, pool_maxsize=settings.pool_size, max_retries=0)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    session.trust_env = False  # no proxy or netrc surprises; TLS verification stays on
    return session


def _status_for_http(code: int) -> str:
    if code in (401, 403):
        return "REQUEST_DENIED"
    if code == 429:
        return "OVER_QUERY_LIMIT"
    if 400 <= code < 500:
        return "INVALID_REQUEST"
    return "UNKNOWN_ERROR"


class _HttpProvider:
    """Shared plumbing: session, timeouts, error mapping, key scrubbing."""

    name = "http"

    def __init__(self, settings: PlacesSettings, api_key: str | None, origin: str):
        self.settings = settings
        self.api_key = api_key or None
        self.origin = settings.base_url or origin
        self.session = make_session(settings)
        connect = settings.connect_timeout or settings.timeout
        self.timeouts = (connect, settings.timeout)
        self.adapter = self.session.get_adapter(self.origin)

    def close(self) -> None:
        self.session.close()

    def _prepare(self, method: str, path: str, headers: dict[str, str] | None = None) -> requests.PreparedRequest:
        """A request prepared once, copied for each call.

        ``Session.request`` re-merges the session's settings on every call
        through typing-Protocol ``isinstance`` checks: profiling showed it as a
        third of a WHATSAT's CPU. The session's adapters, pool and TLS
        verification still serve every ``send``.
        """
        return self.session.prepare_request(requests.Request(method, self.origin + path, headers=headers))

    def _exchange(self, template: requests.PreparedRequest, *, body: bytes | None = None,
                  query: str | None = None) -> tuple[int, Any]:
        """Send a copy of ``template``: (HTTP status, decoded JSON, or None for an error page).

        Through the session's own adapter (its pool, timeouts, TLS verification)
        but not ``Session.send``: its cookie, hook and redirect handling are a
        fifth of a call's CPU and Places needs none of them. No redirects also
        means the key is never carried to another host.
        """
        prepared = template.copy()
        if body is not None:
            prepared.prepare_body(body, None)
        if query is not None:
            prepared.url = f"{template.url}?{query}"
        response = self.adapter.send(prepared, timeout=self.timeouts)
        try:
            return response.status_code, self._json(response)
        finally:
            response.close()  # the body is read: this hands the connection back to the pool

    def nearby(self, lat: float, lon: float, radius_m: float, bound: int) -> dict[str, Any]:
        if not self.api_key:
            return places_error(
                "REQUEST_DENIED",
                f"no API key: set the environment variable {self.settings.api_key_env}",
            )
        try:
            return self._search(lat, lon, radius_m, bound)
        except UpstreamError as exc:
            return places_error(exc.status, redact(exc.message, self.api_key))
        except requests.Timeout:
            return places_error("UNKNOWN_ERROR", f"Places did not answer within {self.settings.timeout:g} s")
        except requests.RequestException as exc:
            # requests puts the whole URL (legacy: with key=...) into its messages.
            message = f"cannot reach Places: {type(exc).__name__}: {exc}"
            return places_error("UNKNOWN_ERROR", redact(message, self.api_key))

    def _search(self, lat: float, lon: float, radius_m: float, bound: int) -> dict[str, Any]:
        raise NotImplementedError

    @staticmethod
    def _json(response: requests.Response) -> Any:
        try:
            return response.json()
        except ValueError:
            if response.status_code != 200:
                # An error page that is not JSON (a proxy's or Google's front
                # end's HTML): the HTTP status still says what happened.
                return None
            message = f"Places answered HTTP {response.status_code} with invalid JSON"
            raise UpstreamError("UNKNOWN_ERROR", message) from None


class GoogleNewProvider(_HttpProvider):
    """Places API (New): POST places:searchNearby, mapped to the legacy shape."""

    name = "google"

    def __init__(self, settings: PlacesSettings, api_key: str | None):
        super().__init__(settings, api_key, GOOGLE_ORIGIN)
        self.field_mask = settings.field_mask or DEFAULT_FIELD_MASK
        self.template = self._prepare("POST", NEW_PATH, {
            "Content-Type": "application/json",
            "X-Goog-Api-Key": self.api_key or "",
            "X-Goog-FieldMask": self.field_mask,
        })

    def request_body(self, lat: float, lon: float, radius_m: float, bound: int) -> dict[str, Any]:
        return {
            "maxResultCount": bound,
            "locationRestriction": {
                "circle": {"center": {"latitude": lat, "longitude": lon}, "radius": radius_m}
            },
        }

    def _search(self, lat: float, lon: float, radius_m: float, bound: int) -> dict[str, Any]:
        request = json.dumps(self.request_body(lat, lon, radius_m, bound)).encode("utf-8")
        code, body = self._exchange(self.template, body=request)
        if code != 200:
            raise _new_api_error(code, body)
        if not isinstance(body, dict):
            raise UpstreamError("UNKNOWN_ERROR", "Places answered with JSON that is not an object")
        places = body.get("places") or []
        if not isinstance(places, list):
            raise UpstreamError("UNKNOWN_ERROR", "Places answered with 'places' that is not a list")
        results = [legacy_result(place) for place in places[:bound] if isinstance(place, dict)]
        return {"html_attributions": [], "results": results, "status": "OK" if results else "ZERO_RESULTS"}


def _new_api_error(code: int, body: Any) -> UpstreamError:
    """Google's error envelope {"error": {"code", "message", "status", "details"}}."""
    error = body.get("error") if isinstance(body, dict) else None
    message = f"Places answered HTTP {code}"
    status = _status_for_http(code)
    if isinstance(error, dict):
        if isinstance(error.get("message"), str):
            message += ": " + error["message"]
        reasons = [d.get("reason") for d in error.get("details") or [] if isinstance(d, dict)]
        # An invalid key is a 400 INVALID_ARGUMENT with reason API_KEY_INVALID.
        if "API_KEY_INVALID" in reasons or error.get("status") in ("PERMISSION_DENIED", "UNAUTHENTICATED"):
            status = "REQUEST_DENIED"
        elif error.get("status") == "RESOURCE_EXHAUSTED":
            status = "OVER_QUERY_LIMIT"
    return UpstreamError(status, message)


def legacy_result(place: Mapping[str, Any]) -> dict[str, Any]:
    """One Place (New) object as a legacy Nearby Search result (table in README)."""
    result: dict[str, Any] = {}
    location = place.get("location") or {}
    geometry: dict[str, Any] = {
        "location": {"lat": location.get("latitude"), "lng": location.get("longitude")}
    }
    viewport = place.get("viewport")
    if isinstance(viewport, dict):
        low, high = viewport.get("low") or {}, viewport.get("high") or {}
        geometry["viewport"] = {
            "northeast": {"lat": high.get("latitude"), "lng": high.get("longitude")},
            "southwest": {"lat": low.get("latitude"), "lng": low.get("longitude")},
        }
    result["geometry"] = geometry
    display = place.get("displayName")
    if isinstance(display, dict) and "text" in display:
        result["name"] = display["text"]
    if "id" in place:
        result["place_id"] = place["id"]
        result["reference"] = place["id"]
    if "businessStatus" in place:
        result["business_status"] = place["businessStatus"]
    if "types" in place:
        result["types"] = place["types"]
    if "shortFormattedAddress" in place:
        result["vicinity"] = place["shortFormattedAddress"]
    elif "formattedAddress" in place:
        result["vicinity"] = place["formattedAddress"]
    # Fields outside the default mask, mapped when a configured field_mask asks
    # for them (each raises the request to a dearer SKU).
    for new_name, legacy_name in _PLAIN_FIELDS:
        if new_name in place:
            result[legacy_name] = place[new_name]
    if place.get("priceLevel") in _PRICE_LEVELS:
        result["price_level"] = _PRICE_LEVELS[place["priceLevel"]]
    plus_code = place.get("plusCode")
    if isinstance(plus_code, dict):
        result["plus_code"] = {
            legacy: plus_code[new] for new, legacy in (("compoundCode", "compound_code"), ("globalCode", "global_code"))
            if new in plus_code
        }
    hours = place.get("currentOpeningHours")
    if isinstance(hours, dict) and "openNow" in hours:
        result["opening_hours"] = {"open_now": hours["openNow"]}
    return result


# Same value, new name (Google's "Migrate the Places API response" table).
_PLAIN_FIELDS = (
    ("rating", "rating"),
    ("userRatingCount", "user_ratings_total"),
    ("iconMaskBaseUri", "icon_mask_base_uri"),
    ("iconBackgroundColor", "icon_background_color"),
)
# The new API's PriceLevel enum against the legacy 0-4 scale.
_PRICE_LEVELS = {
    "PRICE_LEVEL_FREE": 0,
    "PRICE_LEVEL_INEXPENSIVE": 1,
    "PRICE_LEVEL_MODERATE": 2,
    "PRICE_LEVEL_EXPENSIVE": 3,
    "PRICE_LEVEL_VERY_EXPENSIVE": 4,
}


class GoogleLegacyProvider(_HttpProvider):
    """Legacy Nearby Search: GET nearbysearch/json; Google's JSON passed through, cut."""

    name = "google-legacy"

    def __init__(self, settings: PlacesSettings, api_key: str | None):
        super().__init__(settings, api_key, GOOGLE_LEGACY_ORIGIN)
        self.template = self._prepare("GET", LEGACY_PATH)

    def _search(self, lat: float, lon: float, radius_m: float, bound: int) -> dict[str, Any]:
        query = urlencode({"location": f"{lat!r},{lon!r}", "radius": f"{radius_m:g}", "key": self.api_key or ""})
        code, body = self._exchange(self.template, query=query)
        if code != 200:
            message = body.get("error_message") if isinstance(body, dict) else None
            message = str(message) if message else f"Places answered HTTP {code}"
            raise UpstreamError(_status_for_http(code), message)
        if not isinstance(body, dict) or not isinstance(body.get("results", []), list):
            raise UpstreamError("UNKNOWN_ERROR", "Places answered with JSON of an unexpected shape")
        status = body.get("status")
        if status not in ("OK", "ZERO_RESULTS"):
            # REQUEST_DENIED, INVALID_REQUEST, OVER_QUERY_LIMIT ... come with
            # HTTP 200; Google often sends no error_message (INVALID_REQUEST),
            # but the spec's error shape always has one.
            word = status if isinstance(status, str) and status else "UNKNOWN_ERROR"
            message = body.get("error_message")
            raise UpstreamError(word, str(message) if message else f"Places answered status {word}")
        if "error_message" in body:
            body["error_message"] = redact(str(body["error_message"]), self.api_key)
        return cut_results(body, bound)
