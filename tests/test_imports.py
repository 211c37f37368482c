"""The package's import rules (tools/imports.py), on small graphs and on the package itself."""

from __future__ import annotations

from tools.imports import cycles, graph, ours, violations


def test_a_cycle_is_found_through_every_module_on_it() -> None:
    edges = {"herdserver.a": {"herdserver.b"}, "herdserver.b": {"herdserver.c"}, "herdserver.c": {"herdserver.a"}}
    assert cycles(edges) == [["herdserver.a", "herdserver.b", "herdserver.c", "herdserver.a"]]
    assert cycles({"herdserver.a": {"herdserver.b"}, "herdserver.b": set()}) == []


def test_the_rooms_rules() -> None:
    edges = {
        "herdserver.core.store": {"herdserver.logs", "os", "hashlib"},
        "herdserver.net.links": {"herdserver.ops.web", "herdserver.core.store", "gevent"},
        "herdserver.ops.web": {"herdserver.core.store", "herdserver.core.status", "herdserver.config"},
        "herdserver.net.clients": {"herdserver.server"},
        "herdserver.__main__": {"herdserver.server"},
    }
    assert sorted(violations(edges)) == [
        "herdserver.core.store (pure core) imports os",
        "herdserver.core.store imports herdserver.logs",
        "herdserver.net.clients imports herdserver.server",
        "herdserver.net.links imports herdserver.ops.web",
        "herdserver.ops.web imports herdserver.core.store",
    ]


def test_imports_inside_functions_and_type_checking_count() -> None:
    edges = ours(graph())
    # server imports the rooms at module level; the entry point imports server inside main()
    assert "herdserver.server" in edges["herdserver.__main__"]
    assert "herdserver.core.status" in edges["herdserver.ops.metrics"]


def test_the_package_keeps_its_import_rules() -> None:
    assert violations(graph()) == []
