#!/usr/bin/env python3
"""Start, watch and stop the herd described in herd.ini: one process per server.

    python run_herd.py                     # every server in ./herd.ini
    python run_herd.py Alford Hamilton     # only these
    python run_herd.py --config other.ini

Prints one line per server once every port accepts connections, then waits.
Ctrl-C or SIGTERM stops every server it started (SIGTERM, then SIGKILL after
--stop-timeout seconds) and exits with status 0 if every server ran until then
and stopped cleanly, 1 if one did not (it exited by itself, or had to be killed).
A port that something else already listens on is refused before anything starts.
This launcher uses no gevent: it only starts processes and polls ports.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

from herdserver import __version__
from herdserver.config import ConfigError, HerdConfig, ServerConfig, effective_provider, load, prepare_log_dir

EXIT_CONFIG = 2


@dataclass
class Child:
    server: ServerConfig
    process: subprocess.Popen[bytes]
    reported_exit: bool = False


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Run the whole herd (or some of it) from a herd.ini file, one process per server.",
        epilog="Each server also runs alone: python -m herdserver NAME --config PATH. "
        "Logs go to the log_dir of the file, one NAME.log per server.",
    )
    parser.add_argument("names", nargs="*", metavar="NAME", help="servers to start (default: all in the file)")
    parser.add_argument("--config", default="herd.ini", metavar="PATH", help="the herd file (default: ./herd.ini)")
    parser.add_argument(
        "--start-timeout", type=float, default=30.0, metavar="S", help="seconds to wait for every port (default 30)"
    )
    parser.add_argument(
        "--stop-timeout", type=float, default=5.0, metavar="S", help="seconds between SIGTERM and SIGKILL (default 5)"
    )
    parser.add_argument("--version", action="version", version=f"herdserver {__version__}")
    return parser.parse_args(argv)


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def ports_in_use(config: HerdConfig, names: list[str]) -> list[str]:
    """Servers whose address something already listens on (it would answer in their place)."""
    return [
        f"{name}: {s.host}:{s.port} is already in use by another program"
        for name in names
        if port_open((s := config.servers[name]).host, s.port)
    ]


def start(config: HerdConfig, names: list[str]) -> list[Child]:
    children = []
    for name in names:
        command = [sys.executable, "-m", "herdserver", name, "--config", config.path]
        children.append(Child(config.servers[name], subprocess.Popen(command)))
    return children


def wait_until_listening(children: list[Child], timeout: float) -> str | None:
    """None when every port accepts; else why not (a child died, or time ran out)."""
    deadline = time.monotonic() + timeout
    waiting = list(children)
    while waiting:
        for child in list(waiting):
            code = child.process.poll()
            if code is not None:
                return f"{child.server.name} exited with status {code} before listening"
            if port_open(child.server.host, child.server.port):
                waiting.remove(child)
        if time.monotonic() > deadline:
            return "no answer within %gs from %s" % (timeout, ", ".join(c.server.name for c in waiting))
        if waiting:
            time.sleep(0.05)  # polling a port for readiness: there is no event to wait on
    return None


def stop(children: list[Child], timeout: float) -> bool:
    """SIGTERM every child still running, SIGKILL what outlives ``timeout``; True
    when every one of them was still running and exited 0."""
    clean = True
    for child in children:
        if child.process.poll() is None:
            child.process.send_signal(signal.SIGTERM)
        else:
            clean = False  # it had exited by itself
            report_exit(child)
    deadline = time.monotonic() + timeout
    for child in children:
        try:
            code = child.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"run_herd: {child.server.name} ignored SIGTERM; killing it", file=sys.stderr)
            child.process.kill()
            child.process.wait()
            clean = False
            continue
        if code != 0 and not child.reported_exit:
            print(f"run_herd: {child.server.name} stopped with status {code}", file=sys.stderr)
            child.reported_exit = True
            clean = False
    return clean


def print_table(config: HerdConfig, children: list[Child]) -> None:
    provider = effective_provider(config.places, os.environ)
    for child in children:
        s = child.server
        print(
            f"{s.name:<10} {s.host}:{s.port:<6} neighbors: {', '.join(s.neighbors) or '-':<20} "
            f"places: {provider:<13} log: {config.log_path(s.name)}",
            flush=True,
        )


class Stop(Exception):
    pass


def _raise_stop(signum: int, frame: object) -> None:
    raise Stop()


def report_exit(child: Child) -> None:
    """Say (once) that a server exited by itself."""
    code = child.process.poll()
    if code is not None and not child.reported_exit:
        child.reported_exit = True
        print(f"run_herd: {child.server.name} exited with status {code}", file=sys.stderr, flush=True)


def watch(children: list[Child]) -> None:
    """Report servers that exit on their own; return when none is left."""
    while any(child.process.poll() is None for child in children):
        for child in children:
            report_exit(child)
        time.sleep(0.2)  # a watch loop: signals interrupt it at once
    for child in children:
        report_exit(child)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    twice = sorted({name for name in args.names if args.names.count(name) > 1})
    if twice:
        print(f"run_herd: {', '.join(twice)} named more than once", file=sys.stderr)
        return EXIT_CONFIG
    try:
        config = load(args.config)
        for name in args.names:
            config.server(name)
        prepare_log_dir(config)
    except ConfigError as exc:
        print(f"run_herd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    names = args.names or list(config.servers)
    busy = ports_in_use(config, names)
    if busy:
        for problem in busy:
            print(f"run_herd: {problem}", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    children: list[Child] = []
    status = 1
    try:
        children = start(config, names)
        problem = wait_until_listening(children, args.start_timeout)
        if problem:
            print(f"run_herd: {problem}; stopping the herd", file=sys.stderr)
            return 1
        print_table(config, children)
        print(f"run_herd: {len(children)} servers up; Ctrl-C or SIGTERM stops them", flush=True)
        watch(children)
        print("run_herd: every server has exited", file=sys.stderr)
    except Stop:
        print("run_herd: stopping", flush=True)
        status = 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if not stop(children, args.stop_timeout):
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
