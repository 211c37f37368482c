"""The client port when it is full: the quietest connection makes room for a newcomer."""

from __future__ import annotations

import random
import socket
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gevent

from herdserver.config import Limits
from herdserver.core.limits import evictable
from herdserver.net.clients import FAST_PER_BATCH
from herdserver.net.whatsat import DEEP_LANE_CALLS

from .conftest import Herd, LineClient, iamat, wait_until
from .test_security import client_from

CROWD = [f"127.0.1.{i}" for i in range(1, 51)]  # 50 addresses, each well under the per-address cap


def _closed(client: LineClient) -> bool:
    try:
        return client.read_to_eof() == b""
    except ConnectionResetError:
        return True


def _log(herd: Herd, name: str) -> str:
    herd.servers[name].log.flush()
    return (Path(herd.config.log_dir) / f"{name}.log").read_text()


def test_a_crowd_from_many_addresses_cannot_lock_honest_clients_out(make_herd: Callable[..., Herd]) -> None:
    herd = make_herd({"Alford": []}, limits=Limits(max_connections=30, max_connections_per_ip=3, shutdown_grace=0.5))
    server = herd.servers["Alford"]
    crowd = [client_from(herd, "Alford", source) for source in CROWD for _ in range(2)]  # 100 for 30 slots
    crowd[-1].send(b"IAMAT half a li")  # trickling counts as quiet too
    wait_until(lambda: server.clients.evicted == len(crowd) - 30, what="the crowd to fill every slot")
    assert len(server.connections) == 30
    assert all(_closed(client) for client in crowd[:70])  # the oldest went first
    for k in range(10):  # every honest newcomer is answered within a second, the crowd still pushing
        honest = client_from(herd, "Alford", "127.0.0.2")
        honest.timeout = 1.0
        assert honest.ask(iamat(b"honest%d" % k)).startswith(b"AT Alford ")
        honest.close()
        crowd.append(client_from(herd, "Alford", CROWD[k]))
    assert all(_closed(client) for client in crowd[70:80])
    assert len(server.connections) <= 30
    log = _log(herd, "Alford")
    assert "event=evicted" in log and "event=refused" not in log
    assert log.count("event=evicted") < 10  # throttled: 1, 2, 4, 8 ... of 90 or so


def test_eviction_spares_the_recently_active(make_herd: Callable[..., Herd]) -> None:
    herd = make_herd({"Alford": []}, limits=Limits(max_connections=3, shutdown_grace=0.5))
    server = herd.servers["Alford"]
    old, middle, young = herd.client("Alford"), herd.client("Alford"), herd.client("Alford")
    wait_until(lambda: len(server.connections) == 3, what="three connections")
    middle.send(b"IAMAT half")  # served, waiting in recv for the rest of its line (not parked)
    wait_until(lambda: sum(conn.waiting for conn in server.connections.values()) == 1, what="middle served")
    assert old.ask(iamat(b"old")).startswith(b"AT Alford ")  # the oldest connection, the latest command
    first = herd.client("Alford")
    assert first.ask(iamat(b"first")).startswith(b"AT Alford ")
    assert _closed(middle)
    second = herd.client("Alford")
    assert second.ask(iamat(b"second")).startswith(b"AT Alford ")
    assert _closed(young)
    assert old.ask(iamat(b"old")).startswith(b"AT Alford ")  # never quiet the longest: still here
    assert server.clients.evicted == 2


def test_a_connection_being_served_is_not_evicted(make_herd: Callable[..., Herd]) -> None:
    herd = make_herd({"Alford": []}, limits=Limits(max_connections=1, write_timeout=10, shutdown_grace=0.5))
    clients = herd.servers["Alford"].clients
    busy = herd.client("Alford")
    busy.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    busy.sock.settimeout(0.5)
    line = iamat(b"busy") + b"\n"
    try:
        for _ in range(200):  # bounded: 2 MB of IAMATs, replies never read
            busy.sock.sendall(line * 128)
    except OSError:
        pass  # held back: the server stopped reading while its replies wait
    wait_until(lambda: any(conn.busy for conn in clients.connections.values()), what="the reader to be served")
    assert _closed(herd.client("Alford"))  # refused: the only connection is being served
    assert clients.refused == 1 and clients.evicted == 0
    assert "reason=full" in _log(herd, "Alford")


def test_the_per_address_cap_still_refuses_on_a_full_server(make_herd: Callable[..., Herd]) -> None:
    herd = make_herd({"Alford": []}, limits=Limits(max_connections=4, max_connections_per_ip=2, shutdown_grace=0.5))
    clients = herd.servers["Alford"].clients
    hogs = [client_from(herd, "Alford", "127.0.1.1") for _ in range(2)]
    others = [client_from(herd, "Alford", "127.0.1.2") for _ in range(2)]
    wait_until(lambda: len(clients.connections) == 4, what="a full server")
    assert _closed(client_from(herd, "Alford", "127.0.1.1"))  # a third from one address: refused, not let in
    assert clients.refused == 1 and clients.evicted == 0
    assert client_from(herd, "Alford", "127.0.1.3").ask(iamat()).startswith(b"AT Alford ")
    assert clients.evicted == 1 and _closed(hogs[0])
    assert others[0].ask(iamat()).startswith(b"AT Alford ")


def test_eviction_races_with_waking_parking_and_serving(make_herd: Callable[..., Herd]) -> None:
    """Clients connect, trickle, ask, go quiet and get parked at random while newcomers
    evict them: the count never passes the limit, nothing crashes, the books balance."""
    herd = make_herd({"Alford": []}, limits=Limits(max_connections=12, park_after=0.02, shutdown_grace=0.5))
    server = herd.servers["Alford"]
    rng = random.Random(7)
    over: list[int] = []

    def churn(source: str) -> None:
        for _ in range(15):
            try:
                client = client_from(herd, "Alford", source)
                for _ in range(rng.randint(0, 3)):
                    gevent.sleep(rng.uniform(0, 0.03))
                    if rng.random() < 0.5:
                        client.ask(iamat(source.encode()))
                    else:
                        client.send(b"IAMAT trickle")  # half a line
                client.close()
            except (OSError, AssertionError):
                pass  # evicted (EOF or reset) mid-way: expected
            if len(server.connections) > 12:
                over.append(len(server.connections))

    gevent.joinall([gevent.spawn(churn, source) for source in CROWD[:30]], timeout=30, raise_error=True)
    assert not over
    assert server.clients.evicted > 0  # the race was run: a full server, newcomers, eviction
    honest = client_from(herd, "Alford", "127.0.0.2")
    assert honest.ask(iamat(b"honest")).startswith(b"AT Alford ")
    clients = server.clients
    assert sum(clients.per_ip.values()) == len(clients.connections)
    assert set(clients.connections) == {conn.id for conn in clients.connections.values()}


# ------------------------------------------------------------------ what a client that never reads holds


def test_a_pipeline_never_read_holds_no_queued_places_calls(make_herd: Callable[..., Herd], fake_places: Any) -> None:
    """Deep WHATSATs wait for a Places slot before they have a greenlet (a stack each):
    two clients pipelining 40 each hold at most the fast lane's and the deep lane's
    calls between them, and every answer still comes, in order."""
    fake_places.latency = 0.02
    herd = make_herd({"Alford": []})
    lanes = herd.servers["Alford"].whatsat
    readers = [herd.client("Alford", timeout=20) for _ in range(2)]
    for k, reader in enumerate(readers):
        assert reader.ask(iamat(b"pipe%d" % k)).startswith(b"AT Alford ")
        reader.send(b"WHATSAT pipe%d 10 %d\n" % (k, 1 + k) * 40)  # ~60 KB of answers: no back-pressure yet
    most = 0

    def done() -> bool:
        nonlocal most
        most = max(most, len(lanes.calls))
        return len(fake_places.requests) >= 80 and not lanes.calls

    wait_until(done, 20, what="every WHATSAT to be answered")
    assert 0 < most <= 2 * FAST_PER_BATCH + DEEP_LANE_CALLS
    assert lanes.deep_lane.counter == DEEP_LANE_CALLS  # every slot given back
    for reader in readers:
        for _ in range(40):
            assert reader.read_whatsat().startswith(b"AT Alford ")


# ------------------------------------------------------------------ the pure part


def test_evictable_takes_the_front_and_moves_the_unfit_back() -> None:
    order = OrderedDict((key, key) for key in range(10))
    assert evictable(order, lambda value: True) == 0 and list(order) == list(range(10))  # looking moves nothing
    assert evictable(order, lambda value: value >= 3) == 3
    assert list(order)[:7] == [3, 4, 5, 6, 7, 8, 9]  # those passed over are the last looked at next time
    assert list(order)[7:] == [0, 1, 2]
    assert evictable(order, lambda value: value in (0, 1, 2)) == 0


def test_evictable_looks_at_most_scan_entries() -> None:
    order = OrderedDict((key, key) for key in range(100))
    seen: list[int] = []

    def never(value: int) -> bool:
        seen.append(value)
        return False

    assert evictable(order, never, scan=8) is None
    assert seen == list(range(8))
    assert evictable(OrderedDict(), never) is None
    assert evictable(OrderedDict([(1, 1)]), never, scan=8) is None and seen[-1] == 1  # each at most once
