"""``run_herd``: start, watch and stop the herd described in herd.ini, one process per server.

    run_herd --init                   # write a starter ./herd.ini (five servers on 127.0.0.1)
    run_herd                          # every server in ./herd.ini
    run_herd Alford Hamilton          # only these
    run_herd --config other.ini

(``python run_herd.py`` from a clone of the repository is the same program.)

Every port a server will listen on is checked free before anything starts. Once each
server's port answers, one line per server (with its PID), then supervision, as
gunicorn's arbiter does it:

- a server that exits by itself is restarted after 1 s, 2 s, 4 s ... up to 30 s (back
  to 1 s once it had been up for a minute), one line on stderr each time; --no-restart
  only reports it;
- a server whose ``/livez`` (on its http_port) goes unanswered for --liveness-timeout
  seconds is hung: it is killed (SIGKILL) and restarted the same way;
- SIGHUP is passed on to every server (each reopens its log file: logrotate's
  postrotate) and the herd keeps running;
- Ctrl-C or SIGTERM, even during start-up, stops every server it started (SIGTERM,
  then SIGKILL after --stop-timeout seconds); exit status 0 if no server ever exited
  by itself and each stopped cleanly, else 1.

Killed outright (SIGKILL), it leaves no server behind: each is started with --parent-pid
and stops when run_herd is gone. A busy port, a server that dies or does not answer
during start-up is exit 1; a broken herd file, a log_dir that cannot be made or a name
given twice is exit 2. This launcher uses no gevent: it starts processes, sleeps until
a signal (SIGCHLD included) or a timer, and asks /livez from one thread per server.
"""

from __future__ import annotations

import argparse
import errno
import http.client
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from importlib import resources

from . import __version__
from .config import (
    ConfigError,
    HerdConfig,
    ServerConfig,
    describe,
    effective_provider,
    load,
    places_problem,
    prepare_log_dir,
)
from .herdsecret import SecretError, load_secret

EXIT_FAILED = 1  # a server died, hung or would not start; a port was busy
EXIT_CONFIG = 2
STARTER = "default_herd.ini"  # package data: the repository's herd.ini, for --init
LIVENESS_INTERVAL = 2.0  # seconds between /livez probes at most (less for a short --liveness-timeout)
READY_POLL = 0.05  # seconds between looks at the ports during start-up: there is no event to wait on


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


@dataclass(frozen=True)
class Options:
    restart: bool = True
    start_timeout: float = 30.0
    stop_timeout: float = 5.0
    liveness_timeout: float = 10.0  # 0: no /livez checks
    backoff: Backoff = field(default_factory=Backoff)


class Probe:
    """Asks one server's ``/livez`` every ``interval`` seconds from a thread of its own, so a
    hung server never holds up the supervisor, and keeps the time of the last answer."""

    def __init__(self, server: ServerConfig, liveness_timeout: float) -> None:
        self.server = server
        # A few tries within the timeout, each bounded so that a hung server costs one try.
        self.interval = min(LIVENESS_INTERVAL, liveness_timeout / 4)
        self.request_timeout = min(5.0, liveness_timeout / 2)
        self.last_answer = float("-inf")  # time.monotonic()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"livez {server.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.is_set():
            if self.ask():
                self.last_answer = time.monotonic()
            self._stopping.wait(self.interval)

    def ask(self) -> bool:
        connection = http.client.HTTPConnection(self.server.reach, self.server.http_port, timeout=self.request_timeout)
        try:
            connection.request("GET", "/livez")
            return connection.getresponse().status == 200
        except (OSError, http.client.HTTPException):
            return False
        finally:
            connection.close()

    def stop(self) -> None:
        self._stopping.set()


@dataclass
class Child:
    server: ServerConfig
    process: subprocess.Popen[bytes]
    started: float  # time.monotonic() at the last (re)start
    backoff: Backoff
    probe: Probe | None = None  # with an http_port and a liveness timeout
    up_at: float | None = None  # when its port was seen answering, since the last (re)start
    reported_exit: bool = False  # its exit (of this process) was said
    died: bool = False  # it exited by itself (or hung) at least once
    killed: bool = False  # this process was SIGKILLed as hung: do not kill it twice
    restart_at: float | None = None  # time.monotonic() when it is to be started again

    def last_answer(self) -> float | None:
        """When this process last answered (its port at start-up, /livez after), if it has."""
        seen = max(self.up_at or float("-inf"), self.probe.last_answer if self.probe else float("-inf"))
        return seen if seen >= self.started else None


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Options]:
    parser = argparse.ArgumentParser(
        prog="run_herd",
        description="Run the whole herd (or some of it) from a herd.ini file, one process per server, "
        "and keep it running: restart servers that exit or hang, pass SIGHUP on (log rotation).",
        epilog="New here? run_herd --init writes a starter herd.ini; run_herd then starts it. "
        "Each server also runs alone: herdserver NAME --config PATH. Logs go to the log_dir of the "
        "file, one NAME.log per server. herdctl talks to a running herd; herdctl check validates a file.",
    )
    parser.add_argument("names", nargs="*", metavar="NAME", help="servers to start (default: all in the file)")
    parser.add_argument("--config", default="herd.ini", metavar="PATH", help="the herd file (default: ./herd.ini)")
    parser.add_argument(
        "--init", action="store_true", help="write a starter herd file at --config (never over an existing file); exit"
    )
    parser.add_argument(
        "--start-timeout", type=positive, default=30.0, metavar="S", help="seconds to wait for every port (default 30)"
    )
    parser.add_argument(
        "--stop-timeout", type=positive, default=5.0, metavar="S", help="seconds from SIGTERM to SIGKILL (default 5)"
    )
    parser.add_argument(
        "--liveness-timeout", type=non_negative, default=10.0, metavar="S",
        help="kill and restart a server whose /livez (on its http_port) has not answered for S seconds "
        "(default 10; 0: never)",
    )  # fmt: skip
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
    if args.init and args.names:
        parser.error("--init writes the whole starter herd: it takes no server names")
    backoff = Backoff(args.restart_initial, args.restart_max, args.restart_reset)
    return args, Options(args.restart, args.start_timeout, args.stop_timeout, args.liveness_timeout, backoff)


def positive(text: str) -> float:
    value = non_negative(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (0 or more)")
    return value


# -- before anything starts --------------------------------------------------------------------


def write_starter(path: str) -> int:
    """``--init``: the repository's herd.ini at ``path``, unless something is there already."""
    text = resources.files("herdserver").joinpath(STARTER).read_text(encoding="utf-8")
    try:
        with open(path, "x", encoding="utf-8") as handle:  # "x": never over an existing file, even in a race
            handle.write(text)
    except FileExistsError:
        print(f"run_herd: {path} already exists; not overwriting it (edit it, or --init --config OTHER)",
              file=sys.stderr)  # fmt: skip
        return EXIT_CONFIG
    except OSError as exc:
        print(f"run_herd: cannot write {path}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_CONFIG
    summary = describe(load(path))
    shown = "" if path == "herd.ini" else f" --config {path}"
    print(f"run_herd: wrote {path} ({summary}); start the herd with: run_herd{shown}")
    return 0


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def bind_problem(host: str, port: int) -> str | None:
    """Why a server could not listen on host:port, or None: tried with a bind like the
    server's own (SO_REUSEADDR: a TIME_WAIT left by its last run is no obstacle)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        return f"cannot resolve {host}: {exc.strerror}"
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return "is already in use by another program"
            return f"cannot be listened on: {exc.strerror or exc}"
    return None


def ports_in_use(config: HerdConfig, names: list[str]) -> list[str]:
    """Every listening port of the named servers that is not free, naming the server and the key."""
    found = []
    for name in names:
        server = config.servers[name]
        for key, port in server.listen_ports():
            problem = bind_problem(server.host, port)
            if problem:
                found.append(f"{name}: {server.host}:{port} {problem} ([server:{name}] {key})")
    return found


def ensure_secret(config: HerdConfig) -> str:
    """The herd's secret, as every server will find it (the file made now if it is the
    first time, so the servers do not race to make it); says where it comes from."""
    found = load_secret(config, os.environ)
    if not found.secrets:
        return "links UNAUTHENTICATED: secret_file = -"
    return f"links authenticated with {found.source}"


def prebuild_offline_cache(config: HerdConfig, names: list[str]) -> None:
    """Build the offline place cache once, before five servers would each wait for it."""
    if effective_provider(config.places, os.environ) != "offline":
        return
    done = subprocess.run([sys.executable, "-m", "herdserver.offline", "build-cache"], capture_output=True, text=True)
    if done.returncode != 0:  # not fatal: each server falls back on its own
        print(f"run_herd: offline place cache: {done.stderr.strip() or done.stdout.strip()}", file=sys.stderr)


# -- signals -----------------------------------------------------------------------------------


class Signals:
    """Handlers only note what arrived (a stop, a SIGHUP) and wake ``sleep``; the main
    loop acts on it, so nothing is interrupted halfway (a server forked but not yet
    recorded, say). SIGCHLD wakes it too: an exit is seen at once, with no polling."""

    def __init__(self) -> None:
        self.received: int | None = None  # SIGINT or SIGTERM: stop the herd
        self.hup = False
        self._wake_r, wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)  # the C handler writes a byte here: select() below returns
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._note)
        signal.signal(signal.SIGHUP, self._note_hup)
        signal.signal(signal.SIGCHLD, self._wake)  # SIG_DFL would not reach the wakeup fd

    def _note(self, signum: int, frame: object) -> None:
        if self.received is None:
            self.received = signum

    def _note_hup(self, signum: int, frame: object) -> None:
        self.hup = True

    def _wake(self, signum: int, frame: object) -> None:
        pass  # the byte on the wakeup fd is the whole point

    def take_hup(self) -> bool:
        hup, self.hup = self.hup, False
        return hup

    def sleep(self, seconds: float | None) -> None:
        """Wait ``seconds`` (None: for ever), or less if a signal arrives."""
        if self.received is None:
            select.select([self._wake_r], [], [], None if seconds is None else max(0.0, seconds))
        try:
            os.read(self._wake_r, 512)
        except BlockingIOError:
            pass


# -- the servers -------------------------------------------------------------------------------


def spawn(config: HerdConfig, name: str) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "herdserver", name, "--config", config.path, "--parent-pid", str(os.getpid())]
    # Its own session: Ctrl-C in a terminal reaches run_herd alone, which then stops the
    # servers in order. --parent-pid has a server stop by itself if run_herd is killed.
    return subprocess.Popen(command, start_new_session=True)


def start(config: HerdConfig, names: list[str], children: list[Child], options: Options, signals: Signals) -> None:
    """Start the servers into ``children`` one by one, unless a stop is asked for meanwhile."""
    for name in names:
        if signals.received is not None:
            return
        server = config.servers[name]
        probe = Probe(server, options.liveness_timeout) if server.http_port and options.liveness_timeout else None
        children.append(Child(server, spawn(config, name), time.monotonic(), replace(options.backoff), probe))


def wait_until_listening(children: list[Child], timeout: float, signals: Signals) -> str | None:
    """None when every port accepts (or a stop is asked for); else why not (a child died, or time ran out)."""
    deadline = time.monotonic() + timeout
    waiting = list(children)
    while waiting and signals.received is None:
        for child in list(waiting):
            code = child.process.poll()
            if code is not None:
                child.died = child.reported_exit = True  # said here, not once more at the stop
                return f"{child.server.name} exited with status {code} before listening"
            if port_open(child.server.reach, child.server.port):
                child.up_at = time.monotonic()
                waiting.remove(child)
        if time.monotonic() > deadline:
            return "no answer within %gs from %s" % (timeout, ", ".join(c.server.name for c in waiting))
        if waiting:
            signals.sleep(READY_POLL)
    return None


def stop(children: list[Child], timeout: float) -> bool:
    """SIGTERM every child still running, SIGKILL what outlives ``timeout``; True
    when none had ever exited by itself and every one stopped cleanly."""
    clean = not any(child.died for child in children)
    for child in children:
        if child.probe is not None:
            child.probe.stop()
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
    problem = places_problem(config.places, os.environ)
    places = provider + (" (NO API KEY)" if problem else "")
    for child in children:
        s = child.server
        print(
            f"{s.name:<10} {s.host}:{s.port:<6} neighbors: {', '.join(s.neighbors) or '-':<20} "
            f"pid: {child.process.pid:<8} places: {places:<13} log: {config.log_path(s.name)}",
            flush=True,
        )
    if problem:
        print(f"run_herd: places: {problem}", file=sys.stderr, flush=True)


def report_exit(child: Child) -> None:
    """Say (once) that a server exited by itself."""
    code = child.process.poll()
    if code is not None and not child.reported_exit:
        child.reported_exit = True
        print(f"run_herd: {child.server.name} exited with status {code}", file=sys.stderr, flush=True)


# -- supervision -------------------------------------------------------------------------------


def note_exit(child: Child, now: float, restart: bool) -> None:
    """A child that has just exited by itself: report it, and with ``restart`` set when it starts again."""
    code = child.process.poll()
    if code is None or child.reported_exit:
        return
    child.died = True
    if not restart:
        report_exit(child)
        return
    delay = child.backoff.delay(uptime=now - child.started)
    child.restart_at = now + delay
    child.reported_exit = True
    print(f"run_herd: {child.server.name} exited with status {code}; restarting in {delay:g}s",
          file=sys.stderr, flush=True)  # fmt: skip


def respawn(config: HerdConfig, child: Child, now: float) -> None:
    child.process = spawn(config, child.server.name)
    child.started = now
    child.restart_at = None
    child.up_at = None
    child.reported_exit = child.killed = False
    print(f"run_herd: {child.server.name} restarted, pid {child.process.pid}", file=sys.stderr, flush=True)


def liveness_deadline(child: Child, options: Options) -> float | None:
    """When a running, probed child counts as hung: ``liveness_timeout`` after its last answer,
    or ``start_timeout`` after its (re)start while it has not answered yet."""
    if child.probe is None or child.killed or child.restart_at is not None or child.process.poll() is not None:
        return None
    answered = child.last_answer()
    return child.started + options.start_timeout if answered is None else answered + options.liveness_timeout


def kill_if_hung(child: Child, now: float, options: Options) -> None:
    deadline = liveness_deadline(child, options)
    if deadline is None or now < deadline:
        return
    silent = now - (child.last_answer() or child.started)
    print(f"run_herd: {child.server.name} (pid {child.process.pid}) has not answered /livez for {silent:.1f}s; "
          "killing it", file=sys.stderr, flush=True)  # fmt: skip
    child.killed = True
    child.process.kill()  # our own child, not yet reaped: the PID is still its


def pass_on_hup(children: list[Child]) -> None:
    """SIGHUP to each running server whose port answers (it handles SIGHUP from before it
    listens; one still starting has just opened its log anyway)."""
    told = []
    for child in children:
        if child.process.poll() is not None or child.restart_at is not None:
            continue
        if child.up_at is None and not port_open(child.server.reach, child.server.port):
            continue
        child.up_at = child.up_at or time.monotonic()
        child.process.send_signal(signal.SIGHUP)
        told.append(child.server.name)
    print(f"run_herd: SIGHUP passed on to {', '.join(told) or 'no server'} (each reopens its log)", flush=True)


def next_wake(children: list[Child], options: Options) -> float | None:
    """The next timer: a restart or a liveness deadline (None: only a signal will do)."""
    times = [child.restart_at for child in children if child.restart_at is not None]
    times += [d for child in children if (d := liveness_deadline(child, options)) is not None]
    return min(times, default=None)


def supervise(config: HerdConfig, children: list[Child], signals: Signals, options: Options) -> None:
    """Until a stop is asked for: restart each server that exits by itself or hangs, after
    its backoff delay (or with ``--no-restart`` only report it, returning once none is left);
    pass SIGHUP on. Sleeps until a signal (SIGCHLD too) or the next timer."""
    while signals.received is None:
        if signals.take_hup():
            pass_on_hup(children)
        now = time.monotonic()
        for child in children:
            note_exit(child, now, options.restart)
            if child.restart_at is not None and child.restart_at <= now:
                respawn(config, child, now)
            kill_if_hung(child, now, options)
        if not options.restart and all(child.process.poll() is not None for child in children):
            return
        wake = next_wake(children, options)
        signals.sleep(None if wake is None else wake - time.monotonic())


def prepare(args: argparse.Namespace) -> HerdConfig | int:
    """The checked herd file, or the exit status of what is wrong with it (said on stderr)."""
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
    busy = ports_in_use(config, args.names or ours(config))
    for line in busy:
        print(f"run_herd: {line}", file=sys.stderr)
    return EXIT_FAILED if busy else config


def run(config: HerdConfig, names: list[str], options: Options) -> int:
    try:
        secret_note = ensure_secret(config)
    except SecretError as exc:
        print(f"run_herd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    prebuild_offline_cache(config, names)
    signals = Signals()
    children: list[Child] = []
    status = EXIT_FAILED
    try:
        start(config, names, children, options, signals)
        problem = wait_until_listening(children, options.start_timeout, signals)
        if problem:
            print(f"run_herd: {problem}; stopping the herd", file=sys.stderr)
            return EXIT_FAILED
        if signals.received is None:
            print_table(config, children)
            print(f"run_herd: {len(children)} servers up ({secret_note}); Ctrl-C or SIGTERM stops them", flush=True)
            supervise(config, children, signals, options)
        if signals.received is None:
            print("run_herd: every server has exited", file=sys.stderr)
        else:
            print("run_herd: stopping", flush=True)
            status = 0
    finally:
        if not stop(children, options.stop_timeout):
            status = EXIT_FAILED
    return status


def main(argv: list[str] | None = None) -> int:
    args, options = parse_args(argv)
    if args.init:
        return write_starter(args.config)
    config = prepare(args)
    if isinstance(config, int):
        return config
    return run(config, args.names or ours(config), options)


def ours(config: HerdConfig) -> list[str]:
    """Every server of the file but the foreign ones (another implementation runs those)."""
    return [name for name, server in config.servers.items() if not server.foreign]


if __name__ == "__main__":
    sys.exit(main())
