"""Forgers and hogs: bounded times, authenticated links, who may send AT, connection and write limits."""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gevent
import pytest

from herdserver.config import Limits, PeerSettings
from herdserver.core import limits

from .conftest import FAST_PEERS, Herd, LineClient, iamat, replace, wait_until
from .test_cli import ROOT, accepting, free_ports

KIWI = b"kiwi.cs.ucla.edu"


def now_s(offset: float = 0.0) -> bytes:
    return b"%.9f" % (time.time() + offset)


def client_from(herd: Herd, name: str, source_ip: str) -> LineClient:
    """A client whose connection comes from another loopback address."""
    sock = socket.create_connection(herd.address(name), timeout=5, source_address=(source_ip, 0))
    client = LineClient.__new__(LineClient)
    client.sock, client.timeout, client.buffer = sock, 5.0, b""
    herd.clients.append(client)
    return client


# ------------------------------------------------------------------ bounded times


def test_a_time_far_in_the_future_cannot_pin_a_client(make_herd: Callable[..., Herd]) -> None:
    herd = make_herd({"Alford": ["Ball"], "Ball": []})
    client = herd.client("Alford")
    pin = b"IAMAT victim +48.858370+002.294481 253402300799"  # the year 9999
    assert client.ask(pin) == b"? " + pin + b"\n"
    ahead = iamat(b"victim", t=now_s(+61))
    assert client.ask(ahead) == b"? " + ahead + b"\n"
    assert client.ask(iamat(b"victim", t=now_s(+50))).startswith(b"AT Alford -")  # within the skew
    honest = client.ask(iamat(b"victim")).rstrip(b"\n")
    assert herd.holds("Alford", b"victim") != honest  # the +50 s one is newer: that is the order
    assert client.ask(b"IAMAT v +1+1 123456789012") == b"? IAMAT v +1+1 123456789012\n"  # 12 digits


def test_an_at_line_from_a_neighbor_beyond_the_skew_is_dropped_not_forwarded(make_herd: Callable[..., Herd]) -> None:
    herd = make_herd({"Alford": ["Ball"], "Ball": []}, peers=replace(FAST_PEERS, trusted=("127.0.0.1",)))
    client = herd.client("Alford")
    future = b"AT Alford +0.000000000 victim +1+1 " + now_s(+3600)
    client.send(future + b"\n" + b"AT Alford +0.000000000 marker +1+1 " + now_s() + b"\n")
    wait_until(lambda: herd.holds("Ball", b"marker"), what="the marker record at Ball")
    assert herd.holds("Alford", b"victim") is None and herd.holds("Ball", b"victim") is None
    assert herd.servers["Alford"].stats.at_future == 1


def test_an_at_line_naming_a_server_not_in_herd_ini_is_invalid(make_herd: Callable[..., Herd]) -> None:
    herd = make_herd({"Alford": []})
    forged = b"AT Mallory +0.0 victim +48.858370+002.294481 " + now_s()
    assert herd.client("Alford").ask(forged) == b"? " + forged + b"\n"
    assert herd.holds("Alford", b"victim") is None


# ------------------------------------------------------------------ who may send AT lines


def test_with_a_secret_a_plain_client_cannot_inject_but_the_herd_floods(make_herd: Callable[..., Herd]) -> None:
    herd = make_herd(secret="s3cret")
    forged = b"AT Alford +0.000000000 victim +48.858370+002.294481 " + now_s()
    for name in herd.servers:
        assert herd.client(name).ask(forged) == b"? " + forged + b"\n"
    at = herd.client("Ball").ask(iamat()).rstrip(b"\n")
    wait_until(lambda: all(herd.holds(n, KIWI) == at for n in herd.servers), what="the flood over authenticated links")
    assert all(herd.holds(n, b"victim") is None for n in herd.servers)
    text = (Path(herd.config.log_dir) / "Alford.log").read_text()
    assert "s3cret" not in text and "event=peer_authenticated" in text


def test_servers_with_different_secrets_do_not_link(make_herd: Callable[..., Herd]) -> None:
    herd = make_herd({"Alford": ["Ball"], "Ball": []}, secret={"Alford": "one", "Ball": "two"}, wait_links=False)
    herd.client("Alford").ask(iamat())
    alford = herd.servers["Alford"]
    log = Path(herd.config.log_dir) / "Alford.log"
    wait_until(lambda: (alford.log.flush(), "event=auth_failed" in log.read_text())[1], what="auth_failed logged")
    assert herd.holds("Ball", KIWI) is None


def test_rotation_old_and_new_secrets_overlap(make_herd: Callable[..., Herd]) -> None:
    # Mid-rotation: one server already proves with the new secret, the other still
    # with the old; each accepts both, so the links stay up.
    herd = make_herd({"Alford": ["Ball"], "Ball": []}, secret={"Alford": "new,old", "Ball": "old, new"})
    at = herd.client("Alford").ask(iamat()).rstrip(b"\n")
    wait_until(lambda: herd.holds("Ball", KIWI) == at, what="Alford's record at Ball")
    at = herd.client("Ball").ask(iamat(b"other")).rstrip(b"\n")
    wait_until(lambda: herd.holds("Alford", b"other") == at, what="Ball's record at Alford")


@pytest.mark.parametrize("secret_file", ["herd.secret", None])
def test_the_client_port_takes_at_lines_only_from_foreign_or_trusted_addresses(
    make_herd: Callable[..., Herd], secret_file: str | None
) -> None:
    """The herd's own address is no longer enough (on one host it is every process),
    with the default secret file and even with links opted out of authentication."""
    herd = make_herd({"Alford": ["Ball"], "Ball": []}, secret_file=secret_file)
    line = b"AT Alford +0.000000000 kiwi +1+1 " + now_s()
    for source in ("127.0.0.1", "127.0.0.2"):
        assert client_from(herd, "Alford", source).ask(line) == b"? " + line + b"\n"
    for word in (b"HELLO herdserver/2 Ball Alford b n", b"AUTH x", b"SYNC ASK 0", b"BYE"):
        assert herd.client("Alford").ask(word) == b"? " + word + b"\n"
    assert herd.holds("Alford", b"kiwi") is None


def test_a_foreign_neighbor_may_send_at_lines_on_the_client_port(make_herd: Callable[..., Herd]) -> None:
    herd = make_herd({"Alford": ["Other"], "Other": []}, foreign=("Other",), wait_links=False)
    line = b"AT Alford +0.000000000 kiwi +1+1 " + now_s()
    herd.client("Alford").send(line + b"\n")  # 127.0.0.1: Other's host
    wait_until(lambda: herd.holds("Alford", b"kiwi") == line, what="the foreign neighbor's AT line")


def test_trusted_foreign_peers_may_send_at_with_a_secret(make_herd: Callable[..., Herd]) -> None:
    peers: PeerSettings = replace(FAST_PEERS, trusted=("127.0.0.3",))
    herd = make_herd({"Alford": []}, peers=peers, secret="s")
    line = b"AT Alford +0.000000000 kiwi +1+1 " + now_s()
    assert herd.client("Alford").ask(line) == b"? " + line + b"\n"
    client_from(herd, "Alford", "127.0.0.3").send(line + b"\n")
    wait_until(lambda: herd.holds("Alford", b"kiwi"), what="the trusted peer's AT line")


# ------------------------------------------------------------------ connection limits


def test_connections_per_address_are_capped(make_herd: Callable[..., Herd]) -> None:
    herd = make_herd({"Alford": []}, limits=Limits(max_connections_per_ip=3, shutdown_grace=0.5))
    server = herd.servers["Alford"]
    hogs = [herd.client("Alford") for _ in range(3)]
    wait_until(lambda: len(server.connections) == 3, what="three connections")
    assert _closed_at_once(herd.client("Alford"))
    assert len(server.connections) == 3
    other = client_from(herd, "Alford", "127.0.0.2")  # another address is still served
    assert other.ask(iamat()).startswith(b"AT Alford ")
    assert hogs[0].ask(iamat(b"h")).startswith(b"AT Alford ")


def _closed_at_once(client: LineClient) -> bool:
    try:
        return client.read_to_eof() == b""
    except ConnectionResetError:
        return True


def test_a_trickled_line_must_complete_within_line_timeout(make_herd: Callable[..., Herd]) -> None:
    herd = make_herd({"Alford": []}, limits=Limits(line_timeout=0.3, park_after=0.05, shutdown_grace=0.5))
    trickler = herd.client("Alford")
    started = time.monotonic()
    sent = 0
    with pytest.raises((BrokenPipeError, ConnectionResetError)):
        for byte in b"IAMAT trickle +1+1 1" * 100:  # bounded: at most 2,000 bytes, 0.02 s apart
            trickler.send(bytes([byte]))
            sent += 1
            gevent.sleep(0.02)
    assert time.monotonic() - started < 5 and sent > 10  # cut while it kept sending
    assert herd.client("Alford").ask(iamat()).startswith(b"AT Alford ")
    herd.servers["Alford"].log.flush()
    assert "reason=line_timeout" in (Path(herd.config.log_dir) / "Alford.log").read_text()


def test_a_client_that_never_reads_stops_costing_and_is_dropped(make_herd: Callable[..., Herd], fake_places) -> None:
    herd = make_herd({"Alford": []}, limits=Limits(write_timeout=0.5, shutdown_grace=0.5))
    herd.client("Alford").ask(iamat())
    hog = herd.client("Alford")
    hog.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)  # so the test's own kernel holds little
    request = b"WHATSAT kiwi.cs.ucla.edu 50 20\n" * 100
    sent = 0
    hog.sock.settimeout(2.0)
    try:
        for _ in range(10_000):  # bounded (31 MB at most); the server stops reading long before
            hog.sock.sendall(request)
            sent += 100
    except OSError:
        pass  # held by back-pressure for 2 s, or dropped by the server (write_timeout)
    assert sent < 100_000  # the server stopped reading its commands
    assert len(fake_places.requests) < 1000  # and it did not ask Places for answers nobody reads
    wait_until(lambda: herd.servers["Alford"].clients.dropped_slow == 1, what="the hog dropped")
    assert herd.client("Alford").ask(iamat(b"honest")).startswith(b"AT Alford ")


def test_max_connections_comes_from_the_descriptor_limit() -> None:
    assert limits.max_connections(0, 1024, 2, 100) == 1024 - 64 - 4 - 100
    assert limits.max_connections(50, 1024, 2, 100) == 50
    assert limits.max_connections(5000, 1024, 2, 100) == 856
    assert limits.max_connections(0, 10, 2, 100) == 1


def test_a_server_at_its_descriptor_limit_makes_room_and_keeps_serving(tmp_path: Path) -> None:
    port, herd_port = free_ports(2)  # herd_port too: port + 2000 may be taken
    ini = tmp_path / "herd.ini"
    ini.write_text(
        "[herd]\nlog_dir = logs\nstate_dir = -\n[places]\nprovider = google\napi_key_env = K\n"
        f"base_url = http://127.0.0.1:9\npool_size = 4\n[server:Alford]\nport = {port}\n"
        f"herd_port = {herd_port}\n"
    )

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (200, 200))

    proc = subprocess.Popen(
        [sys.executable, "-m", "herdserver", "Alford", "--config", str(ini)],
        cwd=ROOT, env=dict(os.environ, K="k"), stderr=subprocess.PIPE, preexec_fn=low_limit,
    )  # fmt: skip
    socks: list[socket.socket] = []
    try:
        wait_until(lambda: accepting(port), 10.0, what="the server to listen")
        for i in range(300):  # more than the process has descriptors for
            source = "127.0.0.%d" % (2 + i % 50)  # many addresses: the per-address cap is not what trips
            try:
                socks.append(socket.create_connection(("127.0.0.1", port), timeout=2, source_address=(source, 0)))
            except ConnectionResetError:
                pass  # not expected: a full server closes its quietest connection instead
        assert _answers(port)  # within 1 s, while the crowd fills every slot: the quietest made room
    finally:
        for sock in socks:
            sock.close()
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert b"Too many open files" not in err and b"EMFILE" not in err
    log = (tmp_path / "logs" / "Alford.log").read_text()
    assert "event=evicted" in log and "reason=evicted" in log and "event=refused" not in log


def _answers(port: int) -> bool:
    try:
        client = LineClient(("127.0.0.1", port), timeout=1)
        ok = client.ask(iamat(b"honest")).startswith(b"AT Alford ")
        client.close()
        return ok
    except (OSError, AssertionError):
        return False



def test_a_slow_reader_is_held_back_then_gets_every_reply_in_order(make_herd: Callable[..., Herd], fake_places) -> None:
    herd = make_herd({"Alford": []})
    herd.client("Alford").ask(iamat())
    reader = herd.client("Alford", timeout=10)
    reader.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)  # a small window, as a phone's
    count = 2000
    reader.send(b"".join(b"WHATSAT kiwi.cs.ucla.edu 50 %d\n" % (1 + i % 20) for i in range(count)))
    clients = herd.servers["Alford"].clients
    wait_until(lambda: clients.held_back >= 1, what="the server to wait for the client to read")
    asked = len(fake_places.requests)
    assert asked < count // 4  # it stopped asking Places for replies nobody has read yet
    bounds = []
    for _ in range(count):  # now it reads: every reply comes, in order
        payload = json.loads(reader.read_whatsat().split(b"\n", 1)[1])
        bounds.append(len(payload["results"]))
    within = bounds[19]  # asked with bound 20: every place the fake has in the circle
    assert within > 3 and bounds == [min(1 + i % 20, within) for i in range(count)]
    assert clients.dropped_slow == 0


def test_a_deep_pipeline_shares_a_few_places_slots_and_still_gets_every_answer(
    make_herd: Callable[..., Herd], fake_places
) -> None:
    """One client pipelining many WHATSATs cannot hold more than the fast few plus the
    shared deep lane's Places calls at once; every answer still comes, in order."""
    from herdserver.net import clients, whatsat

    herd = make_herd({"Alford": []})
    herd.client("Alford").ask(iamat())
    fake_places.latency = 0.05
    fake_places.reset()
    client = herd.client("Alford", timeout=10)
    count = 60
    client.send(b"WHATSAT kiwi.cs.ucla.edu 10 1\n" * count)
    for _ in range(count):
        assert client.read_whatsat().startswith(b"AT Alford ")
    assert clients.FAST_PER_BATCH + whatsat.DEEP_LANE_CALLS < clients.MAX_PIPELINED_WHATSAT  # so this means something
    assert fake_places.max_in_flight <= clients.FAST_PER_BATCH + whatsat.DEEP_LANE_CALLS
    assert len(fake_places.requests) == count


def test_a_herd_host_that_resolves_only_later_is_trusted_once_it_does(
    make_herd: Callable[..., Herd], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A foreign neighbor's address comes from its host name; one that did not resolve
    at start (a container started later) is looked up again before refusing."""
    from herdserver import server
    from herdserver.net import commands

    answers = [frozenset()]  # at start: nothing resolves
    monkeypatch.setattr(server, "herd_addresses", lambda config, foreign_only=False: answers[0])
    herd = make_herd({"Alford": ["Other"], "Other": []}, foreign=("Other",), wait_links=False)
    line = b"AT Alford +0.000000000 kiwi +1+1 " + now_s()
    monkeypatch.setattr(commands, "TRUST_REFRESH_SECONDS", 3600.0)
    assert herd.client("Alford").ask(line) == b"? " + line + b"\n"  # not resolvable, and not asked again yet
    answers[0] = frozenset({"127.0.0.1"})  # the name resolves now
    monkeypatch.setattr(commands, "TRUST_REFRESH_SECONDS", 0.0)
    herd.client("Alford").send(line + b"\n")
    wait_until(lambda: herd.holds("Alford", b"kiwi"), what="the AT line once the herd's name resolves")


# ------------------------------------------------------------------ the herd port: proof first


def _listener_on_herd_port(herd: Herd, name: str, answer: bytes | None) -> tuple[Any, list[bytes]]:
    """A process of someone else's on a stopped neighbor's herd port: it answers every
    line with ``answer`` (None: says nothing) and keeps all it was sent."""
    from gevent.server import StreamServer

    received: list[bytes] = []

    def handle(sock: socket.socket, address: Any) -> None:
        while chunk := sock.recv(65536):
            received.append(chunk)
            if answer is not None:
                sock.sendall(answer)

    server = StreamServer(("127.0.0.1", herd.config.servers[name].herd_port), handle)
    server.start()
    return server, received


@pytest.mark.parametrize("secret", ["s3cret", None])  # an explicit secret, and the default secret file
@pytest.mark.parametrize("answer", [b"? HELLO\n", None])
def test_a_listener_on_a_stopped_neighbors_herd_port_gets_nothing(
    make_herd: Callable[..., Herd], secret: str | None, answer: bytes | None
) -> None:
    herd = make_herd({"Alford": ["Ball"], "Ball": []}, secret=secret, start=False)
    herd.start("Alford")
    impostor, received = _listener_on_herd_port(herd, "Ball", answer)
    try:
        for i in range(20):
            herd.client("Alford").ask(iamat(b"c%d" % i))
        link = herd.servers["Alford"].links["Ball"]
        wait_until(lambda: link.auth_failures >= 2 or (answer is None and link.links_made >= 2), 10,
                   what="a few refused handshakes")  # fmt: skip
        data = b"".join(received)
        assert b"AT " not in data and b"SYNC" not in data and not link.up.is_set()
        assert all(line.startswith(b"HELLO herdserver/2 Alford Ball ") for line in data.splitlines())
    finally:
        impostor.stop()


def test_an_unproven_peer_on_the_herd_port_changes_nothing(make_herd: Callable[..., Herd]) -> None:
    """It may claim a neighbor's name and send AT lines before (or instead of) the proof:
    no record is stored or overwritten, no link goes up, and it is told nothing."""
    herd = make_herd({"Alford": ["Ball", "Gibson"], "Ball": [], "Gibson": []}, start=False)
    herd.start("Alford")
    herd.start("Ball")
    wait_until(lambda: herd.servers["Alford"].links["Ball"].up.is_set(), what="Alford-Ball up")
    real = herd.client("Ball").ask(iamat(b"victim")).rstrip(b"\n")
    wait_until(lambda: herd.holds("Alford", b"victim") == real, what="the real record at Alford")
    alford = herd.servers["Alford"]
    gibson = alford.links["Gibson"]
    received_before = alford.stats.at_received  # the real record's
    forged = b"AT Gibson +0.000000000 victim +1+1 " + now_s(+1)
    newcomer = b"AT Gibson +0.000000000 newcomer +1+1 " + now_s()
    for hello in (b"HELLO herdserver/2 Gibson Alford boot n\n", b"HELLO herdserver/1 Gibson b n\n", b""):
        for _ in range(5):
            with socket.create_connection(("127.0.0.1", herd.config.servers["Alford"].herd_port), timeout=5) as sock:
                sock.sendall(hello + forged + b"\n" + newcomer + b"\n" + b"AUTH 00\nSYNC ASK 0\nBYE\n")
                sock.settimeout(5)
                said = b""
                while chunk := sock.recv(65536):
                    said += chunk
                assert b"AT " not in said and b"HAVE" not in said
    assert herd.holds("Alford", b"victim") == real and herd.holds("Alford", b"newcomer") is None
    assert not gibson.up.is_set() and gibson.recoveries == 0 and alford.stats.at_received == received_before
    assert alford.herd_port.auth_failures == 15
    assert not any(e["neighbor"] == "Gibson" and e["event"] == "link_up" for e in alford.events.snapshot())
