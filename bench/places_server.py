"""The fake Google Places server of the tests, run as its own process for the bench.

    python -m bench.places_server [--latency SECONDS]

Prints its URL on one line, then serves until SIGTERM. The API key it accepts
is the one the bench puts in the servers' environment (harness.KEY).
"""

from gevent import monkey

monkey.patch_all(thread=True, socket=True)

import argparse  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402

from bench.harness import KEY  # noqa: E402
from tests.fake_places import FakePlaces  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each answer")
    args = parser.parse_args()
    places = FakePlaces(api_key=KEY, latency=args.latency).start()
    print(places.url, flush=True)
    stopping = gevent.event.Event()
    gevent.signal_handler(signal.SIGTERM, stopping.set)
    stopping.wait()
    places.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
