"""Per-server structured logs: one logfmt line per event, client bytes escaped.

A line looks like::

    2026-11-24T17:54:23.123456Z INFO Alford event=in conn=3 peer=127.0.0.1:40512 line="IAMAT kiwi +34-118 1"

Every value that is not a plain word is double-quoted with ``\\``, ``"`` and
every control character escaped, so a client can never start a log line of its
own (``grep 'event=in'`` finds only what the server wrote).

The log buffers in memory and is flushed by its owner (the server flushes it
whenever its event loop falls idle), so logging never waits on the disk in a
client's path. Warnings and errors are flushed at once; a buffer past
``max_buffer`` bytes or holding a line older than MAX_AGE_NS is flushed by the
next line logged (a server too busy ever to fall idle).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any, TextIO

from .config import LOG_STDOUT

_NEEDS_QUOTES = re.compile(r'[^A-Za-z0-9_.:/@+\-,]')
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(m: re.Match[str]) -> str:
    """One character as an escape. A single backslash always starts an escape (a
    literal one is doubled), so different inputs never log the same."""
    code = ord(m.group())
    if m.group() in _ESCAPES:
        return _ESCAPES[m.group()]
    if code < 0x80:  # C0 and DEL: the byte itself
        return f"\\x{code:02x}"
    if 0xDC80 <= code <= 0xDCFF:  # a byte that is not UTF-8 (surrogateescape): the byte
        return f"\\x{code - 0xDC00:02x}"
    return f"\\u{code:04x}"  # C1 controls, line/paragraph separators, other surrogates


_UNSAFE_ASCII = re.compile(b'[\\\\"\x00-\x1f\x7f]')


def escape(value: object) -> str:
    """One logfmt value: bare when it is a plain word, else quoted and escaped."""
    if isinstance(value, bytes):
        if value.isascii():
            # The common cases, a printable ASCII command or a one-line reply (its
            # newline the only byte to escape): no per-character work.
            end = len(value) - 1 if value.endswith(b"\n") else len(value)
            if _UNSAFE_ASCII.search(value, 0, end) is None:
                text = value[:end].decode("ascii")
                if end < len(value):
                    return f'"{text}\\n"'
                return text if text and _NEEDS_QUOTES.search(text) is None else f'"{text}"'
        text = value.decode("utf-8", "surrogateescape")
    elif isinstance(value, (bytearray, memoryview)):
        text = bytes(value).decode("utf-8", "surrogateescape")
    else:
        text = str(value)
    if text and _NEEDS_QUOTES.search(text) is None:
        return text
    return '"' + _escape_text(text) + '"'


# C0, DEL, C1 and the Unicode line/paragraph separators are all escaped: anything a
# terminal or a log viewer could take as a line break or a control sequence.
# The escapes nearly every quoted value needs (a WHATSAT reply has dozens of
# newlines and quotes): plain str.replace, far cheaper than a callback per match.
_COMMON_ESCAPES = tuple(_ESCAPES.items())  # backslash first: later escapes add backslashes
_RARE_UNSAFE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def _escape_text(text: str) -> str:
    for char, escaped in _COMMON_ESCAPES:
        if char in text:
            text = text.replace(char, escaped)
    if not text.isprintable():  # a fast C pre-check; the regex decides what is escaped
        text = _RARE_UNSAFE.sub(_escape_char, text)
    return text


def fields(**values: Any) -> str:
    return " ".join(f"{key}={escape(value)}" for key, value in values.items())


# (time_ns, event, who_key, who, key, values): one traffic record, a line per value;
# event None: a preformatted line (everything but the time stamp) in ``values``.
_Record = tuple[int, str | None, str | None, object, str | None, Any]
STDOUT = LOG_STDOUT  # the path of a log that goes to standard output ([herd] log_dir = -)
_SUMMARY = "\x00summary"  # a traffic record's key: replies, WHATSAT ones summarised (EventLog.replies)


def _summarise_reply(reply: bytes) -> str:
    """One reply as logged at INFO, escaped: a WHATSAT reply (AT line, JSON, empty line) as
    ``"AT ...\\n" status=OK results=5``, any other reply (one line) whole."""
    end = reply.find(b"\n")
    if end < 0 or end == len(reply) - 1:
        return escape(reply)  # one line: an AT reply or a "? " reply
    try:
        payload = json.loads(reply[end + 1:])
        status, results = payload.get("status"), len(payload.get("results") or [])
    except (ValueError, AttributeError, TypeError):
        status, results = "unparsed", 0
    return f"{escape(reply[:end + 1])} status={escape(status)} results={results}"


MAX_AGE_NS = 1_000_000_000  # a line waits at most about this long for a flush, however busy the server


class EventLog:
    """``log.info("open", conn=3, peer=...)`` -> one logfmt line, written in batches.

    Deliberately not the ``logging`` module on the hot path: a record there costs
    several function calls, a lock and a LogRecord per line, which profiling
    showed as 40% of an IAMAT's CPU. ``traffic`` (every line in and out) only
    takes the time and keeps the bytes, one record for what one recv brought or
    one send took; ``flush`` formats everything in one warm loop, off the
    client's path. Other events are formatted at once (they are rare) and keep
    their place in the order.
    """

    def __init__(self, server: str, path: str, level: str = "INFO", max_buffer: int = 1 << 15):
        self.path = path  # STDOUT ("-"): standard output
        self.server = escape(server)
        self.level: int = logging.getLevelNamesMapping()[level.upper()]
        self.stream: TextIO | None = self._open()
        self.lines_written = 0  # herd_log_lines_total
        self.lines_dropped = 0  # herd_log_lines_dropped_total: the write failed
        self.pending: list[_Record] = []
        # Called when a line is buffered and none was: an idle server does not wake to flush.
        self.on_pending: Callable[[], None] | None = None
        self.buffered = 0  # about how many bytes ``pending`` will format to
        self.max_buffer = max_buffer
        self._second = -1
        self._stamp = ""

    def _timestamp(self, ns: int) -> str:
        second, micros = divmod(ns // 1000, 1_000_000)
        if second != self._second:  # strftime once a second, not once a line
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second))
        return "%s%06dZ" % (self._stamp, micros)

    def _open(self) -> TextIO:
        if self.path == STDOUT:
            return sys.stdout
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        return open(self.path, "a", encoding="utf-8", errors="backslashreplace")

    def reopen(self) -> None:
        """Write what is pending, close the file and open it again by name (SIGHUP, after
        logrotate has moved it away). Standard output is left as it is."""
        self.flush()
        if self.stream is None or self.path == STDOUT:
            return
        try:
            stream = self._open()
        except OSError:
            return  # keep writing to the old file rather than losing lines
        self.stream.close()
        self.stream = stream

    def _log(self, level: int, name: str, event: str, values: dict[str, Any], extra: str = "") -> None:
        if level < self.level:
            return
        text = " ".join([f"{key}={escape(value)}" for key, value in values.items()])
        line = f" {name} {self.server} event={event}{' ' if text else ''}{text}{extra}\n"
        self._keep((time.time_ns(), None, None, None, None, line), len(line))
        if level >= logging.WARNING:
            self.flush()

    def _keep(self, record: _Record, size: int) -> None:
        pending = self.pending
        if not pending and self.on_pending is not None:
            self.on_pending()  # the first line since the last flush: the server schedules one
        pending.append(record)
        self.buffered += size
        if self.buffered >= self.max_buffer or record[0] - pending[0][0] > MAX_AGE_NS:
            self.flush()

    def traffic(self, event: str, who_key: str, who: object, key: str, values: list[bytes]) -> None:
        """``event=E <who_key>=<who> <key>=<value>``, a line per value, one time stamp:
        the lines one recv brought (``in``) or one send took (``out``)."""
        if self.level <= logging.INFO and values:
            self._keep((time.time_ns(), event, who_key, who, key, values), 100 * len(values))

    def replies(self, conn: int, replies: list[bytes]) -> None:
        """``event=out conn=N data=...`` per reply. A WHATSAT reply's JSON body is logged whole
        only at DEBUG; at INFO it is its AT line with the status and the number of results."""
        if self.level <= logging.DEBUG:
            self.traffic("out", "conn", conn, "data", replies)
        elif self.level <= logging.INFO and replies:
            self._keep((time.time_ns(), "out", "conn", conn, _SUMMARY, replies), 100 * len(replies))

    def _format(self, records: list[_Record]) -> str:
        server, out = self.server, []
        # A relayed AT line is logged three times (in, out, and its echo back in):
        # escape each distinct value once per batch.
        escaped: dict[bytes, str] = {}
        for ns, event, who_key, who, key, values in records:
            stamp = self._timestamp(ns)
            if event is None:
                out.append(stamp + values)
                continue
            head = f"{stamp} INFO {server} event={event} {who_key}={escape(who)} {'data' if key is _SUMMARY else key}="
            if key is _SUMMARY:
                texts = [_summarise_reply(value) for value in values]
            else:
                texts = [escaped.get(value) or escaped.setdefault(value, escape(value)) for value in values]
            out.append(head + ("\n" + head).join(texts) + "\n")
        return "".join(out)

    def debug(self, event: str, **values: Any) -> None:
        self._log(logging.DEBUG, "DEBUG", event, values)

    def info(self, event: str, **values: Any) -> None:
        self._log(logging.INFO, "INFO", event, values)

    def warning(self, event: str, **values: Any) -> None:
        self._log(logging.WARNING, "WARNING", event, values)

    def error(self, event: str, **values: Any) -> None:
        self._log(logging.ERROR, "ERROR", event, values)

    def exception(self, event: str, **values: Any) -> None:
        """An error with the current traceback folded into one escaped value."""
        self._log(logging.ERROR, "ERROR", event, values, " traceback=" + escape(traceback.format_exc().rstrip()))

    def enabled(self, level: int = logging.INFO) -> bool:
        return level >= self.level

    def flush(self) -> None:
        if not self.pending or self.stream is None:
            return
        records, self.pending, self.buffered = self.pending, [], 0
        data = self._format(records)
        lines = data.count("\n")
        try:
            self.stream.write(data)
            self.stream.flush()
        except OSError:
            self.lines_dropped += lines  # disk full or gone: losing log lines must not stop the server
        else:
            self.lines_written += lines

    def close(self) -> None:
        self.flush()
        if self.stream is not None and self.path != STDOUT:
            self.stream.close()
        self.stream = None


def setup(server: str, path: str, level: str = "INFO") -> EventLog:
    """The log of one server (several may share a process); its owner flushes it."""
    return EventLog(server, path, level)
