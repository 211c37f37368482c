"""The flood floor: the least one Python process per server can do to flood a herd the SPEC's way.

``python -m bench.flood_floor NAME --config HERD.INI`` runs server NAME of a bench herd.ini as
the cheapest gevent relay there can be, so the herd scenario can put herdserver's cost per
update beside the cost of the design itself, on the same graph, in the same run:

- one persistent TCP connection per link, on the client port + ``HERD_OFFSET`` (the lower
  name connects); no handshake, no secret, no queue, no metrics, no state file;
- an AT line (from a link, or made from a client's IAMAT) is stored if it is newer than what
  the process holds for that client (compared as the time's text: the bench's times all have
  the same width) and then written straight to every other link, as SPEC's "forwards it to
  every neighbor" asks;
- every line in and out is logged, as SPEC's Logs ask (a duplicate too), in herdserver's
  format so the bench reads arrival times the same way (``event=in``, ``event=out``); the
  lines one recv brought and the sends they caused are written with one write, at once;
- an IAMAT is answered after the AT line went to every link, as SPEC's floods-before-replies.

It validates nothing and survives nothing (a closed link is dropped): it is a measuring stick,
never a server. The client port opens once every link is connected, so "listening" is "ready".
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402  (after the patch, as in herdserver.__main__)
import configparser  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TextIO  # noqa: E402

import gevent  # noqa: E402
from gevent.event import Event  # noqa: E402
from gevent.server import StreamServer  # noqa: E402

HERD_OFFSET = 2000  # the herd scenario reserves client port + 2000 (herdserver's default herd port)
HOST = "127.0.0.1"
NAME_WIDTH = 16  # a connecting link's first bytes: its name, space-padded
CONNECT_S = 120.0  # N floors start at once on 2 cores


def log_stamp() -> str:
    """Now, as herdserver's log lines start (UTC, microseconds): the bench reads both alike."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Floor:
    def __init__(self, me: str, neighbors: list[str], ports: dict[str, int], log: TextIO):
        self.me, self.neighbors, self.ports, self.log = me, neighbors, ports, log
        self.links: dict[str, socket.socket] = {}
        self.newest: dict[bytes, bytes] = {}  # client -> its newest AT line's time field
        self.logged: list[str] = []  # log lines not yet written
        self.all_linked = Event()

    def take(self, line: bytes, source: str | None) -> None:
        fields = line.split()
        client, when = fields[3], fields[5]
        text = line.decode().strip()
        stamp = log_stamp()
        if source is not None:
            self.logged.append(f'{stamp} {self.me} INFO event=in neighbor={source} line="{text}"\n')
        if self.newest.get(client, b"") >= when:
            return
        self.newest[client] = when
        for neighbor, sock in self.links.items():
            if neighbor != source:
                sock.sendall(line)
                self.logged.append(f'{stamp} {self.me} INFO event=out neighbor={neighbor} line="{text}"\n')

    def write_log(self) -> None:
        self.log.write("".join(self.logged))
        self.log.flush()
        self.logged = []

    def read_link(self, neighbor: str, sock: socket.socket) -> None:
        buffer = b""
        while chunk := sock.recv(65536):
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                self.take(line + b"\n", neighbor)
            self.write_log()
        self.links.pop(neighbor, None)

    def add_link(self, neighbor: str, sock: socket.socket) -> None:
        self.links[neighbor] = sock
        if len(self.links) == len(self.neighbors):
            self.all_linked.set()
        self.read_link(neighbor, sock)

    def accept_link(self, sock: socket.socket, _address: object) -> None:
        name = b""
        while len(name) < NAME_WIDTH and (chunk := sock.recv(NAME_WIDTH - len(name))):
            name += chunk
        self.add_link(name.decode().strip(), sock)

    def connect(self, neighbor: str) -> None:
        deadline = time.monotonic() + CONNECT_S
        while True:
            try:
                sock = socket.create_connection((HOST, self.ports[neighbor] + HERD_OFFSET))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                gevent.sleep(0.05)  # the neighbor is not listening yet
        sock.sendall(self.me.encode().ljust(NAME_WIDTH))
        self.add_link(neighbor, sock)

    def serve_client(self, sock: socket.socket, _address: object) -> None:
        with sock.makefile("rb") as lines:
            for line in lines:
                _, client, place, sent = line.split()
                at = b"AT %s +0.000000000 %s %s %s\n" % (self.me.encode(), client, place, sent)
                self.take(at, None)
                sock.sendall(at)
                stamp = log_stamp()
                self.logged += [f'{stamp} {self.me} INFO event=in data="{line.decode().strip()}"\n',
                                f'{stamp} {self.me} INFO event=out data="{at.decode().strip()}"\n']
                self.write_log()


def herd_graph(ini: configparser.ConfigParser) -> tuple[dict[str, int], dict[str, list[str]]]:
    """Ports and (both-way) neighbors from a herd.ini."""
    ports: dict[str, int] = {}
    neighbors: dict[str, set[str]] = {}
    for section in ini.sections():
        if section.startswith("server:"):
            name = section.removeprefix("server:")
            ports[name] = ini.getint(section, "port")
            neighbors.setdefault(name, set()).update(
                n.strip() for n in ini.get(section, "neighbors", fallback="").split(",") if n.strip())
    for name, theirs in list(neighbors.items()):
        for other in theirs:
            neighbors.setdefault(other, set()).add(name)
    return ports, {name: sorted(theirs) for name, theirs in neighbors.items()}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.flood_floor", description=__doc__.split("\n")[0])
    parser.add_argument("name")
    parser.add_argument("--config", type=Path, required=True)
    args = parser.parse_args(argv)
    ini = configparser.ConfigParser()
    ini.read(args.config)
    ports, neighbors = herd_graph(ini)
    log_dir = Path(ini.get("herd", "log_dir", fallback="."))
    with open(log_dir / f"{args.name}.log", "a") as log:
        floor = Floor(args.name, neighbors[args.name], ports, log)
        StreamServer((HOST, ports[args.name] + HERD_OFFSET), floor.accept_link).start()
        for neighbor in floor.neighbors:
            if neighbor > args.name:
                gevent.spawn(floor.connect, neighbor)
        if floor.neighbors:
            floor.all_linked.wait()
        StreamServer((HOST, ports[args.name]), floor.serve_client).serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
