"""What operators read: Prometheus metrics and the HTTP side (health, status, the page).

Reads a typed snapshot (``core.status.ServerStatus``) through a callable handed to it,
never the server object; imports ``core.status``, ``core.stats``, ``config`` and
``logs`` only, and never ``net``.
"""
