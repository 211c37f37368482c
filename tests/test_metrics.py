"""/metrics as a user alerts on it: every series there from the start, no empty labels,
states that partition, the version, and the process's own metrics in each server's registry."""

from __future__ import annotations

import importlib.metadata
from typing import Any

import herdserver
from herdserver.ops.metrics import COMMAND_RESULTS, PLACES_STATUSES

from .conftest import Herd, iamat, wait_until
from .test_http import get, scrape, value


def test_a_fresh_server_shows_every_series_to_alert_on_at_zero(make_herd: Any) -> None:
    herd: Herd = make_herd({"Alford": ["Ball"], "Ball": []}, http=True)
    for name in ("Alford", "Ball"):  # two servers in one process: each registry has the process's metrics
        s = scrape(herd, name)
        for command, result in COMMAND_RESULTS:
            assert value(s, "herd_commands_total", command=command, result=result) == 0
        for status in PLACES_STATUSES:
            assert value(s, "herd_places_requests_total", provider="google", status=status) == 0
        for reason in ("duplicate", "stale", "future", "forged", "overlong"):
            assert value(s, "herd_dropped_lines_total", reason=reason) == 0
        neighbor = "Ball" if name == "Alford" else "Alford"
        assert value(s, "herd_link_up", neighbor=neighbor) == 1
        assert value(s, "herd_link_reconnects_total", neighbor=neighbor) == 0
        assert value(s, "herd_link_at_lines_sent_total", neighbor=neighbor) == 0
        assert value(s, "herd_at_lines_total", direction="in") == 0
        assert value(s, "herd_state_writable") == 1  # memory-only: nothing to fail
        assert value(s, "herd_build_info", version=herdserver.__version__) == 1
        assert value(s, "process_resident_memory_bytes") > 1 << 20
        assert value(s, "process_open_fds") > 0
        assert any(metric == "python_info" for metric, _ in s)
        assert any(metric == "python_gc_collections_total" for metric, _ in s)
        empty = [(metric, labels) for metric, labels in s if any(v == "" for _, v in labels)]
        assert not empty


def test_connections_partition_into_active_and_parked(make_herd: Any) -> None:
    herd: Herd = make_herd({"Solo": []}, http=True)
    quiet = [herd.client("Solo") for _ in range(3)]  # connected, nothing sent: parked at once
    talking = herd.client("Solo")
    assert talking.ask(iamat()).startswith(b"AT Solo ")  # has its greenlet now (park_after: 5 s)

    def states() -> tuple[float, float]:
        s = scrape(herd, "Solo")
        return value(s, "herd_connections", state="active"), value(s, "herd_connections", state="parked")

    wait_until(lambda: states() == (1, 3), what="1 active and 3 parked")
    connections = get(herd, "Solo", "/status").json()["connections"]
    assert connections == {"open": 4, "parked": 3}  # /status: open is all of them, parked a part
    for client in quiet:
        client.close()
    wait_until(lambda: states() == (1, 0), what="the quiet ones gone")


def test_the_version_is_the_packages(make_herd: Any) -> None:
    assert importlib.metadata.version("herdserver") == herdserver.__version__  # pyproject reads it from there
    herd: Herd = make_herd({"Solo": []}, http=True)
    assert get(herd, "Solo", "/status").json()["version"] == herdserver.__version__
