"""Small socket helpers shared by the client and neighbor paths (gevent-aware)."""

from __future__ import annotations

import socket
from typing import Any

import gevent

RECV_BYTES = 65536


def write_all(sock: socket.socket, data: bytes) -> None:
    """``sendall`` without gevent's per-call ``getsockopt(SO_SNDBUF)`` syscall.

    A reply nearly always fits the socket buffer, so one ``send`` does it; only
    the rest of a large one (a full sync, a big WHATSAT) goes through ``sendall``.
    """
    sent = sock.send(data)
    if sent < len(data):
        sock.sendall(memoryview(data)[sent:])


def send_nowait(sock: socket.socket, data: bytes) -> int:
    """How much of ``data`` the kernel takes right now (0 when the send buffer is
    full); never waits, so the caller arms a timeout only for the rest."""
    gevent_sock: Any = sock  # gevent's send() takes a per-call timeout; 0.0 = never wait
    try:
        sent: int = gevent_sock.send(data, 0, 0.0)
    except BlockingIOError:
        return 0
    return sent


def recv_chunk(sock: socket.socket, idle: float | None) -> bytes | None:
    """Next chunk, ``b""`` at EOF, ``None`` when the idle timeout passed.

    ``gevent.Timeout`` rather than ``settimeout``: the socket stays blocking-mode.
    """
    if idle is None:
        return sock.recv(RECV_BYTES)
    with gevent.Timeout(idle, False):
        return sock.recv(RECV_BYTES)
    return None
