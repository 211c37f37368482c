"""The herd port's handshake, both roles, as bytes in and events out (pure, h11 style).

Nothing but these lines moves on a herd-port connection until both ends have proven
they hold the shared secret (never sent): each proof is an HMAC-SHA256 over the
protocol, the role, both names and both nonces (one chosen by each end), so it cannot
be replayed on another connection, in the other direction, or to another server.

    initiator -> responder   HELLO herdserver/2 <initiator> <responder> <boot> <nonce_i>
    responder -> initiator   HELLO herdserver/2 <responder> <boot> <nonce_r> <proof_r>
    initiator -> responder   AUTH <proof_i>
    responder -> initiator   OK

Only after ``OK`` does either end send records, digests or a goodbye. With the
explicit opt-out (no secret) the proofs are ``-``: the names are still checked.
The caller supplies nonces and boot ids (randomness is I/O) and moves the bytes.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from collections.abc import Collection
from dataclasses import dataclass

PROTOCOL = b"herdserver/2"
NO_PROOF = b"-"
MAX_LINE = 512  # a handshake line is short; an unproven peer gets no more buffer than this


def proof(secret: bytes, role: bytes, initiator: bytes, responder: bytes, nonce_i: bytes, nonce_r: bytes) -> bytes:
    """The hex HMAC one end sends: ``role`` is b"initiator" or b"responder"."""
    message = b" ".join((PROTOCOL, role, initiator, responder, nonce_i, nonce_r))
    return hmac.new(secret, message, hashlib.sha256).hexdigest().encode("ascii")


def verify(
    secrets: tuple[bytes, ...], given: bytes, role: bytes, initiator: bytes, responder: bytes, n_i: bytes, n_r: bytes
) -> bool:
    """True when ``given`` is the proof for any of ``secrets`` (constant-time compares)."""
    if not secrets:
        return given == NO_PROOF
    return any(hmac.compare_digest(proof(s, role, initiator, responder, n_i, n_r), given) for s in secrets)


def _make_proof(secrets: tuple[bytes, ...], *parts: bytes) -> bytes:
    return proof(secrets[0], *parts) if secrets else NO_PROOF


class Phase(enum.Enum):
    STARTED = "started"
    AUTH_SENT = "auth_sent"  # initiator: waiting for OK
    HELLO_SENT = "hello_sent"  # responder: waiting for AUTH
    ESTABLISHED = "established"
    FAILED = "failed"


@dataclass(frozen=True)
class Step:
    """What a line did: bytes to send (may be empty), and whether the peer is now proven
    (``established``) or must be dropped (``failure`` says why)."""

    send: bytes = b""
    established: bool = False
    failure: str = ""


class InitiatorHandshake:
    """The connecting end (a link): hello, check the responder's proof, prove, wait for OK."""

    def __init__(self, secrets: tuple[bytes, ...], me: bytes, neighbor: bytes, boot: bytes, nonce: bytes):
        self.secrets, self.me, self.neighbor, self.nonce = secrets, me, neighbor, nonce
        self.boot = boot
        self.phase = Phase.STARTED
        self.peer_boot = b""

    def hello(self) -> bytes:
        return b"HELLO %s %s %s %s %s\n" % (PROTOCOL, self.me, self.neighbor, self.boot, self.nonce)

    def receive(self, line: bytes) -> Step:
        fields = line.split()
        if self.phase is Phase.STARTED:
            return self._on_hello(fields)
        if self.phase is Phase.AUTH_SENT and fields == [b"OK"]:
            self.phase = Phase.ESTABLISHED
            return Step(established=True)
        return self._fail("the neighbor did not accept our proof" if fields[:1] == [b"?"] else "unexpected answer")

    def _on_hello(self, fields: list[bytes]) -> Step:
        if len(fields) != 6 or fields[0] != b"HELLO" or fields[1] != PROTOCOL:
            return self._fail("not a herdserver/2 hello")
        if fields[2] != self.neighbor:
            return self._fail(f"the server on that port is {fields[2][:64]!r}")
        _, _, _, boot, their_nonce, their_proof = fields
        if not verify(self.secrets, their_proof, b"responder", self.me, self.neighbor, self.nonce, their_nonce):
            return self._fail("the neighbor did not prove the shared secret")
        self.peer_boot = boot
        self.phase = Phase.AUTH_SENT
        ours = _make_proof(self.secrets, b"initiator", self.me, self.neighbor, self.nonce, their_nonce)
        return Step(send=b"AUTH %s\n" % ours)

    def _fail(self, reason: str) -> Step:
        self.phase = Phase.FAILED
        return Step(failure=reason)


class ResponderHandshake:
    """The answering end (the herd port): check the hello, prove, check the initiator's proof."""

    def __init__(self, secrets: tuple[bytes, ...], me: bytes, neighbors: Collection[bytes], boot: bytes, nonce: bytes):
        self.secrets, self.me, self.neighbors, self.boot, self.nonce = secrets, me, neighbors, boot, nonce
        self.phase = Phase.STARTED
        self.peer = b""  # the initiator's name, once its hello named a neighbor of ours
        self.peer_boot = b""
        self._their_nonce = b""

    def receive(self, line: bytes) -> Step:
        fields = line.split()
        if self.phase is Phase.STARTED:
            return self._on_hello(fields)
        if self.phase is Phase.HELLO_SENT and len(fields) == 2 and fields[0] == b"AUTH":
            if verify(self.secrets, fields[1], b"initiator", self.peer, self.me, self._their_nonce, self.nonce):
                self.phase = Phase.ESTABLISHED
                return Step(send=b"OK\n", established=True)
            return self._fail("bad proof")
        return self._fail("expected AUTH")

    def _on_hello(self, fields: list[bytes]) -> Step:
        if len(fields) != 6 or fields[0] != b"HELLO" or fields[1] != PROTOCOL:
            return self._fail("not a herdserver/2 hello")
        _, _, initiator, target, boot, nonce = fields
        if target != self.me:
            return self._fail("the hello is for another server")
        if initiator not in self.neighbors:
            return self._fail("not a neighbor")
        self.peer, self.peer_boot, self._their_nonce = initiator, boot, nonce
        self.phase = Phase.HELLO_SENT
        ours = _make_proof(self.secrets, b"responder", initiator, self.me, nonce, self.nonce)
        return Step(send=b"HELLO %s %s %s %s %s\n" % (PROTOCOL, self.me, self.boot, self.nonce, ours))

    def _fail(self, reason: str) -> Step:
        self.phase = Phase.FAILED
        return Step(failure=reason)
