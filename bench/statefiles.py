"""State files the bench writes directly (herdserver.statefile's format), for replay and sync.

Every line is a canonical AT line as a server makes it (``protocol.make_at``), so
a replayed record and the same record received from a neighbor hash alike.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from herdserver import statefile as state
from herdserver.core import protocol

UCLA = b"+34.068930-118.445127"
BASE_S = int(time.time()) - 86_400  # a day ago: never "ahead of the server's clock"
CHUNK = 50_000


def client_id(i: int, prefix: str = "client") -> bytes:
    return b"%s-%07d.cs.ucla.edu" % (prefix.encode(), i)


def at_line(server: bytes, client: bytes, time_ns: int) -> bytes:
    """The canonical AT line ``server`` would have made for ``client`` at ``time_ns`` (+0.5 ms)."""
    time_raw = b"%d.%09d" % divmod(time_ns, 1_000_000_000)
    msg = protocol.parse(b"IAMAT %s %s %s" % (client, UCLA, time_raw))
    assert isinstance(msg, protocol.IAmAt)
    return protocol.make_at(server, msg, time_ns + 500_000).line


def record_time(i: int, newer: bool = False) -> int:
    """Client ``i``'s time stamp; ``newer`` a second later."""
    return (BASE_S + (1 if newer else 0)) * 1_000_000_000 + i * 1_000


def write(path: Path, records: Iterable[tuple[int, bytes]]) -> int:
    """A state file of ``(time_ns, line)`` records; its size in bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    size = 0
    with open(path, "wb") as out:
        out.write(state.MAGIC)
        size += len(state.MAGIC)
        batch: list[bytes] = []
        for time_ns, line in records:
            batch.append(state.encode(time_ns, line))
            if len(batch) >= CHUNK:
                data = b"".join(batch)
                out.write(data)
                size += len(data)
                batch = []
        data = b"".join(batch)
        out.write(data)
        size += len(data)
    return size


def fast_line(server: bytes, client: bytes, time_ns: int) -> bytes:
    """``at_line`` by formatting alone (checked against it once per ``distinct`` call)."""
    return b"AT %s +0.000500000 %s %s %d.%09d" % (server, client, UCLA, *divmod(time_ns, 1_000_000_000))


def distinct(count: int, server: bytes = b"Alford", prefix: str = "client",
             newer: bool = False) -> Iterator[tuple[int, bytes]]:
    """``count`` records of ``count`` distinct clients (``newer``: a second later)."""
    probe = record_time(0, newer)
    assert fast_line(server, client_id(0, prefix), probe) == at_line(server, client_id(0, prefix), probe)
    for i in range(count):
        time_ns = record_time(i, newer)
        yield time_ns, fast_line(server, client_id(i, prefix), time_ns)


def latest(path: Path, wanted: set[bytes] | None = None) -> tuple[dict[bytes, bytes], int]:
    """The newest line per client of a state file (newer time wins, then the greater
    line, as the store orders them), for ``wanted`` clients only if given; and how
    many distinct clients the file holds."""
    held: dict[bytes, tuple[int, bytes]] = {}
    clients: set[bytes] = set()
    for client, time_ns, line in state.read_records(os.fspath(path), state.ReplayReport()):
        clients.add(client)
        if wanted is not None and client not in wanted:
            continue
        old = held.get(client)
        if old is None or (time_ns, line) > old:
            held[client] = (time_ns, line)
    return {client: line for client, (_, line) in held.items()}, len(clients)
