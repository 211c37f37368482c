"""A large state file: memory per record, replay time; a small one: start-up stays fast.

The bench writes a state file of 1,000,000 distinct clients directly
(``herdserver.statefile.encode``, canonical AT lines) and starts one server on a
copy of it, then the same server with no state file (an empty state); one after
the other, ``runs`` times. Figures:

- memory per record: (RSS with the million replayed - RSS with the empty state)
  / 1,000,000 (VmRSS once it is stable; target <= 300 bytes);
- replay time: ``ms=`` of the ``event=state_loaded`` log line (target <= 2 s);
- start-up: exec -> LISTEN (connect polled every 1 ms) with 1,000 records vs an
  empty state, ``startup_runs`` starts each, alternating (no target number:
  "stays fast" is checked as <= 1.2x the empty state's, our threshold).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from bench import statefiles
from bench.harness import BenchError, Child, Herd, Lab, stable_rss_kb, wait_for_port
from bench.report import Row, Section, Target, median
from bench.scenarios.common import Context
from bench.scenarios.reconcile import events, first

RECORDS = 1_000_000
SMALL = 1_000
PER_RECORD_LIMIT = 300.0  # issue: bytes of RSS per record
REPLAY_LIMIT_MS = 2000.0  # issue: replay of the 1,000,000-record state file
SMALL_START_RATIO = 1.2  # "start-up with a small state stays fast": our threshold, against an empty state
POLL_S = 0.001
DEADLINE_S = 60.0


def start(lab: Lab, name: str, state: Path | None) -> tuple[Herd, Child, float]:
    """A one-server herd (Alford) on a copy of ``state`` (None: no file); exec -> LISTEN seconds."""
    herd = lab.herd(name, {"Alford": []})
    if state is not None:
        (herd.path.parent / "state").mkdir()
        shutil.copyfile(state, herd.path.parent / "state" / "Alford.state")
    started = time.perf_counter()
    lab.start_servers(herd, ["Alford"], wait=False)
    child = herd.children["Alford"]
    wait_for_port(child, herd.ports["Alford"], DEADLINE_S, poll=POLL_S)
    return herd, child, time.perf_counter() - started


def replay_ms(herd: Herd) -> tuple[float, int]:
    """``ms`` and ``records`` of the server's event=state_loaded line (waits for the log flush)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        hit = first(events(herd, "Alford"), b"state_loaded")
        if hit is not None:
            return float(hit[1][b"ms"]), int(hit[1][b"records"])
        time.sleep(0.02)  # the log is flushed every 0.05 s
    raise BenchError(f"{herd.name}: no event=state_loaded in the log")


def stop(lab: Lab, herd: Herd) -> None:
    lab.stop_servers(herd)
    lab.children.remove(herd.children["Alford"])


def write_files(lab: Lab) -> tuple[Path, Path, int, float]:
    """The big and the small state files: their paths, the big one's size, the seconds it took."""
    written = time.monotonic()
    big = lab.dir / "million.state"
    size = statefiles.write(big, statefiles.distinct(RECORDS))
    small = lab.dir / "thousand.state"
    statefiles.write(small, statefiles.distinct(SMALL))
    return big, small, size, time.monotonic() - written


def big_and_empty(lab: Lab, big: Path, r: int) -> dict[str, Any]:
    """One start on the big state (replay, RSS, exec -> LISTEN), then one on an empty state (RSS)."""
    herd, child, listen_s = start(lab, f"big{r}", big)
    ms, records = replay_ms(herd)
    if records != RECORDS:
        raise BenchError(f"replayed {records} records, not {RECORDS}")
    big_kb = stable_rss_kb(child.pid)
    stop(lab, herd)
    herd, child, _ = start(lab, f"empty{r}", None)
    empty_kb = stable_rss_kb(child.pid)
    stop(lab, herd)
    return {"replay_ms": ms, "big_rss_kb": big_kb, "empty_rss_kb": empty_kb, "big_listen_s": listen_s,
            "per_record_b": (big_kb - empty_kb) * 1024 / RECORDS}


def small_starts(lab: Lab, small: Path, runs: int) -> dict[str, list[float]]:
    """exec -> LISTEN with the small state and with none, alternating which goes first."""
    starts: dict[str, list[float]] = {"small": [], "empty": []}
    for r in range(runs):
        for kind in (("small", "empty") if r % 2 == 0 else ("empty", "small")):
            herd, _, listen_s = start(lab, f"start-{kind}{r}", small if kind == "small" else None)
            starts[kind].append(listen_s)
            stop(lab, herd)
    return starts


def rows(runs: list[dict[str, Any]], starts: dict[str, list[float]]) -> list[Row]:
    def med(key: str) -> float:
        return median([float(run[key]) for run in runs])

    per_record, replay = med("per_record_b"), med("replay_ms")
    small_s, empty_s = median(starts["small"]), median(starts["empty"])
    return [
        Row(f"RSS, {RECORDS:,} records replayed", med("big_rss_kb") / 1024, "MB", med("empty_rss_kb") / 1024,
            "empty state"),
        Row("RSS per record", per_record, "bytes", PER_RECORD_LIMIT, "limit",
            Target(f"<= {PER_RECORD_LIMIT:g} bytes", per_record <= PER_RECORD_LIMIT, "issue")),
        Row(f"replay of {RECORDS:,} records (event=state_loaded ms)", replay, "ms", REPLAY_LIMIT_MS, "limit",
            Target(f"<= {REPLAY_LIMIT_MS / 1000:g} s", replay <= REPLAY_LIMIT_MS, "issue")),
        Row(f"exec -> LISTEN, {RECORDS:,} records", med("big_listen_s") * 1000, "ms", empty_s * 1000,
            "empty state"),
        Row(f"exec -> LISTEN, {SMALL:,} records", small_s * 1000, "ms", empty_s * 1000, "empty state",
            Target(f"<= {SMALL_START_RATIO:g}x empty", small_s <= SMALL_START_RATIO * empty_s,
                   f"issue; {SMALL_START_RATIO:g}x assumed")),
    ]


def notes(written_s: float, size: int, ctx: Context) -> list[str]:
    s = ctx.settings
    line_bytes = len(statefiles.fast_line(b"Alford", statefiles.client_id(0), statefiles.record_time(0)))
    return [
        f"state files written by the bench in {written_s:.1f} s: {RECORDS:,} distinct clients, {size / 1e6:.0f} MB "
        f"(lines of {line_bytes} bytes, client ids like "
        f"{statefiles.client_id(0).decode()}); each start on a fresh copy",
        f"RSS: VmRSS once stable (two readings 0.2 s apart within 64 KB); medians of {s.runs} starts each, "
        "the big and the empty state alternating",
        f"exec -> LISTEN: from just before Popen until a connect() succeeds (polled every {POLL_S * 1000:g} ms); "
        f"median of {s.startup_runs} starts each, small and empty alternating",
    ]


def run(ctx: Context) -> Section:
    section = Section("state-load")
    lab = Lab(ctx.work_dir, "state-load", ctx.places_url)
    try:
        big, small, size, written_s = write_files(lab)
        runs = [big_and_empty(lab, big, r) for r in range(ctx.settings.runs)]
        starts = small_starts(lab, small, ctx.settings.startup_runs)
        section.add(*rows(runs, starts))
        section.notes += notes(written_s, size, ctx)
        section.raw = {"runs": runs, "starts": starts}
    finally:
        lab.close()
    return section
