"""Digest reconciliation of two servers that hold 1,000,000 records each, 100 of them different.

The bench writes both state files directly (``herdserver.statefile.encode`` and
``MAGIC``, canonical AT lines): Alford holds 1,000,000 clients; Ball holds the
same records except 50 that only Alford has and 50 for which Ball has a record
a second newer. A two-server herd (Alford - Ball) is started together; each
replays its file and, once the other answers, reconciles as the initiator
(``SYNC ASK/HAVE/PULL/DONE``), logging ``event=sync ... bytes_out=B bytes_in=B``.

Figures: the bytes of each initiator's reconciliation (out + in) and their
sum, against a full push of the table (sum of ``len(line) + 1``; target <= 1%);
each process's CPU from the end of its replay (its ``event=state_loaded`` log
time, against /proc/PID/stat utime+stime sampled every few ms since the start) to
the moment the reconciliation is over and the process is quiet (target < 1 s);
convergence, read back from both state files after a graceful stop: every one
of the 100 differing clients holds the newest line on both ends, and both hold
1,000,000 clients.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

from bench import statefiles
from bench.harness import BenchError, Herd, Lab, cpu_seconds, quiet_cpu
from bench.report import Row, Section, Target
from bench.scenarios.common import Context
from bench.scenarios.propagation import log_time

RECORDS = 1_000_000
ONLY_ALFORD = 50  # the last 50 clients: Ball lacks them
NEWER_ON_BALL = 50  # spread over the table: Ball's record is a second newer
BYTES_LIMIT = 0.01  # issue: reconciliation bytes <= 1% of a full push
CPU_LIMIT_S = 1.0  # issue: reconciliation CPU < 1 s
SAMPLE_S = 0.005
DEADLINE_S = 120.0
PAIR = ("Alford", "Ball")
EVENT = re.compile(rb"^(\S+) \S+ \S+ event=(\S+) (.*)$")
FIELD = re.compile(rb"(\w+)=(\S+)")


def newer_indices() -> list[int]:
    step = (RECORDS - ONLY_ALFORD) // NEWER_ON_BALL
    return [k * step + 7 for k in range(NEWER_ON_BALL)]


def write_states(herd: Herd) -> tuple[dict[bytes, bytes], int]:
    """Both state files; the newest line of each differing client, and the full-push bytes."""
    newer = set(newer_indices())
    only = range(RECORDS - ONLY_ALFORD, RECORDS)
    expected: dict[bytes, bytes] = {}
    full_push = 0

    def alford() -> Any:
        nonlocal full_push
        for i, (time_ns, line) in enumerate(statefiles.distinct(RECORDS)):
            if i not in newer:  # those count with Ball's newer line
                full_push += len(line) + 1
            if i in only:
                expected[statefiles.client_id(i)] = line
            yield time_ns, line

    def ball() -> Any:
        nonlocal full_push
        for i, (time_ns, line) in enumerate(statefiles.distinct(RECORDS - ONLY_ALFORD)):
            if i in newer:
                client = statefiles.client_id(i)
                time_ns = statefiles.record_time(i, newer=True)
                line = statefiles.fast_line(b"Ball", client, time_ns)
                expected[client] = line
                full_push += len(line) + 1
            yield time_ns, line

    state_dir = herd.path.parent / "state"
    statefiles.write(state_dir / "Alford.state", alford())
    statefiles.write(state_dir / "Ball.state", ball())
    return expected, full_push


Event = tuple[float, bytes, dict[bytes, bytes]]


def events(herd: Herd, server: str) -> list[Event]:
    """(log time, event, fields) of every event line in ``server``'s log."""
    found = []
    try:
        with open(herd.log_path(server), "rb") as log:
            for line in log:
                match = EVENT.match(line)
                if match:
                    fields = dict(FIELD.findall(match.group(3)))
                    found.append((log_time(match.group(1)), match.group(2), fields))
    except FileNotFoundError:
        pass
    return found


def first(found: list[Event], event: bytes) -> tuple[float, dict[bytes, bytes]] | None:
    for when, name, fields in found:
        if name == event:
            return when, fields
    return None


Events = dict[str, tuple[float, dict[bytes, bytes]]]  # server -> (log time, fields) of its first such line
Samples = dict[str, list[tuple[float, float]]]  # server -> (wall time, CPU seconds) readings


@dataclass
class Watched:
    """What ``sample_until_synced`` saw: CPU readings and the first of each log event."""

    samples: Samples
    loaded: Events
    digested: Events
    synced: Events


def read_events(herd: Herd, seen: Watched) -> None:
    for name in PAIR:
        found = events(herd, name)
        for event, into in ((b"state_loaded", seen.loaded), (b"digests_ready", seen.digested),
                            (b"sync", seen.synced)):
            hit = first(found, event)
            if hit is not None:
                into[name] = hit


def sample_until_synced(herd: Herd) -> Watched:
    """Both processes' CPU every SAMPLE_S (their logs every 50 ms) until each logged its sync."""
    seen = Watched({name: [] for name in PAIR}, {}, {}, {})
    deadline = time.monotonic() + DEADLINE_S
    next_log = 0.0
    while len(seen.synced) < len(PAIR):
        if time.monotonic() > deadline:
            raise BenchError(f"no event=sync from {sorted(set(PAIR) - set(seen.synced))} within {DEADLINE_S:g} s")
        for name in PAIR:
            if not herd.children[name].alive():
                raise BenchError(f"{name} exited: {herd.children[name].log_tail()}")
            seen.samples[name].append((time.time(), cpu_seconds([herd.pid(name)])))
        if time.monotonic() >= next_log:
            next_log = time.monotonic() + 0.05
            read_events(herd, seen)
        time.sleep(SAMPLE_S)  # sampling /proc against a deadline
    return seen


def cpu_at(samples: list[tuple[float, float]], when: float, default: float) -> float:
    """The last CPU reading at or before ``when``."""
    before = [cpu for at, cpu in samples if at <= when]
    return before[-1] if before else default


def server_figures(herd: Herd, name: str, seen: Watched) -> dict[str, Any]:
    if name not in seen.loaded:
        raise BenchError(f"{name} logged no event=state_loaded")
    loaded_at, loaded = seen.loaded[name]
    samples = seen.samples[name]
    cpu_loaded = cpu_at(samples, loaded_at, samples[0][1])
    # The digests of a large replay are computed once, after the server listens
    # (event=digests_ready); the reconciliation waits for them. Its own CPU is what
    # comes after; the one-time digest build is reported beside it.
    digested_at = seen.digested[name][0] if name in seen.digested else loaded_at
    cpu_digested = cpu_at(samples, digested_at, cpu_loaded)
    cpu_end = quiet_cpu([herd.pid(name)])
    synced_at, fields = seen.synced[name]
    return {
        "replay_ms": float(loaded[b"ms"]),
        "records": int(loaded[b"records"]),
        "cpu_at_replay_end_s": cpu_loaded,
        "cpu_at_quiet_s": cpu_end,
        "digest_cpu_s": cpu_digested - cpu_loaded,
        "sync_cpu_s": cpu_end - cpu_digested,
        "sync_from_replay_end_s": synced_at - loaded_at,
        **{key.decode(): fields[key].decode() for key in fields},
    }


def watch(herd: Herd) -> dict[str, Any]:
    """Sample both processes' CPU until each logged its replay and its sync; then wait
    until they are quiet. CPU at the end of replay = the last sample at or before the
    ``state_loaded`` log time."""
    seen = sample_until_synced(herd)
    return {name: server_figures(herd, name, seen) for name in PAIR}


def converged(herd: Herd, expected: dict[bytes, bytes]) -> dict[str, Any]:
    """Both state files read back after the stop: the newest line of each differing client, and the count."""
    result = {}
    for name in PAIR:
        held, clients = statefiles.latest(herd.path.parent / "state" / f"{name}.state", set(expected))
        wrong = sum(held.get(client) != line for client, line in expected.items())
        result[name] = {"clients": clients, "differing_wrong": wrong}
    return result


def sync_rows(figures: dict[str, Any], full_push: int) -> list[Row]:
    rows, total = [], 0
    for name in PAIR:
        f = figures[name]
        sync_bytes = int(f["bytes_out"]) + int(f["bytes_in"])
        total += sync_bytes
        rows += [
            Row(f"{name} initiates: sync bytes (out {int(f['bytes_out']):,} + in {int(f['bytes_in']):,})",
                sync_bytes, "bytes", full_push, "full push"),
            Row(f"{name} initiates: leaves found differing", float(f["leaves"]), "leaves"),
            Row(f"{name} initiates: its lines of those leaves pushed", float(f["pushed"]), "lines"),
            Row(f"{name} initiates: sync time (its log)", float(f["ms"]), "ms"),
        ]
    share = total / full_push * 100
    rows += [
        Row("both reconciliations: bytes, sum", total, "bytes", full_push, "full push"),
        Row("both reconciliations: share of a full push", share, "%", BYTES_LIMIT * 100, "limit",
            Target(f"<= {BYTES_LIMIT:.0%} of a full push", total <= BYTES_LIMIT * full_push, "issue")),
    ]
    return rows


def cpu_rows(figures: dict[str, Any]) -> list[Row]:
    rows = []
    for name in PAIR:
        f = figures[name]
        rows += [
            Row(f"{name}: digests of the replayed table, once after listening (CPU)", f["digest_cpu_s"], "s", None,
                "-"),
            Row(f"{name}: CPU from digests ready to quiet (sync both ways)", f["sync_cpu_s"], "s", CPU_LIMIT_S,
                "limit", Target(f"< {CPU_LIMIT_S:g} s", f["sync_cpu_s"] < CPU_LIMIT_S, "issue")),
        ]
    rows += [Row(f"{name}: replay of its state file (event=state_loaded ms)", figures[name]["replay_ms"], "ms")
             for name in PAIR]
    return rows


def convergence_row(check: dict[str, Any], expected: dict[bytes, bytes]) -> Row:
    wrong = sum(c["differing_wrong"] for c in check.values())
    all_there = all(c["clients"] == RECORDS for c in check.values())
    return Row("differing clients not newest on both ends after the sync", wrong, "clients", 2 * len(expected),
               "checked (2 ends)", Target(f"0, and both hold {RECORDS:,} clients", wrong == 0 and all_there, "issue"))


def notes(written_s: float, expected: dict[bytes, bytes], full_push: int, check: dict[str, Any]) -> list[str]:
    return [
        f"state files written by the bench in {written_s:.1f} s: Alford {RECORDS:,} clients, "
        f"Ball {RECORDS - ONLY_ALFORD:,}; {ONLY_ALFORD} clients only "
        f"on Alford, {NEWER_ON_BALL} a second newer on Ball; lines of {len(next(iter(expected.values())))} "
        "bytes",
        f"full push = sum of len(line)+1 over the converged table of {RECORDS:,} records = {full_push:,} bytes",
        "both servers started together; each one's forwarder initiates a reconciliation at start "
        "(bytes_out + bytes_in from its event=sync line); the other answers",
        "CPU: utime+stime of each process sampled every 5 ms from its start; 'digests ready' = the last sample at "
        "or before its event=digests_ready log time stamp (the one-time digest build after a replay, reported on "
        "its own row: from 'replay end' to it); 'replay end' = the last sample at "
        "or before its event=state_loaded log time stamp; 'quiet' = two readings 0.1 s apart equal, after both "
        "sync lines were logged; so it covers the process's own sync and its answers to the other's",
        f"after a graceful stop both state files were read back: clients held {check['Alford']['clients']:,} "
        f"(Alford), {check['Ball']['clients']:,} (Ball)",
    ]


def run(ctx: Context) -> Section:
    section = Section("reconcile")
    lab = Lab(ctx.work_dir, "reconcile", ctx.places_url)
    try:
        herd = lab.herd("pair", {"Alford": ["Ball"], "Ball": []}, herd_keys={"fsync": "interval"})
        started = time.monotonic()
        expected, full_push = write_states(herd)
        written_s = time.monotonic() - started
        lab.start_servers(herd, PAIR, wait=False)
        figures = watch(herd)
        lab.stop_servers(herd)  # graceful: the state files are closed (and fsynced)
        check = converged(herd, expected)
        section.add(*sync_rows(figures, full_push), *cpu_rows(figures), convergence_row(check, expected))
        section.notes += notes(written_s, expected, full_push, check)
        section.raw = {"figures": figures, "check": check, "full_push": full_push}
    finally:
        lab.close()
    return section
