"""The latest location record per client, under the herd's one total order."""

from __future__ import annotations

from collections.abc import Iterator

from .protocol import At


class Store:
    """Client id -> newest ``At`` record. Pure: no I/O, no greenlets."""

    def __init__(self) -> None:
        self._records: dict[bytes, At] = {}

    def offer(self, record: At) -> bool:
        """Keep ``record`` if it is newer than what is held; True when it was kept."""
        held = self._records.get(record.client)
        if held is not None and record.order_key <= held.order_key:
            return False
        self._records[record.client] = record
        return True

    def holds(self, client: bytes, line: bytes) -> bool:
        """True when the record held for ``client`` is exactly ``line`` (canonical form)."""
        held = self._records.get(client)
        return held is not None and held.line == line

    def get(self, client: bytes) -> At | None:
        return self._records.get(client)

    def __len__(self) -> int:
        return len(self._records)

    def lines(self) -> Iterator[bytes]:
        """Every held AT line (for a full sync); a snapshot, safe to keep iterating."""
        return iter([record.line for record in self._records.values()])

    def snapshot(self) -> dict[bytes, bytes]:
        return {client: record.line for client, record in self._records.items()}
