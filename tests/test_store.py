"""Store: newest record per client under the one total order (time, then line)."""

from __future__ import annotations

import itertools

from herdserver.core.protocol import At, parse
from herdserver.core.store import Store


def at(t: bytes, server: bytes = b"Alford", client: bytes = b"kiwi", loc: bytes = b"+1+1") -> At:
    msg = parse(b"AT %s +0.000000000 %s %s %s" % (server, client, loc, t))
    assert isinstance(msg, At)
    return msg


def test_first_record_is_kept() -> None:
    store = Store()
    assert store.get(b"kiwi") is None
    record = at(b"1")
    assert store.offer(record) is True
    assert store.get(b"kiwi") == record.line
    assert len(store) == 1


def test_newer_wins() -> None:
    store = Store()
    old, new = at(b"1.5"), at(b"1.500000001")
    assert store.offer(old) is True
    assert store.offer(new) is True
    assert store.get(b"kiwi") == new.line


def test_older_is_dropped() -> None:
    store = Store()
    old, new = at(b"100"), at(b"99.999999999", server=b"Zulu")  # larger line, older time
    assert store.offer(old) is True
    assert store.offer(new) is False
    assert store.get(b"kiwi") == old.line


def test_equal_is_dropped() -> None:
    store = Store()
    first, again = at(b"5"), at(b"5")
    assert first == again and first is not again
    assert store.offer(first) is True
    assert store.offer(again) is False
    assert store.offer(first) is False
    assert store.get(b"kiwi") == first.line


def test_tie_on_time_broken_by_line_bytes() -> None:
    alford, ball = at(b"7", server=b"Alford"), at(b"7", server=b"Ball")
    assert alford.time_ns == ball.time_ns
    for order in ([alford, ball], [ball, alford]):
        store = Store()
        kept = [store.offer(r) for r in order]
        assert store.get(b"kiwi") == ball.line  # b"AT Ball" > b"AT Alford"
        assert kept == ([True, True] if order[0] is alford else [True, False])


def test_same_instant_written_differently() -> None:
    short, long = at(b"1.5", loc=b"+2+2"), at(b"1.500", loc=b"+2+2")
    assert short.time_ns == long.time_ns
    store = Store()
    assert store.offer(long) is True
    assert store.offer(short) is False  # b"...1.5" < b"...1.500"
    assert store.get(b"kiwi") == long.line


def test_clients_are_independent() -> None:
    store = Store()
    assert store.offer(at(b"9", client=b"a")) is True
    assert store.offer(at(b"1", client=b"b")) is True
    assert len(store) == 2
    assert store.snapshot() == {
        b"a": b"AT Alford +0.000000000 a +1+1 9",
        b"b": b"AT Alford +0.000000000 b +1+1 1",
    }


UPDATES = [
    at(b"1", client=b"kiwi"),
    at(b"3", client=b"kiwi", server=b"Ball"),
    at(b"3", client=b"kiwi", server=b"Alford"),
    at(b"2", client=b"kiwi", server=b"Welsh"),
    at(b"4", client=b"lemon"),
    at(b"4.0", client=b"lemon", server=b"Hamilton"),
    at(b"0.9", client=b"lemon", server=b"Zulu"),
]
FINAL = {
    b"kiwi": b"AT Ball +0.000000000 kiwi +1+1 3",
    b"lemon": b"AT Hamilton +0.000000000 lemon +1+1 4.0",
}


def test_same_final_state_whatever_the_order() -> None:
    stored_counts = set()
    for order in itertools.permutations(UPDATES):
        store = Store()
        stored = sum(store.offer(r) for r in order)
        assert store.snapshot() == FINAL, order
        stored_counts.add(stored)
    # Each arrival order stores between 2 (best case) and 7 (worst case) updates.
    assert min(stored_counts) == 2 and max(stored_counts) == 7


def test_lines_is_a_snapshot() -> None:
    store = Store()
    store.offer(at(b"1", client=b"a"))
    store.offer(at(b"1", client=b"b"))
    lines = store.lines()
    store.offer(at(b"2", client=b"c"))  # would break a live dict iterator
    assert sorted(lines) == [b"AT Alford +0.000000000 a +1+1 1", b"AT Alford +0.000000000 b +1+1 1"]


def test_holds_is_true_only_for_the_exact_held_line() -> None:
    store = Store()
    record = at(b"1")
    assert store.holds(b"kiwi", record.line) is False  # nothing held yet
    store.offer(record)
    assert store.holds(b"kiwi", record.line) is True
    assert store.holds(b"kiwi", record.line.replace(b"+0.000000000", b"+0.000000001")) is False
    assert store.holds(b"other", record.line) is False
