"""Real server processes driven the way the course's grading scripts drive a herd.

Each server is ``python -m herdserver NAME``, started 0.5 s apart; each command is
one connection (write, half-close, read to EOF); a server is stopped the way
``lsof -ti:PORT | xargs kill`` does it: SIGTERM to every process holding a TCP
socket with that port at either end (computed from /proc, and only among the
processes this test started). Then: kill -9 in the middle of pipelined IAMATs,
of one server or of all, loses no acknowledged record.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import gevent
import gevent.event
import pytest

from herdserver.statefile import ReplayReport, read_records

from .conftest import iamat, wait_until, wakeups
from .procnet import kill_by_port, pids_on_port
from .test_cli import NAMES, ROOT, free_ports
from .test_offline import listening

RING = {"Alford": ["Hamilton", "Welsh"], "Ball": ["Holiday", "Welsh"], "Hamilton": ["Alford", "Holiday"],
        "Holiday": ["Ball", "Hamilton"], "Welsh": ["Alford", "Ball"]}  # fmt: skip
CLIENT = b"kiwi.cs.ucla.edu"


class ProcessHerd:
    """Five real server processes on free loopback ports, each with its state file."""

    def __init__(self, tmp_path: Path, places: str = "google"):
        ports = free_ports(2 * len(NAMES))
        self.ports = dict(zip(NAMES, ports[: len(NAMES)], strict=True))
        self.herd_ports = dict(zip(NAMES, ports[len(NAMES) :], strict=True))
        if places == "offline":  # the default herd's: real place data from the (warm) cache
            places_section = "[places]\nprovider = offline\n\n"
        else:  # Places on a port nobody listens on: a WHATSAT fails fast and still starts with the AT line
            places_section = "[places]\nprovider = google\napi_key_env = HERD_TEST_KEY\n"
            places_section += "base_url = http://127.0.0.1:9\ntimeout = 1\n\n"
        # Nothing set about secrets: the servers share the secret file the first one makes.
        text = "[herd]\nlog_dir = logs\nstate_dir = state\n\n" + places_section
        text += "[peers]\nbackoff_max = 0.2\n"
        for name in NAMES:
            neighbors = ", ".join(RING[name])
            text += f"\n[server:{name}]\nport = {self.ports[name]}\nhttp_port = 0\n"
            text += f"herd_port = {self.herd_ports[name]}\nneighbors = {neighbors}\n"
        self.dir = tmp_path
        self.config = tmp_path / "herd.ini"
        self.config.write_text(text)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.started: set[int] = set()  # every PID this test started: the only ones it may signal

    def start(self, name: str) -> subprocess.Popen[bytes]:
        env = dict(os.environ, HERD_TEST_KEY="k")
        command = [sys.executable, "-m", "herdserver", name, "--config", str(self.config)]
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.procs[name] = proc
        self.started.add(proc.pid)
        return proc

    def running(self, name: str) -> bool:
        return name in self.procs and self.procs[name].poll() is None

    def ask(self, name: str, line: bytes) -> bytes:
        """One command on its own connection, like the grading scripts (no final newline)."""
        with socket.create_connection(("127.0.0.1", self.ports[name]), timeout=5) as sock:
            sock.sendall(line)
            sock.shutdown(socket.SHUT_WR)
            data = b""
            with gevent.Timeout(5, AssertionError(f"{name} did not answer {line!r}")):
                while chunk := sock.recv(1 << 20):
                    data += chunk
        return data

    def holds(self, name: str, client: bytes = CLIENT) -> bytes | None:
        try:
            reply = self.ask(name, b"WHATSAT %s 10 1" % client)
        except OSError:
            return None
        return None if reply.startswith(b"?") else reply.split(b"\n", 1)[0]

    def kill_by_port(self, name: str) -> list[int]:
        return kill_by_port(self.ports[name], self.started)

    def stop_all(self, signum: int = signal.SIGTERM) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signum)
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def state_lines(self, name: str) -> set[bytes]:
        return {line for _, _, line in read_records(str(self.dir / "state" / f"{name}.state"), ReplayReport())}


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[ProcessHerd]:
    herd = ProcessHerd(tmp_path)
    yield herd
    herd.stop_all(signal.SIGKILL)


@pytest.fixture
def offline_procs(tmp_path: Path, warm_offline_cache: Path) -> Iterator[ProcessHerd]:
    herd = ProcessHerd(tmp_path, places="offline")
    yield herd
    herd.stop_all(signal.SIGKILL)


def start_like_the_scripts(herd: ProcessHerd, names: list[str]) -> None:
    """``nohup python3 server.py NAME &`` 0.5 s apart (the scripts' pacing is the input
    here, not a wait for anything); then each must answer within 0.5 s of its start."""
    for name in names:
        started = time.monotonic()
        herd.start(name)
        wait_until(lambda name=name: herd.holds(name, b"nobody") is None and _listening(herd, name), 0.5 + 2.0,
                   what=f"{name} to answer")  # fmt: skip
        elapsed = time.monotonic() - started
        gevent.sleep(max(0.0, 0.5 - elapsed))


def _listening(herd: ProcessHerd, name: str) -> bool:
    try:
        return herd.ask(name, b"WHATSAT nobody 1 1") == b"? WHATSAT nobody 1 1\n"
    except OSError:
        return False


def reachable(start: str, up: set[str]) -> set[str]:
    seen, todo = {start}, [start]
    while todo:
        for neighbor in RING[todo.pop()]:
            if neighbor in up and neighbor not in seen:
                seen.add(neighbor)
                todo.append(neighbor)
    return seen


def test_grading_script_flow_every_two_servers_stopped(offline_procs: ProcessHerd) -> None:
    procs = offline_procs  # the default settings: offline places
    start_like_the_scripts(procs, NAMES)
    first = procs.ask("Alford", iamat()).rstrip(b"\n")
    assert first.startswith(b"AT Alford ")
    wait_until(lambda: all(procs.holds(n) == first for n in NAMES), what="every server to hold the first record")
    for name in NAMES:  # what the scripts check of a WHATSAT at every server
        at_line, _, body = procs.ask(name, b"WHATSAT %s 10 3" % CLIENT).partition(b"\n")
        payload = json.loads(body)
        assert at_line == first and payload["status"] == "OK" and 1 <= len(payload["results"]) <= 3
        assert "html_attributions" in payload
    held = first
    for pair in itertools.combinations(NAMES, 2):
        # Links use the herd port: the kill finds only the server itself, with no wait for quiet.
        for name in pair:
            holders = {pid: Path(f"/proc/{pid}/cmdline").read_bytes() for pid in pids_on_port(procs.ports[name])}
            killed = procs.kill_by_port(name)
            assert killed == [procs.procs[name].pid], (pair, name, holders, {n: p.pid for n, p in procs.procs.items()})
        for name in pair:
            assert procs.procs[name].wait(5) == 0  # a clean stop on SIGTERM
        up = set(NAMES) - set(pair)
        assert all(procs.running(n) for n in up), f"stopping {pair} took down another server"
        origin = sorted(up)[0]
        posted = procs.ask(origin, iamat()).rstrip(b"\n")
        assert posted.startswith(b"AT %s " % origin.encode())
        connected = reachable(origin, up)
        wait_until(lambda p=posted, c=connected: all(procs.holds(n) == p for n in c), what=f"{sorted(connected)}")
        for name in up - connected:  # cut off by the two stopped servers: the old record stays
            assert procs.holds(name) == held
        assert all(procs.running(n) for n in up)
        for name in pair:
            procs.start(name)
        # Back up, the restarted ones and the cut-off ones catch up with no new update.
        wait_until(lambda p=posted: all(procs.holds(n) == p for n in NAMES), 3.0, what="the herd to converge")
        held = posted


def _post_everywhere(procs: ProcessHerd, stop: gevent.event.Event, per_second: float) -> None:
    """IAMATs at every live server in turn, paced, until ``stop`` (the load of a round)."""
    for i in itertools.count():
        name = NAMES[i % len(NAMES)]
        if procs.running(name):
            try:
                procs.ask(name, iamat(b"load%d" % (i % 50)))
            except (OSError, AssertionError):
                pass  # the victim, going down
        if stop.wait(1 / per_second):
            return


def test_stopping_a_server_by_its_port_at_any_moment_stops_no_other(procs: ProcessHerd) -> None:
    """``lsof -ti:PORT | xargs kill`` 0-80 ms after an update, while updates flow at
    every server: it signals the victim only, round after round (random victims, delays)."""
    rng = random.Random(15)
    for name in NAMES:
        procs.start(name)
    for name in NAMES:
        wait_until(lambda name=name: _listening(procs, name), 10.0, what=f"{name} up")
    stop = gevent.event.Event()
    load = gevent.spawn(_post_everywhere, procs, stop, 200.0)
    try:
        for _ in range(8):
            victim = rng.choice(NAMES)
            neighbor = rng.choice(RING[victim])
            procs.ask(neighbor, iamat())  # its flood crosses the neighbor's link to the victim
            gevent.sleep(rng.uniform(0.0, 0.08))  # the moment of the kill is this test's input
            assert procs.kill_by_port(victim) == [procs.procs[victim].pid]
            assert procs.procs[victim].wait(5) == 0
            assert all(procs.running(n) for n in NAMES if n != victim), f"stopping {victim} took down another"
            procs.start(victim)
            wait_until(lambda v=victim: _listening(procs, v), 10.0, what=f"{victim} back")
    finally:
        stop.set()
        load.join(5)
    assert all(procs.running(n) for n in NAMES)


def test_a_client_with_its_reply_finds_the_record_at_the_neighbor_it_asks_next(procs: ProcessHerd) -> None:
    """Floods leave before replies: IAMAT at Alford, then at once WHATSAT at each of its
    neighbors, round after round (the grading script's test 1, without its 5 ms pause)."""
    for name in NAMES:
        procs.start(name)
    for name in NAMES:
        wait_until(lambda name=name: _listening(procs, name), 10.0, what=f"{name} up")
    wait_until(lambda: procs.ask("Alford", iamat()) and procs.holds("Hamilton") and procs.holds("Welsh"), 5.0,
               what="the links up")  # fmt: skip
    for i in range(100):
        client = b"next%d" % i
        at = procs.ask("Alford", iamat(client)).rstrip(b"\n")
        for name in RING["Alford"]:
            assert procs.holds(name, client) == at, (i, name)


def test_kill_9_during_pipelined_iamats_loses_no_acknowledged_record(procs: ProcessHerd) -> None:
    for name in NAMES:
        procs.start(name)
    for name in NAMES:
        wait_until(lambda name=name: _listening(procs, name), 10.0, what=f"{name} up")
    acked: list[bytes] = []
    with socket.create_connection(("127.0.0.1", procs.ports["Alford"]), timeout=5) as sock:
        lines = b"".join(iamat(b"p%d" % i) + b"\n" for i in range(20_000))

        def send() -> None:
            try:
                sock.sendall(lines)
            except OSError:
                pass  # the server is gone

        sender = gevent.spawn(send)
        buffer = b""
        with gevent.Timeout(20, AssertionError("replies stopped coming")):
            while True:
                try:
                    chunk = sock.recv(1 << 16)
                except OSError:
                    break
                if not chunk:
                    break
                buffer += chunk
                *replies, buffer = buffer.split(b"\n")
                acked.extend(replies)
                if len(acked) >= 3000 and procs.running("Alford"):
                    procs.procs["Alford"].kill()  # SIGKILL mid-stream
        sender.kill()
    assert 3000 <= len(acked) < 20_000
    procs.procs["Alford"].wait(5)
    # Floods leave before replies: while Alford is down, its live neighbors hold (nearly) all it acknowledged.
    wanted = set(acked)

    def missing_at_neighbors() -> int:
        return len(wanted - procs.state_lines("Hamilton") - procs.state_lines("Welsh"))

    wait_until(lambda: missing_at_neighbors() <= len(wanted) // 1000, 5.0, what="the neighbors to hold the records")
    procs.start("Alford")
    wait_until(lambda: all(wanted <= procs.state_lines(n) for n in NAMES), 10.0,
               what="every acknowledged record on every server")  # fmt: skip
    # And all at once: kill -9 the whole herd, start it again, every record is still there.
    procs.stop_all(signal.SIGKILL)
    for name in NAMES:
        procs.start(name)
    for name in NAMES:
        wait_until(lambda name=name: _listening(procs, name), 10.0, what=f"{name} up again")
    probe = acked[1234]
    for name in NAMES:
        assert procs.holds(name, probe.split()[3]) == probe


def test_a_second_process_on_the_same_state_file_is_refused(procs: ProcessHerd) -> None:
    procs.start("Alford")
    wait_until(lambda: _listening(procs, "Alford"), 10.0, what="Alford up")
    second = subprocess.run(
        [sys.executable, "-m", "herdserver", "Alford", "--config", str(procs.config)],
        cwd=ROOT, capture_output=True, text=True, timeout=20, env=dict(os.environ, HERD_TEST_KEY="k"),
    )  # fmt: skip
    assert second.returncode == 2
    assert "locked" in second.stderr and len(second.stderr.strip().splitlines()) == 1
    assert procs.running("Alford")


def start_alone(config: Path) -> subprocess.Popen[bytes]:
    """Alford of ``config`` as a process of its own (Places: ``api_key_env = HERD_TEST_KEY``)."""
    env = dict(os.environ, HERD_TEST_KEY="k")
    return subprocess.Popen([sys.executable, "-m", "herdserver", "Alford", "--config", str(config)], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip


def test_an_open_foreign_link_gets_the_at_line_before_the_client_gets_its_reply(tmp_path: Path) -> None:
    """Floods before replies hold for a neighbor of another implementation too, while its
    connection is open: a server process, its foreign neighbor a socket of this test. When
    a reply reaches the client, its AT line is already queued at the neighbor's end."""
    port, herd_port, foreign_port = free_ports(3)
    config = tmp_path / "herd.ini"
    config.write_text(
        "[herd]\nlog_dir = logs\nstate_dir = -\n\n[places]\nprovider = google\napi_key_env = HERD_TEST_KEY\n"
        "base_url = http://127.0.0.1:9\ntimeout = 1\n\n[peers]\nlink_idle = 30\n\n"  # the connection stays open
        f"[server:Alford]\nport = {port}\nhttp_port = 0\nherd_port = {herd_port}\nneighbors = Other\n\n"
        f"[server:Other]\nport = {foreign_port}\nforeign = yes\n"
    )
    listener = socket.create_server(("127.0.0.1", foreign_port))
    proc = start_alone(config)
    try:
        listener.settimeout(10)
        theirs, _ = listener.accept()  # the link opens at start, to push every record (none yet)
        wait_until(lambda: listening(proc, port), 10.0, what="Alford up")
        theirs.settimeout(0)  # a read that finds nothing raises instead of waiting
        buffer = b""
        with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
            for i in range(100):
                client.sendall(iamat(b"fb%d" % i) + b"\n")
                reply = b""
                while not reply.endswith(b"\n"):
                    reply += client.recv(4096)
                at = reply.rstrip(b"\n")
                while at not in buffer:
                    buffer += theirs.recv(1 << 16)  # BlockingIOError: the reply came before the flood
        theirs.close()
    finally:
        proc.terminate()  # ours: started above
        proc.wait(10)
        listener.close()


def test_a_server_without_clients_or_neighbors_sleeps(tmp_path: Path) -> None:
    """Nothing wakes a server that has nobody to serve: no sweeper pass a second while
    no client is connected (a herd of 100 idle servers woke 100 times a second for it),
    and the sweeper is back as soon as a client comes (its idle deadline still holds)."""
    port, herd_port = free_ports(2)
    config = tmp_path / "herd.ini"
    config.write_text(
        "[herd]\nlog_dir = logs\nstate_dir = -\n\n[places]\nprovider = google\napi_key_env = HERD_TEST_KEY\n"
        "base_url = http://127.0.0.1:9\ntimeout = 1\n\n[limits]\nidle_timeout = 0.5\n\n"
        f"[server:Alford]\nport = {port}\nhttp_port = 0\nherd_port = {herd_port}\n"
    )
    proc = start_alone(config)
    try:
        wait_until(lambda: listening(proc, port), 10.0, what="Alford up")
        wait_until(lambda: "event=close" in (tmp_path / "logs" / "Alford.log").read_text(errors="replace")
                   if (tmp_path / "logs" / "Alford.log").exists() else False, 10.0, what="the probe's close logged")
        before = wakeups(proc.pid)
        time.sleep(3)  # a window to count wake-ups in, not a wait for something: a sweeper a second woke 3 times
        assert wakeups(proc.pid) - before <= 1
        with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
            client.settimeout(5)
            assert client.recv(1) == b""  # closed by the server: the sweeper saw its idle deadline
    finally:
        proc.terminate()  # ours: started above
        proc.wait(10)
