"""``herdctl``: talk to a running herd from a terminal.

    herdctl [--config PATH] [--server NAME] iamat CLIENT LAT LON
    herdctl ... whatsat CLIENT RADIUS_KM BOUND [--json]
    herdctl ... client CLIENT          the AT line each server holds for CLIENT
    herdctl ... status [SERVER]        the herd as --server sees it; with SERVER, that server alone
    herdctl ... watch [--interval S] [--count N]

Servers are found by name in herd.ini (``--server``: default the first in the file).
Commands go over the client port (IAMAT, WHATSAT); the rest over the HTTP side
(``/herd``, ``/status``, ``/client``). No gevent here: plain blocking sockets with timeouts.
A server that does not answer is one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any, TextIO

from .config import ConfigError, HerdConfig, ServerConfig, load

EXIT_DOWN = 1
EXIT_USAGE = 2
_COORDINATE = re.compile(r"[+-]?[0-9]+(\.[0-9]+)?")


class CtlError(Exception):
    """One line for the person at the terminal; exit status 1."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="herdctl", description="Talk to a running herd.")
    parser.add_argument("--config", default="herd.ini", metavar="PATH", help="the herd file (default: ./herd.ini)")
    parser.add_argument("--server", metavar="NAME", help="the server to talk to (default: the first in the file)")
    parser.add_argument("--timeout", type=float, default=5.0, metavar="S", help="seconds per request (default: 5)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = commands.add_parser("iamat", help="report where CLIENT is (time: now); prints the server's AT reply")
    p.add_argument("client")
    p.add_argument("lat", help="latitude in decimal degrees, e.g. 34.068930")
    p.add_argument("lon", help="longitude in decimal degrees, e.g. -118.445127")
    p = commands.add_parser("whatsat", help="places near CLIENT, pretty-printed")
    p.add_argument("client")
    p.add_argument("radius", help="kilometres, 0 < r <= 50")
    p.add_argument("bound", help="at most this many results, 1-20")
    p.add_argument("--json", action="store_true", help="print the server's reply as it came")
    p = commands.add_parser("client", help="the AT line each server holds for CLIENT")
    p.add_argument("client")
    p = commands.add_parser("status", help="a table of servers, links and records")
    p.add_argument("name", nargs="?", metavar="SERVER", help="just this server, asked directly")
    p = commands.add_parser("watch", help="the status table, refreshed until Ctrl-C")
    p.add_argument("--interval", type=float, default=1.0, metavar="S", help="seconds between refreshes")
    p.add_argument("--count", type=int, default=0, metavar="N", help="stop after N refreshes (0: never)")
    return parser.parse_args(argv)


# -- talking to a server -----------------------------------------------------------------------


def _ask_line(server: ServerConfig, line: str, terminator: bytes, timeout: float) -> bytes:
    """Send one command on the client port and read its reply (to ``terminator``, or a ``? `` line)."""
    address = (server.reach, server.port)
    try:
        with socket.create_connection(address, timeout=timeout) as sock:
            sock.sendall(line.encode("utf-8") + b"\n")
            sock.shutdown(socket.SHUT_WR)
            data = b""
            while not (data.endswith(terminator) or (data.startswith(b"? ") and data.endswith(b"\n"))):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError as exc:
        raise CtlError(f"{server.name} ({server.reach}:{server.port}) is not answering: {_reason(exc)}") from None
    if data.startswith(b"? "):
        raise CtlError(f"{server.name} refused the command: {data.decode('utf-8', 'replace').strip()}")
    if not data.endswith(terminator):
        raise CtlError(f"{server.name} closed the connection before a whole reply ({len(data)} bytes)")
    return data


def get_json(server: ServerConfig, path: str, timeout: float) -> Any:
    if not server.http_port:
        raise CtlError(f"{server.name} has no HTTP side (http_port = 0 in herd.ini)")
    url = server.http_url(path)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        raise CtlError(f"{server.name} ({url}) answered HTTP {exc.code}: {exc.read(200).decode(errors='replace')}") \
            from None
    except (OSError, ValueError) as exc:
        where = f"{server.reach}:{server.http_port}"
        raise CtlError(f"{server.name}'s HTTP side ({where}) is not answering: {_reason(exc)}") from None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.URLError) and isinstance(exc.reason, BaseException):
        exc = exc.reason
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return "timed out"
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def coordinate(text: str, what: str) -> str:
    """``34.06`` -> ``+34.06``: ISO 6709 wants the sign; the server checks the range."""
    if not _COORDINATE.fullmatch(text):
        raise CtlError(f"{what} {text!r} is not a decimal number of degrees")
    return text if text[0] in "+-" else "+" + text


# -- the commands ------------------------------------------------------------------------------


def cmd_iamat(config: HerdConfig, server: ServerConfig, args: argparse.Namespace, out: TextIO) -> None:
    seconds, nanos = divmod(time.time_ns(), 1_000_000_000)
    location = coordinate(args.lat, "latitude") + coordinate(args.lon, "longitude")
    reply = _ask_line(server, f"IAMAT {args.client} {location} {seconds}.{nanos:09d}", b"\n", args.timeout)
    out.write(reply.decode("utf-8", "replace"))


def cmd_whatsat(config: HerdConfig, server: ServerConfig, args: argparse.Namespace, out: TextIO) -> None:
    reply = _ask_line(server, f"WHATSAT {args.client} {args.radius} {args.bound}", b"\n\n", args.timeout)
    text = reply.decode("utf-8", "replace")
    if args.json:
        out.write(text)
        return
    at_line, _, body = text.partition("\n")
    payload = json.loads(body)
    results = payload.get("results") or []
    out.write(f"{at_line}\n{payload.get('status')}: {len(results)} result{'s' * (len(results) != 1)}")
    out.write(f" — {payload['error_message']}\n" if payload.get("error_message") else "\n")
    for i, place in enumerate(results, 1):
        where = place.get("vicinity") or ""
        distance = f"{place['distance_m']} m" if "distance_m" in place else ""
        extra = ", ".join(part for part in (where, distance) if part)
        out.write(f"{i:3}. {place.get('name', '?')}{f'  ({extra})' if extra else ''}\n")


def cmd_client(config: HerdConfig, server: ServerConfig, args: argparse.Namespace, out: TextIO) -> None:
    answer = get_json(server, "/client?id=" + urllib.parse.quote(args.client, safe=""), args.timeout)
    width = max(len(name) for name in answer["servers"])
    for name, held in answer["servers"].items():
        line = f"({held['error']})" if "error" in held else held["at"] or "- not held"
        out.write(f"{name:<{width}}  {line}\n")


def herd_table(herd: dict[str, Any]) -> str:
    """One row per server: address, state, records, connections, each link's state."""
    rows = [("SERVER", "ADDRESS", "STATE", "RECORDS", "CONNS", "PLACES", "LINKS")]
    for name, info in herd["topology"].items():
        s = herd["servers"].get(name, {"error": "no answer"})
        if "error" in s:
            rows.append((name, info["address"], "DOWN", "-", "-", "-", s["error"]))
            continue
        links = " ".join(f"{n}:{'up' if link['up'] else 'DOWN'}" for n, link in sorted(s["links"].items()))
        places = s["places"]
        errors = f" {100 * places['error_rate']:.0f}% err" if places["requests"] else ""
        rows.append((
            name + (" *" if name == herd["self"] else ""), s["address"], "ready" if s["ready"]["ok"] else "NOT READY",
            str(s["records"]), f"{s['connections']['open']}/{s['connections']['parked']}",
            places["provider"] + errors, links or "-",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[-1] + "\n" for row in rows
    )


def single_herd(status: dict[str, Any], config: HerdConfig) -> dict[str, Any]:
    """One server's /status in the shape of /herd, so one table prints both."""
    info = config.servers[status["name"]]
    topology = {status["name"]: {"address": f"{info.host}:{info.port}", "neighbors": list(info.neighbors)}}
    return {"self": status["name"], "topology": topology, "servers": {status["name"]: status}}


def cmd_status(config: HerdConfig, server: ServerConfig, args: argparse.Namespace, out: TextIO) -> None:
    if args.name:
        target = _server(config, args.name)
        out.write(herd_table(single_herd(get_json(target, "/status", args.timeout), config)))
    else:
        out.write(herd_table(get_json(server, "/herd", args.timeout)))


def cmd_watch(config: HerdConfig, server: ServerConfig, args: argparse.Namespace, out: TextIO) -> None:
    clear = "\x1b[H\x1b[2J" if out.isatty() else ""
    shown = 0
    try:
        while True:
            try:
                herd = get_json(server, "/herd", args.timeout)
                events = sorted(
                    ({**e, "server": name} for name, s in herd["servers"].items() for e in s.get("events", [])),
                    key=lambda e: e["time"], reverse=True,
                )[:8]
                text = herd_table(herd) + "".join(
                    f"  {time.strftime('%H:%M:%S', time.localtime(e['time']))} {e['server']} -> "
                    f"{e.get('neighbor', '?')}: {e['event']}{' (' + e['reason'] + ')' if e.get('reason') else ''}\n"
                    for e in events
                )
            except CtlError as exc:
                text = f"{exc}\n"
            out.write(f"{clear}herd as {server.name} sees it, {time.strftime('%H:%M:%S')} (Ctrl-C to stop)\n{text}")
            out.flush()
            shown += 1
            if args.count and shown >= args.count:
                return
            time.sleep(args.interval)
    except KeyboardInterrupt:
        out.write("\n")


COMMANDS: dict[str, Callable[[HerdConfig, ServerConfig, argparse.Namespace, TextIO], None]] = {
    "iamat": cmd_iamat,
    "whatsat": cmd_whatsat,
    "client": cmd_client,
    "status": cmd_status,
    "watch": cmd_watch,
}


def _server(config: HerdConfig, name: str | None) -> ServerConfig:
    if name is None:
        return next(iter(config.servers.values()))
    return config.server(name)


def main(argv: list[str] | None = None, out: TextIO | None = None) -> int:
    args = parse_args(argv)
    out = out if out is not None else sys.stdout
    try:
        config = load(args.config)
        server = _server(config, args.server)
        if args.command == "status" and args.name:
            config.server(args.name)
    except ConfigError as exc:
        print(f"herdctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        COMMANDS[args.command](config, server, args, out)
    except CtlError as exc:
        print(f"herdctl: {exc}", file=sys.stderr)
        return EXIT_DOWN
    return 0


if __name__ == "__main__":
    sys.exit(main())
