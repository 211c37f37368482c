"""Places providers behind one interface returning Google's legacy Nearby Search shape.

``make_provider(settings)`` picks one: ``google`` (Places API (New)),
``google-legacy`` (both in ``google.py``) or ``offline`` (GeoNames, ``offline.py``);
``auto`` is google with a key in the environment, else offline. Whichever it
is, ``provider.nearby(lat, lon, radius_m, bound)`` never raises for an upstream
problem: it returns the legacy JSON shape, with ``status`` and
``error_message`` on failure (``places_error``).

Within the package, imports go one way only:
``geonames`` <- ``geonames_cache`` <- ``offline``; ``google`` stands alone; this
module imports both providers and nothing imports it back.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Protocol

from ..config import PlacesSettings, effective_provider
from .offline import OfflineProvider

__all__ = ["Provider", "choose", "make_provider"]


class Provider(Protocol):
    name: str

    def nearby(self, lat: float, lon: float, radius_m: float, bound: int) -> dict[str, Any]:
        """Legacy Nearby Search JSON (a dict) with at most ``bound`` results."""
        ...

    def close(self) -> None: ...


def choose(settings: PlacesSettings, environ: Mapping[str, str] | None = None) -> str:
    """The provider ``auto`` stands for: google with a key in the environment, else offline."""
    return effective_provider(settings, os.environ if environ is None else environ)


def make_provider(settings: PlacesSettings, environ: Mapping[str, str] | None = None) -> Provider:
    environ = os.environ if environ is None else environ
    kind = choose(settings, environ)
    key = environ.get(settings.api_key_env) or None
    if kind in ("google", "google-legacy"):
        # Imported here, not at the top: requests costs ~90 ms of import, and the
        # build-cache child process (which imports this package, for geonames_cache)
        # never needs it. Not a cycle: google imports nothing of this package.
        from .google import GoogleLegacyProvider, GoogleNewProvider

        return (GoogleNewProvider if kind == "google" else GoogleLegacyProvider)(settings, key)
    # Never blocks the server's start: from the cache in ms, or built by a child
    # process while WHATSATs wait up to the Places timeout for it.
    return OfflineProvider(background=True, wait_seconds=settings.timeout)
