"""The herd over real loopback sockets: commands, framing, flooding, outages, logs."""

from __future__ import annotations

import json
import re
import socket
import struct
from collections.abc import Callable

import gevent
import pytest

from herdserver.config import Limits, PlacesSettings
from herdserver.places.google import GoogleNewProvider

from .conftest import FAST_PEERS, TEST_KEY, Herd, iamat, replace, wait_until

KIWI = b"kiwi.cs.ucla.edu"
UCLA = b"+34.068930-118.445127"
AT_LINE = re.compile(rb"AT (\w+) ([+-]\d+\.\d{9}) (\S+) (\S+) (\S+)\n")


def whatsat_parts(reply: bytes) -> tuple[bytes, dict]:
    assert reply.endswith(b"\n\n") and not reply.endswith(b"\n\n\n")
    at_line, _, body = reply.partition(b"\n")
    assert b"\n\n" not in body[:-2]
    return at_line, json.loads(body)


# ------------------------------------------------------------------ IAMAT / WHATSAT


def test_iamat_reply_is_exact(make_herd: Callable[..., Herd]) -> None:
    now = 1479413884_655887836  # pinned server clock: the reply is fully known
    herd = make_herd({"Alford": []}, clock=lambda: now)
    reply = herd.client("Alford").ask(b"IAMAT kiwi.cs.ucla.edu +34.068930-118.445127 1479413884.392014450")
    assert reply == b"AT Alford +0.263873386 kiwi.cs.ucla.edu +34.068930-118.445127 1479413884.392014450\n"


def test_iamat_from_the_future_has_a_negative_difference(make_herd: Callable[..., Herd]) -> None:
    herd = make_herd({"Alford": []}, clock=lambda: 1_000_000_000_000_000_000)
    reply = herd.client("Alford").ask(b"IAMAT a +1-1 1000000000.5")
    assert reply == b"AT Alford -0.500000000 a +1-1 1000000000.5\n"


def test_whatsat_two_hops_away_answers_with_the_origin_at_line(herd: Herd, fake_places) -> None:
    at = herd.client("Alford").ask(iamat())
    wait_until(lambda: herd.holds("Holiday", KIWI), what="Holiday to learn of kiwi")
    client = herd.client("Holiday")
    client.send(b"WHATSAT kiwi.cs.ucla.edu 10 5\n")
    at_line, payload = whatsat_parts(client.read_whatsat())
    assert at_line + b"\n" == at
    assert at_line.startswith(b"AT Alford ")
    assert payload["status"] == "OK"
    assert 1 <= len(payload["results"]) <= 5
    request = fake_places.requests[-1]
    circle = request.json["locationRestriction"]["circle"]
    assert circle["radius"] == 10000
    assert circle["center"] == {"latitude": 34.06893, "longitude": -118.445127}
    assert request.json["maxResultCount"] == 5


def test_whatsat_results_are_cut_to_the_bound(make_herd: Callable[..., Herd]) -> None:
    herd = make_herd({"Alford": []})
    client = herd.client("Alford")
    client.ask(iamat())
    for bound in (1, 3, 20):
        client.send(b"WHATSAT kiwi.cs.ucla.edu 50 %d\n" % bound)
        _, payload = whatsat_parts(client.read_whatsat())
        assert len(payload["results"]) == min(bound, len(payload["results"])) <= bound
    assert len(payload["results"]) > 3  # the fake has enough places for the cut to matter


def test_whatsat_for_an_unknown_client_is_invalid(make_herd: Callable[..., Herd]) -> None:
    herd = make_herd({"Alford": []})
    assert herd.client("Alford").ask(b"WHATSAT nobody 10 5") == b"? WHATSAT nobody 10 5\n"


def test_places_failure_keeps_the_reply_shape(make_herd: Callable[..., Herd], fake_places) -> None:
    herd = make_herd({"Alford": []})
    client = herd.client("Alford")
    at = client.ask(iamat())
    fake_places.fail = "http500"
    client.send(b"WHATSAT kiwi.cs.ucla.edu 10 5\n")
    at_line, payload = whatsat_parts(client.read_whatsat())
    assert at_line + b"\n" == at
    assert payload["results"] == [] and payload["status"] == "UNKNOWN_ERROR" and payload["error_message"]


def test_no_api_key_answers_request_denied(make_herd: Callable[..., Herd], fake_places) -> None:
    herd = make_herd(
        {"Alford": []}, provider_factory=lambda name: GoogleNewProvider(PlacesSettings(base_url=fake_places.url), None)
    )
    client = herd.client("Alford")
    client.ask(iamat())
    client.send(b"WHATSAT kiwi.cs.ucla.edu 10 5\n")
    _, payload = whatsat_parts(client.read_whatsat())
    assert payload["status"] == "REQUEST_DENIED"
    assert "GOOGLE_PLACES_API_KEY" in payload["error_message"]
    assert fake_places.requests == []


def test_a_hung_places_service_does_not_hang_the_client(make_herd: Callable[..., Herd], fake_places) -> None:
    places = PlacesSettings(provider="google", base_url=fake_places.url, timeout=0.3)
    herd = make_herd({"Alford": []}, places=places)
    client = herd.client("Alford")
    client.ask(iamat())
    fake_places.fail = "hang"
    client.send(b"WHATSAT kiwi.cs.ucla.edu 10 5\n")
    _, payload = whatsat_parts(client.read_whatsat())
    assert payload["status"] == "UNKNOWN_ERROR"
    assert client.ask(iamat(b"after")).startswith(b"AT Alford ")


def test_invalid_lines_get_a_question_mark_and_the_session_goes_on(make_herd: Callable[..., Herd]) -> None:
    herd = make_herd({"Alford": []})
    client = herd.client("Alford")
    for bad, expected in [
        (b"  iamat kiwi +1+1 1  ", b"? iamat kiwi +1+1 1\n"),
        (b"HELLO\tthere  world", b"? HELLO\tthere  world\n"),
        (b"IAMAT kiwi +91+1 1", b"? IAMAT kiwi +91+1 1\n"),
        (b"WHATSAT kiwi 51 5", b"? WHATSAT kiwi 51 5\n"),
        (b"IAMAT k\xff +1+1 1", b"? IAMAT k\xff +1+1 1\n"),
        (b"IAMAT kiwi +1+1 nan", b"? IAMAT kiwi +1+1 nan\n"),
    ]:
        assert client.ask(bad) == expected
    assert client.ask(iamat()).startswith(b"AT Alford ")


# ------------------------------------------------------------------ framing


def test_many_commands_pipelined_in_one_write_are_answered_in_order(make_herd: Callable[..., Herd]) -> None:
    herd = make_herd({"Alford": []})
    client = herd.client("Alford")
    lines = [iamat(b"c%d" % i) for i in range(50)] + [b"bogus"]
    client.send(b"\n".join(lines) + b"\n")
    replies = [client.readline() for _ in lines]
    assert [AT_LINE.fullmatch(r).group(3) for r in replies[:-1]] == [b"c%d" % i for i in range(50)]
    assert replies[-1] == b"? bogus\n"


def test_pipelined_whatsats_come_back_in_order(make_herd: Callable[..., Herd]) -> None:
    herd = make_herd({"Alford": []})
    client = herd.client("Alford")
    client.ask(iamat(b"a"))
    client.ask(iamat(b"b", b"+35.0-119.0"))
    client.send(b"WHATSAT a 10 1\nWHATSAT b 10 2\nWHATSAT a 10 3\nbad\n")
    replies = [client.read_whatsat() for _ in range(3)]
    assert [r.split(b" ")[3] for r in replies] == [b"a", b"b", b"a"]
    assert client.readline() == b"? bad\n"


def test_a_command_split_across_writes(make_herd: Callable[..., Herd]) -> None:
    herd = make_herd({"Alford": []}, clock=lambda: 2_000_000_000)
    client = herd.client("Alford")
    for byte in b"IAMAT kiwi +1-1 1\r\n":
        client.send(bytes([byte]))
        gevent.sleep(0)
    assert client.readline() == b"AT Alford +1.000000000 kiwi +1-1 1\n"


def test_last_command_without_newline_then_half_close(make_herd: Callable[..., Herd]) -> None:
    herd = make_herd({"Alford": []}, clock=lambda: 2_000_000_000)
    client = herd.client("Alford")
    client.send(b"IAMAT a +1-1 1\nIAMAT b +1-1 1")
    client.half_close()
    assert client.read_to_eof() == b"AT Alford +1.000000000 a +1-1 1\nAT Alford +1.000000000 b +1-1 1\n"


def test_crlf_tabs_and_blank_lines(make_herd: Callable[..., Herd]) -> None:
    herd = make_herd({"Alford": []}, clock=lambda: 2_000_000_000)
    client = herd.client("Alford")
    client.send(b"\r\n   \n\t\r\n\tIAMAT \t kiwi\t+1-1  1 \r\n")
    client.half_close()
    assert client.read_to_eof() == b"AT Alford +1.000000000 kiwi +1-1 1\n"


def test_an_overlong_line_is_answered_once_and_the_connection_goes_on(make_herd: Callable[..., Herd]) -> None:
    herd = make_herd({"Alford": []}, limits=Limits(max_line_bytes=1024, shutdown_grace=0.5))
    client = herd.client("Alford")
    client.send(b"IAMAT " + b"x" * 100_000)
    reply = client.readline()
    assert reply.startswith(b"? IAMAT xxx") and len(reply) < 1024
    client.send(b"y" * 100_000 + b"\n" + iamat() + b"\n")
    assert client.readline().startswith(b"AT Alford ")
    assert herd.servers["Alford"].connections  # still connected, nothing buffered whole


# ------------------------------------------------------------------ flooding


def _quiescent(herd: Herd) -> bool:
    servers = herd.servers.values()
    sent = sum(f.lines_sent for s in servers for f in s.links.values())
    received = sum(s.stats.at_received for s in servers)
    return sent == received and not any(f.outbox for s in servers for f in s.links.values())


def test_an_update_reaches_every_server_and_crosses_each_link_once_per_direction(herd: Herd) -> None:
    at = herd.client("Ball").ask(iamat())
    for name in herd.servers:
        wait_until(lambda name=name: herd.holds(name, KIWI) == at.rstrip(b"\n"), what=f"{name} to hold kiwi")
    wait_until(lambda: _quiescent(herd), what="the flood to end")
    # Every server forwards a new record once to each neighbor but the one it came
    # from: Ball 2, then one each for the other four; nothing goes back to Ball.
    sent = {(s.name, n): f.lines_sent for s in herd.servers.values() for n, f in s.links.items()}
    assert sum(sent.values()) == 6, sent
    assert sent["Holiday", "Ball"] == sent["Welsh", "Ball"] == 0
    assert sum(s.stats.at_received for s in herd.servers.values()) == 6


def test_older_updates_never_overwrite_newer_ones(herd: Herd) -> None:
    newer = herd.client("Alford").ask(iamat(t=b"1700000000.5")).rstrip(b"\n")
    wait_until(lambda: all(herd.holds(n, KIWI) == newer for n in herd.servers), what="newer everywhere")
    older = herd.client("Holiday").ask(iamat(t=b"1700000000.4"))
    assert older.startswith(b"AT Holiday ")  # still answered ...
    wait_until(lambda: _quiescent(herd), what="the flood to end")
    assert all(herd.holds(n, KIWI) == newer for n in herd.servers)  # ... but changes nothing


def test_concurrent_updates_converge_to_the_same_record_everywhere(herd: Herd) -> None:
    clients = {name: herd.client(name) for name in herd.servers}
    for i in range(20):
        for name, client in clients.items():
            client.send(iamat(b"c%d" % (i % 7), t=b"1700000000.%09d" % (i * 10 + len(name))) + b"\n")
    for client in clients.values():
        for _ in range(20):
            client.readline()
    wait_until(lambda: _quiescent(herd), what="the flood to end")
    tables = [s.store.snapshot() for s in herd.servers.values()]
    assert len(tables[0]) == 7
    assert all(table == tables[0] for table in tables)


def test_a_down_neighbor_never_delays_clients_and_its_outbox_stays_bounded(herd: Herd) -> None:
    herd.stop("Hamilton")
    alford = herd.servers["Alford"]
    wait_until(lambda: not alford.links["Hamilton"].up.is_set(), what="Alford to see Hamilton down")
    client = herd.client("Alford", timeout=2.0)
    for i in range(300):
        client.send(iamat(b"c%d" % (i % 30), t=b"1700000000.%09d" % i) + b"\n")
    for _ in range(300):
        assert client.readline().startswith(b"AT Alford ")
    assert len(alford.links["Hamilton"].outbox) == 30  # latest per client, not every update


def test_a_restarted_server_catches_up_without_new_updates(herd: Herd) -> None:
    herd.stop("Hamilton")
    alford = herd.client("Alford")
    posted = [alford.ask(iamat(b"while-down-%d" % i)).rstrip(b"\n") for i in range(25)]
    wait_until(lambda: all(herd.holds("Holiday", b"while-down-%d" % i) for i in range(25)), what="Holiday")
    herd.start("Hamilton")
    wait_until(
        lambda: all(herd.holds("Hamilton", b"while-down-%d" % i) == line for i, line in enumerate(posted)),
        what="Hamilton to catch up by full sync",
    )
    assert herd.servers["Alford"].stats.iamat == 25  # nothing new was posted to make it happen


def test_any_topology_works_from_config_alone(make_herd: Callable[..., Herd]) -> None:
    line = {f"S{i}": [f"S{i + 1}"] for i in range(6)}
    line["S6"] = []
    herd = make_herd(line)
    at = herd.client("S0").ask(iamat()).rstrip(b"\n")
    wait_until(lambda: herd.holds("S6", KIWI) == at, what="six hops")


TRUSTED_LOCAL = replace(FAST_PEERS, trusted=("127.0.0.1",))  # AT lines on the client port, as a foreign peer's


def test_invalid_at_from_a_peer_is_rejected_and_not_stored(make_herd: Callable[..., Herd]) -> None:
    herd = make_herd({"Alford": []}, peers=TRUSTED_LOCAL)
    client = herd.client("Alford")
    assert client.ask(b"AT Alford +0.1 kiwi +91+0 1") == b"? AT Alford +0.1 kiwi +91+0 1\n"
    client.send(b"AT Alford +0.100000000 kiwi +10+10 5\n")
    wait_until(lambda: herd.holds("Alford", b"kiwi"), what="valid AT stored")
    assert herd.holds("Alford", b"kiwi") == b"AT Alford +0.100000000 kiwi +10+10 5"


def test_a_repeated_at_line_is_dropped_and_not_flooded_again(make_herd: Callable[..., Herd]) -> None:
    herd = make_herd({"Alford": ["Ball"], "Ball": []}, peers=TRUSTED_LOCAL)
    alford, ball = herd.servers["Alford"], herd.servers["Ball"]
    client = herd.client("Alford")
    # A record naming Ball, sent to Alford: it reaches Ball too (the server named
    # in a record is not skipped), and Ball does not send it back where it came from.
    line = b"AT Ball +0.100000000 kiwi +10+10 5"
    client.send(line + b"\n")
    wait_until(lambda: herd.holds("Ball", b"kiwi") == line, what="Ball to hold the record")
    # The same record again, once as sent and once spaced differently: both are echoes.
    client.send(line + b"\n" + line.replace(b" ", b" \t ") + b"\n")
    wait_until(lambda: alford.stats.at_received == 3, what="Alford to read every copy")
    assert alford.stats.at_stored == 1
    assert alford.links["Ball"].lines_sent == 1
    assert ball.stats.at_received == 1 and ball.links["Alford"].lines_sent == 0
    # A different record for the same client still goes through.
    newer = b"AT Ball +0.100000000 kiwi +10+10 6"
    client.send(newer + b"\n")
    wait_until(lambda: herd.holds("Ball", b"kiwi") == newer, what="the newer record at Ball")


# ------------------------------------------------------------------ logs and lifecycle


def test_log_file_records_lines_connections_links_and_places(herd: Herd) -> None:
    client = herd.client("Alford")
    client.ask(iamat(b"evil\x1b[2J\rforged"))
    client.ask(iamat())
    client.send(b"WHATSAT kiwi.cs.ucla.edu 10 2\n")
    client.read_whatsat()
    client.close()
    alford = herd.servers["Alford"]
    wait_until(lambda: not alford.connections or len(alford.connections) <= 2, what="close")
    herd.client("Hamilton").ask(iamat(b"from-hamilton"))
    wait_until(lambda: herd.holds("Alford", b"from-hamilton"), what="Hamilton's record at Alford")
    herd.stop("Hamilton")
    wait_until(lambda: not alford.links["Hamilton"].up.is_set(), what="link down")
    alford.log.flush()
    text = open(herd.config.log_path("Alford"), encoding="utf-8").read()
    for pattern in [
        r"event=start address=127\.0\.0\.1:\d+ neighbors=Hamilton,Welsh provider=google",
        r"event=link_up neighbor=Hamilton",
        r'event=out neighbor=Hamilton line="AT Alford [+-]\d+\.\d{9} kiwi\.cs\.ucla\.edu ',
        r'event=in neighbor=Hamilton line="AT Hamilton [+-]\d+\.\d{9} from-hamilton ',
        r"event=link_down neighbor=Hamilton",
        r"event=open conn=\d+ peer=127\.0\.0\.1:\d+",
        r"event=close conn=\d+ reason=eof",
        r'event=in conn=\d+ line="IAMAT kiwi.cs.ucla.edu ',
        r'event=out conn=\d+ data="AT Alford ',
        r"event=places provider=google status=OK results=2 ms=\d+\.\d",
        r'line="IAMAT evil\\x1b\[2J\\rforged ',
    ]:
        assert re.search(pattern, text), pattern
    line_shape = re.compile(r"\d{4}-\d\d-\d\dT[\d:.]+Z (INFO|DEBUG|WARNING|ERROR) Alford event=")
    assert all(line_shape.match(line) for line in text.splitlines())
    assert TEST_KEY not in text


def test_stop_closes_idle_clients_promptly_and_refuses_new_ones(make_herd: Callable[..., Herd]) -> None:
    herd = make_herd({"Alford": []})
    idle = herd.client("Alford")
    idle.ask(iamat())
    address = herd.address("Alford")
    with gevent.Timeout(2):
        herd.stop("Alford")
    assert idle.read_to_eof() == b""
    with pytest.raises(OSError):
        herd.client("Alford")
    assert address == herd.address("Alford")


def _handlers(herd: Herd, name: str = "Alford") -> int:
    """Client handler greenlets running in a server (parked clients have none)."""
    return len(herd.servers[name].clients.handlers)


def test_idle_clients_hold_no_greenlet_until_they_speak(make_herd: Callable[..., Herd]) -> None:
    herd = make_herd({"Alford": []})
    server = herd.servers["Alford"]
    clients = [herd.client("Alford") for _ in range(20)]
    wait_until(lambda: len(server.connections) == 20, what="20 connections accepted")
    assert _handlers(herd) == 0
    assert clients[7].ask(iamat()).startswith(b"AT Alford ")
    assert _handlers(herd) == 1 and len(server.connections) == 20


def test_a_quiet_client_is_parked_again_and_keeps_its_half_line(make_herd: Callable[..., Herd]) -> None:
    herd = make_herd({"Alford": []}, limits=Limits(park_after=0.05), clock=lambda: 2_000_000_000)
    client = herd.client("Alford")
    assert client.ask(b"IAMAT a +1-1 1") == b"AT Alford +1.000000000 a +1-1 1\n"
    client.send(b"IAMAT b +1")  # half a line, then quiet
    wait_until(lambda: _handlers(herd) == 0, what="the quiet client to be parked")
    client.send(b"-1 1\n")
    assert client.readline() == b"AT Alford +1.000000000 b +1-1 1\n"
    wait_until(lambda: _handlers(herd) == 0, what="parked once more")
    client.half_close()
    assert client.read_to_eof() == b""


def test_a_client_past_max_connections_takes_the_quietest_ones_place(make_herd: Callable[..., Herd]) -> None:
    herd = make_herd({"Alford": []}, limits=Limits(max_connections=2))
    server = herd.servers["Alford"]
    first, second = herd.client("Alford"), herd.client("Alford")
    wait_until(lambda: len(server.connections) == 2, what="two connections accepted")
    third = herd.client("Alford")
    assert third.ask(iamat(b"third")).startswith(b"AT Alford ")  # served at once, not refused
    assert first.read_to_eof() == b""  # the oldest without a command made room
    assert len(server.connections) == 2 and server.clients.evicted == 1
    assert second.ask(iamat()).startswith(b"AT Alford ")


def test_idle_timeout_drops_silent_and_quiet_clients(make_herd: Callable[..., Herd]) -> None:
    herd = make_herd({"Alford": []}, limits=Limits(idle_timeout=0.3, park_after=0.05))
    silent, quiet = herd.client("Alford"), herd.client("Alford")
    assert quiet.ask(iamat()).startswith(b"AT Alford ")
    assert silent.read_to_eof() == b"" and quiet.read_to_eof() == b""
    wait_until(lambda: not herd.servers["Alford"].connections, what="both closed")
    herd.servers["Alford"].log.flush()
    text = open(herd.config.log_path("Alford"), encoding="utf-8").read()
    assert text.count("reason=idle_timeout") == 2


def test_clients_that_reset_at_once_leave_nothing_behind(make_herd: Callable[..., Herd]) -> None:
    herd = make_herd({"Alford": []})
    server = herd.servers["Alford"]
    for _ in range(50):
        client = herd.client("Alford")
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()  # RST instead of FIN
    wait_until(lambda: not server.connections, what="every reset connection closed")
    assert herd.client("Alford").ask(iamat()).startswith(b"AT Alford ")
    assert server.stats.crashes == []


def test_many_clients_at_once(make_herd: Callable[..., Herd]) -> None:
    herd = make_herd({"Alford": []})
    clients = [herd.client("Alford") for _ in range(200)]

    def talk(i: int) -> bytes:
        return clients[i].ask(iamat(b"c%d" % i))

    jobs = [gevent.spawn(talk, i) for i in range(200)]
    gevent.joinall(jobs, timeout=10, raise_error=True)
    assert [AT_LINE.fullmatch(job.value).group(3) for job in jobs] == [b"c%d" % i for i in range(200)]
    assert len(herd.servers["Alford"].store) == 200


def test_more_pipelined_whatsats_than_run_at_once_all_come_back_in_order(
    make_herd: Callable[..., Herd], fake_places
) -> None:
    herd = make_herd({"Alford": []})
    nearby = len(fake_places.within(34.06893, -118.445127, 10_000))
    client = herd.client("Alford")
    for name in (b"a", b"b", b"c"):
        client.ask(iamat(name))
    names = [b"abc"[i % 3 : i % 3 + 1] for i in range(70)]  # 70 > MAX_PIPELINED_WHATSAT
    client.send(b"".join(b"WHATSAT %s 10 %d\n" % (name, 1 + i % 20) for i, name in enumerate(names)))
    for i, name in enumerate(names):
        at_line, payload = whatsat_parts(client.read_whatsat())
        assert at_line.split(b" ")[3] == name
        assert len(payload["results"]) == min(1 + i % 20, nearby)

