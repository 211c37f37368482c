"""What the state file costs one server: IAMAT throughput and p50 per fsync mode.

Four one-server herds run side by side: memory only (``[herd] state_dir = -``,
the baseline) and a state file with ``fsync = interval`` (the default),
``always`` (an acknowledged record is on disk: group commit) and ``never``.
Each run measures 50 persistent closed-loop clients and 1 client against all
four, in rotated order, so the VM's speed drift hits each alike. No issue
target: the figures are reported beside memory-only.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench.harness import Herd, Lab
from bench.report import Row, Section
from bench.scenarios.common import Context, check_errors, closed_loop, med, with_cpu

MODES: dict[str, dict[str, str]] = {
    "memory only": {"state_dir": "-"},
    "fsync = interval": {"fsync": "interval"},
    "fsync = always": {"fsync": "always"},
    "fsync = never": {"fsync": "never"},
}
CLIENTS = (50, 1)


def filesystem(path: Path) -> str:
    """The type of the filesystem holding ``path`` (from /proc/mounts): tmpfs would make fsync free."""
    best, kind = "", "unknown"
    target = os.path.realpath(path)
    with open("/proc/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            point = fields[1]
            if (target == point or target.startswith(point.rstrip("/") + "/")) and len(point) > len(best):
                best, kind = point, f"{fields[2]} on {fields[0]}"
    return kind


def mode_rows(label: str, runs: list[dict[str, Any]], base: list[dict[str, Any]] | None) -> list[Row]:
    """One mode's figures beside memory only's (``base``; None for memory only itself)."""
    figures = (("throughput", "throughput", "req/s"), ("p50", "p50_ms", "ms"), ("p99", "p99_ms", "ms"),
               ("CPU/request", "cpu_us_per_req", "us"))
    return [
        Row(f"{label} {what}", med(runs, key), unit, None if base is None else med(base, key),
            "" if base is None else "memory only")
        for what, key, unit in figures
    ]


Samples = dict[tuple[str, int], list[dict[str, Any]]]  # (mode, clients) -> one sample per run


def start_modes(lab: Lab) -> dict[str, Herd]:
    herds: dict[str, Herd] = {}
    for i, (mode, keys) in enumerate(MODES.items()):
        herds[mode] = lab.herd(f"mode{i}", {"Alford": []}, herd_keys=keys)
        lab.start_servers(herds[mode], ["Alford"])
    return herds


def measure_modes(lab: Lab, herds: dict[str, Herd], ctx: Context) -> Samples:
    """Every run, every client count, the four modes in rotated order (the VM's drift hits each alike)."""
    s = ctx.settings
    worker = lab.worker("load")
    samples: Samples = defaultdict(list)
    names = list(MODES)
    for r in range(s.iamat_runs):
        for clients in CLIENTS:
            for k, mode in enumerate(names[r % 4:] + names[:r % 4]):
                herd, prefix = herds[mode], f"d{r}-{clients}-{k}"
                samples[mode, clients].append(with_cpu(herd.pids(), lambda h=herd, c=clients, p=prefix: closed_loop(
                    worker, [h.ports["Alford"]], c, s.duration, s.max_requests, p)))
    return samples


def add_rows(section: Section, samples: Samples) -> None:
    for clients in CLIENTS:
        base = samples["memory only", clients]
        for mode in MODES:
            runs = samples[mode, clients]
            check_errors(runs, f"{mode} c={clients}", section.notes)
            section.add(*mode_rows(f"c={clients} {mode}", runs, None if mode == "memory only" else base))


def notes(herds: dict[str, Herd], ctx: Context) -> list[str]:
    s = ctx.settings
    state_file = herds["fsync = always"].path.parent / "state" / "Alford.state"
    size = state_file.stat().st_size if state_file.exists() else 0
    return [
        "one server each (four processes side by side); closed loop: each client sends one IAMAT (distinct "
        f"client id) and waits for the reply; {s.duration:g} s or {s.max_requests:,} requests per measurement, "
        f"median of {s.iamat_runs} runs, the four modes in rotated order",
        "state file: the default (state/Alford.state beside herd.ini); interval = fsync at most 1 s after a "
        "write; always = the reply waits for an fsync covering its record (group commit); never = the OS "
        "writes back when it likes",
        f"state dir filesystem: {filesystem(state_file.parent)}; fsync = always state file at the end: "
        f"{size / 1e6:.1f} MB",
        "no issue target: reported beside memory only",
    ]


def run(ctx: Context) -> Section:
    section = Section("durability")
    lab = Lab(ctx.work_dir, "durability", ctx.places_url)
    try:
        herds = start_modes(lab)
        samples = measure_modes(lab, herds, ctx)
        add_rows(section, samples)
        section.notes += notes(herds, ctx)
        section.raw = {f"{mode} c={c}": runs for (mode, c), runs in samples.items()}
    finally:
        lab.close()
    return section
