"""``python -m herdserver NAME [--config PATH]``: run one server of the herd.

gevent patches the standard library here, before anything imports socket, ssl
or requests (urllib3's pool would otherwise keep a thread queue and can
deadlock under load with no warning).
"""

from gevent import monkey

monkey.patch_all(thread=True, socket=True, ssl=True)

import argparse  # noqa: E402
import ctypes  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402

from . import __version__  # noqa: E402
from .config import LOG_STDOUT, ConfigError, HerdConfig, load, places_problem, prepare_log_dir  # noqa: E402

if TYPE_CHECKING:
    from .server import HerdServer

EXIT_CONFIG = 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="herdserver",
        description="Run one server of the herd described in a herd.ini file.",
        epilog="Stop it with Ctrl-C or SIGTERM: it stops accepting, lets busy clients "
        "finish (herd.ini [limits] shutdown_grace) and exits with status 0.",
    )
    parser.add_argument("name", metavar="NAME", help="the server to run: a [server:NAME] section of the file")
    parser.add_argument(
        "--config", default="herd.ini", metavar="PATH", help="the herd file (default: ./herd.ini)"
    )
    parser.add_argument(
        "--parent-pid",
        type=int,
        metavar="PID",
        help="stop (as on SIGTERM) when this parent process is gone; run_herd passes its own PID",
    )
    parser.add_argument("--version", action="version", version=f"herdserver {__version__}")
    return parser.parse_args(argv)


PARENT_POLL_INTERVAL = 1.0  # seconds, where the kernel cannot signal a parent's death


def _set_parent_death_signal(signum: int) -> bool:
    """Linux: have the kernel send ``signum`` when the parent exits. False where that is unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    pr_set_pdeathsig = 1
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return False
    zero = ctypes.c_ulong(0)
    return int(prctl(pr_set_pdeathsig, ctypes.c_ulong(signum), zero, zero, zero)) == 0


def _poll_parent(parent_pid: int, stopping: gevent.event.Event) -> None:
    while os.getppid() == parent_pid:
        gevent.sleep(PARENT_POLL_INTERVAL)
    stopping.set()


def follow_parent(parent_pid: int, stopping: gevent.event.Event) -> bool:
    """Stop when ``parent_pid`` exits, even by SIGKILL: SIGTERM from the kernel on Linux
    (PR_SET_PDEATHSIG), elsewhere a greenlet that polls getppid(). False if the parent
    is gone already (this process was reparented before the watch was set up)."""
    if not _set_parent_death_signal(signal.SIGTERM):
        gevent.spawn(_poll_parent, parent_pid, stopping)
    # Checked after the signal is armed: a parent that died before is seen here, after it by the kernel.
    return os.getppid() == parent_pid


def raise_fd_limit() -> None:
    """Every client is a file descriptor: use the hard limit, not the 1024 default."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


def up_line(server: "HerdServer") -> str:
    """``herdserver: Alford up on 127.0.0.1:12000 (http 127.0.0.1:13000), log /path/Alford.log``"""
    http = "http %s:%d" % server.http.address if server.http is not None else "no http"
    log = "standard output" if server.log.path == LOG_STDOUT else server.log.path
    return "herdserver: %s up on %s:%d (%s), log %s" % (server.name, *server.address, http, log)


def warn_places_problem(config: HerdConfig, server: "HerdServer") -> None:
    """A Google provider without a key would deny every WHATSAT: say so now, on stderr and in the log."""
    problem = places_problem(config.places, os.environ)
    if problem:
        print(f"herdserver: {server.name}: {problem}", file=sys.stderr, flush=True)
        server.log.warning("places_problem", problem=problem)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load(args.config)
        config.server(args.name)
        prepare_log_dir(config)
    except ConfigError as exc:
        print(f"herdserver: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    # Handled from here on, so a stop asked for while the server is starting up is graceful too.
    stopping = gevent.event.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(signum, stopping.set)
    if args.parent_pid is not None and not follow_parent(args.parent_pid, stopping):
        print(f"herdserver: {args.name}: parent process {args.parent_pid} is gone; not starting", file=sys.stderr)
        return 0
    raise_fd_limit()
    from .herdsecret import SecretError
    from .server import HerdServer
    from .statefile import StateLocked

    try:
        server = HerdServer(config, args.name)
        # logrotate's postrotate, and run_herd passing on its own SIGHUP. Before start():
        # once the port answers, a SIGHUP reopens the log instead of killing the process.
        gevent.signal_handler(signal.SIGHUP, server.log.reopen)
        server.start()
    except (StateLocked, SecretError) as exc:
        print(f"herdserver: {args.name}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:
        print(f"herdserver: {args.name}: cannot start: {exc}", file=sys.stderr)
        return 1
    warn_places_problem(config, server)
    print(up_line(server), file=sys.stderr, flush=True)  # one line once it is up
    stopping.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
