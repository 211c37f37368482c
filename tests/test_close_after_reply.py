"""[limits] close_after_reply: clients that send one command and read until the server closes."""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest

from herdserver.config import Limits

from .conftest import Herd, LineClient, iamat, wait_until

CLOSING = Limits(shutdown_grace=0.5, close_after_reply=True)


def one_command(herd: Herd, name: str, line: bytes) -> bytes:
    """Like the course's test clients: write one command, never half-close, read until EOF."""
    client = herd.client(name, timeout=5.0)
    client.send(line + b"\n")
    reply = client.read_to_eof()
    client.close()  # ends the server's wait for it (it reads what a client sends after its command)
    return reply


def test_each_command_gets_its_reply_then_eof(make_herd: Any) -> None:
    herd: Herd = make_herd({"Alford": ["Ball"], "Ball": []}, limits=CLOSING)
    at = one_command(herd, "Alford", iamat(b"kiwi"))
    assert at.startswith(b"AT Alford ") and at.endswith(b"\n") and at.count(b"\n") == 1
    whatsat = one_command(herd, "Alford", b"WHATSAT kiwi 10 2")
    assert whatsat.startswith(at) and whatsat.endswith(b"\n\n")
    assert one_command(herd, "Alford", b"hello") == b"? hello\n"
    # Links use the herd port: the record still floods, and WHATSAT at Ball finds it.
    wait_until(lambda: herd.holds("Ball", b"kiwi"), what="kiwi at Ball")
    assert one_command(herd, "Ball", b"WHATSAT kiwi 10 2").startswith(at)
    # Every client connection closed (the client port holds no neighbor's).
    wait_until(lambda: not any(herd.servers[n].clients.connections for n in herd.servers), what="clients closed")


def test_a_line_sent_after_the_command_does_not_reset_the_reply(make_herd: Any, fake_places: Any) -> None:
    """A client that sends more while its WHATSAT is answered, and reads slowly: closing
    with its line unread would reset the connection and throw away the reply still
    queued in the server's kernel; the server reads and drops it first, so the whole
    reply and then EOF arrive."""
    herd: Herd = make_herd({"Solo": []}, limits=CLOSING)
    one_command(herd, "Solo", iamat(b"kiwi"))
    fake_places.latency = 0.2
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)  # before connect: a small window
    sock.settimeout(5.0)
    sock.connect(herd.address("Solo"))
    try:
        sock.sendall(b"WHATSAT kiwi 50 20\n")
        wait_until(lambda: fake_places.in_flight == 1, what="the Places call under way")
        sock.sendall(b"IAMAT late +1+1 1\n")  # arrives while the command is answered: never read as a command
        server = herd.servers["Solo"]
        wait_until(lambda: not server.clients.connections, what="the server to close the connection")
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    finally:
        sock.close()
    assert reply.startswith(b"AT Solo ") and reply.endswith(b"\n\n")
    assert len(reply) > 8192  # more than the client's window: part of it waited in the server's kernel
    assert len(json.loads(reply.split(b"\n", 1)[1])["results"]) == 20
    assert not herd.holds("Solo", b"late")


def test_without_it_the_connection_stays_open(make_herd: Any) -> None:
    herd: Herd = make_herd({"Solo": []})
    client = LineClient(herd.address("Solo"), timeout=0.3)
    herd.clients.append(client)
    assert client.ask(iamat(b"kiwi")).startswith(b"AT Solo ")
    with pytest.raises(AssertionError, match="no data from server in time"):
        client.read_to_eof()
    assert client.ask(b"WHATSAT kiwi 10 1").startswith(b"AT Solo ")  # still served on the same connection
