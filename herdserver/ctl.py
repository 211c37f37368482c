"""``herdctl``: talk to a running herd from a terminal, or check a herd file.

    herdctl [--config PATH] [--server NAME] iamat CLIENT LAT LON
    herdctl ... whatsat CLIENT RADIUS_KM BOUND [--json]
    herdctl ... client CLIENT [--json]  the AT line each server holds for CLIENT
    herdctl ... status [SERVER] [--json] the herd as --server sees it; with SERVER, that server alone
    herdctl ... watch [--interval S] [--count N]
    herdctl ... check                   validate herd.ini as the servers would, start nothing

Servers are found by name in herd.ini (``--server``: default the first in the file).
Commands go over the client port (IAMAT, WHATSAT); the rest over the HTTP side
(``/herd``, ``/status``, ``/client``). No gevent here: plain blocking sockets with timeouts.
Arguments are checked by the server's rules before anything is sent (exit 2, the rule
named). A server that does not answer is one line on stderr and exit status 1; so is a
``status`` where any server is down or not ready.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from decimal import Decimal
from typing import Any, TextIO

from . import __version__
from .config import ConfigError, HerdConfig, ServerConfig, check_dirs, describe, load, places_problem

EXIT_DOWN = 1
EXIT_USAGE = 2
WHITE_SPACE = " \t\r\n\f\v"  # the protocol's field separators

# The server's rules for the fields (docs/PROTOCOL.md), checked here before anything is
# sent, so a typo is told as the rule it breaks rather than as the server's bare "? ".
# tests/test_ctl.py holds these to what a live server accepts.
_DEGREES = {  # what: (ISO 6709's digits, the limit), e.g.
    "latitude": (re.compile(r"[+-]?[0-9]{1,2}(\.[0-9]+)?"), 90, "34.068930"),
    "longitude": (re.compile(r"[+-]?[0-9]{1,3}(\.[0-9]+)?"), 180, "-118.445127"),
}
_RADIUS = re.compile(r"[0-9]{1,4}(\.[0-9]{0,20})?|\.[0-9]{1,20}")
_BOUND = re.compile(r"[0-9]{1,4}")
MAX_RADIUS_KM = 50
MAX_BOUND = 20


class CtlError(Exception):
    """One line for the person at the terminal; exit status 1."""


def client_id(text: str) -> str:
    if not text or any(c in WHITE_SPACE for c in text):
        raise argparse.ArgumentTypeError(f"a client id must be one word, with no white space (got {text!r})")
    return text


def radius(text: str) -> str:
    if not _RADIUS.fullmatch(text) or not 0 < Decimal(text if text[0] != "." else "0" + text) <= MAX_RADIUS_KM:
        raise argparse.ArgumentTypeError(f"radius must be 0 < r <= {MAX_RADIUS_KM} km, in plain digits (got {text!r})")
    return text


def bound(text: str) -> str:
    if not _BOUND.fullmatch(text) or not 1 <= int(text) <= MAX_BOUND:
        raise argparse.ArgumentTypeError(f"bound must be a whole number from 1 to {MAX_BOUND} (got {text!r})")
    return text


def degrees(what: str) -> Callable[[str], str]:
    """``34.06`` -> ``+34.06``: ISO 6709 wants the sign; the range is decided exactly (Decimal)."""
    pattern, limit, example = _DEGREES[what]

    def convert(text: str) -> str:
        if not pattern.fullmatch(text) or abs(Decimal(text)) > limit:
            raise argparse.ArgumentTypeError(
                f"{what} must be decimal degrees from -{limit} to {limit}, e.g. {example} (got {text!r})"
            )
        return text if text[0] in "+-" else "+" + text

    convert.__name__ = what  # argparse names the argument's type in some messages
    return convert


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="herdctl",
        description="Talk to a running herd, or check a herd file.",
        epilog="Exit status: 0 fine; 1 a server did not answer, refused, or (status) is down or not ready; "
        "2 a usage error or a broken herd file. Start a herd with run_herd.",
    )
    parser.add_argument("--config", default="herd.ini", metavar="PATH", help="the herd file (default: ./herd.ini)")
    parser.add_argument("--server", metavar="NAME", help="the server to talk to (default: the first in the file)")
    parser.add_argument("--timeout", type=float, default=5.0, metavar="S", help="seconds per request (default: 5)")
    parser.add_argument("--version", action="version", version=f"herdserver {__version__}")
    # --config and --server after the command too (herdctl check --config x.ini); SUPPRESS:
    # unless given there, the value from before the command stands.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS, metavar="PATH", help="the herd file")
    common.add_argument("--server", default=argparse.SUPPRESS, metavar="NAME", help="the server to talk to")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".", parents=[common])

    p = command("iamat", "report where CLIENT is (time: now); prints the server's AT reply")
    p.add_argument("client", metavar="CLIENT", type=client_id, help="the client's id: one word")
    p.add_argument("lat", metavar="LAT", type=degrees("latitude"), help="degrees, -90 to 90, e.g. 34.068930")
    p.add_argument("lon", metavar="LON", type=degrees("longitude"), help="degrees, -180 to 180, e.g. -118.445127")
    p = command("whatsat", "places near CLIENT, pretty-printed")
    p.add_argument("client", metavar="CLIENT", type=client_id, help="a client some server has heard of")
    p.add_argument("radius", metavar="RADIUS_KM", type=radius, help="kilometres, 0 < r <= 50")
    p.add_argument("bound", metavar="BOUND", type=bound, help="at most this many results, 1-20")
    p.add_argument("--json", action="store_true", help="print the server's reply as it came")
    p = command("client", "the AT line each server holds for CLIENT")
    p.add_argument("client", metavar="CLIENT", type=client_id, help="the client's id: one word")
    p.add_argument("--json", action="store_true", help="the answer as JSON (the server's /client)")
    p = command("status", "a table of servers, links and records; exit 1 unless every server is up and ready")
    p.add_argument("name", nargs="?", metavar="SERVER", help="just this server, asked directly")
    p.add_argument("--json", action="store_true", help="the answer as JSON (the server's /herd, or /status)")
    p = command("watch", "the status table, refreshed until Ctrl-C")
    p.add_argument("--interval", type=float, default=1.0, metavar="S", help="seconds between refreshes")
    p.add_argument("--count", type=int, default=0, metavar="N", help="stop after N refreshes (0: never)")
    command("check", "validate the herd file as a server would (nothing is started); exit 2 and why if it is broken")
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


# -- the commands ------------------------------------------------------------------------------


def cmd_iamat(config: HerdConfig, server: ServerConfig, args: argparse.Namespace, out: TextIO) -> int:
    seconds, nanos = divmod(time.time_ns(), 1_000_000_000)
    location = args.lat + args.lon
    reply = _ask_line(server, f"IAMAT {args.client} {location} {seconds}.{nanos:09d}", b"\n", args.timeout)
    out.write(reply.decode("utf-8", "replace"))
    return 0


def cmd_whatsat(config: HerdConfig, server: ServerConfig, args: argparse.Namespace, out: TextIO) -> int:
    reply = _ask_line(server, f"WHATSAT {args.client} {args.radius} {args.bound}", b"\n\n", args.timeout)
    text = reply.decode("utf-8", "replace")
    if args.json:
        out.write(text)
        return 0
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
    return 0


def cmd_client(config: HerdConfig, server: ServerConfig, args: argparse.Namespace, out: TextIO) -> int:
    answer = get_json(server, "/client?id=" + urllib.parse.quote(args.client, safe=""), args.timeout)
    if args.json:
        write_json(answer, out)
        return 0
    width = max(len(name) for name in answer["servers"])
    for name, held in answer["servers"].items():
        line = f"({held['error']})" if "error" in held else held["at"] or "- not held"
        out.write(f"{name:<{width}}  {line}\n")
    return 0


def write_json(value: Any, out: TextIO) -> None:
    out.write(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


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


def cmd_status(config: HerdConfig, server: ServerConfig, args: argparse.Namespace, out: TextIO) -> int:
    if args.name:
        herd = single_herd(get_json(_server(config, args.name), "/status", args.timeout), config)
    else:
        herd = get_json(server, "/herd", args.timeout)
    if args.json:
        write_json(herd if not args.name else herd["servers"][args.name], out)
    else:
        out.write(herd_table(herd))
    trouble = not_ready(herd)
    if trouble:  # for scripts and health checks: the exit status says it, stderr says who
        print(f"herdctl: not every server is up and ready: {'; '.join(trouble)}", file=sys.stderr)
        return EXIT_DOWN
    return 0


def not_ready(herd: dict[str, Any]) -> list[str]:
    """``Ball: unreachable``, ``Hamilton: no link up (...)``: each server of the answer that is not ready."""
    found = []
    for name in herd["topology"]:
        s = herd["servers"].get(name, {"error": "no answer"})
        if "error" in s:
            found.append(f"{name}: {s['error']}")
        elif not s["ready"]["ok"]:
            found.append(f"{name}: {s['ready']['reason']}")
    return found


def cmd_check(config: HerdConfig, server: ServerConfig, args: argparse.Namespace, out: TextIO) -> int:
    """load() has applied every rule of the file (main); what is left is what a server checks
    as it starts: its directories, and whether Places can work (a warning: it still starts)."""
    check_dirs(config)
    problem = places_problem(config.places, os.environ)
    if problem:
        print(f"herdctl: warning: {config.path}: [places] {problem}", file=sys.stderr)
    out.write(f"{config.path}: ok: {describe(config)}\n")
    return 0


def cmd_watch(config: HerdConfig, server: ServerConfig, args: argparse.Namespace, out: TextIO) -> int:
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
                return 0
            time.sleep(args.interval)
    except KeyboardInterrupt:
        out.write("\n")
    return 0


COMMANDS: dict[str, Callable[[HerdConfig, ServerConfig, argparse.Namespace, TextIO], int]] = {
    "iamat": cmd_iamat,
    "whatsat": cmd_whatsat,
    "client": cmd_client,
    "status": cmd_status,
    "watch": cmd_watch,
    "check": cmd_check,
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
        return COMMANDS[args.command](config, server, args, out)
    except ConfigError as exc:  # check_dirs raises it too: for `check`, exit 2 with the reason
        print(f"herdctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CtlError as exc:
        print(f"herdctl: {exc}", file=sys.stderr)
        return EXIT_DOWN


if __name__ == "__main__":
    sys.exit(main())
