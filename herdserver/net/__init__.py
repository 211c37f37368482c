"""Everything with gevent and sockets: client connections, the one command dispatcher,
WHATSAT lanes, the links to neighbors and the answering side of their connections.

Imports ``core``, ``places``, ``statefile``, ``config`` and ``logs``; never ``ops``.
"""
