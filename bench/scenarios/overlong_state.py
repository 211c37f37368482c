"""Replay stays linear whatever the state file holds: one 64 MB line among the records.

Two state files of the same ``RECORDS`` records (distinct clients, canonical AT
lines): a normal one, and the same with one 64 MB line (no newline inside: a
hand edit, a disk that returned garbage) in the middle. One server starts on a
copy of each, alternating, ``runs`` times. Figures, the 64 MB file beside the
normal one:

- replay time: ``ms=`` of the ``event=state_loaded`` log line (target <= 0.5 s;
  before the fix, the unfinished line grew by one 1 MB chunk at a time: 2.6-4.3 s);
- peak RSS (VmHWM) once listening: the line is skipped unread, never held.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench import statefiles
from bench.harness import BenchError, Lab
from bench.report import Row, Section, Target, median
from bench.scenarios.common import Context
from bench.scenarios.state_load import replay_ms, start, stop

RECORDS = 100_000
LINE_BYTES = 64 << 20
REPLAY_LIMIT_MS = 500.0  # issue: replay of a state file holding one 64 MB line


def hwm_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise BenchError(f"no VmHWM for pid {pid}")


def write_files(directory: Path) -> tuple[Path, Path]:
    records = list(statefiles.distinct(RECORDS))
    normal, overlong = directory / "normal.state", directory / "overlong.state"
    statefiles.write(normal, records)
    statefiles.write(overlong, records[: RECORDS // 2])
    with open(overlong, "ab") as out:
        block = b"x" * (1 << 20)
        for _ in range(LINE_BYTES // len(block)):
            out.write(block)
        out.write(b"\n")
    rest = directory / "rest.state"
    statefiles.write(rest, records[RECORDS // 2 :])
    with open(overlong, "ab") as out, open(rest, "rb") as tail:
        tail.read(len(b"herdserver-state 1\n"))
        out.write(tail.read())
    rest.unlink()
    return normal, overlong


def run(ctx: Context) -> Section:
    section = Section("overlong-state")
    lab = Lab(ctx.work_dir, "overlong-state", ctx.places_url)
    try:
        normal, overlong = write_files(lab.dir)
        runs: list[dict[str, Any]] = []
        for r in range(ctx.settings.runs):
            run_figures: dict[str, Any] = {}
            for kind, path in (("normal", normal), ("overlong", overlong))[:: 1 if r % 2 == 0 else -1]:
                herd, child, _ = start(lab, f"{kind}{r}", path)
                ms, records = replay_ms(herd)
                if records != RECORDS:
                    raise BenchError(f"{kind}: replayed {records} records, not {RECORDS}")
                run_figures[f"{kind}_ms"], run_figures[f"{kind}_hwm_kb"] = ms, hwm_kb(child.pid)
                stop(lab, herd)
            runs.append(run_figures)

        def med(key: str) -> float:
            return median([float(figures[key]) for figures in runs])

        replay = med("overlong_ms")
        section.add(
            Row(f"replay, {RECORDS:,} records + one 64 MB line", replay, "ms", med("normal_ms"),
                f"{RECORDS:,} records, no long line",
                Target(f"<= {REPLAY_LIMIT_MS:g} ms", replay <= REPLAY_LIMIT_MS, "issue")),
            Row("peak RSS (VmHWM), with the 64 MB line", med("overlong_hwm_kb") / 1024, "MB",
                med("normal_hwm_kb") / 1024, "no long line"),
        )
        section.notes += [
            f"both files: the same {RECORDS:,} distinct clients; the long one has a {LINE_BYTES >> 20} MB line "
            "(no newline inside) half way; each start on a fresh copy",
            f"medians of {ctx.settings.runs} starts each, the two kinds alternating who goes first",
        ]
        section.raw = {"runs": runs}
    finally:
        lab.close()
    return section
