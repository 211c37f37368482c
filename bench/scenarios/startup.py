"""Start-up of one server with the offline provider, warm and cold cache: bench/bench_startup.py."""

from __future__ import annotations

import contextlib
import io
from typing import Any

from bench import bench_startup
from bench.report import Row, Section, Target
from bench.scenarios.common import Context


def rows(result: dict[str, Any]) -> list[Row]:
    g = result["import_gevent"]
    out = []
    for cache in ("warm", "cold"):
        m = result[cache]["median"]
        for key, label, base, base_label in (
            ("listen_s", "exec -> LISTEN", g["wall_s"], "import gevent, wall"),
            ("whatsat_s", "exec -> first WHATSAT answered OK", g["wall_s"], "import gevent, wall"),
            ("cpu_s", "server CPU at that point", g["cpu_s"], "import gevent, CPU"),
            ("children_cpu_s", "its cache builder's CPU", g["cpu_s"], "import gevent, CPU"),
        ):
            limit = bench_startup.TARGETS.get(key) if cache == "warm" else None
            target = None if limit is None else Target(f"<= {limit * 1000:g} ms", m[key] <= limit, "issue")
            out.append(Row(f"{cache} cache: {label}", m[key] * 1000, "ms", base * 1000, base_label, target))
    return out


def run(ctx: Context) -> Section:
    section = Section("startup")
    with contextlib.redirect_stdout(io.StringIO()):  # its own table: the rows below say the same
        result = bench_startup.run(None, runs=ctx.settings.startup_runs)
    section.add(*rows(result))
    imports = result["server_imports"]
    section.notes.append(
        f"median of {ctx.settings.startup_runs} starts each; the server's imports alone "
        f"(monkey.patch_all + herdserver.server) take {imports['wall_s'] * 1000:.0f} ms wall, "
        f"{imports['cpu_s'] * 1000:.0f} ms CPU; cold = an empty cache dir per start (the builder runs in a child)"
    )
    section.raw["startup"] = result
    return section
