"""Reconciliation, pure: two stores that differ end up equal, sending only what differs."""

from __future__ import annotations

import random
from array import array

import pytest

from herdserver.core import sync
from herdserver.core.protocol import At, parse
from herdserver.core.store import Store, fold_levels


def line(client: bytes, t: int, server: bytes = b"Alford") -> bytes:
    return b"AT %s +0.000000000 %s +1+1 %d" % (server, client, t)


def fill(store: Store, lines: list[bytes]) -> None:
    for raw in lines:
        msg = parse(raw)
        assert isinstance(msg, At)
        store.offer(msg)


def reconcile(mine: Store, theirs: Store) -> tuple[int, int]:
    """Run one exchange the way a forwarder and a responder do; (bytes to them, bytes back)."""
    out = back = 0
    reconciler = sync.Reconciler(mine.levels)
    questions = reconciler.start()
    while questions:
        answers: list[bytes] = []
        for question in questions:
            out += len(question) + 1
            command = sync.parse_sync(question.split())
            assert command is not None
            if command.verb == b"ASK":
                answers.append(sync.answer_ask(theirs.levels, command.level, command.numbers))
            else:  # PULL: their lines of those leaves, then DONE
                lines = list(theirs.lines_in(command.numbers))
                answers.extend(lines)
                answers.append(sync.format_done(len(lines)))
        questions = []
        pushed = False
        for answer in answers:
            back += len(answer) + 1
            fields = answer.split()
            if fields[0] == b"AT":
                fill(mine, [answer])
                continue
            command = sync.parse_sync(fields)
            assert command is not None
            if command.verb == b"HAVE":
                pulls = reconciler.on_have(command.level, command.numbers)
                questions.extend(pulls)
                if pulls and not pushed:
                    ours = list(mine.lines_in(reconciler.differing_leaves))
                    out += sum(len(x) + 1 for x in ours)
                    fill(theirs, ours)
                    pushed = True
            else:
                reconciler.on_done()
    assert reconciler.finished
    return out, back


def test_equal_tables_take_one_round_trip() -> None:
    a, b = Store(), Store()
    lines = [line(b"c%d" % i, i + 1) for i in range(500)]
    fill(a, lines)
    fill(b, list(reversed(lines)))
    assert a.leaves == b.leaves
    out, back = reconcile(a, b)
    assert out == len(b"SYNC ASK 0\n") and back < 40


def test_differences_both_ways_and_newer_wins_converge() -> None:
    rng = random.Random(7)
    a, b = Store(), Store()
    common = [line(b"c%d" % i, 1000 + i) for i in range(3000)]
    fill(a, common)
    fill(b, common)
    fill(a, [line(b"only-a-%d" % i, 5) for i in range(20)])
    fill(b, [line(b"only-b-%d" % i, 5) for i in range(20)])
    for i in rng.sample(range(3000), 30):  # the same client, newer on one side or the other
        fill(a if i % 2 else b, [line(b"c%d" % i, 9000 + i, b"Ball")])
    out, back = reconcile(a, b)
    assert a.snapshot() == b.snapshot()
    assert len(a) == 3040
    assert a.record(b"c%d" % i) is not None
    full_push = sum(len(x) + 1 for x in a.lines())
    assert out + back < full_push / 2  # only the differing leaves crossed (this table is small)


def test_empty_against_full() -> None:
    a, b = Store(), Store()
    fill(b, [line(b"c%d" % i, i + 1) for i in range(200)])
    reconcile(a, b)
    assert a.snapshot() == b.snapshot()


@pytest.mark.parametrize(
    "text",
    [
        b"SYNC",
        b"SYNC ASK",
        b"SYNC ASK 5",
        b"SYNC ASK 1 1",  # level 1 has one parent only: the root, 0
        b"SYNC ASK 2 10",
        b"SYNC ASK 2 zz",
        b"SYNC ASK 1",
        b"SYNC ASK 2 " + b" ".join(b"%x" % i for i in range(17)),
        b"SYNC PULL",
        b"SYNC PULL 10000",
        b"SYNC PULL -1",
        b"SYNC HAVE x 1",
        b"SYNC DONE",
        b"SYNC DONE x",
        b"SYNC WHAT 1",
    ],
)
def test_malformed_sync_lines_are_refused(text: bytes) -> None:
    assert sync.parse_sync(text.split()) is None


def test_a_reconciler_refuses_answers_it_did_not_ask_for() -> None:
    reconciler = sync.Reconciler(Store().levels)
    reconciler.start()
    with pytest.raises(ValueError):
        reconciler.on_have(2, [0] * 16)
    with pytest.raises(ValueError):
        reconciler.on_done()


def test_the_store_keeps_every_level_equal_to_a_fold_of_its_leaves() -> None:
    store = Store()
    fill(store, [line(b"c%d" % i, i + 1) for i in range(2000)])
    fill(store, [line(b"c%d" % i, 5000 + i) for i in range(0, 2000, 3)])  # replacements too
    assert [list(level) for level in store.levels] == [list(level) for level in fold_levels(array("Q", store.leaves))]


def test_a_bulk_load_keeps_the_newest_and_the_same_digests_as_one_by_one() -> None:
    records = [line(b"c%d" % (i % 700), 1 + (i * 7919) % 5000) for i in range(3000)]
    one_by_one, bulk = Store(), Store()
    fill(one_by_one, records)
    parsed = [parse(r) for r in records]
    bulk.load((m.client, m.time_ns, m.line) for m in parsed[:2000] if isinstance(m, At))
    steps = bulk.digest_steps(chunk=100)
    next(steps)
    fill(bulk, records[2000:])  # changes while the digests are still being computed
    for _ in steps:
        pass
    assert bulk.digests_ready
    assert bulk.snapshot() == one_by_one.snapshot()
    assert [list(level) for level in bulk.levels] == [list(level) for level in one_by_one.levels]
    fill(bulk, [line(b"c1", 999_999)])  # and it keeps them current afterwards
    fill(one_by_one, [line(b"c1", 999_999)])
    assert [list(level) for level in bulk.levels] == [list(level) for level in one_by_one.levels]
