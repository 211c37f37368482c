"""The answering side of a neighbor's connection (it arrives as a client).

``HELLO`` makes the connection a neighbor's: it is answered with our own hello
(and, with a secret, our proof), and from then on the connection's AT lines are
known to come from that neighbor (so they are not flooded back to it) and it may
ask ``SYNC`` questions. ``AUTH`` carries the initiator's proof; ``BYE`` says the
neighbor is stopping.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gevent.event import Event

from ..core import handshake, protocol, sync
from ..core.store import Store
from ..logs import EventLog
from .links import HELLO_VERSION, new_token


class Responder:
    """The answering side of a neighbor's connection (it arrives as a client).

    ``HELLO`` makes the connection a neighbor's: it is answered with our own
    hello, and from then on the connection's AT lines are known to come from
    that neighbor (so they are not flooded back to it) and it may ask ``SYNC``
    questions. Anything else of ours on a connection that did not say hello
    is invalid, like any unknown command.
    """

    WORDS = (b"HELLO", b"AUTH", b"SYNC", b"BYE")

    def __init__(
        self,
        me: bytes,
        store: Store,
        digests: Event,
        boot_id: str,
        neighbors: tuple[str, ...],
        log: EventLog,
        on_hello: Callable[[str], None] = lambda name: None,
        secrets: tuple[bytes, ...] = (),
        on_bye: Callable[[str], None] = lambda name: None,
    ):
        self.me = me
        self.store = store
        self.digests = digests
        self.on_bye = on_bye
        self.secrets = secrets
        self.on_hello = on_hello
        self.boot_id = boot_id.encode()
        self.names = {name.encode("utf-8"): name for name in neighbors}
        self.log = log
        self.peer_boots: dict[str, bytes] = {}
        self.restarts_seen = 0

    def answer(self, fields: list[bytes], item: bytes, conn: Any) -> bytes | None:
        if fields[0] == b"HELLO":
            return self._hello(fields, item, conn)
        if fields[0] == b"AUTH":
            return self._auth(fields, item, conn)
        if conn.neighbor is None or not conn.may_send_at:
            return protocol.format_invalid(item.strip())
        if fields[0] == b"BYE" and len(fields) == 1:
            self.log.info("peer_bye", conn=conn.id, neighbor=conn.neighbor)
            self.on_bye(conn.neighbor)
            return None
        command = sync.parse_sync(fields)
        if command is None:
            return protocol.format_invalid(item.strip())
        if command.verb == b"ASK":
            self.digests.wait()  # after a large replay they take a moment
            return sync.answer_ask(self.store.levels, command.level, command.numbers) + b"\n"
        if command.verb == b"PULL":
            lines = list(self.store.lines_in(command.numbers))
            lines.append(sync.format_done(len(lines)))
            return b"\n".join(lines) + b"\n"
        return protocol.format_invalid(item.strip())

    def _hello(self, fields: list[bytes], item: bytes, conn: Any) -> bytes:
        if len(fields) != 5 or fields[1] != HELLO_VERSION or fields[2] not in self.names:
            return protocol.format_invalid(item.strip())
        name = self.names[fields[2]]
        boot = fields[3]
        previous = self.peer_boots.get(name)
        if previous is not None and previous != boot:
            self.restarts_seen += 1
            self.log.info("peer_restarted", neighbor=name)
        self.peer_boots[name] = boot
        conn.neighbor = name
        conn.peer_hello()
        self.on_hello(name)
        self.log.info("peer_hello", conn=conn.id, neighbor=name)
        nonce = new_token().encode()
        conn.nonces = (fields[2], fields[4], nonce)
        me = self.me
        ours = handshake.proof(self.secrets[0], b"responder", fields[2], me, fields[4], nonce) if self.secrets else b"-"
        return b"HELLO %s %s %s %s %s\n" % (HELLO_VERSION, me, self.boot_id, nonce, ours)

    def _auth(self, fields: list[bytes], item: bytes, conn: Any) -> bytes | None:
        """The initiator's proof: from now on this connection's AT lines count."""
        if len(fields) != 2 or conn.nonces is None or not self.secrets:
            return protocol.format_invalid(item.strip())
        initiator, nonce_i, nonce_r = conn.nonces
        conn.nonces = None  # one proof per hello: no second try on the same nonces
        me = self.me
        if not handshake.verify(self.secrets, fields[1], b"initiator", initiator, me, nonce_i, nonce_r):
            self.log.warning("auth_failed", conn=conn.id, neighbor=conn.neighbor, reason="bad proof")
            return protocol.format_invalid(item.strip())
        conn.may_send_at = True
        self.log.info("peer_authenticated", conn=conn.id, neighbor=conn.neighbor)
        return None
