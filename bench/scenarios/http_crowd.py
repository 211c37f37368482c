"""The HTTP side under a crowd: /livez latency and the server's memory per connection.

One server with its HTTP side (``[http]`` defaults: 5 s head deadline, 32 KiB
heads, 256 connections, 32 per address, 64 requests at once). The runner probes
/livez (a fresh connection each, as a health checker does) first alone, then
while a load process holds ~1,000 connections from 40 loopback addresses on the
HTTP port, half idle and half trickling a byte every 0.5-1 s and reconnecting
whenever the server closes them. Memory: the growth of the server's RSS per
connection held with a 31 KB unfinished head (the most one may cost) next to
idle ones, on a second server whose head deadline is long enough to measure;
and what 64 header floods (99 lines of 60 KB each, within http.client's limits)
leave behind; before the gate each such connection cost 5.8 MB (the issue's figure).
"""

from __future__ import annotations

import os
import sys
import threading
import time
import urllib.request
from typing import Any

from bench.harness import HOST, BenchError, Herd, Lab, LoadWorker, rss_kb, stable_rss_kb
from bench.report import Row, Section, Target
from bench.scenarios.attack import wait_opened
from bench.scenarios.common import JOB_SLACK, QUICK, Context, target

CROWD = 1_000
CROWD_SOURCES = [f"127.0.7.{i}" for i in range(1, 41)]  # 25 each: under the per-address cap of 32
HELD = 240  # connections held for the memory figures (under the 256 cap: nothing evicted)
HELD_SOURCES = [f"127.0.8.{i}" for i in range(1, 9)]  # 30 each
FLOODS = 64
FLOOD_SOURCES = [f"127.0.9.{i}" for i in range(1, 5)]
LIVEZ_LIMIT = 1.0  # seconds: a health checker's patience (the "answered within 1 s")
KB_PER_HEAD_LIMIT = 64.0  # a 32 KiB head buffer and a greenlet; our threshold


def http_herd(lab: Lab, name: str, http_keys: dict[str, Any]) -> Herd:
    h = lab.herd(name, {"Web": []}, http=True)
    if http_keys:
        h.path.write_text(h.path.read_text() + "\n[http]\n" + "".join(f"{k} = {v}\n" for k, v in http_keys.items()))
    lab.start_servers(h, ["Web"])
    return h


class Prober:
    """GET /livez from a thread of the runner, a fresh connection each time, until stopped."""

    def __init__(self, port: int, every: float = 0.05):
        self.url = f"http://{HOST}:{port}/livez"
        self.every = every
        self.seconds: list[float] = []
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def probe(self) -> None:
        started = time.monotonic()
        try:
            with urllib.request.urlopen(self.url, timeout=LIVEZ_LIMIT) as response:
                response.read()
            self.seconds.append(time.monotonic() - started)
        except OSError as exc:
            self.failures.append(f"{type(exc).__name__}: {exc}")

    def _loop(self) -> None:
        while not self.stop.is_set():
            self.probe()
            self.stop.wait(self.every)

    def run_for(self, seconds: float) -> Prober:
        self.thread.start()
        time.sleep(seconds)  # the length of the measurement, not a synchronisation
        self.stop.set()
        self.thread.join(timeout=LIVEZ_LIMIT + 5)
        return self

    def ms(self, q: float) -> float | None:
        if not self.seconds:
            return None
        ordered = sorted(self.seconds)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def held_cost(worker: LoadWorker, h: Herd, name: str, header_lines: int, line_bytes: int) -> dict[str, Any]:
    """RSS growth per connection while HELD of them hold a head that never ends."""
    pid = h.pid("Web")
    before_kb, fds_before = stable_rss_kb(pid), fds(pid)
    worker.call("http_heads_start", timeout=JOB_SLACK, name=name, target=target(h.http_ports["Web"]), count=HELD,
                sources=HELD_SOURCES, header_lines=header_lines, line_bytes=line_bytes, complete=False,
                duration=60.0)
    deadline = time.monotonic() + 30
    while worker.call("attack_status", timeout=JOB_SLACK, name=name).get("sent", 0) < HELD:
        if time.monotonic() > deadline:
            raise BenchError(f"{name}: not all {HELD} heads sent")
        time.sleep(0.2)  # polling the load worker's counter against a deadline
    held = fds(pid) - fds_before
    grown_kb = stable_rss_kb(pid) - before_kb
    status = worker.call("attack_stop", timeout=JOB_SLACK, name=name)
    return {"held": held, "kb": grown_kb, "kb_per_conn": grown_kb / held if held > 0 else None, "status": status}


def run(ctx: Context) -> Section:
    section = Section("http-crowd")
    quick = ctx.settings is QUICK
    probe_s = 3.0 if quick else 10.0
    lab = Lab(ctx.work_dir, "http-crowd", ctx.places_url)
    try:
        crowd_herd = http_herd(lab, "crowd", {})
        port, pid = crowd_herd.http_ports["Web"], crowd_herd.pid("Web")
        attackers = LoadWorker(lab.spawn("crowd", [sys.executable, "-m", "bench.http_crowd_load"], pipes=True))
        attackers.call("hello", timeout=30)

        alone = Prober(port).run_for(probe_s)
        rss_before = stable_rss_kb(pid)
        attackers.call("flood_start", timeout=JOB_SLACK, name="crowd", target=target(port), count=CROWD,
                       sources=CROWD_SOURCES, trickle_every=2, batch=250, duration=probe_s + 60,
                       every=[0.5, 1.0], max_reconnects=1_000_000)
        wait_opened([attackers], "crowd", 60.0)
        crowded = Prober(port).run_for(probe_s)
        rss_crowd, held_crowd = rss_kb(pid), fds(pid)
        crowd_status = attackers.call("attack_stop", timeout=JOB_SLACK, name="crowd")

        floods_before = stable_rss_kb(pid)
        attackers.call("http_heads_start", timeout=JOB_SLACK, name="floods", target=target(port), count=FLOODS,
                       sources=FLOOD_SOURCES, header_lines=99, line_bytes=60_000, complete=True, duration=60.0)
        flood_status = wait_answered(attackers, "floods", FLOODS)
        floods_after = stable_rss_kb(pid)

        memory_herd = http_herd(lab, "memory", {"head_timeout": 60})
        idle = held_cost(attackers, memory_herd, "idle", 0, 0)  # first: memory the fat heads freed would mask it
        fat = held_cost(attackers, memory_herd, "fat", 1, 31_000)
        lab.stop_servers(crowd_herd)
        lab.stop_servers(memory_herd)

        logs = crowd_herd.log_path("Web").read_text()
        answered_431 = flood_status.get("answer_431", 0)
        worst = max(crowded.seconds) * 1000 if crowded.seconds else None
        ok = not crowded.failures and worst is not None and worst < LIVEZ_LIMIT * 1000
        flood_kb = (floods_after - floods_before) / FLOODS
        section.add(
            Row("/livez p50 in a crowd of ~1,000", crowded.ms(0.5), "ms", alone.ms(0.5), "alone"),
            Row("/livez p99 in a crowd of ~1,000", crowded.ms(0.99), "ms", alone.ms(0.99), "alone"),
            Row("/livez slowest in the crowd", worst, "ms", max(alone.seconds) * 1000 if alone.seconds else None,
                "alone", Target(f"< {LIVEZ_LIMIT * 1000:g} ms, none failed", ok, "issue")),
            Row("/livez answered in the crowd", len(crowded.seconds), "req",
                len(crowded.seconds) + len(crowded.failures), "asked"),
            Row("server descriptors in the crowd", held_crowd, "fds", CROWD, "connections the crowd asked for"),
            Row("server RSS in the crowd", rss_crowd / 1024, "MB", rss_before / 1024, "before"),
            Row("RSS per connection, 31 KB unfinished head", fat["kb_per_conn"], "KB", idle["kb_per_conn"],
                "idle connection", Target(f"<= {KB_PER_HEAD_LIMIT:g} KB",
                                          fat["kb_per_conn"] is not None and fat["kb_per_conn"] <= KB_PER_HEAD_LIMIT,
                                          f"issue; {KB_PER_HEAD_LIMIT:g} KB assumed")),
            Row("header floods (99 x 60 KB) answered 431", answered_431, "conns", FLOODS, "sent"),
            Row("RSS left per header flood", flood_kb, "KB", 5.8 * 1024, "each before the gate (issue's figure)"),
        )
        section.notes += [
            f"crowd: {CROWD} connections from {len(CROWD_SOURCES)} addresses, every 2nd trickling 'x' every "
            f"0.5-1 s, reconnecting when closed: {crowd_status}",
            f"/livez probed every 0.05 s for {probe_s:g} s, fresh connection, {LIVEZ_LIMIT:g} s timeout; "
            f"failures in the crowd: {crowded.failures[:3]}",
            f"log: {logs.count('event=http_bad_request')} http_bad_request lines, "
            f"{logs.count('event=http_evicted')} http_evicted, {logs.count('event=http_refused')} http_refused "
            "(the last two at powers of 2)",
            f"held heads ([http] head_timeout = 60): fat {fat}; idle {idle}",
            f"floods: {flood_status}",
        ]
        section.raw = {"alone": alone.seconds, "crowded": crowded.seconds, "failures": crowded.failures,
                       "fat": fat, "idle": idle, "floods": flood_status, "crowd": crowd_status,
                       "rss_kb": {"before": rss_before, "crowd": rss_crowd, "floods_before": floods_before,
                                  "floods_after": floods_after}}
    finally:
        lab.close()
    return section


def wait_answered(worker: LoadWorker, name: str, count: int) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while True:
        status = worker.call("attack_status", timeout=JOB_SLACK, name=name)
        done = sum(v for k, v in status.items() if k.startswith("answer_") or k == "closed_silently")
        if done >= count or time.monotonic() > deadline:
            worker.call("attack_stop", timeout=JOB_SLACK, name=name)
            return status
        time.sleep(0.2)  # polling the load worker's counters against a deadline
