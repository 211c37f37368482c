"""The herd handshake's proofs (pure): an end proves it holds the shared secret
without sending it, by an HMAC-SHA256 over both names and two fresh nonces (one
chosen by each end), so a proof cannot be replayed on another connection or in
the other direction.
"""

from __future__ import annotations

import hashlib
import hmac

PROTOCOL = b"herdserver/1"
NO_PROOF = b"-"


def proof(secret: bytes, role: bytes, initiator: bytes, responder: bytes, nonce_i: bytes, nonce_r: bytes) -> bytes:
    """The hex HMAC one end sends: ``role`` is b"initiator" or b"responder"."""
    message = b" ".join((PROTOCOL, role, initiator, responder, nonce_i, nonce_r))
    return hmac.new(secret, message, hashlib.sha256).hexdigest().encode("ascii")


def verify(
    secrets: tuple[bytes, ...], given: bytes, role: bytes, initiator: bytes, responder: bytes, n_i: bytes, n_r: bytes
) -> bool:
    """True when ``given`` is the proof for any of ``secrets`` (constant-time compares)."""
    return any(hmac.compare_digest(proof(s, role, initiator, responder, n_i, n_r), given) for s in secrets)
