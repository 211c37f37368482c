"""How soon ``python -m herdserver NAME`` (offline provider) is useful, warm and cold cache.

For a warm cache (the cache file built beforehand) and a cold one (an empty cache dir
per start), each started ``startup_runs`` times (medians):

- exec -> LISTEN: from just before the server's exec until a connect() to its port
  succeeds (polled every 1 ms);
- exec -> first WHATSAT answered with offline results (status OK): one connection
  sends IAMAT then WHATSAT as soon as the port accepts; an "offline place data is
  still loading" answer is retried;
- the server's CPU at that moment (utime+stime, /proc/PID/stat), and its waited-for
  children's (cutime+cstime: the cache builder, cold);

beside a bare ``python -c "import gevent"`` (exec to exit, CPU from wait4) and the
server's imports alone (``monkey.patch_all(); import herdserver.server``), measured in
the same run. Targets (the start-up issue): warm cache, listen <= 0.3 s, WHATSAT <= 0.5 s,
CPU <= 0.4 s, each a median of 5 starts.
"""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path
from typing import Any

from bench.harness import HOST, BenchError, Lab, proc_times, timed_run, wait_for_port
from bench.report import Row, Section, Target, median
from bench.scenarios.common import Context

DEADLINE_S = 60.0  # one start, from exec to the first OK WHATSAT
POLL_S = 0.001  # the resolution of exec -> LISTEN
UCLA = "+34.068930-118.445127"
TARGETS = {"listen_s": 0.3, "whatsat_s": 0.5, "cpu_s": 0.4}  # the issue: warm cache, median of 5
OFFLINE = {"provider": "offline", "timeout": "5"}
IMPORTS = "from gevent import monkey; monkey.patch_all(); import herdserver.server, herdserver.places"
FIGURES = (  # key, label, baseline key of import gevent, its label
    ("listen_s", "exec -> LISTEN", "wall_s", "import gevent, wall"),
    ("whatsat_s", "exec -> first WHATSAT answered OK", "wall_s", "import gevent, wall"),
    ("cpu_s", "server CPU at that point", "cpu_s", "import gevent, CPU"),
    ("children_cpu_s", "its cache builder's CPU", "cpu_s", "import gevent, CPU"),
)


# -- baselines ---------------------------------------------------------------------------------


def baseline(code: str, runs: int) -> dict[str, Any]:
    """``python -c code``, exec to exit: median wall and CPU seconds."""
    samples = [timed_run([sys.executable, "-c", code]) for _ in range(runs)]
    walls, cpus = [wall for wall, _ in samples], [cpu for _, cpu in samples]
    return {"wall_s": median(walls), "cpu_s": median(cpus), "walls": walls, "cpus": cpus}


# -- one start -----------------------------------------------------------------------------------


def whatsat(port: int) -> bytes:
    """IAMAT then WHATSAT on one connection; the two replies (the WHATSAT's ends in an empty line)."""
    with socket.create_connection((HOST, port), timeout=DEADLINE_S) as sock:
        sock.sendall(f"IAMAT bench {UCLA} {time.time():.9f}\nWHATSAT bench 10 5\n".encode())
        buffer = b""
        while buffer.count(b"\n\n") < 1 or buffer.count(b"\n") < 2:
            chunk = sock.recv(65536)
            if not chunk:
                raise BenchError(f"EOF from the server: {buffer[-300:]!r}")
            buffer += chunk
    return buffer


def first_ok_whatsat(port: int, deadline: float) -> int:
    """Ask until the answer has offline results; how many 'still loading' answers came first."""
    loading = 0
    while True:
        reply = whatsat(port)
        if b'"status": "OK"' in reply:
            return loading
        if b"still loading" not in reply or time.perf_counter() > deadline:
            raise BenchError(f"unexpected WHATSAT answer: {reply[:400]!r}")
        loading += 1


def one_start(lab: Lab, name: str, cache_dir: Path) -> dict[str, Any]:
    herd = lab.herd(name, {"Alford": []}, places_keys=OFFLINE)
    port = herd.ports["Alford"]
    started = time.perf_counter()
    lab.start_servers(herd, ["Alford"], wait=False, env={"HERDSERVER_CACHE_DIR": str(cache_dir)})
    try:
        child = herd.children["Alford"]
        wait_for_port(child, port, DEADLINE_S, poll=POLL_S)
        listen = time.perf_counter() - started
        loading = first_ok_whatsat(port, started + DEADLINE_S)
        answered = time.perf_counter() - started
        own, children = proc_times(child.pid)
    finally:
        lab.stop_servers(herd)
    return {"listen_s": listen, "whatsat_s": answered, "cpu_s": own, "children_cpu_s": children,
            "loading_answers": loading}


# -- the warm and cold series -----------------------------------------------------------------


def build_cache(cache_dir: Path) -> None:
    timed_run([sys.executable, "-m", "herdserver.offline", "build-cache"],
              env={"HERDSERVER_CACHE_DIR": str(cache_dir)})


def starts(lab: Lab, runs: int, warm: bool) -> dict[str, Any]:
    kind = "warm" if warm else "cold"
    shared = lab.dir / "cache-warm"
    if warm:
        build_cache(shared)
    samples = [one_start(lab, f"{kind}-{i}", shared if warm else lab.dir / f"cache-{kind}-{i}")
               for i in range(runs)]
    medians = {key: median([float(sample[key]) for sample in samples]) for key in samples[0]}
    return {"median": medians, "samples": samples}


def measure(ctx: Context) -> dict[str, Any]:
    runs = ctx.settings.startup_runs
    lab = Lab(ctx.work_dir, "startup", ctx.places_url)
    try:
        return {
            "runs": runs,
            "import_gevent": baseline("import gevent", runs),
            "server_imports": baseline(IMPORTS, runs),
            "warm": starts(lab, runs, warm=True),
            "cold": starts(lab, runs, warm=False),
        }
    finally:
        lab.close()


# -- report ------------------------------------------------------------------------------------


def rows(result: dict[str, Any]) -> list[Row]:
    gevent = result["import_gevent"]
    out = []
    for cache in ("warm", "cold"):
        m = result[cache]["median"]
        for key, label, base_key, base_label in FIGURES:
            limit = TARGETS.get(key) if cache == "warm" else None
            target = None if limit is None else Target(f"<= {limit * 1000:g} ms", m[key] <= limit, "issue")
            out.append(Row(f"{cache} cache: {label}", m[key] * 1000, "ms", gevent[base_key] * 1000, base_label,
                           target))
    return out


def notes(result: dict[str, Any]) -> list[str]:
    imports = result["server_imports"]
    out = [
        f"median of {result['runs']} starts each; the server's imports alone (monkey.patch_all + "
        f"herdserver.server) take {imports['wall_s'] * 1000:.0f} ms wall, {imports['cpu_s'] * 1000:.0f} ms CPU; "
        "cold = an empty cache dir per start (the builder runs in a child)",
    ]
    for cache in ("warm", "cold"):
        loading = result[cache]["median"]["loading_answers"]
        if loading:
            out.append(f"{cache}: 'still loading' answers before the first OK, median {loading:g}")
    return out


def run(ctx: Context) -> Section:
    section = Section("startup")
    result = measure(ctx)
    section.add(*rows(result))
    section.notes += notes(result)
    section.raw["startup"] = result
    return section
