"""The one command dispatcher: every line from a client connection is decided here.

IAMAT and AT go through the replication rule (``core.replica``); WHATSAT goes to
its lane (``whatsat.py``); the herd's own words go to the responder. Counting,
logging of invalid lines, who may send AT lines on a client port, and "persist
before replying" all live here, once. Nothing here reads or writes a socket.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol, TypeAlias

import gevent
from gevent.event import Event
from gevent.greenlet import Greenlet

from ..core import protocol
from ..core.protocol import At, IAmAt, Invalid, Overlong, WhatsAt
from ..core.replica import Replica
from ..core.stats import Stats, command_word
from ..core.trust import Trust
from ..logs import EventLog
from ..statefile import StateFile
from .whatsat import WhatsatLanes

TRUST_REFRESH_SECONDS = 5.0  # herd host names looked up again at most this often (_trusted_after_refresh)

Reply: TypeAlias = "bytes | Greenlet | None"


class Sender(Protocol):
    """What the dispatcher needs to know of the connection a line came on."""

    id: int
    peer: str
    ip: str
    may_send_at: bool


class Commands:
    """What each line does, counted once; the state file is written before any reply."""

    def __init__(
        self,
        name: str,
        replica: Replica,
        whatsat: WhatsatLanes,
        stats: Stats,
        log: EventLog,
        journal: StateFile | None,
        trust: Trust,
        refresh_trust: Callable[[], Trust] | None = None,
        clock: Callable[[], int] = time.time_ns,
    ):
        self.name_bytes = name.encode("utf-8")
        self.replica = replica
        self.store = replica.store
        self.whatsat = whatsat
        self.stats = stats
        self.log = log
        self.journal = journal
        self.trust = trust
        self.refresh_trust = refresh_trust
        self._trust_checked = time.monotonic()
        self.clock = clock
        self.digests = Event()  # set once the store's digests are complete (sync waits for it)
        if self.store.digests_ready:
            self.digests.set()

    def compute_digests(self) -> None:
        """After a bulk load: the store's digests, a chunk at a time, letting clients in between."""
        started = time.perf_counter()
        for _ in self.store.digest_steps():
            gevent.sleep(0)
        self.digests.set()
        self.log.info("digests_ready", records=len(self.store), ms="%.1f" % ((time.perf_counter() - started) * 1000))

    # -- one line from a client connection -------------------------------------------------

    def handle(self, item: bytes | Overlong, conn: Sender, deep: bool = False) -> Reply:
        """The reply to one line (None: no reply; a greenlet: a WHATSAT on its way)."""
        if isinstance(item, Overlong):
            self.stats.invalid += 1
            self.stats.overlong += 1
            self.stats.invalid_by["other"] += 1
            return protocol.overlong_reply(item)
        fields = item.split()
        if not fields:
            return None  # blank: no reply
        word = fields[0]
        if word == b"AT":
            if not conn.may_send_at and not self._trusted_after_refresh(conn):
                return self._refuse_at(item, conn)
            self.stats.at_bytes_in += len(item) + 1
            if self._duplicate(fields, conn):
                return None
        started = time.perf_counter()
        reply = self._command(item, fields, None, deep)
        if word in (b"IAMAT", b"AT") and not (reply and reply[:1] == b"?"):
            self.stats.durations[command_word(word)].observe(time.perf_counter() - started)
        return reply

    def _command(self, item: bytes, fields: list[bytes], source: str | None, deep: bool) -> Reply:
        msg = protocol.parse_fields(fields, item)
        if isinstance(msg, IAmAt):
            return self.iamat(msg, item)
        if isinstance(msg, At):
            return self.receive_at(msg, item, source)
        if isinstance(msg, WhatsAt):
            return self.start_whatsat(msg, item, deep)
        assert isinstance(msg, Invalid)
        return self.invalid(command_word(fields[0]), msg.line, msg.reason)

    def _refuse_at(self, item: bytes, conn: Sender) -> bytes:
        self.stats.at_refused += 1
        if self.stats.at_refused & (self.stats.at_refused - 1) == 0:  # 1, 2, 4 ...: a flood logs a few lines
            self.log.warning("at_refused", conn=conn.id, peer=conn.peer, refused_so_far=self.stats.at_refused)
        return protocol.format_invalid(item.strip())

    def _duplicate(self, fields: list[bytes], conn: Sender | None) -> bool:
        """Flooding can bring an AT line to a server twice; the second copy is
        byte-identical to what it holds, so it is dropped without a parse."""
        echo = protocol.at_identity(fields)
        if echo is None or not self.store.holds(*echo):
            return False
        self.stats.at_received += 1
        self.stats.at_duplicate += 1
        if self.log.level <= logging.DEBUG:  # no kwargs dict on the hot path at INFO
            self.log.debug("at_dropped", conn=conn.id if conn else "-", client=echo[0])
        return True

    def _trusted_after_refresh(self, conn: Sender) -> bool:
        """A foreign neighbor is trusted by what its host name resolves to, and a name may
        resolve only later (a container that started after us): look the names up again,
        at most every TRUST_REFRESH_SECONDS, before refusing.
        (In the handler's greenlet: the lookup may wait, the event loop does not.)"""
        if self.refresh_trust is None:
            return False
        now = time.monotonic()
        if now - self._trust_checked < TRUST_REFRESH_SECONDS:
            return False
        self._trust_checked = now
        self.trust = self.refresh_trust()
        conn.may_send_at = self.trust.allows_by_address(conn.ip)
        return conn.may_send_at

    # -- records -------------------------------------------------------------------------

    def iamat(self, msg: IAmAt, line: bytes) -> bytes:
        """Write, then store and flood, then reply, in that order: an ``AT`` reply
        means the record is in the state file (with fsync = always: on the disk). A
        record the disk refused is neither stored nor flooded; the client gets ``? ``
        and may send it again. (An IAMAT older than the record held changes nothing:
        nothing to write, and the reply is its AT line as always.)"""
        now = self.clock()
        if self.replica.too_far_ahead(msg.time_ns, now):
            return self.invalid("IAMAT", line, "time ahead of the server's clock", client=msg.client)
        record = protocol.make_at(self.name_bytes, msg, now)
        if self.replica.is_new(record.client, record.time_ns, record.line):
            if not self.write(record.time_ns, record.line):
                self.stats.iamat_unwritten += 1  # the failure itself is logged (throttled) by the state file
                return protocol.format_invalid(line.strip())
            self.replica.keep(record.client, record.time_ns, record.line, None, written=True)
        self.stats.iamat += 1
        return record.line + b"\n"

    def write(self, time_ns: int, line: bytes) -> bool:
        """One record into the state file now (one write; with fsync = always, waits
        for an fsync covering it): True when it is there, or there is no state file."""
        journal = self.journal
        if journal is None:
            return True
        journal.append(time_ns, line)
        return journal.flush() and journal.commit()

    def receive_at(self, msg: At, line: bytes, source: str | None) -> bytes | None:
        """An AT line from a neighbor (``source``) or an unnamed connection: no reply,
        unless it is invalid (then the ``? `` reply)."""
        self.stats.at_received += 1
        if not self.replica.names_a_server(msg.server):
            return self.invalid("AT", line, "AT names a server herd.ini does not list", server=msg.server)
        if self.replica.too_far_ahead(msg.time_ns, self.clock()):
            self.stats.at_future += 1
            self.log.warning("at_dropped", reason="time ahead of the server's clock", line=msg.line)
            return None
        if self.replica.keep(msg.client, msg.time_ns, msg.line, source):
            self.stats.at_stored += 1
        elif self.log.level <= logging.DEBUG:
            self.log.debug("at_dropped", client=msg.client)
        return None

    def take_line(self, item: bytes, fields: list[bytes], source: str) -> bool:
        """An AT line from a proven neighbor's link (``source``): True if stored."""
        self.stats.at_bytes_in += len(item) + 1
        stored_before = self.stats.at_stored
        if self._duplicate(fields, None):
            return False
        started = time.perf_counter()
        msg = protocol.parse_fields(fields, item)
        if not isinstance(msg, At):
            self.invalid("AT", item, getattr(msg, "reason", "not an AT line"), neighbor=source)
            return False
        self.receive_at(msg, item, source)
        self.stats.durations["AT"].observe(time.perf_counter() - started)
        return self.stats.at_stored > stored_before

    def persist(self) -> None:
        """Before a reply that acknowledges what this batch stored: the neighbors'
        records it stored go to the OS (an IAMAT's record was written by ``iamat``
        itself, before it was stored), then every live link writes what was flooded."""
        self.persist_received()
        self._flood_before_reply()

    def persist_received(self) -> None:
        """Hand the neighbors' records a batch stored to the OS (and, with fsync =
        always, to the disk). They are not acknowledged to anyone: one the disk refuses
        stays in memory (a restart gets it back from the neighbors by reconciliation).
        Their floods leave at the end of this turn of the event loop, without waiting."""
        if self.journal is not None:
            self.journal.flush()
            self.journal.commit()

    def _flood_before_reply(self) -> None:
        """Each link writes what it was offered once per turn of the event loop (a loop
        callback it schedules at the first offer), so the updates of all the clients
        answered in one turn share a send and the neighbor one wake-up. The reply waits
        for that write: ``gevent.sleep(0)`` resumes through the same FIFO of loop
        callbacks, so this greenlet runs on after every flush scheduled before it."""
        if self.replica.has_queued():
            gevent.sleep(0)

    # -- WHATSAT ---------------------------------------------------------------------

    def start_whatsat(self, msg: WhatsAt, line: bytes, deep: bool = False) -> bytes | Greenlet:
        record = self.store.record(msg.client)
        if record is None:
            # A neighbor's flood may be readable on its link in this same turn of the loop
            # (it left before the client's reply): let it be read before saying "unknown".
            gevent.sleep(0)
            record = self.store.record(msg.client)
        if record is None:
            return self.invalid("WHATSAT", line, "unknown client")
        self.stats.whatsat += 1
        return self.whatsat.start(msg, record, deep)

    def invalid(self, word: str, line: bytes, reason: str, **details: object) -> bytes:
        """The ``? `` reply to ``line``, counted under ``word`` and logged with why."""
        self.stats.invalid += 1
        self.stats.invalid_by[word] += 1
        self.log.info("invalid", reason=reason, **details)
        return protocol.format_invalid(line.strip())
