"""fsutil: the lock file, whole writes, atomic replacement."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from herdserver import fsutil


def test_flock_excludes_a_second_holder_until_the_first_lets_go(tmp_path: Path) -> None:
    lock = tmp_path / "x.lock"
    first = fsutil.flock(lock)
    try:
        # flock locks belong to an open file description: a second open in this
        # process is refused just as another process would be.
        with pytest.raises(BlockingIOError):
            fsutil.flock(lock, wait=False)
    finally:
        os.close(first)
    second = fsutil.flock(lock, wait=False)
    os.close(second)
    assert lock.exists()  # the lock file stays for the next holder


def test_locked_holds_the_lock_for_the_block_only(tmp_path: Path) -> None:
    lock = tmp_path / "x.lock"
    with fsutil.locked(lock):
        with pytest.raises(BlockingIOError):
            fsutil.flock(lock, wait=False)
    os.close(fsutil.flock(lock, wait=False))


def test_write_all_retries_a_partial_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write
    sizes: list[int] = []

    def three_bytes_at_a_time(fd: int, data: bytes | memoryview) -> int:
        sizes.append(real_write(fd, bytes(data[:3])))
        return sizes[-1]

    monkeypatch.setattr(os, "write", three_bytes_at_a_time)
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        fsutil.write_all(fd, b"0123456789")
    finally:
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == b"0123456789"
    assert sizes == [3, 3, 3, 1]


def test_atomic_write_replaces_the_file_whole(tmp_path: Path) -> None:
    target = tmp_path / "data.bin"
    target.write_bytes(b"old")
    seen_while_writing: list[bytes] = []

    def chunks() -> Iterator[bytes]:
        yield b"new "
        seen_while_writing.append(target.read_bytes())
        yield b"content"

    fsutil.atomic_write(target, chunks())
    assert seen_while_writing == [b"old"]  # readers see the old file until the rename
    assert target.read_bytes() == b"new content"
    assert target.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.bin"]  # no temp file left


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "data.bin"
    target.write_bytes(b"old")

    def failing() -> Iterator[bytes]:
        yield b"half of the new"
        raise KeyboardInterrupt  # e.g. Ctrl-C mid-write: BaseException cleans up too

    with pytest.raises(KeyboardInterrupt):
        fsutil.atomic_write(target, failing())
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.bin"]


def test_atomic_write_creates_a_missing_file_and_fsync_dir_accepts_a_directory(tmp_path: Path) -> None:
    fsutil.atomic_write(str(tmp_path / "fresh"), [b"a", b"", b"b"], mode=0o600)
    assert (tmp_path / "fresh").read_bytes() == b"ab"
    assert (tmp_path / "fresh").stat().st_mode & 0o777 == 0o600
    fsutil.fsync_dir(tmp_path)
    with pytest.raises(FileNotFoundError):
        fsutil.fsync_dir(tmp_path / "missing")
