"""Prometheus metrics for one server, read from a status snapshot at scrape time.

The hot path never touches ``prometheus_client``: a command costs an ``int += 1``
on ``core.stats.Stats``. ``HerdCollector`` is handed a callable that returns a
``ServerStatus`` and turns it into metric families only when ``/metrics`` is
scraped, into a registry of the server's own (several servers may share a
process, as the tests do). ``registry`` adds prometheus_client's own process,
platform and GC collectors beside it.

Every series a user would alert on exists from the first scrape, at 0 until its
first event (an alert on ``rate()`` or ``increase()`` of a series that appears
only with its first event misses that event), and no label is ever empty.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from ..core.stats import command_counts
from ..core.status import ServerStatus

# (command, result) pairs shown at 0 before their first event; the rest of
# command_counts' pairs are always there.
COMMAND_RESULTS = (
    ("IAMAT", "ok"), ("IAMAT", "invalid"), ("WHATSAT", "ok"), ("WHATSAT", "invalid"),
    ("AT", "stored"), ("AT", "dropped"), ("AT", "invalid"), ("other", "invalid"),
)  # fmt: skip
# Places status words shown at 0 for the server's provider before their first call:
# the successes and the errors places.py maps HTTP failures and timeouts to.
PLACES_STATUSES = ("OK", "ZERO_RESULTS", "UNKNOWN_ERROR", "INVALID_REQUEST", "OVER_QUERY_LIMIT", "REQUEST_DENIED")


def registry(status: Callable[[], ServerStatus]) -> CollectorRegistry:
    """One server's registry: its HerdCollector and prometheus_client's process
    (``process_resident_memory_bytes``, ...), platform (``python_info``) and GC
    collectors. Servers sharing a process each get their own, reporting the same process."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(HerdCollector(status))
    # The library's own instances live in its global REGISTRY, which we do not serve: new ones, in ours.
    ProcessCollector(registry=reg)
    PlatformCollector(registry=reg)
    GCCollector(registry=reg)
    return reg


class HerdCollector(Collector):
    """Reads one server's counters at scrape time (no Counter.inc() anywhere)."""

    def __init__(self, status: Callable[[], ServerStatus]):
        self.status = status

    def collect(self) -> Iterator[Metric]:
        server = self.status()
        stats = server.stats
        build = GaugeMetricFamily("herd_build_info", "Always 1; the herdserver version as a label", labels=["version"])
        build.add_metric([server.version], 1)
        yield build
        yield GaugeMetricFamily(
            "herd_state_writable",
            "1 while the state file can be written (or the server keeps no state file); 0: records are not kept",
            value=1 if server.state_writable else 0,
        )
        commands = CounterMetricFamily(
            "herd_commands_total", "Commands handled, by command word and result", labels=["command", "result"]
        )
        counts = dict.fromkeys(COMMAND_RESULTS, 0)
        counts.update(command_counts(stats))
        for (command, result), n in sorted(counts.items()):
            commands.add_metric([command, result], n)
        yield commands

        durations = HistogramMetricFamily(
            "herd_command_duration_seconds",
            "Time to handle a command, reply ready (WHATSAT: including the Places call)",
            labels=["command"],
        )
        for command, hist in stats.durations.items():
            durations.add_metric([command], hist.cumulative(), hist.sum)
        yield durations

        yield GaugeMetricFamily("herd_records", "Client records held", value=server.records)
        connections = GaugeMetricFamily(
            "herd_connections",
            "Client connections open, by state: active (has its greenlet) or parked"
            " (waiting on a watcher); the states partition them, so sum() is every open connection",
            labels=["state"],
        )
        connections.add_metric(["active"], server.active_connections)
        connections.add_metric(["parked"], server.parked_connections)
        yield connections

        link_up = GaugeMetricFamily("herd_link_up", "1 while the link to the neighbor is up", labels=["neighbor"])
        reconnects = CounterMetricFamily(
            "herd_link_reconnects_total", "Times the link came back up after it was down", labels=["neighbor"]
        )
        connections_made = CounterMetricFamily(
            "herd_link_connections_total",
            "Connections opened to the neighbor's herd port (a link stays open: this grows when it reconnects)",
            labels=["neighbor"],
        )
        queued = GaugeMetricFamily(
            "herd_link_queue_depth", "Records waiting in the link's outbox (latest per client)", labels=["neighbor"]
        )
        auth_failed = CounterMetricFamily(
            "herd_link_auth_failures_total",
            "Handshakes on our link to the neighbor that failed the proof (a wrong secret, or not our neighbor)",
            labels=["neighbor"],
        )
        syncs = CounterMetricFamily(
            "herd_syncs_total",
            "Reconciliations this server started with the neighbor (digest: herdserver neighbors, sending only"
            " what differs; full: every record as plain AT lines, to another implementation)",
            labels=["neighbor", "kind"],
        )
        lines_sent = CounterMetricFamily(
            "herd_link_at_lines_sent_total", "AT lines sent to the neighbor", labels=["neighbor"]
        )
        for link in server.links:
            name = link.neighbor
            link_up.add_metric([name], 1 if link.up else 0)
            reconnects.add_metric([name], link.recoveries)
            connections_made.add_metric([name], link.connections_made)
            syncs.add_metric([name, "digest"], link.syncs)
            syncs.add_metric([name, "full"], link.full_pushes)
            lines_sent.add_metric([name], link.lines_sent)
            queued.add_metric([name], link.queued)
            auth_failed.add_metric([name], link.auth_failures)
        yield from (link_up, reconnects, connections_made, syncs, lines_sent, queued, auth_failed)
        yield CounterMetricFamily(
            "herd_port_auth_failures_total",
            "Connections to this server's herd port refused before or at the proof (unproven peers)",
            value=server.herd_port_auth_failures,
        )

        # Totals by direction only: an AT line names no sender, so "in" has no neighbor to label.
        at_lines = CounterMetricFamily(
            "herd_at_lines_total", "AT lines received (in) and sent (out)", labels=["direction"]
        )
        at_lines.add_metric(["in"], stats.at_received)
        at_lines.add_metric(["out"], sum(link.lines_sent for link in server.links))
        yield at_lines
        at_bytes = CounterMetricFamily("herd_at_bytes_total", "Bytes of AT lines", labels=["direction"])
        at_bytes.add_metric(["in"], stats.at_bytes_in)
        at_bytes.add_metric(["out"], sum(link.bytes_sent for link in server.links))
        yield at_bytes

        places = CounterMetricFamily(
            "herd_places_requests_total", "Places calls by provider and status word", labels=["provider", "status"]
        )
        requests = dict.fromkeys(((server.provider, status) for status in PLACES_STATUSES), 0)
        requests.update(stats.places.requests)
        for (provider, status), n in sorted(requests.items()):
            places.add_metric([provider, status], n)
        yield places
        places_seconds = HistogramMetricFamily("herd_places_duration_seconds", "Time a Places call took")
        places_seconds.add_metric([], stats.places.seconds.cumulative(), stats.places.seconds.sum)
        yield places_seconds

        dropped = CounterMetricFamily(
            "herd_dropped_lines_total",
            "Lines that changed nothing: AT lines already held (duplicate), older (stale), too far in the future"
            " (future) or from a connection not allowed to send them (forged); over-long lines",
            labels=["reason"],
        )
        dropped.add_metric(["duplicate"], stats.at_duplicate)
        stale = stats.at_received - stats.at_stored - stats.at_duplicate - stats.at_future
        dropped.add_metric(["stale"], max(0, stale))
        dropped.add_metric(["future"], stats.at_future)
        dropped.add_metric(["forged"], stats.at_refused)
        dropped.add_metric(["overlong"], stats.overlong)
        yield dropped
        yield CounterMetricFamily(
            "herd_connections_refused_total",
            "Client connections refused (server full of connections being served, or too many from one address)",
            value=server.refused,
        )
        yield CounterMetricFamily(
            "herd_connections_evicted_total",
            "Quiet client connections (longest without a complete command) closed to make room for a newcomer",
            value=server.evicted,
        )
        yield CounterMetricFamily(
            "herd_clients_dropped_slow_total", "Clients dropped for leaving replies unread past write_timeout",
            value=server.dropped_slow,
        )

        yield CounterMetricFamily("herd_log_lines_total", "Log lines written", value=server.log_lines)
        yield CounterMetricFamily(
            "herd_log_lines_dropped_total", "Log lines lost (the write failed)", value=server.log_lines_dropped
        )
        yield CounterMetricFamily(
            "herd_state_write_failures_total",
            "State file writes and fsyncs that failed (disk full, I/O error, read-only): nothing was acknowledged",
            value=stats.state_write_failures,
        )
        yield GaugeMetricFamily(
            "herd_state_writable", "1 while the state file takes writes (always 1 without one)",
            value=1 if server.state_writable else 0,
        )
        yield CounterMetricFamily(
            "herd_worker_crashes_total", "Greenlets and connections that died of a bug", value=len(stats.crashes)
        )
