"""A bounded line reader over one socket, for the herd port's connections (both ends).

One splitter per connection, so the bytes that follow a handshake in the same read are
not lost when the caller moves from the handshake to the steady state.
"""

from __future__ import annotations

import socket

import gevent

from ..core.protocol import LineSplitter, Overlong
from .sockets import RECV_BYTES


class LineReader:
    def __init__(self, sock: socket.socket, limit: int):
        self.sock = sock
        self.splitter = LineSplitter(limit)
        self.ready: list[bytes | Overlong] = []
        self.eof = False
        self.bytes_read = 0

    def read_some(self) -> list[bytes | Overlong]:
        """The lines that are complete now (waiting for at least one read); [] at EOF."""
        if self.ready:
            items, self.ready = self.ready, []
            return items
        while not self.eof:
            data = self.sock.recv(RECV_BYTES)
            self.bytes_read += len(data)
            if not data:
                self.eof = True
                return self.splitter.finish()
            items = self.splitter.feed(data)
            if items:
                return items
        return []

    def next_line(self, timeout: float) -> bytes | Overlong | None:
        """The next non-blank line within ``timeout`` s; None at EOF or on timeout."""
        with gevent.Timeout(timeout, False):
            while True:
                items = self.read_some()
                if not items:
                    return None
                for index, item in enumerate(items):
                    if isinstance(item, Overlong) or item.strip():
                        self.ready = items[index + 1 :] + self.ready
                        return item
        return None
