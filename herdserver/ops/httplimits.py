"""An HTTP server nobody can hold: gevent's WSGI server with a gate in front of it.

pywsgi on its own reads a request's head with ``http.client`` (lines up to 64 KB,
100 of them, no deadline) inside a handler slot: 64 idle sockets filled its pool
and /livez went unanswered, and 99 header lines of 60 KB cost 5.8 MB a connection.
Here each connection first reads its head itself, under a deadline
(``head_timeout``) and a byte cap (``max_head_bytes``), checks it, and only then
takes one of ``max_requests`` request slots and hands pywsgi the finished head
from memory. So:

- an idle or trickling connection holds no request slot, only its greenlet and
  at most ``max_head_bytes``, and for at most ``head_timeout`` seconds;
- at ``max_connections`` the connection that has waited longest for a request
  head is closed to make room, so a health check always gets in;
- ``max_connections_per_ip`` from one address, beyond that closed at once;
- /livez and /readyz never wait for a request slot;
- every bad request is one ``http_bad_request`` log line (never a traceback on
  stderr) and every answer carries ``X-Content-Type-Options: nosniff``.

Request bodies are not read: this side serves GET and HEAD only, so a request
that announces a body is answered (405 or 400) and its connection closed.
"""

from __future__ import annotations

import re
import traceback
from collections import Counter, OrderedDict
from io import BytesIO
from typing import Any

import gevent
from gevent import GreenletExit
from gevent.greenlet import Greenlet
from gevent.lock import Semaphore
from gevent.pool import Pool
from gevent.pywsgi import WSGIHandler, WSGIServer

from ..config import HttpSettings
from ..logs import EventLog

NOSNIFF = ("X-Content-Type-Options", "nosniff")
MAX_HEADERS = 100  # header lines per request (http.client's own limit); beyond: 431
MAX_REQUEST_LINE = 8190  # pywsgi answers 414 from 8192 bytes with the CRLF; we say so first, and log it
WRITE_TIMEOUT = 10.0  # seconds an answer may wait for the client to read it
UNGATED = frozenset({b"/livez", b"/readyz"})  # cheap, no I/O: answered even while every slot is taken
READ_CHUNK = 4096

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/1\.[01]")
_HEADER_LINE = re.compile(_TOKEN + rb":[^\x00-\x08\x0a-\x1f\x7f]*")  # no obs-fold, no controls but HT
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_BODY_HEADER = re.compile(rb"\n(transfer-encoding|content-length)[ \t]*:[ \t]*([^\r\n]*)", re.IGNORECASE)


class _Evicted(GreenletExit):  # type: ignore[misc]
    """Thrown into an idle connection's greenlet to close it for a newer one (quietly: a GreenletExit)."""


class BadHead(Exception):
    """A request head this side will not serve: the status to answer and why (for the log)."""

    def __init__(self, status: str, reason: str, extra: tuple[tuple[str, str], ...] = ()):
        super().__init__(status, reason)
        self.status = status
        self.reason = reason
        self.extra = extra


def find_head_end(buffer: bytes | bytearray, start: int = 0) -> int:
    """The index just past the blank line that ends a request head, or -1 (CRLF or bare LF lines)."""
    match = _HEAD_END.search(buffer, max(0, start - 3))
    return match.end() if match else -1


def check_head(head: bytes) -> bytes:
    """The request target of a well-formed GET/HEAD head, else BadHead (the head ends with its blank line)."""
    lines = head.split(b"\n")[:-2]  # the blank line and what follows its LF
    request_line = lines[0].rstrip(b"\r")
    if len(request_line) > MAX_REQUEST_LINE:
        raise BadHead("414 URI Too Long", "request_line_too_long")
    match = _REQUEST_LINE.fullmatch(request_line)
    if match is None:
        raise BadHead("400 Bad Request", "bad_request_line")
    if len(lines) - 1 > MAX_HEADERS:
        raise BadHead("431 Request Header Fields Too Large", "too_many_headers")
    if not all(_HEADER_LINE.fullmatch(line.rstrip(b"\r")) for line in lines[1:]):
        raise BadHead("400 Bad Request", "bad_header_line")
    if any(kind.lower() == b"transfer-encoding" or value.strip() != b"0" for kind, value in _BODY_HEADER.findall(head)):
        if match.group(1) not in (b"GET", b"HEAD"):
            raise BadHead("405 Method Not Allowed", "request_body", (("Allow", "GET, HEAD"),))
        raise BadHead("400 Bad Request", "request_body")
    return match.group(2)


def canned(status: str, extra: tuple[tuple[str, str], ...] = ()) -> bytes:
    """A whole answer that closes the connection (the head was not served)."""
    body = status.encode("ascii") + b"\n"
    headers = [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body))),
               ("Connection", "close"), NOSNIFF, *extra]  # fmt: skip
    lines = [f"HTTP/1.1 {status}", *(f"{name}: {value}" for name, value in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + body


class GatedHandler(WSGIHandler):  # type: ignore[misc]
    """One connection: read each head bounded, check it, then let pywsgi serve it from memory."""

    server: GatedServer
    pending = b""  # bytes past the last head: the start of a pipelined next request

    def __init__(self, sock: Any, address: Any, server: GatedServer):
        # pywsgi's own rfile (a buffered socket file) is never read: heads come from memory.
        super().__init__(sock, address, server, rfile=BytesIO())

    def handle_one_request(self) -> Any:
        try:
            head = self._read_head()
            if head is None:
                return None
            target = check_head(head)
        except BadHead as bad:
            self.server.bad_request(self.client_address, bad.reason, status=bad.status.split()[0])
            return bad.status.split()[0], canned(bad.status, bad.extra)
        self.rfile = BytesIO(head)
        if target.split(b"?", 1)[0] in UNGATED:
            return super().handle_one_request()
        with self.server.slots:
            return super().handle_one_request()

    def _read_head(self) -> bytes | None:
        """The next request head (None: closed, timed out or evicted); BadHead when it is too large."""
        buffer, self.pending = bytearray(self.pending), b""
        me = gevent.getcurrent()
        self.server.idle[me] = None  # the newest to wait: evicted last
        try:
            with gevent.Timeout(self.server.settings.head_timeout, False):
                return self._receive_head(buffer)
            if buffer.strip():
                self.server.bad_request(self.client_address, "head_timeout", bytes=len(buffer))
            return None
        except _Evicted:
            return None
        except OSError:  # reset, or the socket's own timeout
            return None
        finally:
            self.server.idle.pop(me, None)

    def _receive_head(self, buffer: bytearray) -> bytes | None:
        limit = self.server.settings.max_head_bytes
        scanned = 0
        while True:
            if buffer.startswith((b"\r", b"\n")):  # empty lines before a request line are ignored (RFC 9112 2.2)
                del buffer[: len(buffer) - len(buffer.lstrip(b"\r\n"))]
                scanned = 0
            end = find_head_end(buffer, scanned)
            if 0 <= end <= limit:
                self.pending = bytes(buffer[end:])
                return bytes(buffer[:end])
            if end > limit or len(buffer) > limit:
                raise BadHead("431 Request Header Fields Too Large", "head_too_large")
            scanned = len(buffer)
            chunk = self.socket.recv(READ_CHUNK)
            if not chunk:
                return None
            buffer += chunk

    def start_response(self, status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        if not any(name.lower() == "x-content-type-options" for name, _ in headers):
            headers = [*headers, NOSNIFF]
        return super().start_response(status, headers, exc_info)

    def _handle_client_error(self, ex: BaseException) -> tuple[str, bytes]:
        # pywsgi would print a traceback for anything but a ValueError; the head was checked, so this is rare.
        self.server.bad_request(self.client_address, "unparsable", status="400", error=f"{type(ex).__name__}: {ex}")
        return "400", canned("400 Bad Request")

    def _log_error(self, t: type[BaseException], v: BaseException, tb: Any) -> None:
        # pywsgi hands an application's exception to the hub, which prints it on stderr: our log instead.
        if not issubclass(t, GreenletExit):
            self.server.events.error(
                "http_error", peer=_peer(self.client_address), path=getattr(self, "path", None),
                error=f"{t.__name__}: {v}", traceback="".join(traceback.format_exception(t, v, tb)),
            )  # fmt: skip


class GatedServer(WSGIServer):  # type: ignore[misc]
    """pywsgi's server with connection caps: per address, in total (evicting the oldest idle)."""

    handler_class = GatedHandler

    def __init__(self, address: tuple[str, int], app: Any, settings: HttpSettings, log: EventLog):
        # An unbounded pool, so stop() ends every handler; the caps are counted here instead.
        super().__init__(address, app, spawn=Pool(), log=None, error_log=_ErrorLog(log))
        self.settings = settings
        self.events = log
        self.slots = Semaphore(settings.max_requests)
        self.idle: OrderedDict[Greenlet, None] = OrderedDict()  # connections waiting for a head, oldest first
        self.per_address: Counter[str] = Counter()
        self.open = 0
        self.leaving: set[Greenlet] = set()  # evicted, not yet closed
        self.refused = 0
        self.evicted = 0

    def handle(self, sock: Any, address: Any) -> None:
        peer = address[0] if isinstance(address, tuple) else str(address)
        if self.per_address[peer] >= self.settings.max_connections_per_ip:
            return self._refuse(sock, address, "per_ip")
        if self.open >= self.settings.max_connections and not self._evict_oldest_idle():
            return self._refuse(sock, address, "full")
        self.open += 1
        self.per_address[peer] += 1
        me = gevent.getcurrent()
        try:
            sock.settimeout(WRITE_TIMEOUT)
            super().handle(sock, address)
        except Exception as exc:  # one connection's failure is a log line, not a traceback from the hub
            self.events.error("http_error", peer=_peer(address), error=f"{type(exc).__name__}: {exc}")
        finally:
            if me in self.leaving:
                self.leaving.discard(me)  # counted out when it was evicted
            else:
                self.open -= 1
            self.per_address[peer] -= 1
            if not self.per_address[peer]:
                del self.per_address[peer]

    def _evict_oldest_idle(self) -> bool:
        if not self.idle:
            return False
        oldest, _ = self.idle.popitem(last=False)
        oldest.kill(_Evicted, block=False)
        self.open -= 1  # counted out now, so the cap holds at once (it closes when it next runs)
        self.leaving.add(oldest)
        self.evicted += 1
        if _power_of_two(self.evicted):
            self.events.info("http_evicted", count=self.evicted, reason="max_connections")
        return True

    def _refuse(self, sock: Any, address: Any, reason: str) -> None:
        sock.close()
        self.refused += 1
        if _power_of_two(self.refused):  # an attack must not write the log full
            self.events.warning("http_refused", peer=_peer(address), reason=reason, count=self.refused)

    def bad_request(self, address: Any, reason: str, **details: object) -> None:
        self.events.info("http_bad_request", peer=_peer(address), reason=reason, **details)


class _ErrorLog:
    """pywsgi's error log (its own messages about a request) into the server's log."""

    def __init__(self, log: EventLog):
        self.log = log

    def write(self, text: str) -> None:
        if text.strip():
            self.log.warning("http_error", message=text.strip())

    def flush(self) -> None:
        pass


def _peer(address: Any) -> str:
    return f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)


def _power_of_two(n: int) -> bool:
    return n & (n - 1) == 0
