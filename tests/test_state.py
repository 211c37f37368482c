"""The state file: append, replay, torn and corrupt lines, the lock, compaction, fsync modes."""

from __future__ import annotations

import os
from pathlib import Path

import gevent
import pytest

from herdserver import statefile as state_mod
from herdserver.core.store import Store
from herdserver.logs import EventLog
from herdserver.statefile import MAGIC, StateFile, StateLocked, encode


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
