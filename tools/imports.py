"""Check herdserver's import rules; ``python -m tools.imports`` prints the graph's
violations and exits 1 if there are any.

Every ``from . import`` / ``from .x import`` / ``import herdserver.x`` counts,
including ones inside functions and under ``TYPE_CHECKING``. The rules:

- no cycle anywhere in the package;
- ``core`` imports nothing of ours outside ``core``, and only the standard library
  (no gevent, sockets, threads, subprocesses, ``os``, clocks);
- ``statefile`` and ``places`` import only ``core``, ``fsutil``, ``config``, ``logs``;
- ``net`` imports only ``core``, ``places``, ``statefile``, ``fsutil``, ``config``, ``logs``;
- ``ops`` imports only ``core.status``, ``core.stats``, ``config``, ``logs``
  (and itself); ``net`` and ``ops`` never import each other;
- only the entry points (``__main__``, ``supervisor``, ``ctl``) import ``server``.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

PACKAGE = "herdserver"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE
FLOOR = ("herdserver.config", "herdserver.logs", "herdserver.fsutil", "herdserver")
ENTRY_POINTS = ("herdserver.__main__", "herdserver.supervisor", "herdserver.ctl")
# What the pure core may import from outside the package: the standard library minus I/O.
CORE_FORBIDDEN = {
    "os", "socket", "threading", "subprocess", "time", "gevent", "select", "selectors", "signal",
    "asyncio", "multiprocessing", "requests", "random", "datetime", "io", "pathlib", "shutil", "fcntl",
}  # fmt: skip


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> Iterator[tuple[str, tuple[str, ...]]]:
    """Every import in ``path`` as (absolute module, names taken from it), wherever it stands."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from ((alias.name, ()) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base]) if base else ".".join(anchor)
            yield base, tuple(alias.name for alias in node.names)


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for base, names in imports_of(path):
            # "from . import x" imports the module x when there is one, else a name of base
            submodules = [f"{base}.{n}" for n in names if f"{base}.{n}" in modules]
            for imported in submodules or [base]:
                add_target(imported, name, modules, targets)
        edges[name] = targets
    return edges


def add_target(imported: str, name: str, modules: dict[str, Path], targets: set[str]) -> None:
    if imported.startswith(PACKAGE):
        while imported not in modules and "." in imported:
            imported = imported.rpartition(".")[0]
        if imported in modules and imported != name:
            targets.add(imported)
    else:
        targets.add(imported)


def ours(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    return {m: {t for t in ts if t.startswith(PACKAGE) and t != PACKAGE} for m, ts in edges.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected part with more than one module (or a self loop)."""
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                found.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    return found


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def allowed(src: str, dst: str) -> bool:
    """May module ``src`` import our module ``dst``?"""
    a, b = room(src), room(dst)
    if a == b or (dst in FLOOR and a != "core"):
        return dst != "herdserver.server" or src in ENTRY_POINTS
    if a == "core":
        return False
    if b == "server":
        return src in ENTRY_POINTS
    rules = {
        "statefile": {"core"},
        "places": {"core"},
        "net": {"core", "places", "statefile"},
        "ops": {"core"},
    }
    if a == "ops" and b == "core":
        return dst in ("herdserver.core.status", "herdserver.core.stats")
    if a in rules:
        return b in rules[a]
    return True  # server, the entry points and the floor may use every room


def violations(edges: dict[str, set[str]]) -> list[str]:
    problems = [f"cycle: {' -> '.join(cycle)}" for cycle in cycles(ours(edges))]
    for src, targets in sorted(edges.items()):
        for dst in sorted(targets):
            if dst.startswith(PACKAGE):
                if dst != PACKAGE and not allowed(src, dst):
                    problems.append(f"{src} imports {dst}")
            elif room(src) == "core" and dst.split(".")[0] in CORE_FORBIDDEN:
                problems.append(f"{src} (pure core) imports {dst}")
    return problems


def main() -> int:
    problems = violations(graph())
    for problem in problems:
        print(problem)
    if not problems:
        print(f"{PACKAGE}: {len(graph())} modules, no cycle, every import within the rules")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
