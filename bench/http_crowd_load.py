"""Attack jobs for the ``http-crowd`` scenario: ``bench/attack_load.py``'s jobs plus HTTP heads.

    python -m bench.http_crowd_load        # same JSON job protocol as bench/load.py

``http_heads_start`` opens connections that each send one request head (big,
complete or not) and then hold the connection, recording what the server answers.
"""

from __future__ import annotations

import sys
from typing import Any

from bench import load
from bench.attack_load import ATTACKS, Attack, loopback  # its jobs (flood_start, ...) come along
from bench.load import job


def head_bytes(header_lines: int, line_bytes: int, complete: bool) -> bytes:
    line = b"X-Fill: " + b"f" * line_bytes + b"\r\n"
    return b"GET /status HTTP/1.1\r\nHost: bench\r\n" + line * header_lines + (b"\r\n" if complete else b"")


def send_head(attack: Attack, target: list[Any], source: str, head: bytes) -> None:
    """Send ``head``, then wait for the server's answer or close (or the attack's end)."""
    sock = attack.open(target, source)
    if sock is None:
        return
    sock.settimeout(None)
    try:
        sock.sendall(head)
        attack.count("sent")
    except OSError:
        attack.count("closed_while_sending")
    try:
        answer = sock.recv(64)
    except OSError:
        answer = b""
    attack.count(f"answer_{answer[9:12].decode('latin-1')}" if answer.startswith(b"HTTP/1.1 ") else "closed_silently")


@job
def http_heads_start(name: str, target: list[Any], count: int, sources: list[str], header_lines: int,
                     line_bytes: int, complete: bool, duration: float) -> dict[str, Any]:
    sources = [loopback(s) for s in sources]
    head = head_bytes(header_lines, line_bytes, complete)
    attack = ATTACKS[name] = Attack(duration, 0)
    for k in range(count):
        attack.group.spawn(send_head, attack, target, sources[k % len(sources)], head)
    return {"started": name, "head_bytes": len(head)}


if __name__ == "__main__":
    sys.exit(load.main())
