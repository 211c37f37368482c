"""The HTTP side cannot be held: slowloris, idle crowds, header floods, malformed
requests, per-address and total caps; ids as the line protocol has them; nosniff.

Real loopback sockets to a real server in this process (the attack runs in this
process's hub too: the server answers /livez while it is going on)."""

from __future__ import annotations

import re
import socket
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import gevent
import pytest
import requests
from gevent.event import Event

from herdserver.config import HttpSettings
from herdserver.ops.httplimits import BadHead, check_head, find_head_end
from herdserver.server import HerdServer

from .conftest import Herd, iamat, wait_until

NOSNIFF = "nosniff"


def http_herd(make_herd: Any, topology: dict[str, list[str]] | None = None, **settings: Any) -> Herd:
    """A herd with HTTP sides under ``[http]`` settings (defaults for the rest)."""
    topology = topology or {"Solo": []}
    herd: Herd = make_herd(topology, http=True, start=False)
    herd.config = replace(herd.config, http=HttpSettings(**settings))
    for name in topology:
        herd.start(name)
    wait_until(herd.links_up, what="links up")
    return herd


def http_port(herd: Herd, name: str = "Solo") -> int:
    return herd.config.servers[name].http_port


def server(herd: Herd, name: str = "Solo") -> HerdServer:
    return herd.servers[name]


def connect(herd: Herd, source: str = "127.0.0.1", name: str = "Solo") -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.settimeout(5)
    sock.connect(("127.0.0.1", http_port(herd, name)))
    return sock


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (a reset after its answer counts as the close)."""
    data = b""
    with gevent.Timeout(5, AssertionError(f"not closed; got {data[:200]!r}")):
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                return data
            if not chunk:
                return data
            data += chunk


def exchange(herd: Herd, raw: bytes, source: str = "127.0.0.1") -> bytes:
    sock = connect(herd, source)
    try:
        sock.sendall(raw)
        return read_all(sock)
    finally:
        sock.close()


def get(herd: Herd, path: str, name: str = "Solo", timeout: float = 5) -> requests.Response:
    return requests.get(f"http://127.0.0.1:{http_port(herd, name)}{path}", timeout=timeout)


def log_lines(herd: Herd, name: str, needle: str) -> list[str]:
    server(herd, name).log.flush()
    return [line for line in Path(herd.config.log_path(name)).read_text().splitlines() if needle in line]


@pytest.fixture
def solo(make_herd: Any) -> Herd:
    return http_herd(make_herd)


def poll_health(herd: Herd, stop: Event) -> list[float]:
    """/livez and /readyz, one fresh connection each, until ``stop``: every one must answer within 1 s."""
    seconds = []
    while not stop.is_set():
        for path in ("/livez", "/readyz"):
            started = time.monotonic()
            response = get(herd, path, timeout=1.0)
            seconds.append(time.monotonic() - started)
            assert response.status_code == 200, (path, response.status_code)
            assert seconds[-1] < 1.0, f"{path} took {seconds[-1]:.3f}s"
    return seconds


def test_idle_and_trickling_crowds_leave_livez_answered(solo: Herd) -> None:
    """64 idle connections filled the old handler pool; 300 tricklers more on top reach the
    connection cap (256): the oldest idle ones make room and /livez is answered throughout."""
    idle = [connect(solo, f"127.0.2.{1 + i // 32}") for i in range(64)]
    wait_until(lambda: server(solo).http.wsgi.open == 64, what="64 idle connections held")  # type: ignore[union-attr]
    assert get(solo, "/livez", timeout=1.0).status_code == 200
    tricklers = [connect(solo, f"127.0.3.{1 + i // 30}") for i in range(300)]
    head = b"GET /status HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000
    stop = Event()

    def trickle() -> None:
        for i in range(len(head)):  # one byte per connection every 20 ms: never a whole head
            for sock in tricklers:
                try:
                    sock.send(head[i : i + 1])
                except OSError:
                    pass  # evicted
            if stop.wait(0.02):
                return

    attack = gevent.spawn(trickle)
    health = gevent.spawn(poll_health, solo, stop)
    gevent.sleep(2.0)  # the length of the attack, not a synchronisation
    stop.set()
    seconds = health.get(timeout=5)
    attack.join(timeout=5)
    gate = server(solo).http.wsgi  # type: ignore[union-attr]
    assert len(seconds) >= 4
    assert gate.open <= 256 and gate.evicted >= 64 + 300 - 256
    assert all(addr_count <= 32 for addr_count in gate.per_address.values())
    for sock in idle + tricklers:
        sock.close()


def test_a_trickled_head_is_cut_at_the_deadline_and_logged(make_herd: Any) -> None:
    herd = http_herd(make_herd, head_timeout=0.3)
    sock = connect(herd)
    partial = b"GET /livez HTTP/1.1\r\nHost: x\r\n"
    sock.sendall(partial)  # never the blank line
    assert read_all(sock) == b""  # closed without an answer
    silent = connect(herd)
    assert read_all(silent) == b""  # nothing sent at all: closed too, but that is no bad request
    (line,) = log_lines(herd, "Solo", "event=http_bad_request")
    assert "reason=head_timeout" in line and f"bytes={len(partial)}" in line
    with requests.Session() as session:  # keep-alive between requests is fine under the deadline
        for _ in range(3):
            assert session.get(f"http://127.0.0.1:{http_port(herd)}/livez", timeout=5).status_code == 200


def test_header_floods_get_431_and_are_closed(solo: Herd) -> None:
    """99 header lines of 60 KB (within http.client's limits): the server stops reading at 32 KiB."""
    line = b"X-Flood: " + b"f" * 60_000 + b"\r\n"
    socks = [connect(solo, f"127.0.4.{1 + i // 20}") for i in range(40)]

    def flood(sock: socket.socket) -> None:
        try:
            sock.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\n" + line * 99 + b"\r\n")
        except OSError:
            pass  # closed by the server: expected

    senders = [gevent.spawn(flood, sock) for sock in socks]
    answers = [read_all(sock) for sock in socks]
    gevent.joinall(senders, timeout=5)
    assert all(a.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n") for a in answers), answers[:2]
    assert all(b"Connection: close\r\n" in a and b"X-Content-Type-Options: nosniff\r\n" in a for a in answers)
    assert len(log_lines(solo, "Solo", "reason=head_too_large")) == 40
    for sock in socks:
        sock.close()
    assert get(solo, "/livez").status_code == 200


MALFORMED = [
    (b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(101)) + b"\r\n", "431", "too_many_headers"),
    (b"HELLO\r\n\r\n", "400", "bad_request_line"),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\n\n", "400", "bad_request_line"),  # not HTTP at all
    (b"GET / HTTP/2.0\r\n\r\n", "400", "bad_request_line"),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", "414", "request_line_too_long"),
    (b"GET / HTTP/1.1\r\nno colon here\r\n\r\n", "400", "bad_header_line"),
    (b"GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n", "400", "bad_header_line"),
    (b"GET / HTTP/1.1\r\nX: a\r\n folded\r\n\r\n", "400", "bad_header_line"),
    (b"POST /status HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello", "405", "request_body"),
    (b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", "400", "request_body"),
]


def test_malformed_requests_get_one_log_line_each_and_nothing_on_stderr(
    solo: Herd, capfd: pytest.CaptureFixture[str]
) -> None:
    for raw, status, _ in MALFORMED:
        answer = exchange(solo, raw)
        assert answer.startswith(b"HTTP/1.1 " + status.encode()), (raw[:40], answer[:100])
        assert b"X-Content-Type-Options: nosniff\r\n" in answer
    logged = [re.search(r"reason=(\S+) status=(\d+)", line).groups()  # type: ignore[union-attr]
              for line in log_lines(solo, "Solo", "event=http_bad_request")]  # fmt: skip
    assert logged == [(reason, status) for _, status, reason in MALFORMED]
    assert get(solo, "/livez").status_code == 200
    assert capfd.readouterr().err == ""


def test_herd_and_client_with_servers_down_print_no_traceback(
    make_herd: Any, capfd: pytest.CaptureFixture[str]
) -> None:
    herd = http_herd(make_herd, {"Alford": ["Ball", "Hamilton"], "Ball": [], "Hamilton": []})
    herd.stop("Ball")
    herd.stop("Hamilton")
    for _ in range(3):
        view = get(herd, "/herd", "Alford").json()
        assert view["servers"]["Ball"] == {"name": "Ball", "error": "unreachable (connection failed)"}
        client = get(herd, "/client?id=kiwi", "Alford").json()
        assert client["servers"]["Hamilton"] == {"name": "Hamilton", "error": "unreachable (connection failed)"}
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize("client", ["a\u00a0b", "a\u2028b", "a\u3000b", "a\x1cb", "caf\u00e9"])
def test_client_ids_follow_the_line_protocol_white_space_rule(solo: Herd, client: str) -> None:
    """Only the six ASCII white-space bytes split a protocol line: anything else is part of the id."""
    at = solo.client("Solo").ask(iamat(client.encode()))
    assert at.startswith(b"AT Solo ")
    answer = get(solo, "/client?id=" + requests.utils.quote(client, safe="")).json()
    assert answer == {"client": client, "servers": {"Solo": {"server": "Solo", "at": at.decode().strip()}}}


ASCII_WHITE_SPACE_IDS = ["id=a%20b", "id=a+b", "id=a%09b", "id=a%0Bb", "id=a%0Cb", "id=%0D", "id=a%0A", "id="]


@pytest.mark.parametrize("query", ASCII_WHITE_SPACE_IDS)
def test_client_ids_with_ascii_white_space_are_refused(solo: Herd, query: str) -> None:
    answer = get(solo, f"/client?{query}")
    assert (answer.status_code, answer.text) == (400, "?id=CLIENT (one word) is required\n")


@pytest.mark.parametrize(
    "method, path, status",
    [
        ("GET", "/metrics", 200), ("GET", "/livez", 200), ("GET", "/readyz", 200), ("GET", "/status", 200),
        ("GET", "/herd", 200), ("GET", "/client?id=kiwi", 200), ("GET", "/client", 400), ("GET", "/", 200),
        ("GET", "/nope", 404), ("POST", "/status", 405), ("HEAD", "/livez", 200),
        ("HEAD", "/metrics", 405),  # prometheus_client's own answer: GET only
    ],
)  # fmt: skip
def test_every_answer_says_nosniff(solo: Herd, method: str, path: str, status: int) -> None:
    response = requests.request(method, f"http://127.0.0.1:{http_port(solo)}{path}", timeout=5)
    assert response.status_code == status
    assert response.headers["X-Content-Type-Options"] == NOSNIFF


def test_connections_past_the_per_address_cap_are_closed_at_once(make_herd: Any) -> None:
    herd = http_herd(make_herd, max_connections_per_ip=4)
    held = [connect(herd, "127.0.5.1") for _ in range(4)]
    wait_until(lambda: server(herd).http.wsgi.open == 4, what="4 held")  # type: ignore[union-attr]
    extra = connect(herd, "127.0.5.1")
    assert read_all(extra) == b""  # closed without a word
    other = exchange(herd, b"GET /livez HTTP/1.1\r\nConnection: close\r\n\r\n", "127.0.5.2")
    assert other.startswith(b"HTTP/1.1 200 OK\r\n")
    (line,) = log_lines(herd, "Solo", "event=http_refused")
    assert "reason=per_ip" in line and "peer=127.0.5.1:" in line
    for sock in held:  # still open: a request on each is answered
        sock.sendall(b"GET /livez HTTP/1.1\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 OK\r\n")
        sock.close()


def test_at_the_connection_cap_the_oldest_idle_connection_makes_room(make_herd: Any) -> None:
    herd = http_herd(make_herd, max_connections=8, max_requests=4)
    socks = [connect(herd, f"127.0.6.{i + 1}") for i in range(8)]
    gate = server(herd).http.wsgi  # type: ignore[union-attr]
    wait_until(lambda: gate.open == 8, what="8 held")
    livez = b"GET /livez HTTP/1.1\r\n\r\n"  # keep-alive: each stays open after its answer
    socks[0].sendall(livez)  # the first becomes the newest idle one after this
    assert socks[0].recv(65536).startswith(b"HTTP/1.1 200 OK\r\n")
    for oldest in (1, 2):  # a 9th, a 10th: each closes the one that has waited longest, not socks[0]
        newcomer = connect(herd, "127.0.6.100")
        socks.append(newcomer)
        newcomer.sendall(livez)
        assert newcomer.recv(65536).startswith(b"HTTP/1.1 200 OK\r\n")
        assert read_all(socks[oldest]) == b""
    socks[0].sendall(livez)
    assert socks[0].recv(65536).startswith(b"HTTP/1.1 200 OK\r\n")
    assert gate.open == 8 and gate.evicted == 2
    for sock in socks:
        sock.close()


def test_livez_is_answered_while_every_request_slot_is_taken(make_herd: Any) -> None:
    """One slot, held by a /herd that waits on a neighbor whose HTTP port never answers."""
    herd: Herd = make_herd({"Alford": ["Ball"], "Ball": []}, http=True, start=False)
    herd.config = replace(herd.config, http=HttpSettings(max_requests=1))
    silent = socket.socket()
    silent.bind(("127.0.0.1", http_port(herd, "Ball")))
    silent.listen(8)  # connections complete in the backlog; nothing ever answers
    try:
        herd.start("Alford")
        slots = server(herd, "Alford").http.wsgi.slots  # type: ignore[union-attr]
        view = gevent.spawn(get, herd, "/herd", "Alford")
        wait_until(slots.locked, what="the only request slot taken by /herd")
        assert get(herd, "/livez", "Alford").status_code == 200
        assert get(herd, "/readyz", "Alford").status_code == 200  # answered (links do not count)
        assert not view.ready()  # /herd still waits for Ball's answer
        assert view.get(timeout=5).json()["servers"]["Ball"]["error"] == "no answer in time"
    finally:
        silent.close()


def test_pipelined_and_keep_alive_requests_are_answered_in_order(solo: Herd) -> None:
    sock = connect(solo)
    sock.sendall(b"GET /livez HTTP/1.1\r\n\r\nGET /nope HTTP/1.1\r\n\r\n")
    sock.sendall(b"GET /readyz HTTP/1.1\r\nConnection: close\r\n\r\n")
    answers = read_all(sock).split(b"HTTP/1.1 ")[1:]
    assert [a[:3] for a in answers] == [b"200", b"404", b"200"]
    sock.close()


@pytest.mark.parametrize(
    "raw, end",
    [(b"GET / HTTP/1.1\r\n\r\n", 18), (b"GET / HTTP/1.1\n\nrest", 16), (b"GET / HTTP/1.1\r\nA: b\r\n", -1),
     (b"GET / HTTP/1.1\r\nA: b\n\r\nX", 23)],
)  # fmt: skip
def test_find_head_end(raw: bytes, end: int) -> None:
    assert find_head_end(raw) == end
    # Scanning on from where an earlier, shorter read found no end: the same.
    assert all(find_head_end(raw, start) == end for start in range(end if end >= 0 else len(raw)))


def test_check_head_returns_the_target() -> None:
    assert check_head(b"GET /client?id=x HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n") == b"/client?id=x"
    with pytest.raises(BadHead) as bad:
        check_head(b"PUT / HTTP/1.1\r\ncontent-length:  12 \r\n\r\n")
    assert (bad.value.status, bad.value.reason) == ("405 Method Not Allowed", "request_body")
