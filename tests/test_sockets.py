"""Socket helpers over a real (gevent) socket pair."""

from __future__ import annotations

import socket

from herdserver.net.sockets import send_nowait


def test_send_nowait_takes_what_fits_and_never_waits() -> None:
    left, right = socket.socketpair()
    with left, right:
        left.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        assert send_nowait(left, b"hello\n") == 6
        assert right.recv(100) == b"hello\n"
        chunk = b"x" * 65536
        total = 0
        for _ in range(1000):  # bounded: the buffers fill long before this
            sent = send_nowait(left, chunk)
            if sent == 0:
                break
            total += sent
        assert send_nowait(left, chunk) == 0  # full: 0 at once, no wait
        assert total > 0
