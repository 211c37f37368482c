"""The state file: every stored record appended as it comes, replayed at start.

Format (text, one record a line, greppable)::

    herdserver-state 1
    <crc32 of the line, 8 hex digits> <client time in ns> <AT line>

The first line names the format. Each record line carries a CRC-32 of its AT
line, so a torn or corrupt line (power loss, disk full, a bad sector) is
detected at replay, reported and skipped, never taken for a record and never
a reason to drop the lines after it. The time in nanoseconds saves replay a
parse per line.

Writes: ``append`` only buffers; the owner calls ``flush`` once per batch of
commands, *before* it replies, so an acknowledged record has been handed to the
OS (one ``os.write`` for the batch) and survives ``kill -9``. What a power loss
may cost is the fsync mode (``[herd] fsync``):

- ``interval`` (default): fsync at most a second after a write, like Redis's
  ``appendfsync everysec``: a power loss loses at most about the last second.
- ``always``: ``commit`` waits for an fsync covering the batch (group commit: one
  fsync for every batch that arrived meanwhile); a power loss loses nothing that
  was acknowledged.
- ``never``: the OS writes back when it likes (typically within 30 s).

fsync runs in gevent's threadpool, never on the event loop.

Compaction (Serf's snapshot.go way): when the file holds more than twice the
live records, a fresh file is written beside it from a snapshot (plus whatever
was appended meanwhile), fsynced, renamed over the old one, and the directory
fsynced. A lock file (``flock``) keeps a second process off the same state.
"""

from __future__ import annotations

import errno
import fcntl
import os
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import gevent
from gevent.event import Event

from .config import FSYNC_MODES
from .logs import EventLog

MAGIC = b"herdserver-state 1\n"
FSYNC_INTERVAL_SECONDS = 1.0
READ_CHUNK = 1 << 20
COMPACT_MIN_LINES = 4096  # below this a file is never worth compacting
COMPACT_CHUNK_LINES = 8192  # lines per write while compacting (the loop yields between)


class StateLocked(Exception):
    """Another process holds this state file."""


@dataclass
class ReplayReport:
    records: int = 0
    corrupt: int = 0
    torn_tail: bool = False
    first_bad_line: int = 0
    intact_bytes: int = 0  # where the last whole line ends (a torn tail is cut back to it)


def encode(time_ns: int, line: bytes) -> bytes:
    body = b"%d %s" % (time_ns, line)
    return b"%08x %s\n" % (zlib.crc32(body), body)


def decode(raw: bytes) -> tuple[bytes, int, bytes] | None:
    """(client, time_ns, AT line) of one record line (without its newline), or None
    if it is corrupt. The CRC covers the time and the line: once it matches, both
    are as they were written (by this code, so well-formed)."""
    body = raw[9:]
    try:
        if raw[8:9] != b" " or zlib.crc32(body) != int(raw[:8], 16):
            return None
        space = body.index(b" ")
        line = body[space + 1 :]
        return line.split(b" ", 4)[3], int(body[:space]), line
    except (ValueError, IndexError):
        return None


def read_records(path: str, report: ReplayReport) -> Iterator[tuple[bytes, int, bytes]]:
    """(client, time_ns, line) of every intact record, in file order."""
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        return
    with handle:
        head = handle.read(len(MAGIC))
        if head != MAGIC:
            if head:
                report.corrupt += 1
                report.first_bad_line = report.first_bad_line or 1
                handle.seek(0)  # not our header: still try every line
        number = 1
        rest = b""
        while chunk := handle.read(READ_CHUNK):
            lines = (rest + chunk).split(b"\n")
            rest = lines.pop()
            good = [decoded for raw in lines if (decoded := decode(raw)) is not None]
            if len(good) < len(lines):  # rare: find which, for the report
                for offset, raw in enumerate(lines):
                    if raw and decode(raw) is None:
                        report.corrupt += 1
                        report.first_bad_line = report.first_bad_line or number + offset + 1
            number += len(lines)
            report.records += len(good)
            yield from good
        report.intact_bytes = handle.tell() - len(rest)
        if rest:  # no newline: the write was cut short (power loss, disk full)
            report.torn_tail = True


class StateFile:
    """One server's state file: locked, appended in batches, fsynced by policy."""

    def __init__(self, path: str, fsync: str, log: EventLog):
        if fsync not in FSYNC_MODES:
            raise ValueError(f"fsync must be one of {', '.join(FSYNC_MODES)}")
        self.path = path
        self.fsync_mode = fsync
        self.log = log
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        self.directory = directory
        self._lock_fd = _lock(path + ".lock")
        self._fd = -1
        self._pending: list[bytes] = []
        self._compacting: list[bytes] | None = None  # appends made while a compaction runs
        self.lines_in_file = 0
        self.written = 0  # bytes handed to the OS, ever
        self.synced = 0  # bytes covered by an fsync
        self._dirty = Event()  # set when written > synced
        self._synced_round = Event()
        self._greenlets: list[gevent.Greenlet] = []
        self.write_errors = 0

    # -- start ---------------------------------------------------------------------------

    def replay(self, load: Callable[[Iterable[tuple[bytes, int, bytes]]], object]) -> ReplayReport:
        """Hand every intact record to ``load`` (e.g. ``Store.load``), then open the
        file for appending.

        A torn last line is cut off (truncated away) so the next append starts on a
        line of its own; corrupt lines stay where they are until the next compaction.
        """
        report = ReplayReport()
        load(read_records(self.path, report))
        self.lines_in_file = report.records + report.corrupt
        if report.torn_tail:
            os.truncate(self.path, report.intact_bytes)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        if os.fstat(self._fd).st_size == 0:
            os.write(self._fd, MAGIC)
        return report

    def start(self) -> None:
        """The background work: the fsync loop (interval/always)."""
        if self.fsync_mode != "never":
            self._greenlets.append(gevent.spawn(self._fsync_loop))

    # -- the hot path --------------------------------------------------------------------

    def append(self, time_ns: int, line: bytes) -> None:
        self._pending.append(encode(time_ns, line))

    def flush(self) -> None:
        """Hand every appended record to the OS (one write); before any reply that
        acknowledges one of them."""
        if not self._pending or self._fd < 0:
            return
        data = b"".join(self._pending)
        count = len(self._pending)
        if self._compacting is not None:
            self._compacting.extend(self._pending)
        self._pending = []
        try:
            _write_all(self._fd, data)
        except OSError as exc:
            self.write_errors += 1
            self.log.error("state_write_failed", path=self.path, error=os.strerror(exc.errno or 0))
            return
        self.lines_in_file += count
        self.written += len(data)
        self._dirty.set()

    def commit(self) -> None:
        """With ``fsync = always``: wait until an fsync covers everything flushed so far."""
        if self.fsync_mode != "always":
            return
        target = self.written
        while self.synced < target and self._fd >= 0:
            round_done = self._synced_round
            self._dirty.set()
            round_done.wait()

    def _fsync_loop(self) -> None:
        pool = gevent.get_hub().threadpool
        while True:
            self._dirty.wait()
            if self.fsync_mode == "interval":
                gevent.sleep(FSYNC_INTERVAL_SECONDS)
            self._dirty.clear()
            target, fd = self.written, self._fd
            if fd < 0:
                return
            try:
                pool.apply(os.fsync, (fd,))
            except OSError as exc:
                self.log.error("state_fsync_failed", path=self.path, error=os.strerror(exc.errno or 0))
            self.synced = max(self.synced, target)
            done, self._synced_round = self._synced_round, Event()
            done.set()

    # -- compaction ----------------------------------------------------------------------

    def needs_compaction(self, live: int) -> bool:
        return self._compacting is None and self.lines_in_file > max(2 * live, COMPACT_MIN_LINES)

    def compact(self, snapshot: list[tuple[int, bytes]]) -> None:
        """Rewrite the file from ``snapshot`` (time_ns, line) plus what is appended
        meanwhile; runs in the caller's greenlet, yielding between chunks."""
        if self._compacting is not None or self._fd < 0:
            return
        self._compacting = []
        tmp = self.path + ".compact"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        pool = gevent.get_hub().threadpool
        try:
            _write_all(fd, MAGIC)
            for start in range(0, len(snapshot), COMPACT_CHUNK_LINES):
                chunk = snapshot[start : start + COMPACT_CHUNK_LINES]
                _write_all(fd, b"".join(encode(t, line) for t, line in chunk))
                gevent.sleep(0)
            self.flush()
            copied = len(self._compacting)
            _write_all(fd, b"".join(self._compacting))
            pool.apply(os.fsync, (fd,))
            # Nothing may be flushed between the last copy and the switch: no yield below.
            self.flush()
            _write_all(fd, b"".join(self._compacting[copied:]))
            os.fsync(fd)  # only the few lines written since the threadpool fsync
            os.replace(tmp, self.path)
            _fsync_dir(self.directory)
        except BaseException:
            os.close(fd)
            self._compacting = None
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        old, self._fd = self._fd, fd
        os.close(old)
        before = self.lines_in_file
        self.lines_in_file = len(snapshot) + len(self._compacting)
        self._compacting = None
        self.log.info("state_compacted", path=self.path, lines_before=before, lines_after=self.lines_in_file)

    def close(self) -> None:
        self.flush()
        for greenlet in self._greenlets:
            greenlet.kill(block=False)
        if self._fd >= 0:
            try:
                os.fsync(self._fd)
            except OSError:
                pass
            os.close(self._fd)
            self._fd = -1
        self._synced_round.set()
        os.close(self._lock_fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _lock(path: str) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise StateLocked(f"{path} is locked: another server process uses this state file") from None
        raise
    return fd
