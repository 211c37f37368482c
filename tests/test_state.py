"""The state file: append, replay, torn and corrupt lines, the lock, compaction, fsync modes."""

from __future__ import annotations

import errno
import os
import tracemalloc
from pathlib import Path

import gevent
import pytest

from herdserver import statefile as state_mod
from herdserver.core.store import Store
from herdserver.logs import EventLog
from herdserver.statefile import MAGIC, StateFile, StateLocked, encode

from .conftest import wait_until


def log(tmp_path: Path) -> EventLog:
    return EventLog("T", str(tmp_path / "T.log"))


def at(client: bytes, t: int) -> bytes:
    return b"AT Alford +0.000000000 %s +1+1 %d" % (client, t)


def write_records(tmp_path: Path, records: list[tuple[bytes, int]], fsync: str = "never") -> Path:
    path = tmp_path / "A.state"
    state = StateFile(str(path), fsync, log(tmp_path))
    state.replay(list)
    for client, t in records:
        state.append(t * 10**9, at(client, t))
    state.flush()
    state.close()
    return path


def replay(tmp_path: Path, path: Path) -> tuple[Store, state_mod.ReplayReport]:
    store = Store()
    state = StateFile(str(path), "never", log(tmp_path))
    report = state.replay(store.load)
    state.close()
    return store, report


def test_records_survive_a_reopen_and_newer_wins(tmp_path: Path) -> None:
    path = write_records(tmp_path, [(b"a", 1), (b"b", 2), (b"a", 3), (b"a", 2)])
    store, report = replay(tmp_path, path)
    assert report.records == 4 and report.corrupt == 0 and not report.torn_tail
    assert store.get(b"a") == at(b"a", 3) and store.get(b"b") == at(b"b", 2)
    assert path.read_bytes().startswith(MAGIC)


def test_a_torn_tail_is_reported_cut_off_and_appends_go_on(tmp_path: Path) -> None:
    path = write_records(tmp_path, [(b"a", 1), (b"b", 2)])
    with open(path, "ab") as handle:
        handle.write(encode(3 * 10**9, at(b"c", 3))[:-9])  # power lost mid-write
    store, report = replay(tmp_path, path)
    assert report.torn_tail and report.records == 2 and len(store) == 2
    assert path.read_bytes().endswith(b"\n")  # cut back to the last whole line
    write_records(tmp_path, [(b"d", 4)])
    store, report = replay(tmp_path, path)
    assert sorted(store.snapshot()) == [b"a", b"b", b"d"] and not report.torn_tail


def test_a_corrupt_line_is_skipped_and_every_other_record_kept(tmp_path: Path) -> None:
    path = write_records(tmp_path, [(b"c%d" % i, i + 1) for i in range(10)])
    data = bytearray(path.read_bytes())
    middle = data.index(b"c4 ")
    data[middle] = ord("x")  # a flipped byte: the checksum no longer matches
    data[data.index(b"c7 ") - 40 : data.index(b"c7 ") - 38] = b"\x00\xff"
    path.write_bytes(bytes(data))
    store, report = replay(tmp_path, path)
    assert report.corrupt == 2 and report.first_bad_line > 1
    assert len(store) == 8 and b"c4" not in store and b"c9" in store


def test_a_garbage_file_is_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "A.state"
    path.write_bytes(os.urandom(5000) + b"\n" + encode(10**9, at(b"ok", 1)))
    store, report = replay(tmp_path, path)
    assert store.get(b"ok") == at(b"ok", 1) and report.corrupt >= 1


def test_a_second_process_on_the_same_state_is_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "A.state")
    first = StateFile(path, "never", log(tmp_path))
    with pytest.raises(StateLocked, match="another server process"):
        StateFile(path, "never", log(tmp_path))
    first.close()
    StateFile(path, "never", log(tmp_path)).close()  # free again once closed


def test_compaction_keeps_every_live_record_and_what_arrives_meanwhile(tmp_path: Path) -> None:
    path = str(tmp_path / "A.state")
    store = Store()
    state = StateFile(path, "never", log(tmp_path))
    state.replay(store.load)
    for t in range(1, 6):
        for i in range(3000):
            line = at(b"c%d" % i, t)
            store.offer_line(b"c%d" % i, t * 10**9, line)
            state.append(t * 10**9, line)
        state.flush()
    assert state.needs_compaction(len(store))
    snapshot = [(int(line.rsplit(b" ", 1)[1]) * 10**9, line) for line in store.lines()]

    def meanwhile() -> None:
        state.append(7 * 10**9, at(b"late", 7))
        state.flush()

    writer = gevent.spawn_later(0, meanwhile)
    state.compact(snapshot)
    writer.join()
    state.append(8 * 10**9, at(b"later", 8))
    state.flush()
    state.close()
    assert not os.path.exists(path + ".compact")
    reloaded, report = replay(tmp_path, Path(path))
    assert report.records == 3002 and report.corrupt == 0
    assert reloaded.get(b"c5") == at(b"c5", 5) and b"late" in reloaded and b"later" in reloaded


@pytest.mark.parametrize(("mode", "fsyncs"), [("always", True), ("never", False)])
def test_commit_waits_for_an_fsync_with_always_and_never_fsyncs_with_never(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, fsyncs: bool
) -> None:
    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(state_mod.os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    state = StateFile(str(tmp_path / "A.state"), mode, log(tmp_path))
    state.replay(list)
    state.start()
    state.append(10**9, at(b"a", 1))
    state.flush()
    state.commit()  # with "always", returns once an fsync covers the batch
    assert bool(synced) is fsyncs
    assert (state.synced >= state.written) is fsyncs
    state.close()


# -- when the disk fails ---------------------------------------------------------------


def full_disk(monkeypatch: pytest.MonkeyPatch, failing: list[bool], part: float = 0.5) -> None:
    """While ``failing[0]``: every state file write puts part of its bytes down, then
    fails with ENOSPC (as a write that fills the disk does)."""
    real = state_mod._write_all

    def write(fd: int, data: bytes) -> None:
        if not failing[0]:
            return real(fd, data)
        os.write(fd, data[: int(len(data) * part)])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(state_mod, "_write_all", write)


def test_a_failed_write_is_cut_back_refused_and_the_next_record_is_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    failing = [False]
    full_disk(monkeypatch, failing)
    path = tmp_path / "A.state"
    state = StateFile(str(path), "never", log(tmp_path))
    state.replay(list)
    state.append(10**9, at(b"a", 1))
    assert state.flush() and state.writable
    size = path.stat().st_size
    failing[0] = True
    state.append(2 * 10**9, at(b"b", 2))
    assert not state.flush()  # the caller answers "? ": nothing acknowledged
    assert not state.writable and state.stats.state_write_failures == 1
    assert path.stat().st_size == size  # cut back to its last whole line
    failing[0] = False
    state.append(3 * 10**9, at(b"c", 3))
    assert state.flush() and state.writable
    state.close()
    store, report = replay(tmp_path, path)
    assert report.corrupt == 0 and not report.torn_tail
    assert sorted(store.snapshot()) == [b"a", b"c"]


def test_a_cut_back_that_fails_too_is_done_before_the_next_append(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    failing = [True]
    full_disk(monkeypatch, failing)
    real_truncate = os.ftruncate
    truncates = [False]

    def ftruncate(fd: int, size: int) -> None:
        if not truncates[0]:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        real_truncate(fd, size)

    monkeypatch.setattr(state_mod.os, "ftruncate", ftruncate)
    path = tmp_path / "A.state"
    state = StateFile(str(path), "never", log(tmp_path))
    state.replay(list)
    state.append(10**9, at(b"a", 1))
    assert not state.flush()  # the very first write (the header with it) fails
    assert path.stat().st_size > 0  # and its half line stays, for now
    failing[0], truncates[0] = False, True
    state.append(2 * 10**9, at(b"b", 2))
    assert state.flush()
    state.close()
    store, report = replay(tmp_path, path)
    assert report.corrupt == 0 and not report.torn_tail and sorted(store.snapshot()) == [b"b"]
    assert path.read_bytes().startswith(MAGIC)


def test_an_fsync_that_fails_with_always_refuses_the_batch_and_cuts_it_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = [True]
    real = state_mod._fsync

    def fsync(fd: int) -> None:
        if broken[0]:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(fd)

    monkeypatch.setattr(state_mod, "_fsync", fsync)
    path = tmp_path / "A.state"
    state = StateFile(str(path), "always", log(tmp_path))
    state.replay(list)
    state.start()
    state.append(10**9, at(b"a", 1))
    assert state.flush()  # in the page cache...
    assert not state.commit()  # ...but not on the disk: not acknowledged
    assert not state.writable and state.stats.state_write_failures >= 1
    broken[0] = False
    state.append(2 * 10**9, at(b"b", 2))
    assert state.flush() and state.commit()
    wait_until(lambda: state.writable, what="writable after an fsync that works")
    state.close()
    store, report = replay(tmp_path, path)
    assert report.corrupt == 0 and sorted(store.snapshot()) == [b"b"]


@pytest.mark.parametrize("mode", ["never", "interval", "always"])
def test_writable_comes_back_by_itself_when_space_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    monkeypatch.setattr(state_mod, "PROBE_SECONDS", 0.01)
    monkeypatch.setattr(state_mod, "FSYNC_INTERVAL_SECONDS", 0.01)
    failing = [False]
    full_disk(monkeypatch, failing)
    path = tmp_path / "A.state"
    state = StateFile(str(path), mode, log(tmp_path))
    state.replay(list)
    state.start()
    state.append(10**9, at(b"a", 1))
    assert state.flush() and state.commit()
    failing[0] = True
    state.append(2 * 10**9, at(b"b", 2))
    assert not state.flush()
    gevent.sleep(0.05)  # probes fail meanwhile (and are cut back)
    assert not state.writable
    failing[0] = False  # space returns; no client writes
    wait_until(lambda: state.writable, what="the probe to find the disk writable")
    state.close()
    store, report = replay(tmp_path, path)
    assert report.corrupt == 0 and not report.torn_tail and sorted(store.snapshot()) == [b"a"]


def test_a_failing_disk_logs_once_then_throttled_with_a_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    full_disk(monkeypatch, [True])
    events = log(tmp_path)
    state = StateFile(str(tmp_path / "A.state"), "never", events)
    state.replay(list)
    for i in range(50):
        state.append(i, at(b"a", i))
        assert not state.flush()
    monkeypatch.setattr(state_mod.time, "monotonic", lambda: 10**9)  # FAILURE_LOG_SECONDS later
    state.append(99, at(b"a", 99))
    assert not state.flush()
    state.close()
    events.flush()
    lines = [line for line in (tmp_path / "T.log").read_text().splitlines() if "state_write_failed" in line]
    assert len(lines) == 2 and "No space left on device" in lines[0]
    assert "failures_since_last_log=1" in lines[0] and "failures_since_last_log=50" in lines[1]
    assert state.stats.state_write_failures == 51


# -- replay: whatever the file holds ---------------------------------------------------


def test_a_64_mb_line_is_skipped_unread_and_the_records_around_it_load(tmp_path: Path) -> None:
    path = write_records(tmp_path, [(b"before%d" % i, i + 1) for i in range(100)])
    with open(path, "ab") as handle:
        handle.write(b"x" * (64 << 20) + b"\n")
        for i in range(100):
            handle.write(encode((i + 1) * 10**9, at(b"after%d" % i, i + 1)))
    tracemalloc.start()
    try:
        report = state_mod.ReplayReport()
        records = sum(1 for _ in state_mod.read_records(str(path), report))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert records == 200 and report.corrupt == 1 and report.overlong == 1 and report.first_bad_line == 102
    assert peak < 8 << 20  # a chunk or two, never the line
    store, _ = replay(tmp_path, path)
    assert b"before99" in store and b"after0" in store and len(store) == 200


def test_an_over_long_torn_tail_is_cut_off(tmp_path: Path) -> None:
    path = write_records(tmp_path, [(b"a", 1)])
    size = path.stat().st_size
    with open(path, "ab") as handle:
        handle.write(b"y" * (3 << 20))  # no newline: a write that never finished
    store, report = replay(tmp_path, path)
    assert report.torn_tail and report.intact_bytes == size and path.stat().st_size == size
    write_records(tmp_path, [(b"b", 2)])
    store, report = replay(tmp_path, path)
    assert sorted(store.snapshot()) == [b"a", b"b"] and report.corrupt == 0


def test_a_right_crc_on_a_malformed_or_foreign_at_line_is_skipped_and_reported(tmp_path: Path) -> None:
    path = write_records(tmp_path, [(b"a", 1)])
    bad = [
        b"AT Alford +0.1 kiwi nowhere 5",  # a hand edit: no location
        b"AT Alford +0.1 kiwi +1+1 5.x",  # no time
        b"AT Alford +0.000000001 kiwi +91.0+1 5",  # latitude past 90
        b"AT Nowhere +0.000000001 kiwi +1+1 5",  # a server herd.ini does not list
        b"AT Alford  +0.000000001 kiwi +1+1 5",  # not canonical (two spaces)
        b"IAMAT kiwi +1+1 5",
    ]
    good = b"AT Alford +1 other +01.5+001.25 6.5"  # another implementation's form: valid
    with open(path, "ab") as handle:
        for line in bad:
            handle.write(encode(5 * 10**9, line))
        handle.write(encode(6 * 10**9, good))
    store = Store()
    state = StateFile(str(path), "never", log(tmp_path), servers=frozenset({b"Alford"}))
    report = state.replay(store.load)
    state.close()
    assert report.corrupt == len(bad) and report.first_bad_line == 3 and report.records == 2
    assert b"kiwi" not in store and store.get(b"other") == good
    assert store.offer_line(b"other", 7 * 10**9, at(b"other", 7))  # time_of on what was loaded: no crash
