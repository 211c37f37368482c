"""The state file: every stored record appended as it comes, replayed at start.

Format (text, one record a line, greppable)::

    herdserver-state 1
    <crc32 of the line, 8 hex digits> <client time in ns> <AT line>

The first line names the format. Each record line carries a CRC-32 of its AT
line, so a torn or corrupt line (power loss, disk full, a bad sector) is
detected at replay, reported and skipped, never taken for a record and never
a reason to drop the lines after it. The time in nanoseconds saves replay a
parse per line.

Writes: ``append`` only buffers; ``flush`` hands what is buffered to the OS (one
``os.write``). An IAMAT's record is flushed (and, with ``always``, committed) on
its own before it is stored, flooded and acknowledged, so an acknowledged record
survives ``kill -9``; neighbors' records are flushed once per batch of lines. What a power loss
may cost is the fsync mode (``[herd] fsync``):

- ``interval`` (default): fsync at most a second after a write, like Redis's
  ``appendfsync everysec``: a power loss loses at most about the last second.
- ``always``: ``commit`` waits for an fsync covering the batch (group commit: one
  fsync for every batch that arrived meanwhile); a power loss loses nothing that
  was acknowledged.
- ``never``: the OS writes back when it likes (typically within 30 s).

fsync runs in gevent's threadpool, never on the event loop.

When the disk fails (ENOSPC, EDQUOT, EIO, EROFS): ``flush`` and ``commit`` return
False, so the caller answers ``? `` instead of acknowledging; the file is cut back
(ftruncate) to its last whole line before anything else is appended; the failure
is logged once (then at most every ``FAILURE_LOG_SECONDS`` with a count) and
counted; ``writable`` is False until a write succeeds again, which a probe tries
every ``PROBE_SECONDS`` (so the server recovers by itself when space returns,
even with no client writing).

Replay is linear in the file whatever it holds: a line longer than ``max_line``
(``MAX_RECORD_LINE`` or more) is skipped while scanning, never accumulated, and a
line whose CRC matches but whose AT line does not parse, or names a server
herd.ini does not list, is reported and skipped like a corrupt one.

Compaction (Serf's snapshot.go way): when the file holds more than twice the
live records, a fresh file is written beside it from a snapshot (plus whatever
was appended meanwhile), fsynced, renamed over the old one, and the directory
fsynced. A lock file (``flock``) keeps a second process off the same state.
"""

from __future__ import annotations

import errno
import os
import re
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

import gevent
from gevent.event import Event

from .config import FSYNC_MODES
from .core.protocol import parse_at_line
from .core.stats import Stats
from .fsutil import flock, fsync_dir, write_all
from .logs import EventLog

MAGIC = b"herdserver-state 1\n"
FSYNC_INTERVAL_SECONDS = 1.0
READ_CHUNK = 1 << 20
COMPACT_MIN_LINES = 4096  # below this a file is never worth compacting
COMPACT_CHUNK_LINES = 8192  # lines per write while compacting (the loop yields between)
# A record line is an AT line (at most [limits] max_line_bytes, 8 KiB by default) plus
# about 30 bytes of framing; a longer line at replay is garbage, skipped unread.
MAX_RECORD_LINE = 64 * 1024
FAILURE_LOG_SECONDS = 10.0  # a failing disk logs its first failure, then one line this often
PROBE_SECONDS = 1.0  # while not writable: how often a write is tried without waiting for a client
PROBE_BYTES = b"\n" * 4096  # blank lines (replay skips them), cut off again at once


class StateLocked(Exception):
    """Another process holds this state file."""


@dataclass
class ReplayReport:
    records: int = 0
    corrupt: int = 0  # lines skipped: bad CRC, not an AT line of this herd, or over-long
    overlong: int = 0  # of those, lines longer than max_line (skipped unread)
    torn_tail: bool = False
    first_bad_line: int = 0
    intact_bytes: int = 0  # where the last whole line ends (a torn tail is cut back to it)

    def bad(self, number: int) -> None:
        self.corrupt += 1
        self.first_bad_line = self.first_bad_line or number


def encode(time_ns: int, line: bytes) -> bytes:
    body = b"%d %s" % (time_ns, line)
    return b"%08x %s\n" % (zlib.crc32(body), body)


# The common record line in one match: a canonical AT line as this code writes it.
# Only a fast path: everything it accepts the protocol's parser accepts too, and a
# line it rejects is decided by that parser (``_decode_slowly``). Groups: CRC, the
# body it covers, the time field, the AT line, its server, its client.
_PATTERN = (
    rb"([0-9a-f]{8}) (([0-9]{1,30}) (AT ([\x21-\x7e]+) [+-][0-9]{1,11}\.[0-9]{9} ([\x21-\x7e]+)"
    rb" [+-](?:[0-8]?[0-9](?:\.[0-9]+)?|90(?:\.0+)?)[+-](?:(?:1[0-7][0-9]|[0-9]{1,2})(?:\.[0-9]+)?|180(?:\.0+)?)"
    rb" [0-9]{1,11}(?:\.[0-9]{1,18})?))"
)
_RECORD = re.compile(_PATTERN)
_RECORDS = re.compile(rb"^" + _PATTERN + rb"$", re.MULTILINE)  # every such line of a chunk in one call


def decode(raw: bytes, servers: frozenset[bytes] | None = None) -> tuple[bytes, int, bytes] | None:
    """(client, time_ns, AT line) of one record line (without its newline), or None
    if it is corrupt: a CRC that does not match, or (a hand edit with a right CRC)
    an AT line that does not parse or names a server not in ``servers`` (None: any).
    The CRC covers the time field and the line: the time is read from the former."""
    match = _RECORD.fullmatch(raw)
    if match is None:
        return _decode_slowly(raw, servers)
    crc, body, time_ns, line, server, client = match.groups()
    if zlib.crc32(body) != int(crc, 16) or (servers is not None and server not in servers):
        return None
    return client, int(time_ns), line


def _decode_slowly(raw: bytes, servers: frozenset[bytes] | None) -> tuple[bytes, int, bytes] | None:
    """``decode`` for what the fast pattern does not take: another server's AT line
    in a form of its own, or garbage."""
    body = raw[9:]
    try:
        if raw[8:9] != b" " or zlib.crc32(body) != int(raw[:8], 16):
            return None
        space = body.index(b" ")
        time_ns, line = int(body[:space]), body[space + 1 :]
    except ValueError:
        return None
    record = parse_at_line(line)
    if record is None or record.line != line or (servers is not None and record.server not in servers):
        return None
    return record.client, time_ns, line


def _decode_chunk(data: bytes, lines: int, servers: frozenset[bytes] | None) -> list[tuple[bytes, int, bytes]] | None:
    """Every record of ``data`` (``lines`` whole lines) in one regex call, or None
    unless each line is a good record in the common form (then: line by line)."""
    crc = zlib.crc32
    good = [
        (client, int(time_ns), line)
        for check, body, time_ns, line, server, client in _RECORDS.findall(data)
        if crc(body) == int(check, 16) and (servers is None or server in servers)
    ]
    return good if len(good) == lines else None


def read_records(
    path: str, report: ReplayReport, servers: frozenset[bytes] | None = None, max_line: int = MAX_RECORD_LINE
) -> Iterator[tuple[bytes, int, bytes]]:
    """(client, time_ns, line) of every intact record, in file order; linear in the
    file's size whatever it holds (a line over ``max_line`` is skipped unread)."""
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        return
    with handle:
        head = handle.read(len(MAGIC))
        if head != MAGIC:
            if head:
                report.bad(1)
                handle.seek(0)  # not our header: still try every line
        yield from _scan(handle, report, servers, max_line)


def _scan(
    handle: BinaryIO, report: ReplayReport, servers: frozenset[bytes] | None, max_line: int
) -> Iterator[tuple[bytes, int, bytes]]:
    number = 1  # lines read so far (the header is line 1)
    rest = b""  # the unfinished line at the end of the last chunk (at most max_line bytes)
    skipping = -1  # where the over-long line being skipped starts, or -1
    while chunk := handle.read(READ_CHUNK):
        if skipping >= 0:
            end = chunk.find(b"\n")
            if end < 0:
                continue  # still inside it: nothing kept
            number += 1
            report.overlong += 1
            report.bad(number)
            skipping, chunk = -1, chunk[end + 1 :]
        data = rest + chunk if rest else chunk
        end = data.rfind(b"\n") + 1
        data, rest = data[:end], data[end:]
        if len(rest) > max_line:
            skipping, rest = handle.tell() - len(rest), b""
        count = data.count(b"\n")
        good = _decode_chunk(data, count, servers)
        if good is None:  # rare: a line in another form, a blank or a bad one
            good = _decode_lines(data, number, report, servers, max_line)
        number += count
        report.records += len(good)
        yield from good
    if skipping >= 0:  # an over-long line with no newline: a torn tail like any other
        report.intact_bytes, report.torn_tail = skipping, True
    else:
        report.intact_bytes = handle.tell() - len(rest)
        report.torn_tail = bool(rest)  # no newline: the write was cut short (power loss, disk full)


def _decode_lines(
    data: bytes, number: int, report: ReplayReport, servers: frozenset[bytes] | None, max_line: int
) -> list[tuple[bytes, int, bytes]]:
    """``_decode_chunk`` line by line, reporting the bad ones (``number``: the line before ``data``)."""
    good = []
    for offset, raw in enumerate(data.split(b"\n")[:-1], number + 1):
        decoded = decode(raw, servers) if raw and len(raw) <= max_line else None
        if decoded is not None:
            good.append(decoded)
        elif raw:  # a blank line is nothing (a probe's leftover), not a bad one
            report.overlong += len(raw) > max_line
            report.bad(offset)
    return good


class StateFile:
    """One server's state file: locked, appended in batches, fsynced by policy."""

    def __init__(
        self,
        path: str,
        fsync: str,
        log: EventLog,
        *,
        servers: frozenset[bytes] | None = None,
        max_line: int = MAX_RECORD_LINE,
        stats: Stats | None = None,
    ):
        if fsync not in FSYNC_MODES:
            raise ValueError(f"fsync must be one of {', '.join(FSYNC_MODES)}")
        self.path = path
        self.fsync_mode = fsync
        self.log = log
        self.servers = servers  # the herd's server names: a record naming another is skipped at replay
        self.max_line = max_line
        self.stats = stats if stats is not None else Stats()  # state_write_failures is counted there
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        self.directory = directory
        self._lock_fd = _lock(path + ".lock")
        self._fd = -1
        self._pending: list[bytes] = []
        self._compacting: list[bytes] | None = None  # appends made while a compaction runs
        self.lines_in_file = 0
        self.size = 0  # where the file's last whole line ends: a failed write is cut back to it
        self._torn = False  # a failed write may have left part of a line past ``size``
        self.written = 0  # bytes handed to the OS, ever
        self.synced = 0  # bytes covered by an fsync
        self._synced_size = 0  # ``size`` as of the last fsync that worked
        self._fsync_failures = 0  # commit() compares it: an fsync failed meanwhile
        self._dirty = Event()  # set when written > synced
        self._synced_round = Event()
        self._greenlets: list[gevent.Greenlet] = []
        self.writable = True  # False from a failed write or fsync until one works again
        self._failing_since = 0.0
        self._written_at_failure = 0  # ``written`` at the last failure: an fsync past it means recovered
        self._failures_unlogged = 0
        self._failure_logged_at = 0.0
        self._probe: gevent.Greenlet | None = None

    # -- start ---------------------------------------------------------------------------

    def replay(self, load: Callable[[Iterable[tuple[bytes, int, bytes]]], object]) -> ReplayReport:
        """Hand every intact record to ``load`` (e.g. ``Store.load``), then open the
        file for appending.

        A torn last line is cut off (truncated away) so the next append starts on a
        line of its own; corrupt lines stay where they are until the next compaction.
        """
        report = ReplayReport()
        load(read_records(self.path, report, self.servers, self.max_line))
        self.lines_in_file = report.records + report.corrupt
        if report.torn_tail:
            os.truncate(self.path, report.intact_bytes)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.size = self._synced_size = os.fstat(self._fd).st_size  # 0: the first write brings the header
        return report

    def start(self) -> None:
        """The background work: the fsync loop (interval/always)."""
        if self.fsync_mode != "never":
            self._greenlets.append(gevent.spawn(self._fsync_loop))

    # -- the hot path --------------------------------------------------------------------

    def append(self, time_ns: int, line: bytes) -> None:
        self._pending.append(encode(time_ns, line))

    def flush(self) -> bool:
        """Hand every appended record to the OS (one write); before any reply that
        acknowledges one of them. False when that failed: the records are not in the
        file (it is cut back to its last whole line) and must not be acknowledged."""
        if not self._pending:
            return True
        pending, self._pending = self._pending, []
        if self._fd < 0:
            return False
        data = b"".join(pending)
        if not self._write(MAGIC + data if self.size == 0 else data):
            return False
        if self._compacting is not None:
            self._compacting.append(data)
        self.lines_in_file += len(pending)
        return True

    def _write(self, data: bytes) -> bool:
        """Append ``data`` whole, or nothing of it (cut back): True when it is in the file."""
        try:
            if self._torn:  # what the last failed write left: away before anything new
                os.ftruncate(self._fd, self.size)
                self._torn = False
            _write_all(self._fd, data)
        except OSError as exc:
            self._torn = True
            self._failed("write", exc)
            self._cut_back()
            return False
        self.size += len(data)
        self.written += len(data)
        self._dirty.set()
        if not self.writable and self.fsync_mode == "never":  # else: once an fsync covers a new write
            self._recovered()
        return True

    def _cut_back(self) -> None:
        try:
            os.ftruncate(self._fd, self.size)
            self._torn = False
        except OSError:  # (EROFS, EIO) tried again before the next write, which waits for it
            pass

    def commit(self) -> bool:
        """With ``fsync = always``: wait until an fsync covers everything flushed so far.
        False when an fsync failed meanwhile: what it was to cover was cut off the file."""
        if self.fsync_mode != "always":
            return True
        target, failures = self.written, self._fsync_failures
        while self.synced < target and self._fd >= 0 and self._fsync_failures == failures:
            round_done = self._synced_round
            self._dirty.set()
            round_done.wait()
        return self.synced >= target and self._fsync_failures == failures

    def _fsync_loop(self) -> None:
        pool = gevent.get_hub().threadpool
        while True:
            self._dirty.wait()
            if self.fsync_mode == "interval":
                gevent.sleep(FSYNC_INTERVAL_SECONDS)
            self._dirty.clear()
            target, fd, size = self.written, self._fd, self.size
            if fd < 0:
                return
            try:
                pool.apply(_fsync, (fd,))
            except OSError as exc:
                self._fsync_failed(fd, exc)
            else:
                if fd == self._fd:
                    self._synced_size = max(self._synced_size, size)
                if not self.writable and target > self._written_at_failure:
                    self._recovered()
            self.synced = max(self.synced, target)
            done, self._synced_round = self._synced_round, Event()
            done.set()

    def _fsync_failed(self, fd: int, exc: OSError) -> None:
        """An fsync failed: what it covered may never reach the disk. With ``always``
        nothing past the last good fsync was acknowledged: it is cut off (its waiters
        answer ``? ``). Otherwise it was acknowledged already and stays."""
        self._failed("fsync", exc)
        if self.fsync_mode == "always":
            self._fsync_failures += 1
            if fd == self._fd and self.size > self._synced_size:
                self.size = self._synced_size
                self._torn = True
                self._cut_back()

    # -- failures ------------------------------------------------------------------------

    def _failed(self, op: str, exc: OSError) -> None:
        """One failure counted; logged at once when the disk was fine until now, else
        at most every FAILURE_LOG_SECONDS with how many happened since."""
        self.stats.state_write_failures += 1
        self._written_at_failure = self.written
        now = time.monotonic()
        if self.writable:
            self.writable = False
            self._failing_since = now
            if self._probe is None or self._probe.dead:
                self._probe = gevent.spawn(self._probe_until_writable)
        elif now - self._failure_logged_at < FAILURE_LOG_SECONDS:
            self._failures_unlogged += 1
            return
        self.log.error(
            "state_write_failed", path=self.path, op=op, error=os.strerror(exc.errno or 0),
            failures_since_last_log=self._failures_unlogged + 1,
        )
        self._failure_logged_at, self._failures_unlogged = now, 0

    def _recovered(self) -> None:
        self.writable = True
        self.log.warning(
            "state_writable", path=self.path, failing_s="%.1f" % (time.monotonic() - self._failing_since),
            failures=self.stats.state_write_failures,
        )

    def _probe_until_writable(self) -> None:
        """While not writable, try a write (and an fsync) now and then: readiness comes
        back when space does, even if no client writes (a load balancer sends none)."""
        while not self.writable and self._fd >= 0:
            gevent.sleep(PROBE_SECONDS)
            if self.writable or self._fd < 0:
                return
            if self._pending:  # neighbors' records waiting: they are the probe
                self.flush()
            elif self._write(PROBE_BYTES):  # (the fsync loop then confirms it)
                self.size -= len(PROBE_BYTES)
                self._torn = True
                self._cut_back()

    # -- compaction ----------------------------------------------------------------------

    def needs_compaction(self, live: int) -> bool:
        return self._compacting is None and self.lines_in_file > max(2 * live, COMPACT_MIN_LINES)

    def compact(self, snapshot: list[tuple[int, bytes]]) -> None:
        """Rewrite the file from ``snapshot`` (time_ns, line) plus what is appended
        meanwhile; runs in the caller's greenlet, yielding between chunks. An OSError
        (the disk full) leaves the old file as it was, and is raised for the caller to
        try again later."""
        if self._compacting is not None or self._fd < 0:
            return
        self._compacting = []
        failures = self._fsync_failures
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
            pool.apply(_fsync, (fd,))
            # Nothing may be flushed between the last copy and the switch: no yield below.
            self.flush()
            _write_all(fd, b"".join(self._compacting[copied:]))
            _fsync(fd)  # only the few lines written since the threadpool fsync
            if self._fsync_failures != failures:  # lines cut off the old file were copied: start over later
                raise OSError(errno.EIO, "an fsync of the state file failed while compacting")
            os.replace(tmp, self.path)
            fsync_dir(self.directory)
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
        self.lines_in_file = len(snapshot) + sum(chunk.count(b"\n") for chunk in self._compacting)
        self.size = self._synced_size = os.fstat(fd).st_size
        self._torn = False
        self._compacting = None
        self.log.info("state_compacted", path=self.path, lines_before=before, lines_after=self.lines_in_file)

    def close(self) -> None:
        self.flush()
        for greenlet in self._greenlets:
            greenlet.kill(block=False)
        if self._probe is not None:
            self._probe.kill(block=False)
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
    """fsutil.write_all (a name of its own: tests make it fail)."""
    write_all(fd, data)


def _fsync(fd: int) -> None:
    """os.fsync (a name of its own: tests make it fail)."""
    os.fsync(fd)


def _lock(path: str) -> int:
    try:
        return flock(path, wait=False)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise StateLocked(f"{path} is locked: another server process uses this state file") from None
        raise
