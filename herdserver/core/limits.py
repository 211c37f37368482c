"""Limits arithmetic, pure: how many clients a process can hold, and deadlines.

Every client is a file descriptor. A server that accepts until ``accept()``
fails with EMFILE can no longer open a link, a log or its state file, and
stops answering anyone; so ``max_connections`` is derived from the
descriptor limit, less what the server itself needs, unless set lower.

A full server makes room rather than refuse: the connection longest without a
complete command goes (``evictable``), so a crowd of do-nothing sockets from
many addresses cannot lock honest newcomers out.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")

# Descriptors a server needs besides its clients: the listener, the HTTP port,
# epoll, the hub's wake pipes and threadpool, stdio, the log, the state file and
# its lock, a compaction file, and headroom to accept (and refuse) one more.
BASE_RESERVE = 64
PER_NEIGHBOR = 2  # a link connection out and one in


def max_connections(configured: int, fd_limit: int, neighbors: int, places_pool: int) -> int:
    """Clients one server may hold: ``configured`` (0 = no wish) capped by what the
    descriptor limit leaves once links, Places connections and the server's own
    files are counted."""
    available = max(1, fd_limit - BASE_RESERVE - PER_NEIGHBOR * neighbors - places_pool)
    return available if configured <= 0 else min(configured, available)


def read_deadline(
    now: float,
    last_command: float,
    line_started: float | None,
    idle_timeout: float,
    line_timeout: float,
) -> tuple[float | None, str]:
    """When a client's connection must be closed if nothing more arrives, and why.

    ``idle``: no complete command for ``idle_timeout`` s (0 = never). ``line``: a
    line begun at ``line_started`` not finished within ``line_timeout`` s of its
    first byte (0 = never): trickling bytes does not reset it. Returns seconds
    from ``now`` (never negative) or None for no deadline.
    """
    deadlines = []
    if idle_timeout:
        deadlines.append((last_command + idle_timeout, "idle_timeout"))
    if line_timeout and line_started is not None:
        deadlines.append((line_started + line_timeout, "line_timeout"))
    if not deadlines:
        return None, ""
    when, reason = min(deadlines)
    return max(0.0, when - now), reason


# Entries ``evictable`` looks at, at most, for one newcomer: bounded work per accept
# even when the oldest entries are all being served.
EVICT_SCAN = 32


def evictable(order: OrderedDict[K, V], candidate: Callable[[V], bool], scan: int = EVICT_SCAN) -> V | None:
    """The value that has gone longest untouched and may be closed, or None.

    ``order`` holds the connections oldest first: the caller moves an entry to the
    end (``move_to_end``, O(1)) whenever it completes a command, so the front is the
    longest quiet. Entries that are not candidates (being served) are moved to the
    end as they are met: the next newcomer does not look at them again until every
    other entry has been looked at, so each accept costs O(1) amortized, and never
    more than ``scan`` steps. (A connection being served counts as active.)
    """
    for _ in range(min(scan, len(order))):
        key = next(iter(order))
        value = order[key]
        if candidate(value):
            return value
        order.move_to_end(key)
    return None
