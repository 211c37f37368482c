"""Reconciliation between two herdserver servers: compare digests, send what differs.

Pure: no sockets, no clocks. Each server's ``Store`` keeps ``LEAVES`` (65,536)
leaf digests, the XOR of a 64-bit hash of every AT line whose client falls in
the leaf. Over them sits a tree of fanout 16: level 0 is the root (one node),
level 4 the leaves. Node ``i`` of level ``L`` covers the leaves
``[i * 16**(4-L), (i+1) * 16**(4-L))`` and its digest is the XOR of theirs;
the store keeps every level current, so answering a question costs no fold.

The side that starts (the *initiator*, a forwarder) walks the tree down
breadth-first, asking only under nodes that differ; the other side (the
*responder*) answers each question from its own leaves and keeps no state:

    I: SYNC ASK 0                      R: SYNC HAVE 0 <root>
    I: SYNC ASK 1 0                    R: SYNC HAVE 1 <16 digests: the children of node 0>
    I: SYNC ASK 2 3 a                  R: SYNC HAVE 2 <16 children of node 3, then 16 of node a>
    ...                                (parents in hex, digests as 16 hex digits)
    I: SYNC PULL 3a7f 3a80 ...         R: its AT lines of those leaves, then SYNC DONE <lines>
    I: its own AT lines of those leaves (plain AT lines; newer wins on both sides)

Equal tables end after one round trip (the roots match). With ``d`` differing
clients among ``n`` the bytes are about ``d`` times a few hundred (the digest
paths) plus the lines of the ``d`` leaves: for 100 differences in a million
records, well under 1% of a full push.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .store import LEAF_BITS

FANOUT = 16
DEPTH = LEAF_BITS // 4  # 4: levels 0 (root) .. 4 (leaves)
PARENTS_PER_ASK = 16  # an answer is then at most 16 * 16 digests: about 4.4 KB
LEAVES_PER_PULL = 256


def span(level: int) -> int:
    """How many leaves one node of ``level`` covers."""
    width: int = FANOUT ** (DEPTH - level)
    return width


Levels = Sequence[Sequence[int]]  # the digests of every node, level by level (Store.levels)


def node_digest(levels: Levels, level: int, index: int) -> int:
    return int(levels[level][index])


def children(parents: Sequence[int]) -> list[int]:
    return [parent * FANOUT + c for parent in parents for c in range(FANOUT)]


def answer_ask(levels: Levels, level: int, parents: Sequence[int]) -> bytes:
    """The responder's ``SYNC HAVE`` line for ``SYNC ASK level parents``."""
    nodes = [0] if level == 0 else children(parents)
    digests = b" ".join(b"%016x" % node_digest(levels, level, node) for node in nodes)
    return b"SYNC HAVE %d %s" % (level, digests)


@dataclass(slots=True)
class SyncCommand:
    """One parsed ``SYNC`` line."""

    verb: bytes  # ASK, HAVE, PULL, DONE
    level: int = 0
    numbers: list[int] = field(default_factory=list)


def parse_sync(fields: Sequence[bytes]) -> SyncCommand | None:
    """A ``SYNC ...`` line's fields, or None if it is malformed (answered ``? ``)."""
    if len(fields) < 2 or fields[0] != b"SYNC":
        return None
    verb = fields[1]
    try:
        if verb in (b"ASK", b"HAVE"):
            level = int(fields[2])
            if not 0 <= level <= DEPTH:
                return None
            numbers = [int(f, 16) for f in fields[3:]]
            limit = FANOUT ** (level - 1) if verb == b"ASK" and level else 2**64
            if verb == b"ASK" and (len(numbers) > PARENTS_PER_ASK or (level and not numbers)):
                return None
            if any(not 0 <= n < limit for n in numbers):
                return None
            return SyncCommand(verb, level, numbers)
        if verb == b"PULL":
            leaves = [int(f, 16) for f in fields[2:]]
            if not leaves or len(leaves) > LEAVES_PER_PULL or any(not 0 <= n < span(0) for n in leaves):
                return None
            return SyncCommand(verb, DEPTH, leaves)
        if verb == b"DONE" and len(fields) == 3:
            return SyncCommand(verb, 0, [int(fields[2])])
    except (ValueError, IndexError):
        return None
    return None


def format_ask(level: int, parents: Sequence[int]) -> bytes:
    if level == 0:
        return b"SYNC ASK 0"
    return b"SYNC ASK %d %s" % (level, b" ".join(b"%x" % p for p in parents))


def format_pull(leaves: Sequence[int]) -> bytes:
    return b"SYNC PULL " + b" ".join(b"%x" % leaf for leaf in leaves)


def format_done(count: int) -> bytes:
    return b"SYNC DONE %d" % count


class Reconciler:
    """The initiator's side of one reconciliation, as a state machine.

    ``start()`` gives the first lines to send; each ``SYNC HAVE`` answer goes to
    ``on_have``, which returns the next lines. When the walk reaches the
    leaves, ``on_have`` returns the PULL lines and ``differing_leaves`` says
    which leaves to push our own lines of; ``pulls_left`` counts the ``SYNC
    DONE`` answers still to come. ``finished`` once nothing is outstanding.
    """

    def __init__(self, levels: Levels):
        self.levels = levels
        self.level = 0
        self.asked: list[list[int]] = []  # parents of each ASK still unanswered, in order
        self.next_parents: list[int] = []  # nodes found different at self.level so far
        self.differing_leaves: list[int] = []
        self.pulls_left = 0
        self.started = False

    @property
    def finished(self) -> bool:
        return self.started and not self.asked and self.pulls_left == 0

    def start(self) -> list[bytes]:
        self.started = True
        self.asked = [[]]
        return [format_ask(0, [])]

    def on_have(self, level: int, digests: Sequence[int]) -> list[bytes]:
        if not self.asked or level != self.level:
            raise ValueError(f"unexpected SYNC HAVE {level} (walking level {self.level})")
        parents = self.asked.pop(0)
        nodes = [0] if level == 0 else children(parents)
        if len(digests) != len(nodes):
            raise ValueError(f"SYNC HAVE {level}: {len(digests)} digests for {len(nodes)} nodes")
        for node, theirs in zip(nodes, digests, strict=True):
            if node_digest(self.levels, level, node) != theirs:
                self.next_parents.append(node)
        if self.asked:
            return []  # the rest of this level is still on its way
        return self._descend()

    def _descend(self) -> list[bytes]:
        found, self.next_parents = self.next_parents, []
        if not found:
            return []
        if self.level == DEPTH:
            self.differing_leaves = found
            chunks = [found[i : i + LEAVES_PER_PULL] for i in range(0, len(found), LEAVES_PER_PULL)]
            self.pulls_left = len(chunks)
            return [format_pull(chunk) for chunk in chunks]
        self.level += 1
        chunks = [found[i : i + PARENTS_PER_ASK] for i in range(0, len(found), PARENTS_PER_ASK)]
        self.asked = chunks
        return [format_ask(self.level, chunk) for chunk in chunks]

    def on_done(self) -> None:
        if self.pulls_left <= 0:
            raise ValueError("unexpected SYNC DONE")
        self.pulls_left -= 1
