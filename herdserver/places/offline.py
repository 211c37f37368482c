"""The offline Places provider: GeoNames places near a point, in the legacy Nearby Search shape.

The data is loaded once per process and shared by every provider: from the
cache file (``geonames_cache``) in milliseconds, or built from the source
(``geonames``) when the cache is missing or stale. Servers never wait for a
build: ``background=True`` has a child process (``build-cache --stdout``) build
it while a greenlet waits, and a WHATSAT meanwhile waits up to the Places timeout.
"""

from __future__ import annotations

import math
import os
import sys
import threading
from collections.abc import Callable
from os import PathLike
from pathlib import Path
from typing import Any

from ..core.places_json import places_error
from . import geonames_cache
from .geonames import ATTRIBUTION, SCALE, TYPES, Dataset, reason

# One load per process, data path and cache dir, shared by every provider (and
# failures too, so a broken install is not re-read on every WHATSAT). An entry
# is a _Loading while a background load is in progress.
_cache: dict[tuple[str, str], Dataset | str | _Loading] = {}
_cache_lock = threading.Lock()


def _cache_key(path: str | PathLike[str] | None, cache_dir: Path | None) -> tuple[str, str]:
    return (str(path) if path is not None else "", str(cache_dir) if cache_dir is not None else "")


def _unavailable(exc: Exception) -> str:
    return f"offline place data unavailable: {reason(exc)}"


def _shared(key: tuple[str, str], make: Callable[[], Dataset | str | _Loading]) -> Dataset | str | _Loading:
    """The process-wide entry for ``key``, made once (failures too, so a broken install
    is not read again on every WHATSAT)."""
    with _cache_lock:
        entry = _cache.get(key)
        if entry is None:
            entry = _cache[key] = make()
        return entry


def shared_dataset(path: str | PathLike[str] | None = None, cache_dir: Path | None = None) -> Dataset | str:
    """The process-wide Dataset for path, or the message saying why there is none.

    Synchronous: from the cache file when it is valid (milliseconds), else built
    here (seconds) and written to the cache for the next process."""

    def make() -> Dataset | str:
        try:
            outcome = geonames_cache.ensure(path, cache_dir)
        except (OSError, ValueError, UnicodeError) as exc:
            return _unavailable(exc)
        if outcome.note:
            print(f"herdserver.offline: {outcome.note}", file=sys.stderr)
        return outcome.dataset

    entry = _shared(_cache_key(path, cache_dir), make)
    if isinstance(entry, _Loading):
        result = entry.wait(None)
        assert result is not None
        return result
    return entry


def shared_loading(path: str | PathLike[str] | None = None, cache_dir: Path | None = None) -> Dataset | str | _Loading:
    """Like shared_dataset, but a missing or stale cache never blocks: the data is
    built in a child process (``build-cache --stdout``) while a greenlet waits for
    it; a _Loading stands for it meanwhile. For gevent servers."""
    key = _cache_key(path, cache_dir)

    def make() -> Dataset | str | _Loading:
        try:
            found = geonames_cache.try_cache(path, cache_dir)
        except (OSError, ValueError) as exc:  # the source itself is missing: no child can help
            return _unavailable(exc)
        return found if found is not None else _Loading(key, path, cache_dir)

    return _shared(key, make)


class _Loading:
    """The data being built by ``python -m herdserver.offline build-cache --stdout``.

    A greenlet runs the child (gevent.subprocess: the hub never blocks), reads
    the cache bytes from its stdout and parses them; waiters block on an Event.
    The child takes the cache's lock, so servers starting together build the
    file once and the others read it; with an unwritable cache dir the child
    still builds and sends the data, and says why on stderr (the server's)."""

    def __init__(self, key: tuple[str, str], path: str | PathLike[str] | None, cache_dir: Path | None) -> None:
        import gevent
        import gevent.event

        self.result: Dataset | str | None = None
        self.pid: int | None = None
        self._key = key
        self._done = gevent.event.Event()
        self._greenlet = gevent.spawn(self._run, path, cache_dir)

    def wait(self, timeout: float | None) -> Dataset | str | None:
        """The Dataset or the reason there is none; None if not ready within timeout."""
        self._done.wait(timeout)
        return self.result

    def _run(self, path: str | PathLike[str] | None, cache_dir: Path | None) -> None:
        try:
            self.result = self._load(path, cache_dir)
        except Exception as exc:  # never leave the waiters hanging
            self.result = f"offline place data unavailable: {type(exc).__name__}"
        finally:
            with _cache_lock:
                if _cache.get(self._key) is self:
                    assert self.result is not None
                    _cache[self._key] = self.result
            self._done.set()

    def _load(self, path: str | PathLike[str] | None, cache_dir: Path | None) -> Dataset | str:
        from gevent import subprocess

        command = [sys.executable, "-m", "herdserver.offline", "build-cache", "--stdout"]
        if path is not None:
            command += ["--data", str(path)]
        if cache_dir is not None:
            command += ["--cache-dir", str(cache_dir)]
        env = dict(os.environ)
        package_parent = str(Path(__file__).resolve().parents[2])  # the child imports this same herdserver
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
        child = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
        self.pid = child.pid
        data, errors = child.communicate()
        text = errors.decode("utf-8", "replace").strip()
        if child.returncode != 0:
            last = text.splitlines()[-1] if text else f"the loader exited with status {child.returncode}"
            prefix = "offline place data unavailable"
            return last if last.startswith(prefix) else f"{prefix}: {last}"
        if text:
            print(text, file=sys.stderr)  # e.g. why the cache could not be written
        try:
            return geonames_cache.parse(data, None)
        except geonames_cache.CacheError as exc:
            return f"offline place data unavailable: the loader sent bad data ({exc})"


# ---------------------------------------------------------------- provider


class OfflineProvider:
    """Places from GeoNames in memory, answered in the legacy Nearby Search shape.

    ``OfflineProvider(dataset)`` and ``OfflineProvider()`` are ready when made
    (the latter loads or builds the data synchronously). ``background=True`` (what
    servers use) never blocks: with no valid cache the data comes from a child
    process, and a WHATSAT meanwhile waits up to ``wait_seconds`` for it, then
    answers UNKNOWN_ERROR "offline place data is still loading"."""

    name = "offline"

    def __init__(
        self,
        dataset: Dataset | None = None,
        *,
        data_path: str | PathLike[str] | None = None,
        cache_dir: Path | None = None,
        background: bool = False,
        wait_seconds: float = 5.0,
    ) -> None:
        self.wait_seconds = wait_seconds
        self.dataset: Dataset | None = None
        self.error: str | None = None
        self._loading: _Loading | None = None
        if dataset is not None:
            loaded: Dataset | str | _Loading = dataset
        elif background:
            loaded = shared_loading(data_path, cache_dir)
        else:
            loaded = shared_dataset(data_path, cache_dir)
        self._adopt(loaded)

    def _adopt(self, loaded: Dataset | str | _Loading) -> None:
        if isinstance(loaded, _Loading):
            self._loading = loaded
        elif isinstance(loaded, Dataset):
            self.dataset, self._loading = loaded, None
        else:
            self.error, self._loading = loaded, None

    def ready(self, timeout: float | None = 0.0) -> bool:
        """True once the data (or the reason there is none) is known; waits up to timeout."""
        if self._loading is not None:
            result = self._loading.wait(timeout)
            if result is None:
                return False
            self._adopt(result)
        return True

    def nearby(self, lat: float, lon: float, radius_m: float, bound: int) -> dict[str, Any]:
        if not self.ready(self.wait_seconds):
            return places_error("UNKNOWN_ERROR", "offline place data is still loading")
        if self.dataset is None:
            return places_error("UNKNOWN_ERROR", self.error or "offline place data unavailable")
        if not all(math.isfinite(v) for v in (lat, lon, radius_m)) or abs(lat) > 90 or abs(lon) > 180:
            return places_error("INVALID_REQUEST", "location or radius out of range")
        try:
            hits = self.dataset.query(lat, lon, radius_m)[: max(bound, 0)]
            results = [self._result(distance, i) for distance, i in hits]
        except Exception as exc:  # never raise into a client's connection
            return places_error("UNKNOWN_ERROR", f"offline search failed: {type(exc).__name__}")
        return {"html_attributions": [ATTRIBUTION], "results": results, "status": "OK" if results else "ZERO_RESULTS"}

    def _result(self, distance: float, i: int) -> dict[str, Any]:
        ds = self.dataset
        assert ds is not None
        place_id = f"geonames:{ds.ids[i]}"
        return {
            "geometry": {"location": {"lat": ds.lat[i] / SCALE, "lng": ds.lon[i] / SCALE}},
            "name": ds.name(i),
            "place_id": place_id,
            "reference": place_id,
            "types": list(TYPES),
            "vicinity": ds.vicinity(i),
            "population": ds.population[i],
            "distance_m": round(distance),
        }

    def close(self) -> None:
        """Nothing to release: the data is shared by every provider in the process."""
