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
from tests.fake_places import FakePlaces, Reply, Request  # noqa: E402

MEMO_LIMIT = 10_000  # distinct requests remembered (the bench asks far fewer)


class MemoFakePlaces(FakePlaces):
    """The tests' fake, with each distinct successful Nearby Search (New) answered from memory.

    It stands for Google's servers, not a process of ours: it should not take
    the bench's two cores from the herd. Its answers are pure functions of the
    request (key, field mask, body), so remembering them changes no byte of any
    answer; latency, recording, failures and the legacy API are as in the tests.
    """

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.memo: dict[tuple[object, ...], Reply] = {}

    def _remembered(self, key: tuple[object, ...], answer: Reply) -> Reply:
        if answer.status == 200 and len(self.memo) < MEMO_LIMIT:
            self.memo[key] = answer
        return answer

    def search_nearby(self, request: Request) -> Reply:
        key = ("new", request.body, request.headers.get("x-goog-api-key"), request.headers.get("x-goog-fieldmask"))
        return self.memo.get(key) or self._remembered(key, super().search_nearby(request))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each answer")
    args = parser.parse_args()
    places = MemoFakePlaces(api_key=KEY, latency=args.latency).start()
    print(places.url, flush=True)
    stopping = gevent.event.Event()
    gevent.signal_handler(signal.SIGTERM, stopping.set)
    stopping.wait()
    places.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
