"""The scenarios of the suite, in the order they run: name -> run(Context) -> Section."""

from __future__ import annotations

from collections.abc import Callable

from bench.report import Section
from bench.scenarios import (
    attack,
    compare,
    connections,
    durability,
    herd,
    http_crowd,
    iamat,
    metrics,
    offline,
    overlong_state,
    propagation,
    reconcile,
    slow_neighbor,
    startup,
    state_load,
    whatsat,
)
from bench.scenarios.common import Context

SCENARIOS: dict[str, Callable[[Context], Section]] = {
    "iamat": iamat.run,
    "metrics": metrics.run,
    "propagation": propagation.run,
    "connections": connections.run,
    "whatsat": whatsat.run,
    "offline": offline.run,
    "slow-neighbor": slow_neighbor.run,
    "startup": startup.run,
    "compare": compare.run,
    "durability": durability.run,
    "reconcile": reconcile.run,
    "state-load": state_load.run,
    "overlong-state": overlong_state.run,
    "attack": attack.run,
    "herd": herd.run,
    "http-crowd": http_crowd.run,
}
