"""The pure core: bytes in, messages and decisions out.

Standard library only: no gevent, sockets, threads, subprocesses, clock reads or
``os``. Time and randomness come in as arguments, so tests pin them. Everything
with I/O (``net``, ``ops``, ``statefile``, ``places``) sits around this package.
"""
