"""Who may send AT lines. Pure: no sockets.

With a shared secret (``[herd] secret_env`` names the variable; several
secrets, comma-separated, are all accepted and the first is used, so a key is
rotated with no downtime), every link opens with a handshake in which each end
proves it holds a secret without sending it: an HMAC-SHA256 over both names and
two fresh nonces, one chosen by each end, so a proof cannot be replayed on
another connection or in the other direction. AT lines are then accepted only
on links that proved it, and from the addresses listed in ``[peers] trusted``
(foreign implementations, which cannot). Without a secret, AT lines are
accepted from the addresses of the servers in herd.ini (and the trusted list)
only: on one shared host that is every local process.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass


def canonical_ip(address: str) -> str:
    """One spelling per address (``::ffff:127.0.0.1`` is ``127.0.0.1``)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


@dataclass(frozen=True)
class Trust:
    """The policy for AT lines arriving on client connections."""

    secrets: tuple[bytes, ...]
    herd_ips: frozenset[str]  # addresses of the servers in herd.ini
    trusted_ips: frozenset[str]  # [peers] trusted: foreign peers

    @property
    def authenticated(self) -> bool:
        return bool(self.secrets)

    def allows_by_address(self, ip: str) -> bool:
        """May a connection from ``ip`` send AT lines before (or without) a handshake?"""
        ip = canonical_ip(ip)
        if ip in self.trusted_ips:
            return True
        return not self.secrets and ip in self.herd_ips
