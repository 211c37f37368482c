"""WHATSAT: Places calls in their lanes, each bounded by a deadline.

The first few WHATSATs of one read ask Places at once; those deep in a pipeline
share a few server-wide slots (``DEEP_LANE_CALLS``), so a client that pipelines
without end (and, not reading, makes the server answer for nothing) cannot take
the CPU from everyone else. Whatever the provider does, a payload in the legacy
shape comes back.
"""

from __future__ import annotations

import time
from typing import Any

import gevent
from gevent.greenlet import Greenlet
from gevent.lock import Semaphore
from gevent.pool import Group

from ..core import places_json
from ..core.protocol import At, WhatsAt
from ..core.stats import Stats
from ..logs import EventLog
from ..places import Provider

# Places calls in flight, server-wide, for WHATSATs past the first few of one read
# (clients.FAST_PER_BATCH): a deep pipeline gets answers, at a pace.
DEEP_LANE_CALLS = 8


class WhatsatLanes:
    """Starts a WHATSAT's Places call in its lane; the greenlet's value is the reply."""

    def __init__(self, provider: Provider, timeout_s: float, stats: Stats, log: EventLog):
        self.provider = provider
        self.timeout_s = timeout_s
        self.stats = stats
        self.log = log
        self.calls = Group()  # WHATSATs waiting on Places
        self.deep_lane = Semaphore(DEEP_LANE_CALLS)

    def start(self, msg: WhatsAt, record: At, deep: bool) -> Greenlet:
        if not deep:
            return self.calls.spawn(self._answer, msg, record)
        # A deep call waits for its slot before it has a greenlet: the caller (the
        # connection's handler, with nothing else to do until its replies are due)
        # waits, not one queued greenlet per WHATSAT with its stack saved (~10 KB):
        # 20 of those per connection made a client that pipelines and never reads
        # cost ~270 KB instead of ~100 KB. The slot is freed however the call ends
        # (killed before it ran included).
        self.deep_lane.acquire()
        call = self.calls.spawn(self._answer, msg, record)
        call.rawlink(self._free_slot)
        return call

    def _free_slot(self, _call: Greenlet) -> None:
        self.deep_lane.release()

    def _answer(self, msg: WhatsAt, record: At) -> bytes:
        started = time.perf_counter()
        payload = self.places_call(record, msg.radius_m, msg.bound)
        reply = places_json.format_whatsat_reply(record.line, payload)
        self.stats.durations["WHATSAT"].observe(time.perf_counter() - started)
        return reply

    def places_call(self, record: At, radius_m: float, bound: int) -> dict[str, Any]:
        """Ask the provider; whatever happens, a payload in the legacy shape comes back."""
        started = time.perf_counter()
        # The provider has its own HTTP timeouts; this bounds the whole call as well
        # (a server that trickles bytes resets a per-read timeout forever).
        deadline = self.timeout_s * 2 + 1
        payload: dict[str, Any] | None = None
        try:
            with gevent.Timeout(deadline, False):
                payload = self.provider.nearby(record.location.lat, record.location.lon, radius_m, bound)
        except Exception:
            self.log.exception("places_crashed", provider=self.provider.name)
            payload = places_json.places_error("UNKNOWN_ERROR", "internal error while asking Places")
        if payload is None:
            payload = places_json.places_error("UNKNOWN_ERROR", f"Places did not answer within {deadline:g} s")
        payload = places_json.cut_results(payload, bound)
        elapsed = time.perf_counter() - started
        self.stats.places.observe(self.provider.name, str(payload.get("status")), elapsed)
        self.log.info(
            "places",
            provider=self.provider.name,
            status=payload.get("status"),
            results=len(payload.get("results") or []),
            ms="%.1f" % (elapsed * 1000),
        )
        return payload

    def close(self) -> None:
        self.calls.kill(timeout=1)
