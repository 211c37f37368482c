"""Result rows, the printed tables and the machine header of the benchmark suite."""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any


@dataclass
class Target:
    """A goal for one figure; ``source`` says where it comes from (issue, bench_offline, or
    "issue; <threshold> assumed" when the issue states the goal but not the number)."""

    text: str
    met: bool
    source: str


@dataclass
class Row:
    """One figure next to its baseline from the same run."""

    label: str
    value: float | None
    unit: str
    baseline: float | None = None
    baseline_label: str = ""
    target: Target | None = None

    @property
    def ratio(self) -> float | None:
        if self.value is None or not self.baseline:
            return None
        return self.value / self.baseline


@dataclass
class Section:
    """One scenario's outcome: rows to print, notes, raw measurements for the JSON."""

    name: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0

    def add(self, *rows: Row) -> None:
        self.rows.extend(rows)

    def to_json(self) -> dict[str, Any]:
        rows = [{**asdict(row), "ratio": row.ratio} for row in self.rows]
        return {"rows": rows, "notes": self.notes, "raw": self.raw, "error": self.error, "seconds": self.seconds}


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def number(value: float | None) -> str:
    if value is None:
        return "-"
    size = abs(value)
    if size >= 100:
        return f"{value:,.0f}"
    if size >= 10:
        return f"{value:.1f}"
    if size >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def ratio_text(row: Row) -> str:
    return "-" if row.ratio is None else f"{row.ratio:.2f}x"


COLUMNS = ("figure", "value", "unit", "baseline", "(baseline is)", "ratio")
MIN_WIDTHS = (10, 10, 9, 10, 14, 9)


def aligned(cells: tuple[str, ...], widths: list[int]) -> str:
    return "".join(f"{cell:<{width}}" for cell, width in zip(cells, widths, strict=True))


def print_section(section: Section) -> None:
    print(f"\n== {section.name}  ({section.seconds:.0f} s)")
    if section.error:
        print(f"   FAILED: {section.error}")
    table = [
        (row.label, number(row.value), row.unit, number(row.baseline), row.baseline_label, ratio_text(row))
        for row in section.rows
    ]
    widths = [max([len(cells[i]) + 2 for cells in table] + [least]) for i, least in enumerate(MIN_WIDTHS)]
    if section.rows:
        print("   " + aligned(COLUMNS, widths) + "target")
    for row, cells in zip(section.rows, table, strict=True):
        line = aligned(cells, widths)
        if row.target:
            verdict = "MET" if row.target.met else "NOT MET"
            line += f"{row.target.text} [{row.target.source}]: {verdict}"
        print("   " + line.rstrip())
    for note in section.notes:
        print(f"   * {note}")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def load_average() -> str:
    """The 1, 5 and 15 minute load averages: other work on the machine skews every figure."""
    try:
        with open("/proc/loadavg") as loadavg:
            return " ".join(loadavg.read().split()[:3])
    except OSError:
        return "unknown"


def speed_probe(lines: int = 20_000) -> float:
    """Microseconds per ``protocol.parse`` of an IAMAT line, best of 3: how fast this
    (shared, virtual) machine runs Python right now, to compare runs by."""
    from herdserver.core import protocol  # the bench runs from the repository root

    line = b"IAMAT kiwi.cs.ucla.edu +34.068930-118.445127 1795543228.716537891"
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(lines):
            protocol.parse(line)
        best = min(best, (time.perf_counter() - started) / lines * 1e6)
    return best


def machine() -> dict[str, Any]:
    cores = len(os.sched_getaffinity(0))
    return {
        "speed_probe_us": speed_probe(),
        "nproc": cores,
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "gevent": package_version("gevent"),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "loadavg_at_start": load_average(),
        "shared_cores": f"servers and load generators share these {cores} cores",
    }


def print_header(info: dict[str, Any], mode: str) -> None:
    print(f"herdserver benchmark suite ({mode}), {info['date']}")
    print(
        f"machine: nproc={info['nproc']}, CPU {info['cpu']}, Python {info['python']}, gevent {info['gevent']}; "
        f"{info['shared_cores']}: every figure includes that contention."
    )
    print(f"load average before the suite started: {info['loadavg_at_start']} (anything else running skews figures)")
    print(f"speed probe: {info['speed_probe_us']:.2f} us per IAMAT parse, best of 3 (lower = a faster moment of "
          "this shared VM; compare runs by it)")
    print("ratio = value / baseline; baselines are measured in the same run. Medians over runs unless noted.")
