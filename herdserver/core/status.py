"""What one server looks like from outside, as typed snapshots (pure).

``server.status()`` builds a ``ServerStatus`` when asked; the Prometheus collector
and the HTTP side read only that, never the server object. ``RecentEvents`` is the
explicit sink the links report to and the page reads (not the log).
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass
from typing import Any

from .stats import Stats

EVENTS_KEPT = 50  # recent link events kept per server


class PeerKind(enum.Enum):
    """What is at the other end of a link."""

    UNKNOWN = "unknown"  # not heard from yet
    HERDSERVER = "herdserver"  # speaks the herd port's protocol
    FOREIGN = "foreign"  # another implementation: plain AT lines on its client port


@dataclass(frozen=True, slots=True)
class LinkState:
    neighbor: str
    address: str
    up: bool  # the last exchange with the neighbor worked
    connected: bool  # a connection is open right now
    kind: PeerKind
    connections_made: int
    recoveries: int  # times the link came back up after being down
    lines_sent: int
    bytes_sent: int
    syncs: int
    full_pushes: int
    queued: int  # records waiting in the outbox
    auth_failures: int = 0  # handshakes on this link that failed the proof

    def as_json(self) -> dict[str, Any]:
        return {
            "up": self.up,
            "connected": self.connected,
            "herdserver": self.kind is PeerKind.HERDSERVER,
            "kind": self.kind.value,
            "address": self.address,
            "links_made": self.connections_made,
            "recoveries": self.recoveries,
            "lines_sent": self.lines_sent,
            "bytes_sent": self.bytes_sent,
            "syncs": self.syncs,
            "full_pushes": self.full_pushes,
            "queued": self.queued,
            "auth_failures": self.auth_failures,
        }


class RecentEvents:
    """The last ``EVENTS_KEPT`` link events, for the page (time comes from the caller)."""

    def __init__(self, kept: int = EVENTS_KEPT):
        self._events: deque[dict[str, Any]] = deque(maxlen=kept)

    def add(self, at: float, event: str, **values: object) -> None:
        entry: dict[str, Any] = {"time": at, "event": event}
        entry.update({key: as_text(value) for key, value in values.items()})
        self._events.append(entry)

    def snapshot(self) -> list[dict[str, Any]]:
        return list(self._events)


@dataclass(frozen=True, slots=True)
class ServerStatus:
    name: str
    address: str
    http: str | None
    time: float
    uptime_s: float
    provider: str
    records: int
    listening: bool
    state_loaded: bool
    state_writable: bool  # the last write (or fsync) of the state file worked (True without one)
    open_connections: int
    parked_connections: int
    links: tuple[LinkState, ...]
    stats: Stats
    refused: int  # client connections refused (full of busy ones, or too many from one address)
    evicted: int  # quiet client connections closed to make room for a newcomer
    dropped_slow: int  # clients dropped for leaving replies unread
    log_lines: int
    log_lines_dropped: int
    events: tuple[dict[str, Any], ...] = ()
    herd_port_auth_failures: int = 0  # connections to our herd port that failed the handshake
    version: str = ""  # herdserver.__version__ (herd_build_info, /status)

    @property
    def active_connections(self) -> int:
        """Open connections that are not parked: ``herd_connections`` partitions into active and parked."""
        return self.open_connections - self.parked_connections

    def readiness(self) -> tuple[bool, str]:
        """(ready, why not): listening, state loaded, and the state file writable.

        Links do not count: a server whose neighbors are all down still answers IAMAT
        and WHATSAT (and reconciliation catches up when they return); taking it out of
        a load balancer would only take the herd's last server away too."""
        if not self.listening:
            return False, "not listening for clients"
        if not self.state_loaded:
            return False, "state not loaded yet"
        if not self.state_writable:
            return False, "state file not writable (disk full or failing): IAMATs are answered ?"
        return True, "ready"

    def as_json(self) -> dict[str, Any]:
        """This server as the page, herdctl and other servers' /herd see it."""
        stats = self.stats
        ready, reason = self.readiness()
        places = stats.places.summary()
        places["provider"] = self.provider
        return {
            "name": self.name,
            "version": self.version,
            "address": self.address,
            "http": self.http,
            "time": self.time,
            "uptime_s": self.uptime_s,
            "provider": self.provider,
            "records": self.records,
            "connections": {"open": self.open_connections, "parked": self.parked_connections},
            "links": {link.neighbor: link.as_json() for link in self.links},
            "counters": {
                "iamat": stats.iamat,
                "whatsat": stats.whatsat,
                "at_received": stats.at_received,
                "at_stored": stats.at_stored,
                "invalid": stats.invalid,
                "iamat_unwritten": stats.iamat_unwritten,
                "state_write_failures": stats.state_write_failures,
                "at_duplicate": stats.at_duplicate,
                "overlong": stats.overlong,
                "log_lines": self.log_lines,
                "log_lines_dropped": self.log_lines_dropped,
                "crashes": len(stats.crashes),
            },
            "places": places,
            "events": list(self.events),
            "ready": {"ok": ready, "reason": reason},
            "herd_port_auth_failures": self.herd_port_auth_failures,
        }


def as_text(value: object) -> Any:
    """Bytes (client ids, AT lines) as text for JSON; bytes that are not UTF-8 as \\xNN."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
