"""The HTTP side over real loopback sockets: /metrics, /livez, /readyz, /status, /herd, /client, /."""

from __future__ import annotations

import socket
import time
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

import herdserver
from herdserver.config import ServerConfig
from herdserver.core import stats
from herdserver.server import HerdServer

from .conftest import Herd, iamat, wait_until

TRIANGLE = {"Alford": ["Ball", "Hamilton"], "Ball": ["Hamilton"], "Hamilton": []}


def url(herd: Herd, name: str, path: str) -> str:
    return f"http://127.0.0.1:{herd.config.servers[name].http_port}{path}"


def get(herd: Herd, name: str, path: str) -> requests.Response:
    return requests.get(url(herd, name, path), timeout=5)


def scrape(herd: Herd, name: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics: (name, sorted labels) -> value."""
    response = get(herd, name, "/metrics")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples[name, tuple(sorted(labels.items()))]


@pytest.fixture
def triangle(make_herd: Any) -> Herd:
    herd: Herd = make_herd(TRIANGLE, http=True)
    return herd


def test_metrics_count_commands_links_places_and_logs(triangle: Herd) -> None:
    alford = triangle.client("Alford")
    at = alford.ask(iamat(b"kiwi"))
    wait_until(lambda: all(triangle.holds(n, b"kiwi") for n in TRIANGLE), what="kiwi everywhere")
    alford.send(b"WHATSAT kiwi 10 2\n")
    assert alford.read_whatsat().startswith(at)
    assert alford.ask(b"IAMAT kiwi nowhere 1") == b"? IAMAT kiwi nowhere 1\n"
    assert alford.ask(b"hello") == b"? hello\n"
    alford.send(b"x" * 9000 + b"\n")
    alford.readline()
    # Alford floods kiwi to Ball and Hamilton, which forward it to each other: the second copy is dropped.
    wait_until(lambda: triangle.servers["Ball"].stats.at_received >= 2, what="kiwi twice at Ball")
    triangle.servers["Alford"].log.flush()

    s = scrape(triangle, "Alford")
    assert value(s, "herd_commands_total", command="IAMAT", result="ok") == 1
    assert value(s, "herd_commands_total", command="WHATSAT", result="ok") == 1
    assert value(s, "herd_commands_total", command="IAMAT", result="invalid") == 1
    assert value(s, "herd_commands_total", command="other", result="invalid") == 2  # hello, the over-long line
    assert value(s, "herd_command_duration_seconds_count", command="IAMAT") == 1
    assert value(s, "herd_command_duration_seconds_bucket", command="IAMAT", le="+Inf") == 1
    assert 0 < value(s, "herd_command_duration_seconds_sum", command="IAMAT") < 1
    assert value(s, "herd_command_duration_seconds_count", command="WHATSAT") == 1
    assert value(s, "herd_records") == 1
    assert value(s, "herd_connections", state="active") + value(s, "herd_connections", state="parked") >= 1
    for neighbor in ("Ball", "Hamilton"):
        assert value(s, "herd_link_up", neighbor=neighbor) == 1
        assert value(s, "herd_link_reconnects_total", neighbor=neighbor) == 0
        assert value(s, "herd_syncs_total", neighbor=neighbor, kind="digest") >= 1  # at start
        assert value(s, "herd_syncs_total", neighbor=neighbor, kind="full") == 0  # a herdserver: digests only
        assert value(s, "herd_link_connections_total", neighbor=neighbor) >= 1
        assert value(s, "herd_link_at_lines_sent_total", neighbor=neighbor) == 1
    assert value(s, "herd_at_lines_total", direction="out") == 2
    assert value(s, "herd_at_bytes_total", direction="out") == 2 * (len(at))
    assert value(s, "herd_at_lines_total", direction="in") == 0  # not flooded back to its maker
    assert value(s, "herd_places_requests_total", provider="google", status="OK") == 1
    assert value(s, "herd_places_duration_seconds_count") == 1
    assert value(s, "herd_dropped_lines_total", reason="overlong") == 1
    assert value(s, "herd_dropped_lines_total", reason="future") == 0
    assert value(s, "herd_dropped_lines_total", reason="forged") == 0
    assert value(s, "herd_connections_refused_total") == 0
    assert value(s, "herd_connections_evicted_total") == 0
    assert value(s, "herd_clients_dropped_slow_total") == 0
    assert value(s, "herd_log_lines_total") > 5
    assert value(s, "herd_log_lines_dropped_total") == 0
    assert value(s, "herd_worker_crashes_total") == 0

    ball = scrape(triangle, "Ball")  # its own registry: its own numbers
    assert value(ball, "herd_commands_total", command="IAMAT", result="ok") == 0
    assert value(ball, "herd_records") == 1
    assert value(ball, "herd_at_lines_total", direction="in") == 2  # from Alford and from Hamilton
    assert value(ball, "herd_at_bytes_total", direction="in") == 2 * len(at)
    assert value(ball, "herd_commands_total", command="AT", result="stored") == 1
    assert value(ball, "herd_commands_total", command="AT", result="dropped") == 1
    assert value(ball, "herd_dropped_lines_total", reason="duplicate") == 1  # byte-identical: dropped unparsed
    assert value(ball, "herd_dropped_lines_total", reason="stale") == 0


def test_histogram_buckets_are_cumulative_and_le_inclusive() -> None:
    hist = stats.Histogram((0.1, 1.0))
    for seconds in (0.05, 0.1, 0.5, 1.0, 3.0):
        hist.observe(seconds)
    assert hist.cumulative() == [("0.1", 2), ("1.0", 4), ("+Inf", 5)]
    assert hist.count == 5 and hist.sum == pytest.approx(4.65)


def test_hot_path_counters_are_plain_ints(triangle: Herd) -> None:
    counters = triangle.servers["Alford"].stats
    assert all(type(getattr(counters, f)) is int for f in ("iamat", "at_received", "at_stored", "at_duplicate"))
    assert type(counters.durations["IAMAT"].counts[0]) is int


def test_livez_and_readyz(make_herd: Any) -> None:
    herd = make_herd({"Alford": ["Ball"], "Ball": [], "Solo": []}, http=True)
    for name in ("Alford", "Ball", "Solo"):
        assert get(herd, name, "/livez").status_code == 200
        ready = get(herd, name, "/readyz")
        assert (ready.status_code, ready.text) == (200, "ready\n")
    herd.stop("Ball")
    # Its only neighbor down, Alford still serves IAMAT and WHATSAT: it stays ready.
    client = herd.client("Alford")
    assert client.ask(iamat(b"kiwi")).startswith(b"AT Alford ")  # its flood finds Ball down
    wait_until(lambda: get(herd, "Alford", "/status").json()["links"]["Ball"]["up"] is False, what="link down")
    assert client.ask(b"WHATSAT kiwi 10 1").startswith(b"AT Alford ")
    ready = get(herd, "Alford", "/readyz")
    assert (ready.status_code, ready.text) == (200, "ready\n")
    assert get(herd, "Alford", "/livez").status_code == 200


def test_status_json(triangle: Herd) -> None:
    at = triangle.client("Ball").ask(iamat(b"kiwi"))
    status = get(triangle, "Ball", "/status").json()
    server = triangle.servers["Ball"]
    assert status["name"] == "Ball"
    assert status["version"] == herdserver.__version__
    assert status["address"] == "127.0.0.1:%d" % server.address[1]
    assert status["http"] == f"127.0.0.1:{triangle.config.servers['Ball'].http_port}"
    assert status["provider"] == "google" and status["places"]["provider"] == "google"
    assert status["records"] == 1
    assert status["connections"]["open"] >= 1 and status["connections"]["parked"] >= 0
    assert set(status["links"]) == {"Alford", "Hamilton"}
    assert all(link["up"] for link in status["links"].values())
    assert status["counters"]["iamat"] == 1
    assert status["ready"] == {"ok": True, "reason": "ready"}
    assert status["uptime_s"] > 0
    assert {(e["event"], e["neighbor"]) for e in status["events"]} >= {("link_up", "Alford"), ("link_up", "Hamilton")}
    assert at.startswith(b"AT Ball ")


def test_link_events_are_bounded(triangle: Herd) -> None:
    events = triangle.servers["Alford"].events
    for _ in range(200):
        events.add(time.time(), "link_retry", neighbor="Ball", reason="test")
    assert len(get(triangle, "Alford", "/status").json()["events"]) == 50


def test_herd_and_client_views_ask_every_server(triangle: Herd) -> None:
    at = triangle.client("Hamilton").ask(iamat(b"kiwi"))
    wait_until(lambda: all(triangle.holds(n, b"kiwi") for n in TRIANGLE), what="kiwi everywhere")
    herd = get(triangle, "Alford", "/herd").json()
    assert herd["self"] == "Alford"
    assert sorted(herd["servers"]) == ["Alford", "Ball", "Hamilton"]
    assert all(herd["servers"][n]["records"] == 1 for n in TRIANGLE)
    assert herd["topology"]["Ball"]["neighbors"] == ["Alford", "Hamilton"]
    client = get(triangle, "Alford", "/client?id=kiwi").json()
    assert client == {"client": "kiwi", "servers": {n: {"server": n, "at": at.decode().strip()} for n in TRIANGLE}}
    nobody = get(triangle, "Ball", "/client?id=nobody").json()
    assert all(answer["at"] is None for answer in nobody["servers"].values())
    assert get(triangle, "Ball", "/client").status_code == 400

    triangle.stop("Hamilton")
    herd = get(triangle, "Alford", "/herd").json()
    assert herd["servers"]["Hamilton"] == {"name": "Hamilton", "error": "unreachable (connection failed)"}
    assert herd["servers"]["Ball"]["records"] == 1


def test_client_ids_that_are_not_plain_text_survive(triangle: Herd) -> None:
    triangle.client("Alford").ask(iamat("k\u00e9<b>".encode()))
    answer = get(triangle, "Alford", "/client?id=k%C3%A9%3Cb%3E&scope=local").json()
    assert answer["at"].split()[3] == "k\u00e9<b>"


def test_page_and_unknown_paths(triangle: Herd) -> None:
    page = get(triangle, "Alford", "/")
    assert page.status_code == 200 and page.headers["Content-Type"] == "text/html; charset=utf-8"
    assert "<svg" in page.text and "fetch(\"/herd\"" in page.text
    assert "http://" not in page.text.replace("http://www.w3.org/2000/svg", "")  # nothing from elsewhere
    assert get(triangle, "Alford", "/nope").status_code == 404
    assert requests.post(url(triangle, "Alford", "/status"), timeout=5).status_code == 405


def test_http_port_zero_means_no_http_side(make_herd: Any) -> None:
    herd = make_herd({"Alford": []})
    assert herd.servers["Alford"].http is None


def test_a_taken_http_port_stops_the_start(make_herd: Any) -> None:
    herd = make_herd({"Alford": []})
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen(1)
    try:
        me = herd.config.servers["Alford"]
        config = type(herd.config)(
            path=herd.config.path,
            servers={"Alford": ServerConfig("Alford", "127.0.0.1", 0, (), squatter.getsockname()[1])},
            log_dir=herd.config.log_dir,
        )
        server = HerdServer(config, "Alford", provider=herd.provider_factory("Alford"))
        with pytest.raises(OSError):
            server.start()
        assert me.port  # the running herd is untouched
    finally:
        squatter.close()
