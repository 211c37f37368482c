"""``python -m herdserver NAME [--config PATH]``: run one server of the herd.

gevent patches the standard library here, before anything imports socket, ssl
or requests (urllib3's pool would otherwise keep a thread queue and can
deadlock under load with no warning).
"""

from gevent import monkey

monkey.patch_all(thread=True, socket=True, ssl=True)

import argparse  # noqa: E402
import resource  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402

from . import __version__  # noqa: E402
from .config import LOG_STDOUT, ConfigError, load  # noqa: E402

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
    parser.add_argument("--version", action="version", version=f"herdserver {__version__}")
    return parser.parse_args(argv)


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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load(args.config)
        config.server(args.name)
    except ConfigError as exc:
        print(f"herdserver: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    raise_fd_limit()
    from .server import HerdServer

    try:
        server = HerdServer(config, args.name)
        server.start()
    except OSError as exc:
        print(f"herdserver: {args.name}: cannot start: {exc}", file=sys.stderr)
        return 1
    stopping = gevent.event.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(signum, stopping.set)
    gevent.signal_handler(signal.SIGHUP, server.log.reopen)  # observe: logrotate's postrotate
    print(up_line(server), file=sys.stderr, flush=True)  # observe: one line once it is up
    stopping.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
