"""Durability and convergence in-process: restarts in every order, the state file, anti-entropy."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from herdserver.config import PeerSettings
from herdserver.core.status import PeerKind

from .conftest import FAST_PEERS, Herd, iamat, replace, wait_until

N = 60


@contextmanager
def alford_beside(
    make_herd: Callable[..., Herd], handler: Callable[[Any, Any], None], peers: PeerSettings, foreign: bool = False
) -> Iterator[Herd]:
    """Alford alone, its one neighbor "Other" a plain gevent server running ``handler``
    where Alford's link connects: Other's client port when herd.ini marks it foreign
    (another implementation), else its herd port (a misbehaving peer)."""
    from gevent.server import StreamServer

    herd = make_herd(
        {"Alford": ["Other"], "Other": []}, start=False, peers=peers, foreign=("Other",) if foreign else ()
    )
    other = herd.config.servers["Other"]
    server = StreamServer((other.host, other.link_port), handler)
    server.start()
    try:
        herd.start("Alford")
        yield herd
    finally:
        server.stop()


def post_everywhere(herd: Herd, prefix: bytes = b"c") -> dict[bytes, bytes]:
    """N records, each posted at one of the servers in turn; client -> its AT line."""
    names = list(herd.servers)
    posted = {}
    for i in range(N):
        client = b"%s%d" % (prefix, i)
        posted[client] = herd.client(names[i % len(names)]).ask(iamat(client)).rstrip(b"\n")
    return posted


def converged(herd: Herd, posted: dict[bytes, bytes]) -> bool:
    return all(herd.holds(name, client) == line for name in herd.servers for client, line in posted.items())


def wait_converged(herd: Herd, posted: dict[bytes, bytes], timeout: float = 5.0) -> None:
    wait_until(lambda: converged(herd, posted), timeout, what="every server to hold every record")


@pytest.mark.parametrize("state", [False, True], ids=["memory-only", "state-file"])
def test_restart_all_but_one_at_once(make_herd: Callable[..., Herd], state: bool) -> None:
    herd = make_herd(state=state)
    posted = post_everywhere(herd)
    wait_converged(herd, posted)
    restarted = [name for name in herd.servers if name != "Welsh"]
    for name in restarted:
        herd.stop(name)
    for name in restarted:
        herd.start(name)
    # Memory-only, the four come back empty: Welsh alone holds everything, including
    # the records each of them made, and reconciliation must hand those back too.
    wait_converged(herd, posted)
    assert herd.servers["Alford"].stats.iamat == 0  # nothing new was posted


def test_restart_the_whole_herd_keeps_every_record(make_herd: Callable[..., Herd]) -> None:
    herd = make_herd(state=True)
    posted = post_everywhere(herd)
    wait_converged(herd, posted)
    names = list(herd.servers)
    for name in names:
        herd.stop(name)
    for name in names:
        server = herd.start(name)
        assert len(server.store) == N  # replayed before it listens
    wait_converged(herd, posted)
    reply = herd.client("Holiday").ask(b"WHATSAT c3 10 1")
    assert reply.rstrip(b"\n") == posted[b"c3"]


def test_rolling_restarts_with_updates_in_between(make_herd: Callable[..., Herd]) -> None:
    herd = make_herd()  # memory-only: every restarted server is empty and must catch up
    posted = post_everywhere(herd)
    for round_, name in enumerate(list(herd.servers)):
        herd.stop(name)
        posted.update(post_everywhere(herd, prefix=b"r%d-" % round_))
        herd.start(name)
    wait_converged(herd, posted)


def test_a_server_down_during_updates_gets_them_when_it_returns(make_herd: Callable[..., Herd]) -> None:
    herd = make_herd(state=True)
    herd.stop("Hamilton")
    posted = post_everywhere(herd)  # at the four still up
    herd.start("Hamilton")
    wait_converged(herd, posted)


def test_periodic_anti_entropy_repairs_a_divergence_made_on_purpose(make_herd: Callable[..., Herd]) -> None:
    peers: PeerSettings = replace(FAST_PEERS, sync_interval=0.2)
    herd = make_herd(peers=peers)
    # A record only Holiday holds, put in behind the flood's back (as a lost line would).
    line = b"AT Holiday +0.000000001 hidden +10+10 1700000000"
    holiday = herd.servers["Holiday"]
    assert holiday.store.offer_line(b"hidden", 1_700_000_000 * 10**9, line)
    wait_until(lambda: all(herd.holds(n, b"hidden") == line for n in herd.servers), what="anti-entropy")
    synced = sum(f.syncs for s in herd.servers.values() for f in s.links.values())
    assert synced > len(herd.servers)  # more than the start-up round: the timer did it


def test_links_stay_open_and_updates_open_no_connection(make_herd: Callable[..., Herd]) -> None:
    herd = make_herd({"Alford": ["Ball"], "Ball": []})
    links = [herd.servers["Alford"].links["Ball"], herd.servers["Ball"].links["Alford"]]
    made = [link.links_made for link in links]
    for i in range(20):
        at = herd.client("Alford" if i % 2 else "Ball").ask(iamat(b"c%d" % i)).rstrip(b"\n")
        wait_until(lambda at=at, i=i: all(herd.holds(n, b"c%d" % i) == at for n in herd.servers), what="the record")
    assert [link.links_made for link in links] == made == [1, 1]
    assert all(link.connected and link.up.is_set() for link in links)


def test_a_foreign_neighbor_gets_plain_at_lines_and_a_full_push(make_herd: Callable[..., Herd]) -> None:
    """A neighbor configured as another implementation (foreign = yes) is sent plain AT
    lines only, on its client port: every record at link-up, then each update."""
    received: list[bytes] = []

    def foreign(sock, address) -> None:  # type: ignore[no-untyped-def]
        buffer = b""
        while chunk := sock.recv(65536):
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for text in lines:
                received.append(text)
                if not text.startswith(b"AT "):
                    sock.sendall(b"? " + text.strip() + b"\n")

    with alford_beside(make_herd, foreign, replace(FAST_PEERS, connect_timeout=5.0), foreign=True) as herd:
        forwarder = herd.servers["Alford"].links["Other"]
        assert forwarder.kind is PeerKind.FOREIGN
        for client in (b"first", b"second"):  # each on a new connection: the link closes when idle
            wait_until(lambda: not forwarder.connected, what="the link to go idle")
            at = herd.client("Alford").ask(iamat(client)).rstrip(b"\n")
            wait_until(lambda at=at: at in received, 2.5, what="the AT line at the foreign server")
        assert all(line.startswith(b"AT ") for line in received)
        assert not any(line.startswith(b"SYNC") for line in received)


def test_a_neighbor_that_drops_every_connection_is_retried_with_backoff(make_herd: Callable[..., Herd]) -> None:
    """Not in a tight loop: connections to a peer that closes each one at once are spaced out."""
    accepted: list[float] = []

    def rude(sock, address) -> None:  # type: ignore[no-untyped-def]
        accepted.append(time.monotonic())
        sock.close()

    with alford_beside(make_herd, rude, replace(FAST_PEERS, backoff_initial=0.05, backoff_max=0.2)):
        wait_until(lambda: len(accepted) >= 6, 5.0, what="a few retries")
        spans = [b - a for a, b in itertools.pairwise(accepted)]
        assert min(spans[2:]) >= 0.02  # spaced by the backoff (0.05 doubling to 0.2, jittered to half)
