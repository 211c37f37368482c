"""Attack jobs for the ``attack`` scenario: a ``bench/load.py`` worker with more jobs.

    python -m bench.attack_load        # same JSON job protocol as bench/load.py

The attacks run in the background (the job that starts one returns at once, so
one worker can hold connections while the runner measures); ``*_status`` reads
their counters and ``*_stop`` ends them. Each is bounded in time (``duration``)
and in count (connections, reconnects, lines). Loopback only: every source
address is checked to be in 127.0.0.0/8.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all(thread=True, socket=True)

import ipaddress  # noqa: E402
import random  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
from gevent.pool import Group  # noqa: E402

from bench import load  # noqa: E402
from bench.load import IO_TIMEOUT, Errors, Reader, fd_room, iamat, job  # noqa: E402

FORGED_LOCATION = b"+66.666666+066.666666"  # never sent by an honest client
FAR_FUTURE = b"253402300799"  # 9999-12-31T23:59:59Z


def loopback(address: str) -> str:
    if ipaddress.ip_address(address) not in ipaddress.ip_network("127.0.0.0/8"):
        raise ValueError(f"{address} is not a loopback address")
    return address


def attack_connect(target: list[Any], source: str) -> socket.socket:
    sock = socket.create_connection((target[0], target[1]), timeout=IO_TIMEOUT, source_address=(source, 0))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    """True when the server has closed (EOF or reset) the connection; never blocks
    (timeout 0: gevent's recv would otherwise wait for the socket to be readable)."""
    timeout = sock.gettimeout()
    sock.settimeout(0.0)
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        sock.settimeout(timeout)


class Attack:
    """Counters and sockets of one background attack."""

    def __init__(self, duration: float, max_reconnects: int):
        self.deadline = time.monotonic() + duration
        self.stopping = False
        self.max_reconnects = max_reconnects
        self.group = Group()
        self.socks: set[socket.socket] = set()
        self.counts: dict[str, int] = {}
        self.errors = Errors()

    def count(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    def running(self) -> bool:
        return not self.stopping and time.monotonic() < self.deadline

    def may_reconnect(self) -> bool:
        return self.running() and self.counts.get("reconnects", 0) < self.max_reconnects

    def open(self, target: list[Any], source: str) -> socket.socket | None:
        try:
            sock = attack_connect(target, source)
        except OSError as exc:
            self.count("connect_errors")
            self.errors.add(exc)
            return None
        self.socks.add(sock)
        self.count("connected")
        return sock

    def drop(self, sock: socket.socket) -> None:
        self.socks.discard(sock)
        sock.close()

    def status(self) -> dict[str, Any]:
        return {**self.counts, "held": len(self.socks), "errors": self.errors.count, "first_error": self.errors.first}

    def stop(self) -> dict[str, Any]:
        self.stopping = True
        self.group.kill(block=True, timeout=10)
        result = self.status()
        for sock in list(self.socks):
            sock.close()
        self.socks.clear()
        return result


ATTACKS: dict[str, Attack] = {}


def sleep_until(attack: Attack, seconds: float) -> bool:
    """Sleep ``seconds`` (or less, at the deadline); False once the attack is over."""
    gevent.sleep(max(0.0, min(seconds, attack.deadline - time.monotonic())))
    return attack.running()


# -- idle and trickling connections ---------------------------------------------------------------


def trickler(attack: Attack, target: list[Any], source: str, sock: socket.socket, every: tuple[float, float]) -> None:
    """One byte every ``every`` seconds, never a newline; reconnect when the server drops it."""
    while True:
        if not sleep_until(attack, random.uniform(*every)):
            return
        if closed_by_server(sock):
            attack.count("dropped_by_server")
            attack.drop(sock)
            if not attack.may_reconnect():
                return
            attack.count("reconnects")
            new = attack.open(target, source)
            if new is None:
                return
            sock = new
            continue
        try:
            sock.send(b"x")
            attack.count("bytes_sent")
        except OSError:
            attack.count("dropped_by_server")
            attack.drop(sock)
            return


def flooder(attack: Attack, target: list[Any], count: int, sources: list[str], trickle_every: int,
            batch: int, every: tuple[float, float]) -> None:
    """Open ``count`` connections ``batch`` at a time, source addresses round-robin;
    every ``trickle_every``-th one trickles (0: none), the rest stay idle."""
    opened = 0
    while opened < count and attack.running():
        group = Group()
        for k in range(opened, min(count, opened + batch)):
            group.spawn(flood_one, attack, target, sources[k % len(sources)], trickle_every and k % trickle_every == 0,
                        every)
        group.join(timeout=IO_TIMEOUT)
        opened = min(count, opened + batch)
    attack.counts["opened_all_at"] = int(time.monotonic() * 1000)


def flood_one(attack: Attack, target: list[Any], source: str, trickles: bool, every: tuple[float, float]) -> None:
    sock = attack.open(target, source)
    if sock is not None and trickles:
        attack.count("tricklers")
        attack.group.spawn(trickler, attack, target, source, sock, every)


@job
def flood_start(name: str, target: list[Any], count: int, sources: list[str], trickle_every: int, batch: int,
                duration: float, every: list[float], max_reconnects: int) -> dict[str, Any]:
    sources = [loopback(s) for s in sources]
    room = fd_room() - 200
    if count > room:
        raise ValueError(f"{count} connections asked, {room} descriptors left in this process")
    attack = ATTACKS[name] = Attack(duration, max_reconnects)
    attack.group.spawn(flooder, attack, target, count, sources, trickle_every, batch, (every[0], every[1]))
    return {"started": name, "fd_limit": room + 200}


@job
def attack_status(name: str) -> dict[str, Any]:
    return ATTACKS[name].status()


@job
def attack_stop(name: str) -> dict[str, Any]:
    return ATTACKS.pop(name).stop()


# -- WHATSAT pipeliners that read nothing --------------------------------------------------------


def pipeliner(attack: Attack, target: list[Any], client: str, source: str) -> None:
    """IAMAT once, then WHATSAT without end, reading nothing; reconnect when dropped."""
    line = f"WHATSAT {client} 10 5\n".encode() * 64
    while attack.running():
        sock = attack.open(target, source)
        if sock is None:
            return
        sock.settimeout(None)  # wait as long as the server makes us: it drops us, or the attack ends
        try:
            sock.sendall(iamat(client))
            Reader(sock).until(b"\n")
            while attack.running():
                sock.sendall(line)  # blocks once the server stops reading (its replies unread)
                attack.count("whatsat_sent", 64)
        except (OSError, EOFError):
            attack.count("dropped_by_server")
        attack.drop(sock)
        if not attack.may_reconnect():
            return
        attack.count("reconnects")


@job
def pipeline_start(name: str, target: list[Any], clients: int, prefix: str, source: str, duration: float,
                   max_reconnects: int) -> dict[str, Any]:
    attack = ATTACKS[name] = Attack(duration, max_reconnects)
    for k in range(clients):
        attack.group.spawn(pipeliner, attack, target, f"{prefix}-{k}", loopback(source))
    return {"started": name}


# -- the forger ------------------------------------------------------------------------------------


def forger(attack: Attack, targets: list[list[Any]], servers: list[str], victim: str, source: str,
           max_lines: int) -> None:
    """Plain client connections: AT lines naming real and unknown servers for ``victim``
    (current and far-future times), and IAMATs for ``victim`` with a far-future time.
    Reads every reply (an AT line refused is answered ``? ...``)."""
    conns = []
    for target in targets:
        sock = attack.open(target, source)
        if sock is not None:
            conns.append((sock, Reader(sock)))
    v = victim.encode()
    while attack.running() and attack.counts.get("lines", 0) < max_lines:
        now = time.time_ns()
        stamp = b"%d.%09d" % (now // 10**9, now % 10**9)
        lines = [b"AT %s +0.0 %s %s %s\n" % (s.encode(), v, FORGED_LOCATION, t)
                 for s in servers for t in (stamp, FAR_FUTURE)]
        lines.append(b"IAMAT %s %s %s\n" % (v, FORGED_LOCATION, FAR_FUTURE))
        lines.append(b"IAMAT %s %s %s.000000001\n" % (v, load.LOCATION, FAR_FUTURE))
        for sock, reader in conns:
            try:
                sock.sendall(b"".join(lines))
                # every refused line is answered "? ..."; a far-future AT accepted would get no reply:
                # read with a short deadline so a silent one never stalls the forger
                answered = 0
                sock.settimeout(1.0)
                try:
                    while answered < len(lines):
                        reply = reader.until(b"\n")
                        answered += 1
                        attack.count("refused_replies" if reply.startswith(b"? ") else "other_replies")
                except TimeoutError:
                    attack.count("unanswered", len(lines) - answered)
                attack.count("lines", len(lines))
            except (OSError, EOFError) as exc:
                attack.errors.add(exc)
                return
        if not sleep_until(attack, 0.05):
            return


@job
def forge_start(name: str, targets: list[list[Any]], servers: list[str], victim: str, sources: list[str],
                duration: float, max_lines: int) -> dict[str, Any]:
    attack = ATTACKS[name] = Attack(duration, 0)
    for source in sources:
        attack.group.spawn(forger, attack, targets, servers, victim, loopback(source), max_lines)
    return {"started": name}


@job
def record_of(targets: list[list[Any]], client: str) -> dict[str, Any]:
    """What each server holds for ``client``: the AT line of ``WHATSAT client 1 1``
    (or the ``? `` reply when it holds nothing)."""
    held = []
    for target in targets:
        with load.connect(target) as sock:
            sock.sendall(f"WHATSAT {client} 1 1\n".encode())
            reader = Reader(sock)
            first = reader.until(b"\n")
            if not first.startswith(b"? "):
                reader.until(b"\n\n")
            held.append(first.decode().strip())
    return {"held": held}


@job
def honest_whatsat(target: list[Any], client: str, seconds: float, max_requests: int) -> dict[str, Any]:
    """One honest client: IAMAT once, then WHATSAT after WHATSAT, each answer read whole
    before the next is sent, for ``seconds``; latencies in ms."""
    latencies: list[float] = []
    with load.connect(target) as sock:
        reader = Reader(sock)
        sock.sendall(iamat(client))
        reader.until(b"\n")
        line = f"WHATSAT {client} 10 5\n".encode()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and len(latencies) < max_requests:
            started = time.perf_counter()
            sock.sendall(line)
            if reader.until(b"\n").startswith(b"? "):
                raise ValueError("WHATSAT refused")
            reader.until(b"\n\n")
            latencies.append(time.perf_counter() - started)
    return {"count": len(latencies), **load.summary(latencies)}


@job
def newcomers(target: list[Any], count: int, source: str, timeout_s: float) -> dict[str, Any]:
    """``count`` new connections from ``source``, one after another, each asking one
    IAMAT: how many were answered within ``timeout_s`` s (a full server that refuses, or
    leaves them waiting, answers none)."""
    answered, latencies = 0, []
    for k in range(count):
        started = time.perf_counter()
        try:
            sock = socket.create_connection((target[0], target[1]), timeout=timeout_s,
                                            source_address=(loopback(source), 0))
            with sock:
                sock.settimeout(timeout_s)
                sock.sendall(iamat(f"newcomer-{k}"))
                if Reader(sock).until(b"\n").startswith(b"AT "):
                    answered += 1
                    latencies.append(time.perf_counter() - started)
        except (OSError, EOFError):
            pass  # refused, reset or timed out: not answered
    return {"asked": count, "answered": answered, **load.summary(latencies)}


@job
def honest_iamat(target: list[Any], client: str) -> dict[str, Any]:
    with load.connect(target) as sock:
        sock.sendall(iamat(client))
        return {"reply": Reader(sock).until(b"\n").decode().strip()}


if __name__ == "__main__":
    sys.exit(load.main())
