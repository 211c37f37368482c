"""The counters and histograms the hot path bumps (pure: plain ints, no prometheus).

A command costs an ``int += 1`` on ``Stats`` and, for the timed ones, one ``bisect``
into a ``Histogram``'s bucket list. ``ops/metrics.py`` turns these into metric
families only when ``/metrics`` is scraped.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

# Seconds. Commands take tens of microseconds (a WHATSAT: the Places call), Places calls milliseconds to seconds.
COMMAND_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, 10.0)
PLACES_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
COMMANDS = (b"IAMAT", b"WHATSAT", b"AT")
PLACES_ERRORS_OK = frozenset({"OK", "ZERO_RESULTS"})  # every other status word is an error


class Histogram:
    """Bucket counts kept the cheap way: ``observe`` is one bisect and two additions."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bucket (Prometheus "le").
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, float]]:
        """``(le, count of observations <= le)`` pairs, ending with ``+Inf``."""
        out: list[tuple[str, float]] = []
        total = 0
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            total += count
            out.append(("+Inf" if bound == math.inf else repr(bound), total))
        return out


def command_histograms() -> dict[str, Histogram]:
    return {name.decode(): Histogram(COMMAND_BUCKETS) for name in COMMANDS}


class PlacesStats:
    """Places calls by (provider, status) and their durations (not on the hot path: a call takes ms)."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, str]] = Counter()
        self.seconds = Histogram(PLACES_BUCKETS)

    def observe(self, provider: str, status: str, seconds: float) -> None:
        self.requests[provider, status] += 1
        self.seconds.observe(seconds)

    def summary(self) -> dict[str, Any]:
        total = sum(self.requests.values())
        errors = sum(n for (_, status), n in self.requests.items() if status not in PLACES_ERRORS_OK)
        by_status: Counter[str] = Counter()
        for (_, status), n in self.requests.items():
            by_status[status] += n
        return {
            "requests": total,
            "errors": errors,
            "error_rate": errors / total if total else 0.0,
            "by_status": dict(by_status),
            "seconds_sum": self.seconds.sum,
        }


def command_word(first_field: bytes) -> str:
    """The label of a command for ``herd_commands_total``: a known word, else ``other``."""
    return first_field.decode() if first_field in COMMANDS else "other"


@dataclass
class Stats:
    iamat: int = 0
    whatsat: int = 0
    at_received: int = 0
    at_stored: int = 0
    at_future: int = 0  # AT lines dropped: time too far ahead of our clock
    at_refused: int = 0  # AT lines from connections not allowed to send them
    invalid: int = 0
    iamat_unwritten: int = 0  # IAMATs answered "? ": their record could not be written to the state file
    state_write_failures: int = 0  # state file writes and fsyncs that failed (ENOSPC, EIO, EDQUOT, EROFS)
    crashes: list[str] = field(default_factory=list)
    # -- read by ops/metrics.py at scrape time (plain ints on the hot path, no prometheus calls) --
    at_bytes_in: int = 0  # bytes of AT lines received (their newline included)
    at_duplicate: int = 0  # AT lines dropped unparsed: byte-identical to the record held
    overlong: int = 0  # lines over max_line_bytes
    invalid_by: Counter[str] = field(default_factory=Counter)  # invalid commands by word (command_word)
    durations: dict[str, Histogram] = field(default_factory=command_histograms)
    places: PlacesStats = field(default_factory=PlacesStats)


def command_counts(stats: Stats) -> dict[tuple[str, str], int]:
    """``(command, result)`` -> how many, from the server's plain counters."""
    counts: dict[tuple[str, str], int] = {
        ("IAMAT", "ok"): stats.iamat,
        ("IAMAT", "unwritten"): stats.iamat_unwritten,
        ("WHATSAT", "ok"): stats.whatsat,
        ("AT", "stored"): stats.at_stored,
        ("AT", "dropped"): stats.at_received - stats.at_stored,
    }
    for word, n in stats.invalid_by.items():
        counts[word, "invalid"] = n
    return counts
