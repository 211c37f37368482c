"""The latest location record per client, under the herd's one total order.

Pure: no I/O, no greenlets. A record is held as its canonical AT line only
(the client id is the key): about 240 bytes per client at a million clients,
where a parsed ``At`` object with its fields cost about 700. Whatever needs the
fields (a WHATSAT's location) parses the one line it needs.

The store also keeps the digests the reconciliation between servers compares
(``sync.py``): each client falls in one of ``LEAVES`` leaves by a hash of its
id, and a leaf's digest is the XOR of a 64-bit hash of every line in it, kept
up to date on every change, so comparing two tables costs nothing until they
differ.
"""

from __future__ import annotations

import hashlib
import zlib
from array import array
from collections.abc import Iterable, Iterator

from .protocol import At, parse_at_line, parse_time

LEAF_BITS = 16
LEAVES = 1 << LEAF_BITS
LEVELS = LEAF_BITS // 4 + 1  # root, then every 4 bits of the leaf number
_LEAF_MASK = LEAVES - 1


def leaf_of(client: bytes) -> int:
    """The leaf a client's record falls in: the same on every server."""
    return zlib.crc32(client) & _LEAF_MASK


def line_hash(line: bytes) -> int:
    """A 64-bit hash of one AT line, the same on every server (not Python's hash())."""
    return int.from_bytes(hashlib.blake2b(line, digest_size=8).digest(), "little")


def newer(time_ns: int, line: bytes, held: bytes) -> bool:
    """The herd's one total order: client time first, then the line's bytes."""
    held_time = time_of(held)
    return time_ns > held_time or (time_ns == held_time and line > held)


def fold_levels(leaves: array[int]) -> list[array[int]]:
    """Every level of the digest tree (root first) from the leaves: a node is the XOR
    of its 16 children."""
    levels = [leaves]
    while len(levels[0]) > 1:
        below = levels[0]
        above = array("Q", bytes(8 * (len(below) // 16)))
        for i in range(len(below)):
            above[i >> 4] ^= below[i]
        levels.insert(0, above)
    return levels


def time_of(line: bytes) -> int:
    """Client time (ns) of a held line: its last field, validated when it was stored."""
    time_ns = parse_time(line[line.rindex(b" ") + 1 :])
    assert time_ns is not None
    return time_ns


class Store:
    """Client id -> the newest canonical AT line, plus the leaf digests."""

    def __init__(self) -> None:
        self._lines: dict[bytes, bytes] = {}
        # The digest of every node of the reconciliation tree (fanout 16, four levels
        # over the leaves), kept current on every change so no question costs a fold.
        self.levels = [array("Q", bytes(8 * 16**level)) for level in range(LEVELS)]
        self.leaves = self.levels[-1]
        self.digests_ready = True  # False between a bulk ``load`` and its ``digest_steps``
        self._snapshot: tuple[list[bytes], list[bytes]] | None = None
        self._changes: list[tuple[bytes, bytes | None, bytes]] = []

    def offer(self, record: At) -> bool:
        """Keep ``record`` if it is newer than what is held; True when it was kept."""
        return self.offer_line(record.client, record.time_ns, record.line)

    def offer_line(self, client: bytes, time_ns: int, line: bytes) -> bool:
        """``offer`` for a caller that has the three values already (replay, sync)."""
        held = self._lines.get(client)
        if held is not None and not newer(time_ns, line, held):
            return False
        if not self.digests_ready:  # being computed from a snapshot: applied after it
            self._changes.append((client, held, line))
            self._lines[client] = line
            return True
        change = line_hash(line) if held is None else line_hash(held) ^ line_hash(line)
        self._lines[client] = line
        leaf = leaf_of(client)
        levels = self.levels
        levels[0][0] ^= change
        levels[1][leaf >> 12] ^= change
        levels[2][leaf >> 8] ^= change
        levels[3][leaf >> 4] ^= change
        levels[4][leaf] ^= change
        return True

    def load(self, records: Iterable[tuple[bytes, int, bytes]]) -> None:
        """Many (client, time_ns, line) at once (a state file's replay): the newest per
        client wins as with ``offer_line``. The digests are not kept up to date on the
        way: ``digest_steps`` computes them afterwards, a chunk at a time, so a server
        with a million records listens before it has hashed them all."""
        lines = self._lines
        get = lines.get
        for client, time_ns, line in records:
            held = get(client)
            if held is None or newer(time_ns, line, held):
                lines[client] = line
        # Until the digests are computed, changes are logged instead of applied; the
        # snapshot is taken now, so every change after it is in the log.
        self._snapshot = (list(lines.keys()), list(lines.values()))
        self._changes = []
        self.digests_ready = False

    def digest_steps(self, chunk: int = 50_000) -> Iterator[int]:
        """Compute the digests of a ``load``, yielding between chunks (the caller lets
        the event loop run there); then apply the changes made meanwhile."""
        if self.digests_ready or self._snapshot is None:
            return
        clients, lines = self._snapshot
        leaves = array("Q", bytes(8 * LEAVES))
        # leaf_of and line_hash written out: a million calls each cost a third more.
        crc, blake2b, from_bytes = zlib.crc32, hashlib.blake2b, int.from_bytes
        for start in range(0, len(clients), chunk):
            for client, line in zip(clients[start : start + chunk], lines[start : start + chunk], strict=True):
                leaves[crc(client) & _LEAF_MASK] ^= from_bytes(blake2b(line, digest_size=8).digest(), "little")
            yield start
        for client, old, new in self._changes:
            leaves[leaf_of(client)] ^= (line_hash(old) if old is not None else 0) ^ line_hash(new)
        self.levels, self.leaves = fold_levels(leaves), leaves
        self._snapshot, self._changes = None, []
        self.digests_ready = True

    def holds(self, client: bytes, line: bytes) -> bool:
        """True when the record held for ``client`` is exactly ``line`` (canonical form)."""
        return self._lines.get(client) == line

    def get(self, client: bytes) -> bytes | None:
        """The AT line held for ``client``."""
        return self._lines.get(client)

    def record(self, client: bytes) -> At | None:
        """The held record, parsed (for WHATSAT: it needs the location)."""
        line = self._lines.get(client)
        return None if line is None else parse_at_line(line)

    def __len__(self) -> int:
        return len(self._lines)

    def __contains__(self, client: object) -> bool:
        return client in self._lines

    def lines(self) -> list[bytes]:
        """Every held AT line (for a full push); a snapshot, safe to keep iterating."""
        return list(self._lines.values())

    def snapshot(self) -> dict[bytes, bytes]:
        return dict(self._lines)

    def lines_in(self, leaves: Iterable[int]) -> Iterator[bytes]:
        """The held lines of the clients in these leaves (a scan: used only for the
        few leaves a reconciliation found different)."""
        wanted = set(leaves)
        if not wanted:
            return iter(())
        crc = zlib.crc32
        return iter([line for client, line in self._lines.items() if crc(client) & _LEAF_MASK in wanted])
