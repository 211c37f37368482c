"""The HTTP side of one server: metrics, health, status, the herd page (gevent WSGI, same loop).

Served by ``gevent.pywsgi.WSGIServer`` on ``[server:X] http_port`` in the server's
own process and hub (no thread). Endpoints:

    /metrics   Prometheus text (metrics.registry: HerdCollector, read at scrape time, and the process's)
    /livez     200 while the process answers
    /readyz    200 when listening, state loaded and the state file writable; else 503 and why
    /status    this server as JSON (``ServerStatus.as_json``)
    /herd      every server's /status, fetched by this one (short timeouts), plus the topology
    /client    ?id=CLIENT: the AT line each server holds for it (``&scope=local``: this server's only)
    /          the herd page (herd_page.html: inline CSS and JS, no CDN)

The server in front of the app (``httplimits.GatedServer``) bounds what a client
can hold: a deadline and a byte cap on each request head, connection caps, a
fixed number of requests served at once; see its docstring and ``[http]``.

Everything it says comes from a ``ServerStatus`` snapshot (``status`` callable),
the herd's configuration and a record lookup, all handed to it: never the server.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, quote

import gevent
import requests
from prometheus_client import make_wsgi_app

from ..config import HerdConfig, ServerConfig
from ..core.status import ServerStatus, as_text
from ..logs import EventLog
from . import metrics
from .httplimits import GatedServer

FETCH_CONNECT_TIMEOUT = 0.3  # seconds: /herd and /client ask every other server ...
FETCH_READ_TIMEOUT = 0.7
FETCH_DEADLINE = 1.5  # ... and give up on all of them together after this long
ID_WHITESPACE = b" \t\n\r\f\v"  # what splits a protocol line into words (bytes.split()): nothing else

StartResponse = Callable[..., Any]


class HttpFront:
    """The WSGI server and app of one server; started and stopped with it."""

    def __init__(
        self,
        status: Callable[[], ServerStatus],
        config: HerdConfig,
        me: ServerConfig,
        lookup: Callable[[bytes], bytes | None],
        log: EventLog,
    ):
        self.status = status
        self.config = config
        self.me = me
        self.lookup = lookup
        self.registry = metrics.registry(status)
        self._metrics = make_wsgi_app(self.registry)
        self.session = requests.Session()
        self.wsgi = GatedServer((me.host, me.http_port), self.app, config.http, log)
        self.routes: dict[str, Callable[[dict[str, Any], StartResponse], Iterable[bytes]]] = {
            "/metrics": self._metrics,
            "/livez": self._livez,
            "/readyz": self._readyz,
            "/status": self._status,
            "/herd": self._herd,
            "/client": self._client,
            "/": self._page,
        }

    @property
    def address(self) -> tuple[str, int]:
        return self.wsgi.server_host, self.wsgi.server_port

    def start(self) -> None:
        self.wsgi.start()

    def stop(self) -> None:
        self.wsgi.stop(timeout=0)  # nothing here is worth waiting for: idle keep-alives would hold it
        self.session.close()

    # -- the WSGI app ---------------------------------------------------------------------

    def app(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            return _reply(start_response, "405 Method Not Allowed", b"GET only\n", extra=[("Allow", "GET, HEAD")])
        route = self.routes.get(environ.get("PATH_INFO") or "/")
        if route is None:
            return _reply(start_response, "404 Not Found", b"not found\n")
        return route(environ, start_response)

    def _livez(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        return _reply(start_response, "200 OK", b"ok\n")

    def _readyz(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        ready, reason = self.status().readiness()
        return _reply(start_response, "200 OK" if ready else "503 Service Unavailable", reason.encode() + b"\n")

    def _status(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        return _json(start_response, self.status().as_json())

    def _page(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        return _reply(start_response, "200 OK", page(), "text/html; charset=utf-8")

    def _herd(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        return _json(start_response, self.herd())

    def _client(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        query = parse_qs(environ.get("QUERY_STRING", ""), encoding="utf-8", errors="surrogateescape")
        client = (query.get("id") or [""])[0]
        if not is_one_word(client):
            return _reply(start_response, "400 Bad Request", b"?id=CLIENT (one word) is required\n")
        if (query.get("scope") or [""])[0] == "local":
            return _json(start_response, {"server": self.me.name, "at": self.local_record(client)})
        return _json(start_response, self.client(client))

    # -- what the endpoints say -------------------------------------------------------------

    def local_record(self, client: str) -> str | None:
        line = self.lookup(client.encode("utf-8", "surrogateescape"))
        return as_text(line) if line is not None else None

    def topology(self) -> dict[str, Any]:
        return {
            name: {"address": f"{s.host}:{s.port}", "http": s.http_port, "neighbors": list(s.neighbors)}
            for name, s in self.config.servers.items()
        }

    def herd(self) -> dict[str, Any]:
        """Every server's /status as this one can get it (``error`` where it could not)."""
        servers = self._ask_everyone("/status", lambda: self.status().as_json())
        return {"self": self.me.name, "time": time.time(), "topology": self.topology(), "servers": servers}

    def client(self, client: str) -> dict[str, Any]:
        path = f"/client?scope=local&id={quote(client, safe='', errors='surrogateescape')}"
        answers = self._ask_everyone(path, lambda: {"server": self.me.name, "at": self.local_record(client)})
        return {"client": client, "servers": answers}

    def _ask_everyone(self, path: str, mine: Callable[[], dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """GET ``path`` from every other server at once (bounded by FETCH_DEADLINE), ``mine()`` for this one."""
        answers: dict[str, dict[str, Any]] = {}
        jobs = {}
        for name, config in self.config.servers.items():
            if name == self.me.name:
                answers[name] = mine()
            elif not config.http_port:
                answers[name] = {"name": name, "error": "no http_port"}
            else:
                jobs[name] = gevent.spawn(self._fetch, name, config.http_url(path))
        gevent.joinall(list(jobs.values()), timeout=FETCH_DEADLINE)
        for name, job in jobs.items():
            if job.successful():
                answers[name] = job.value
            else:
                job.kill(block=False)
                error = job.exception if job.ready() else "no answer in time"
                answers[name] = {"name": name, "error": _describe(error)}
        return {name: answers[name] for name in sorted(answers)}

    def _fetch(self, name: str, url: str) -> dict[str, Any]:
        """Another server's answer, or why there is none: a greenlet that raised would have
        the hub print its traceback on stderr, once per unreachable server per /herd."""
        try:
            response = self.session.get(url, timeout=(FETCH_CONNECT_TIMEOUT, FETCH_READ_TIMEOUT))
            response.raise_for_status()
            answer = response.json()
        except Exception as exc:  # whatever went wrong (connection, status, JSON) is the answer
            return {"name": name, "error": _describe(exc)}
        if not isinstance(answer, dict):
            return {"name": name, "error": "not a JSON object"}
        return answer


def is_one_word(client: str) -> bool:
    """A client id as the line protocol takes it: one word split on the six ASCII
    white-space bytes only (U+00A0 or U+2028 are part of a word there, so here too)."""
    raw = client.encode("utf-8", "surrogateescape")
    return bool(raw) and not any(byte in ID_WHITESPACE for byte in raw)


def _reply(
    start_response: StartResponse,
    status_line: str,
    body: bytes,
    content_type: str = "text/plain; charset=utf-8",
    extra: list[tuple[str, str]] | None = None,
) -> list[bytes]:
    headers = [("Content-Type", content_type), ("Content-Length", str(len(body))), ("Cache-Control", "no-store")]
    start_response(status_line, headers + (extra or []))
    return [body]


def _json(start_response: StartResponse, document: Any) -> list[bytes]:
    body = json.dumps(document).encode("ascii")  # \u escapes: valid whatever bytes a client id holds
    return _reply(start_response, "200 OK", body, "application/json; charset=utf-8")


def _describe(error: object) -> str:
    if isinstance(error, requests.ConnectionError):
        return "unreachable (connection failed)"
    if isinstance(error, requests.Timeout):
        return "no answer in time"
    if isinstance(error, requests.HTTPError) and error.response is not None:
        return f"answered {error.response.status_code}"
    return f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else str(error)


_PAGE: bytes | None = None


def page() -> bytes:
    global _PAGE
    if _PAGE is None:
        _PAGE = resources.files("herdserver.ops").joinpath("herd_page.html").read_bytes()
    return _PAGE
