"""The replication rule, pure: newer wins, and a kept record goes to the journal and
to every link but the one it came from.

"Newer" is the store's total order (client time in nanoseconds, then the line's
bytes), so every server keeps the same record for a client once a flood is over,
whatever order the updates arrive in; a record no newer than the one held changes
nothing and goes nowhere, which is what ends a flood.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from .store import Store, newer

NS_PER_S = 1_000_000_000


class Journal(Protocol):
    """Where a kept record is written before it is acknowledged (the state file)."""

    def append(self, time_ns: int, line: bytes) -> None: ...


class Outlet(Protocol):
    """Where a kept record goes for one neighbor (a link's outbox)."""

    name: str

    def offer(self, client: bytes, line: bytes) -> None: ...

    def has_queued(self) -> bool: ...


class Replica:
    """One server's copy of the herd's records, and where each new one goes."""

    def __init__(
        self,
        store: Store,
        known_servers: Iterable[str],
        max_clock_skew_s: float,
        journal: Journal | None = None,
    ):
        self.store = store
        self.journal = journal
        self.outlets: list[Outlet] = []
        self.known_servers = frozenset(server.encode("utf-8") for server in known_servers)
        self.skew_ns = round(max_clock_skew_s * NS_PER_S)

    def too_far_ahead(self, time_ns: int, now_ns: int) -> bool:
        """A client time past the server's clock by more than the allowed skew."""
        return time_ns > now_ns + self.skew_ns

    def names_a_server(self, server: bytes) -> bool:
        return server in self.known_servers

    def is_new(self, client: bytes, time_ns: int, line: bytes) -> bool:
        """Newer than the record held for ``client`` (or none is held): ``keep`` would keep it."""
        held = self.store.get(client)
        return held is None or newer(time_ns, line, held)

    def keep(self, client: bytes, time_ns: int, line: bytes, source: str | None, written: bool = False) -> bool:
        """Store ``line`` if newer; then journal it (unless it is ``written`` there
        already) and offer it to every outlet but ``source``'s (the neighbor it came
        from). True if kept."""
        if not self.store.offer_line(client, time_ns, line):
            return False
        if self.journal is not None and not written:
            self.journal.append(time_ns, line)
        for outlet in self.outlets:
            if outlet.name != source:
                outlet.offer(client, line)
        return True

    def has_queued(self) -> bool:
        """Does any outlet hold records it will write in this turn of the event loop
        (a reply that acknowledges them waits for that)?"""
        for outlet in self.outlets:  # a plain loop: this runs before every reply
            if outlet.has_queued():
                return True
        return False
