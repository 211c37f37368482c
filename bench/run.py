#!/usr/bin/env python3
"""The herdserver benchmark suite: one command, every scenario, baselines in the same run.

    .venv/bin/python bench/run.py [--quick] [--json PATH] [--only SCENARIO ...] [--compare [REV]]
                                  [--herd-sizes N ...] [--keep]

Servers, the echo baseline, the fake Places server and the load generators run
as separate processes on loopback ports; every one is stopped by PID at the
end, when a scenario fails, and on Ctrl-C. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import harness, report  # noqa: E402
from bench.scenarios import SCENARIOS, compare  # noqa: E402
from bench.scenarios.common import FULL, QUICK, Context  # noqa: E402

PLACES_LATENCY = 0.2  # seconds; the WHATSAT scenario's ideal
DEFAULT_JSON = ROOT / "bench" / "results" / "latest.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Run the herdserver benchmark suite.")
    parser.add_argument("--quick", action="store_true", help="one run each, smaller counts (a smoke test, ~1 min)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, metavar="PATH",
                        help=f"write the results here (default: {DEFAULT_JSON.relative_to(ROOT)})")
    parser.add_argument("--only", nargs="+", choices=list(SCENARIOS), metavar="SCENARIO",
                        help=f"run only these ({', '.join(SCENARIOS)})")
    parser.add_argument("--compare", metavar="REV", nargs="?", const=compare.DEFAULT_REV,
                        help="the git revision the compare scenario measures this working tree against, side by "
                             "side (default: HEAD~1; HEAD: uncommitted changes; 70174fa: the last with persistent "
                             "links); alone, it runs only that scenario")
    parser.add_argument("--herd-sizes", nargs="+", type=int, metavar="N",
                        help="the herd scenario's herd sizes (default: 50 100; --quick: 20)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (herd files, server logs)")
    return parser.parse_args(argv)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_scenario(name: str, ctx: Context) -> report.Section:
    started = time.monotonic()
    try:
        section = SCENARIOS[name](ctx)
    except Exception as exc:  # one scenario failing never stops the suite
        section = report.Section(name, error=f"{type(exc).__name__}: {exc}")
    section.seconds = time.monotonic() - started
    report.print_section(section)
    sys.stdout.flush()
    return section


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1, default=str) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = QUICK if args.quick else FULL
    if args.herd_sizes:
        settings = replace(settings, herd_sizes=tuple(args.herd_sizes))
    machine = report.machine()
    report.print_header(machine, "quick" if args.quick else "full")
    document: dict[str, Any] = {"machine": machine, "mode": "quick" if args.quick else "full",
                                "settings": asdict(settings),
                                "scenarios": {}}
    work_dir = Path(tempfile.mkdtemp(prefix="herdbench-"))
    for signum in (signal.SIGINT, signal.SIGTERM):  # explicit: a background shell may have ignored SIGINT
        signal.signal(signum, _interrupt)
    started = time.monotonic()
    status = 0
    try:
        places, places_url = harness.start_places(work_dir, PLACES_LATENCY)
        ctx = Context(settings, work_dir, places_url, PLACES_LATENCY, places.pid, args.compare)
        chosen = args.only or (["compare"] if args.compare else list(SCENARIOS))
        for name in chosen:
            section = run_scenario(name, ctx)
            document["scenarios"][name] = section.to_json()
            status |= section.error is not None
    except KeyboardInterrupt:
        print("\ninterrupted: stopping every process the suite started", file=sys.stderr)
        document["interrupted"] = True
        status = 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        harness.PROCESSES.stop_all()
        document["total_seconds"] = time.monotonic() - started
        document["speed_probe_us_at_end"] = report.speed_probe()
        write_json(args.json, document)
        if args.keep:
            print(f"kept {work_dir}")
        else:
            shutil.rmtree(work_dir, ignore_errors=True)
    print(f"\nspeed probe at the end: {document['speed_probe_us_at_end']:.2f} us (at the start: "
          f"{machine['speed_probe_us']:.2f} us)")
    print(f"total {document['total_seconds']:.0f} s; results in {args.json}")
    return status


if __name__ == "__main__":
    sys.exit(main())
