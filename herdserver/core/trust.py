"""Who may send AT lines on a client port. Pure: no sockets.

The client port is for clients. Herdserver neighbors send their AT lines over their
links to the herd port, after proving the herd's secret (``handshake.py``); on a
client port, AT lines are accepted only from neighbors configured as another
implementation (``[server:X] foreign = yes``: their host's addresses) and from the
addresses in ``[peers] trusted``. From anyone else they get ``? ``.
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

    foreign_ips: frozenset[str]  # addresses of the servers herd.ini marks foreign = yes
    trusted_ips: frozenset[str]  # [peers] trusted

    def allows_by_address(self, ip: str) -> bool:
        """May a connection from ``ip`` send AT lines on a client port?"""
        ip = canonical_ip(ip)
        return ip in self.trusted_ips or ip in self.foreign_ips
