#!/usr/bin/env python3
"""Start, watch and stop the herd described in herd.ini: one process per server.

    python run_herd.py                     # every server in ./herd.ini
    python run_herd.py Alford Hamilton     # only these
    python run_herd.py --config other.ini

Prints one line per server once every port accepts connections, then supervises:
a server that exits by itself is restarted after 1 s, 2 s, 4 s ... up to 30 s
(back to 1 s once it had been up for a minute), one line on stderr each time;
--no-restart only reports it. Ctrl-C or SIGTERM, even during start-up, stops every
server it started (SIGTERM, then SIGKILL after --stop-timeout seconds) and exits
with status 0 if no server ever exited by itself and each stopped cleanly, else 1.
Killed outright (SIGKILL), it leaves no server behind: each is started with
--parent-pid and stops when run_herd is gone.
A port that something else already listens on is refused before anything starts;
a broken herd file, a log_dir that cannot be made or a name given twice is exit 2.
This launcher uses no gevent: it only starts processes and polls ports.
"""

from __future__ import annotations

import argparse
import os
import secrets
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, replace

from herdserver import __version__
from herdserver.config import ConfigError, HerdConfig, ServerConfig, effective_provider, load, prepare_log_dir

EXIT_CONFIG = 2
WATCH_INTERVAL = 0.2  # seconds between looks at the servers (a signal wakes the loop at once)


@dataclass
class Backoff:
    """Restart delays: ``initial`` doubling per quick death up to ``maximum``; a server
    that was up for ``reset_after`` seconds or more starts again from ``initial``."""

    initial: float = 1.0
    maximum: float = 30.0
    reset_after: float = 60.0
    next_delay: float | None = None

    def delay(self, uptime: float) -> float:
        """The wait before restarting a server that exited after ``uptime`` seconds."""
        if self.next_delay is None or uptime >= self.reset_after:
            self.next_delay = self.initial
        delay = self.next_delay
        self.next_delay = min(delay * 2, self.maximum)
        return delay


@dataclass
class Child:
    server: ServerConfig
    process: subprocess.Popen[bytes]
    started: float  # time.monotonic() at the last (re)start
    backoff: Backoff
    reported_exit: bool = False  # its exit (of this process) was said
    died: bool = False  # it exited by itself at least once
    restart_at: float | None = None  # time.monotonic() when it is to be started again


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
    parser.add_argument(
        "--no-restart",
        dest="restart",
        action="store_false",
        help="do not restart a server that exits by itself (only report it; run_herd exits once none is left)",
    )
    parser.add_argument("--version", action="version", version=f"herdserver {__version__}")
    # The restart delays, for tests (hidden): --restart-initial, --restart-max, --restart-reset.
    d = Backoff()
    for option, default in (("initial", d.initial), ("max", d.maximum), ("reset", d.reset_after)):
        parser.add_argument(f"--restart-{option}", type=positive, default=default, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.restart_max < args.restart_initial:
        parser.error("--restart-max must not be less than --restart-initial")
    args.backoff = Backoff(args.restart_initial, args.restart_max, args.restart_reset)
    return args


def positive(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


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


class Signals:
    """SIGINT and SIGTERM only note that a stop was asked for, and cut short ``sleep``:
    nothing is interrupted halfway (a server forked but not yet recorded, say)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._wake_r, wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)  # the C handler writes a byte here: select() below returns
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._note)

    def _note(self, signum: int, frame: object) -> None:
        if self.received is None:
            self.received = signum

    def sleep(self, seconds: float) -> None:
        """Wait ``seconds``, or less if a signal arrives."""
        if self.received is None:
            select.select([self._wake_r], [], [], max(0.0, seconds))
        try:
            os.read(self._wake_r, 512)
        except BlockingIOError:
            pass


def ensure_secret(config: HerdConfig) -> str:
    """With no secret in the environment, make a fresh one for this run: the herd's
    links are then authenticated with no set-up (the servers inherit it). Says which."""
    if config.secrets(os.environ):
        return f"links authenticated with ${config.secret_env}"
    os.environ[config.secret_env] = secrets.token_hex(32)
    return "links authenticated with a fresh secret made for this run"


def prebuild_offline_cache(config: HerdConfig, names: list[str]) -> None:
    """Build the offline place cache once, before five servers would each wait for it."""
    if effective_provider(config.places, os.environ) != "offline":
        return
    done = subprocess.run([sys.executable, "-m", "herdserver.offline", "build-cache"], capture_output=True, text=True)
    if done.returncode != 0:  # not fatal: each server falls back on its own
        print(f"run_herd: offline place cache: {done.stderr.strip() or done.stdout.strip()}", file=sys.stderr)


def spawn(config: HerdConfig, name: str) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "herdserver", name, "--config", config.path, "--parent-pid", str(os.getpid())]
    # Its own session: Ctrl-C in a terminal reaches run_herd alone, which then stops the
    # servers in order. --parent-pid has a server stop by itself if run_herd is killed.
    return subprocess.Popen(command, start_new_session=True)


def start(config: HerdConfig, names: list[str], children: list[Child], backoff: Backoff, signals: Signals) -> None:
    """Start the servers into ``children`` one by one, unless a stop is asked for meanwhile."""
    for name in names:
        if signals.received is not None:
            return
        children.append(Child(config.servers[name], spawn(config, name), time.monotonic(), replace(backoff)))


def wait_until_listening(children: list[Child], timeout: float, signals: Signals) -> str | None:
    """None when every port accepts (or a stop is asked for); else why not (a child died, or time ran out)."""
    deadline = time.monotonic() + timeout
    waiting = list(children)
    while waiting and signals.received is None:
        for child in list(waiting):
            code = child.process.poll()
            if code is not None:
                return f"{child.server.name} exited with status {code} before listening"
            if port_open(child.server.host, child.server.port):
                waiting.remove(child)
        if time.monotonic() > deadline:
            return "no answer within %gs from %s" % (timeout, ", ".join(c.server.name for c in waiting))
        if waiting:
            signals.sleep(0.05)  # polling a port for readiness: there is no event to wait on
    return None


def stop(children: list[Child], timeout: float) -> bool:
    """SIGTERM every child still running, SIGKILL what outlives ``timeout``; True
    when none had ever exited by itself and every one stopped cleanly."""
    clean = not any(child.died for child in children)
    for child in children:
        if child.process.poll() is None:
            child.process.send_signal(signal.SIGTERM)
        else:
            child.died = True  # it had exited by itself, maybe just now
            report_exit(child)
            clean = False
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
        # -SIGTERM: it was stopped while still starting, before it handles the signal itself.
        if code not in (0, -signal.SIGTERM) and not child.reported_exit:
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


def report_exit(child: Child) -> None:
    """Say (once) that a server exited by itself."""
    code = child.process.poll()
    if code is not None and not child.reported_exit:
        child.reported_exit = True
        print(f"run_herd: {child.server.name} exited with status {code}", file=sys.stderr, flush=True)


def supervise(config: HerdConfig, children: list[Child], signals: Signals, restart: bool) -> None:
    """Until a stop is asked for: restart each server that exits by itself, after its
    backoff delay (``restart``), or only report it, returning once none is left."""
    while signals.received is None:
        now = time.monotonic()
        wake = now + WATCH_INTERVAL
        for child in children:
            if child.restart_at is None:
                code = child.process.poll()
                if code is None or child.reported_exit:
                    continue
                child.died = True
                if not restart:
                    report_exit(child)
                    continue
                delay = child.backoff.delay(uptime=now - child.started)
                child.restart_at = now + delay
                child.reported_exit = True
                print(
                    f"run_herd: {child.server.name} exited with status {code}; restarting in {delay:g}s",
                    file=sys.stderr,
                    flush=True,
                )
            if child.restart_at <= now:
                child.process = spawn(config, child.server.name)
                child.started = now
                child.restart_at = None
                child.reported_exit = False
            else:
                wake = min(wake, child.restart_at)
        if not restart and all(child.process.poll() is not None for child in children):
            return
        signals.sleep(wake - now)  # a watch loop: a signal cuts it short


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
        for line in busy:
            print(f"run_herd: {line}", file=sys.stderr)
        return 1
    secret_note = ensure_secret(config)
    prebuild_offline_cache(config, names)
    signals = Signals()
    children: list[Child] = []
    status = 1
    try:
        start(config, names, children, args.backoff, signals)
        problem = wait_until_listening(children, args.start_timeout, signals)
        if problem:
            print(f"run_herd: {problem}; stopping the herd", file=sys.stderr)
            return 1
        if signals.received is None:
            print_table(config, children)
            print(f"run_herd: {len(children)} servers up ({secret_note}); Ctrl-C or SIGTERM stops them", flush=True)
            supervise(config, children, signals, args.restart)
        if signals.received is None:
            print("run_herd: every server has exited", file=sys.stderr)
        else:
            print("run_herd: stopping", flush=True)
            status = 0
    finally:
        if not stop(children, args.stop_timeout):
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
