"""WHATSAT through whole servers: concurrency, every provider, and key hygiene in the logs."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from pathlib import Path

import gevent
import pytest

from herdserver.config import PlacesSettings
from herdserver.places import make_provider

from .conftest import TEST_KEY, Herd, LineClient, iamat

SECRET = "AIzaSy-very-secret+key/with=odd&chars"


def _closed_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def _provider_factory(places: PlacesSettings, key: str) -> Callable[[str], object]:
    return lambda name: make_provider(places, {places.api_key_env: key})


def test_a_hundred_concurrent_whatsats_overlap_at_the_places_service(
    make_herd: Callable[..., Herd], fake_places
) -> None:
    herd = make_herd({"Alford": []})
    clients = [herd.client("Alford", timeout=10) for _ in range(100)]
    for i, client in enumerate(clients):
        client.ask(iamat(b"c%d" % i))
    fake_places.latency = 0.2

    def ask(i: int) -> dict:
        clients[i].send(b"WHATSAT c%d 10 5\n" % i)
        reply = clients[i].read_whatsat()
        return json.loads(reply.partition(b"\n")[2])

    jobs = [gevent.spawn(ask, i) for i in range(100)]
    gevent.joinall(jobs, raise_error=True)
    assert all(job.value["status"] == "OK" for job in jobs)
    assert fake_places.max_in_flight >= 50, fake_places.max_in_flight


@pytest.mark.parametrize("kind", ["google", "google-legacy"])
def test_the_key_never_reaches_a_log_file_or_a_client(make_herd: Callable[..., Herd], fake_places, kind: str) -> None:
    """Every failure path, with a key whose characters need URL encoding."""
    fake_places.api_key = SECRET
    good = PlacesSettings(provider=kind, base_url=fake_places.url, timeout=0.3, api_key_env="K")
    herd = make_herd({"Alford": ["Ball"], "Ball": []}, places=good, provider_factory=_provider_factory(good, SECRET))
    refused = PlacesSettings(provider=kind, base_url=f"http://127.0.0.1:{_closed_port()}", timeout=0.3, api_key_env="K")
    herd.stop("Ball")
    herd.provider_factory = _provider_factory(refused, SECRET)  # Ball: connection refused (URL in the error)
    herd.start("Ball")
    replies = []
    for name in ("Alford", "Ball"):
        client = herd.client(name)
        client.ask(iamat())
        for fail in (None, "http500", "http429", "badjson", "hang", "denied", "invalid"):
            fake_places.fail = fail
            client.send(b"WHATSAT kiwi.cs.ucla.edu 10 5\n")
            replies.append(client.read_whatsat())
    fake_places.fail = None
    statuses = {json.loads(r.partition(b"\n")[2])["status"] for r in replies}
    assert {"OK", "UNKNOWN_ERROR", "OVER_QUERY_LIMIT", "REQUEST_DENIED"} <= statuses
    herd.shutdown()
    logs = list(Path(herd.config.log_dir).glob("*.log"))
    assert len(logs) == 2
    for path in logs:
        text = path.read_text(encoding="utf-8")
        assert "event=places" in text
        for spelling in (SECRET, SECRET.replace("+", "%2B"), SECRET.replace("/", "%2F"), "very-secret"):
            assert spelling not in text, (path, spelling)
    assert not any(b"very-secret" in reply for reply in replies)


@pytest.mark.usefixtures("warm_offline_cache")
def test_offline_provider_answers_with_real_places_and_attribution(make_herd: Callable[..., Herd]) -> None:
    offline = PlacesSettings(provider="offline")
    herd = make_herd({"Alford": []}, places=offline, provider_factory=_provider_factory(offline, ""))
    client = herd.client("Alford")
    client.ask(iamat())
    client.send(b"WHATSAT kiwi.cs.ucla.edu 10 5\n")
    at, _, body = client.read_whatsat().partition(b"\n")
    payload = json.loads(body)
    assert at.startswith(b"AT Alford ") and at.endswith(b" kiwi.cs.ucla.edu +34.068930-118.445127 " + at.split()[-1])
    assert payload["status"] == "OK" and len(payload["results"]) == 5
    assert "GeoNames" in payload["html_attributions"][0]
    distances = [r["distance_m"] for r in payload["results"]]
    assert distances == sorted(distances) and distances[-1] <= 10_000
    assert all(r["place_id"].startswith("geonames:") for r in payload["results"])


@pytest.mark.usefixtures("warm_offline_cache")
def test_auto_without_a_key_is_offline_and_says_so(make_herd: Callable[..., Herd]) -> None:
    auto = PlacesSettings(provider="auto")
    herd = make_herd({"Alford": []}, places=auto, provider_factory=_provider_factory(auto, ""))
    herd.servers["Alford"].log.flush()
    text = Path(herd.config.log_path("Alford")).read_text(encoding="utf-8")
    assert "event=start" in text and "provider=offline" in text


def test_auto_with_a_key_is_google(make_herd: Callable[..., Herd], fake_places) -> None:
    auto = PlacesSettings(provider="auto", base_url=fake_places.url, api_key_env="K")
    herd = make_herd({"Alford": []}, places=auto, provider_factory=_provider_factory(auto, TEST_KEY))
    client: LineClient = herd.client("Alford")
    client.ask(iamat())
    client.send(b"WHATSAT kiwi.cs.ucla.edu 10 5\n")
    assert b'"status": "OK"' in client.read_whatsat()
    assert fake_places.requests[-1].path.endswith("places:searchNearby")
