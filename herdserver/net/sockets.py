"""Small socket helpers shared by the client and neighbor paths (gevent-aware)."""

from __future__ import annotations

import fcntl
import socket
import struct
import termios
from typing import Any

RECV_BYTES = 65536


def send_nowait(sock: socket.socket, data: bytes) -> int:
    """How much of ``data`` the kernel takes right now (0 when the send buffer is
    full); never waits, so the caller arms a timeout only for the rest."""
    gevent_sock: Any = sock  # gevent's send() takes a per-call timeout; 0.0 = never wait
    try:
        sent: int = gevent_sock.send(data, 0, 0.0)
    except BlockingIOError:
        return 0
    return sent


def unsent(sock: socket.socket) -> int:
    """Bytes in the socket's send queue that the peer has not acknowledged (Linux
    SIOCOUTQ); 0 where the call is not available."""
    try:
        return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0])
    except OSError:
        return 0
