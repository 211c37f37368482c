"""What each command does, with no sockets: the one place "newer wins" is applied.

IAMAT and AT go to the store; a record that is new there is appended to the
state file and offered to every neighbor's forwarder except the one it came
from. WHATSAT asks Places. The connection machinery (``clients.py``) and the
forwarders (``peers.py``) call in here; nothing here reads or writes a socket.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import gevent
from gevent.event import Event
from gevent.greenlet import Greenlet
from gevent.lock import Semaphore
from gevent.pool import Group

from .config import HerdConfig
from .core import places_json, protocol, stats
from .core.protocol import At, IAmAt, Invalid, WhatsAt
from .core.stats import Stats
from .core.store import Store
from .logs import EventLog
from .places import Provider
from .state import StateFile

NS_PER_S = 1_000_000_000
# Places calls in flight, server-wide, for WHATSATs past the first few of one read
# (FAST_PER_BATCH in clients.py): a deep pipeline gets answers, at a pace.
DEEP_LANE_CALLS = 8


class Outlet(Protocol):
    """Where a new record goes for one neighbor (a forwarder's outbox)."""

    name: str

    def offer(self, client: bytes, line: bytes) -> None: ...


class Node:
    """The herd logic of one server: store, state file, flood, Places."""

    def __init__(
        self,
        config: HerdConfig,
        name: str,
        store: Store,
        state: StateFile | None,
        provider: Provider,
        log: EventLog,
        clock: Callable[[], int] = time.time_ns,
    ):
        self.config = config
        self.name = name
        self.name_bytes = name.encode("utf-8")
        self.store = store
        self.state = state
        self.provider = provider
        self.log = log
        self.clock = clock
        self.stats = Stats()
        self.skew_ns = round(config.limits.max_clock_skew * NS_PER_S)
        self.known_servers = {server.encode("utf-8") for server in config.servers}
        self.outlets: list[Outlet] = []
        self.calls = Group()  # WHATSATs waiting on Places
        self.deep_lane = Semaphore(DEEP_LANE_CALLS)
        self.digests = Event()  # set once the store's digests are complete (sync waits for it)
        if store.digests_ready:
            self.digests.set()

    def compute_digests(self) -> None:
        """After a bulk load: the store's digests, a chunk at a time, letting clients in between."""
        started = time.perf_counter()
        for _ in self.store.digest_steps():
            gevent.sleep(0)
        self.digests.set()
        self.log.info("digests_ready", records=len(self.store), ms="%.1f" % ((time.perf_counter() - started) * 1000))

    # -- records -------------------------------------------------------------------------

    def iamat(self, msg: IAmAt, line: bytes) -> bytes:
        now = self.clock()
        if msg.time_ns > now + self.skew_ns:
            return self.invalid("IAMAT", line, "time ahead of the server's clock", client=msg.client)
        self.stats.iamat += 1
        record = protocol.make_at(self.name_bytes, msg, now)
        self.keep(record.client, record.time_ns, record.line, None)
        return record.line + b"\n"

    def at(self, msg: At, line: bytes, source: str | None) -> bytes | None:
        """An AT line from a neighbor (``source``) or an unnamed connection: no reply,
        unless it is invalid (then the ``? `` reply)."""
        self.stats.at_received += 1
        if msg.server not in self.known_servers:
            return self.invalid("AT", line, "AT names a server herd.ini does not list", server=msg.server)
        if msg.time_ns > self.clock() + self.skew_ns:
            self.stats.at_future += 1
            self.log.warning("at_dropped", reason="time ahead of the server's clock", line=msg.line)
            return None
        if self.keep(msg.client, msg.time_ns, msg.line, source):
            self.stats.at_stored += 1
        elif self.log.level <= logging.DEBUG:
            self.log.debug("at_dropped", client=msg.client)
        return None

    def keep(self, client: bytes, time_ns: int, line: bytes, source: str | None) -> bool:
        """Store if newer; then append to the state file and flood. True if kept."""
        if not self.store.offer_line(client, time_ns, line):
            return False
        if self.state is not None:
            self.state.append(time_ns, line)
        for outlet in self.outlets:
            if outlet.name != source:
                outlet.offer(client, line)
        return True

    def persist(self) -> None:
        """Hand what this batch stored to the OS (and, with fsync = always, to the
        disk): called before any reply that acknowledges it."""
        if self.state is not None:
            self.state.flush()
            self.state.commit()

    # -- WHATSAT ---------------------------------------------------------------------

    def whatsat(self, msg: WhatsAt, line: bytes, deep: bool = False) -> bytes | Greenlet:
        record = self.store.record(msg.client)
        if record is None:
            return self.invalid("WHATSAT", line, "unknown client")
        self.stats.whatsat += 1
        return self.calls.spawn(self._whatsat_deep if deep else self._whatsat, msg, record)

    def _whatsat_deep(self, msg: WhatsAt, record: At) -> bytes:
        """A WHATSAT deep in one connection's pipeline: it shares a few Places slots with
        every other such one, so clients that pipeline without end (and, not reading,
        make the server answer for nothing) cannot take the CPU from everyone else."""
        with self.deep_lane:
            return self._whatsat(msg, record)

    def _whatsat(self, msg: WhatsAt, record: At) -> bytes:
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
        deadline = self.config.places.timeout * 2 + 1
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

    # -- one command from a client connection ------------------------------------------

    def command(
        self, item: bytes, fields: list[bytes], source: str | None, deep: bool = False
    ) -> bytes | Greenlet | None:
        """The reply to one non-blank line of a client connection (None: no reply).

        ``source`` names the neighbor the connection belongs to, if it said HELLO.
        """
        msg = protocol.parse_fields(fields, item)
        if isinstance(msg, IAmAt):
            return self.iamat(msg, item)
        if isinstance(msg, At):
            return self.at(msg, item, source)
        if isinstance(msg, WhatsAt):
            return self.whatsat(msg, item, deep)
        assert isinstance(msg, Invalid)
        return self.invalid(stats.command_word(fields[0]), msg.line, msg.reason)

    def invalid(self, word: str, line: bytes, reason: str, **details: object) -> bytes:
        """The ``? `` reply to ``line``, counted under ``word`` and logged with why."""
        self.stats.invalid += 1
        self.stats.invalid_by[word] += 1
        self.log.info("invalid", reason=reason, **details)
        return protocol.format_invalid(line.strip())
