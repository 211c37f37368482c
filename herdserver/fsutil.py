"""File-system helpers shared by the state file and the offline place cache: one per job.

- ``flock``/``locked``: an exclusive ``flock`` on a lock file, so two processes
  never build or own the same file at once.
- ``write_all``: ``os.write`` until every byte is written (a write may be partial).
- ``atomic_write``: temp file in the same directory, fsync, ``os.replace``, fsync of
  the directory, so a reader sees the old file or the new one, never a torn one.
- ``fsync_dir``: make a rename (or a create) in a directory durable.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterable, Iterator
from os import PathLike

StrPath = str | PathLike[str]


def flock(path: StrPath, *, wait: bool = True) -> int:
    """An fd holding an exclusive flock on ``path`` (created if missing); closing it unlocks.

    With ``wait=False`` a lock held elsewhere raises at once (``BlockingIOError``,
    errno EWOULDBLOCK) instead of waiting. The lock file is never removed: unlinking
    a file another process waits on would let two holders in at once."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def locked(path: StrPath) -> Iterator[None]:
    """``flock(path)`` held for the ``with`` block (waits for another holder)."""
    fd = flock(path)
    try:
        yield
    finally:
        os.close(fd)  # releases the lock


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """Write every byte: ``os.write`` may write only part (signals, pipes, full disks)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def fsync_dir(directory: StrPath) -> None:
    """fsync a directory, so an entry renamed or created in it survives a power loss."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: StrPath, chunks: Iterable[bytes], *, mode: int = 0o644) -> None:
    """Replace ``path`` with the concatenated ``chunks``: the old file or the new, never a mix.

    The temp file is in the same directory (``os.replace`` is atomic only within a
    file system) and removed if anything fails, including a KeyboardInterrupt or a
    SystemExit from a signal handler."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        try:
            for chunk in chunks:
                write_all(fd, chunk)
            os.fchmod(fd, mode)  # mkstemp makes it 0600
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # The new file is in place either way; a directory that refuses fsync (some
    # file systems do) only weakens how durable the rename is, so it is no failure.
    with contextlib.suppress(OSError):
        fsync_dir(directory)
