"""Per-server structured logs: one logfmt line per event, client bytes escaped.

A line looks like::

    2026-11-24T17:54:23.123456Z INFO Alford event=in conn=3 peer=127.0.0.1:40512 line="IAMAT kiwi +34-118 1"

Every value that is not a plain word is double-quoted with ``\\``, ``"`` and
every control character escaped, so a client can never start a log line of its
own (``grep 'event=in'`` finds only what the server wrote).

The file handler buffers in memory and is flushed by its owner (the server runs
a flusher greenlet), so logging never waits on the disk in a client's path.
Warnings and errors are flushed at once.
"""

from __future__ import annotations

import logging
import os
import re
import itertools
import time
from typing import Any

_instances = itertools.count(1)

_NEEDS_QUOTES = re.compile(r'[^A-Za-z0-9_.:/@+\-,]')
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}
# C0, DEL, C1 and the Unicode line/paragraph separators: anything a terminal or
# a log viewer could take as a line break or a control sequence.
_UNSAFE = re.compile('[\\\\"\x00-\x1f\x7f-\x9f\u2028\u2029]')


def _escape_char(m: re.Match[str]) -> str:
    ch = m.group()
    if ch in _ESCAPES:
        return _ESCAPES[ch]
    return f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}"


def escape(value: object) -> str:
    """One logfmt value: bare when it is a plain word, else quoted and escaped."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        text = bytes(value).decode("utf-8", "backslashreplace")
    else:
        text = str(value)
    if text and _NEEDS_QUOTES.search(text) is None:
        return text
    return '"' + _UNSAFE.sub(_escape_char, text) + '"'


def fields(**values: Any) -> str:
    return " ".join(f"{key}={escape(value)}" for key, value in values.items())


class EventLog:
    """A thin facade: ``log.info("in", conn=3, line=b"...")`` -> one logfmt line."""

    def __init__(self, logger: logging.Logger):
        self.logger = logger

    def _log(self, level: int, event: str, values: dict[str, Any]) -> None:
        if self.logger.isEnabledFor(level):
            self.logger.log(level, "event=%s %s", event, fields(**values) if values else "")

    def debug(self, event: str, **values: Any) -> None:
        self._log(logging.DEBUG, event, values)

    def info(self, event: str, **values: Any) -> None:
        self._log(logging.INFO, event, values)

    def warning(self, event: str, **values: Any) -> None:
        self._log(logging.WARNING, event, values)

    def error(self, event: str, **values: Any) -> None:
        self._log(logging.ERROR, event, values)

    def exception(self, event: str, **values: Any) -> None:
        if self.logger.isEnabledFor(logging.ERROR):
            self.logger.error("event=%s %s", event, fields(**values), exc_info=True)

    def enabled(self, level: int = logging.INFO) -> bool:
        return self.logger.isEnabledFor(level)


class LogfmtFormatter(logging.Formatter):
    def __init__(self, server: str):
        super().__init__()
        self.server = escape(server)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        seconds = int(record.created)
        micros = int((record.created - seconds) * 1_000_000)
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{micros:06d}Z"

    def format(self, record: logging.LogRecord) -> str:
        line = f"{self.formatTime(record)} {record.levelname} {self.server} {record.getMessage().rstrip()}"
        if record.exc_info:
            # Tracebacks are folded into one escaped value so the file stays one event a line.
            line += " traceback=" + escape(self.formatException(record.exc_info))
        return line


class BufferedFileHandler(logging.Handler):
    """Appends formatted lines to a buffer; ``flush()`` writes them in one call."""

    def __init__(self, path: str, max_buffer: int = 1 << 16):
        super().__init__()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self.stream = open(path, "a", encoding="utf-8", errors="backslashreplace")
        self.buffer: list[str] = []
        self.buffered = 0
        self.max_buffer = max_buffer

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
        except Exception:  # a broken record must never take the server down
            self.handleError(record)
            return
        self.buffer.append(line)
        self.buffered += len(line)
        if self.buffered >= self.max_buffer or record.levelno >= logging.WARNING:
            self.flush()

    def flush(self) -> None:
        if not self.buffer or self.stream is None:
            return
        data, self.buffer, self.buffered = "".join(self.buffer), [], 0
        try:
            self.stream.write(data)
            self.stream.flush()
        except OSError:
            pass  # disk full or gone: losing log lines must not stop the server

    def close(self) -> None:
        self.flush()
        if self.stream is not None:
            self.stream.close()
            self.stream = None  # type: ignore[assignment]
        super().close()


def setup(server: str, path: str, level: str = "INFO") -> tuple[EventLog, BufferedFileHandler]:
    """A logger of its own for one server (several servers may share a process)."""
    # Not registered with logging.getLogger: a test suite starts hundreds of servers.
    logger = logging.Logger(f"herdserver.{server}.{next(_instances)}")
    logger.setLevel(level)
    logger.propagate = False
    handler = BufferedFileHandler(path)
    handler.setFormatter(LogfmtFormatter(server))
    logger.handlers[:] = [handler]
    return EventLog(logger), handler
