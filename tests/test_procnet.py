"""tests/procnet.py against real sockets held by processes this test starts."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from .conftest import wait_until
from .procnet import kill_by_port, pids_on_port, socket_inodes

# Each holder prints one line once its socket is set up, then holds it until stdin closes.
LISTENER = """
import socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
server = socket.socket(family)
server.bind((sys.argv[1], 0))
server.listen(5)
print(server.getsockname()[1], flush=True)
conn, _ = server.accept()
sys.stdin.read()
"""
CLIENT = """
import socket, sys
conn = socket.create_connection((sys.argv[1], int(sys.argv[2])))
print("connected", flush=True)
sys.stdin.read()
"""


class Holders:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, script: str, *args: str) -> tuple[subprocess.Popen[str], str]:
        proc = subprocess.Popen(
            [sys.executable, "-c", script, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.procs.append(proc)
        assert proc.stdout is not None
        return proc, proc.stdout.readline().strip()

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()  # a process this test started, by its Popen
            proc.wait()
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    stream.close()


@pytest.fixture
def holders() -> Iterator[Holders]:
    h = Holders()
    try:
        yield h
    finally:
        h.close()


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.parametrize("host", ["127.0.0.1", pytest.param("::1", id="ipv6")])
def test_finds_the_listener_and_both_ends_of_a_connection(holders: Holders, host: str) -> None:
    if host == "::1" and not ipv6_loopback():
        pytest.skip("no IPv6 loopback here")
    listener, port_text = holders.start(LISTENER, host)
    port = int(port_text)
    assert pids_on_port(port) == [listener.pid]
    client, said = holders.start(CLIENT, host, port_text)
    assert said == "connected"
    # The client's socket has the port as its *remote* end only: it is found too.
    wait_until(lambda: pids_on_port(port) == sorted([listener.pid, client.pid]), what="both holders")
    assert os.getpid() not in pids_on_port(port)


def test_a_port_nobody_holds_has_no_pids() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert pids_on_port(port) == []
    assert kill_by_port(port, {os.getpid()}) == []


def test_kill_by_port_signals_only_the_allowed_holders(holders: Holders) -> None:
    listener, port_text = holders.start(LISTENER, "127.0.0.1")
    port = int(port_text)
    client, _ = holders.start(CLIENT, "127.0.0.1", port_text)
    wait_until(lambda: len(pids_on_port(port)) == 2, what="both holders")
    with socket.create_connection(("127.0.0.1", port)):  # this process holds the port too now
        assert os.getpid() in pids_on_port(port)
        assert kill_by_port(port, {client.pid, 1}) == [client.pid]  # not the listener, not this test
        assert client.wait(timeout=10) == -signal.SIGTERM
        assert listener.poll() is None
        assert kill_by_port(port, {listener.pid}) == [listener.pid]
        assert listener.wait(timeout=10) == -signal.SIGTERM


def test_time_wait_and_other_unowned_sockets_are_skipped(tmp_path) -> None:
    table = tmp_path / "tcp"
    table.write_text(
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
        "   0: 0100007F:1F90 0100007F:D431 06 00000000:00000000 03:00000F9A 00000000     0        0 0 3 0\n"
        "   1: 0100007F:D432 0100007F:1F90 01 00000000:00000000 00:00000000 00000000  1000        0 4242 1 0\n"
        "   2: 0100007F:1F91 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 4343 1 0\n"
    )
    assert socket_inodes(0x1F90, [str(table), str(tmp_path / "absent")]) == {"4242"}
