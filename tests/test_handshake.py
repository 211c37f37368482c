"""The herd port's handshake as bytes in and steps out (no sockets), both roles."""

from __future__ import annotations

import pytest

from herdserver.core import handshake
from herdserver.core.handshake import InitiatorHandshake, Phase, ResponderHandshake

SECRETS = (b"k",)


Secrets = tuple[bytes, ...]


def pair(
    i_secrets: Secrets = SECRETS, r_secrets: Secrets = SECRETS, neighbors: tuple[bytes, ...] = (b"A",)
) -> tuple[InitiatorHandshake, ResponderHandshake]:
    return (
        InitiatorHandshake(i_secrets, b"A", b"B", b"bootA", b"n1"),
        ResponderHandshake(r_secrets, b"B", neighbors, b"bootB", b"n2"),
    )


def run(initiator: InitiatorHandshake, responder: ResponderHandshake) -> tuple[list[bytes], str]:
    """Drive both ends to the end: the lines that crossed, and the first failure ('' if none)."""
    wire = [initiator.hello()]
    to_responder = True
    while True:
        step = (responder if to_responder else initiator).receive(wire[-1].rstrip(b"\n"))
        if step.failure:
            return wire, step.failure
        if step.send:
            wire.append(step.send)
            to_responder = not to_responder
        if initiator.phase is Phase.ESTABLISHED and responder.phase is Phase.ESTABLISHED:
            return wire, ""
        if not step.send:
            return wire, "stalled"


def test_both_ends_prove_the_secret_in_four_lines() -> None:
    initiator, responder = pair()
    wire, failure = run(initiator, responder)
    assert failure == ""
    assert [line.split()[0] for line in wire] == [b"HELLO", b"HELLO", b"AUTH", b"OK"]
    assert wire[0] == b"HELLO herdserver/2 A B bootA n1\n"
    assert b"k" not in b"".join(wire).split()  # the secret itself never crosses
    assert responder.peer == b"A" and responder.peer_boot == b"bootA" and initiator.peer_boot == b"bootB"


def test_rotation_each_proves_with_its_first_and_verifies_with_any() -> None:
    assert run(*pair(i_secrets=(b"new", b"old"), r_secrets=(b"old", b"new")))[1] == ""
    assert run(*pair(i_secrets=(b"new",), r_secrets=(b"old", b"new")))[1] == (
        "the neighbor did not prove the shared secret"  # it proves with old, which we no longer hold
    )
    assert run(*pair(i_secrets=(b"new", b"old"), r_secrets=(b"old",)))[1] == "bad proof"  # AUTH proves with new


@pytest.mark.parametrize(
    ("i_secrets", "r_secrets", "neighbors", "failure"),
    [
        ((b"k",), (b"other",), (b"A",), "the neighbor did not prove the shared secret"),
        ((b"k",), (b"k",), (b"C",), "not a neighbor"),
        ((), (b"k",), (b"A",), "the neighbor did not prove the shared secret"),  # opted out: not accepted
        ((b"k",), (), (b"A",), "the neighbor did not prove the shared secret"),
        ((), (), (b"A",), ""),  # both opted out: the names are still checked
    ],
)
def test_mismatches_fail_before_anything_but_the_handshake_moves(
    i_secrets: tuple[bytes, ...], r_secrets: tuple[bytes, ...], neighbors: tuple[bytes, ...], failure: str
) -> None:
    initiator, responder = pair(i_secrets, r_secrets, neighbors)
    wire, got = run(initiator, responder)
    assert got == failure
    assert all(line.split()[0] in (b"HELLO", b"AUTH", b"OK") for line in wire)


def test_the_responder_checks_the_hello_is_for_it() -> None:
    _, responder = pair()
    assert responder.receive(b"HELLO herdserver/2 A C bootA n1").failure == "the hello is for another server"
    _, responder = pair()
    assert responder.receive(b"HELLO herdserver/1 A B bootA n1").failure == "not a herdserver/2 hello"
    _, responder = pair()
    assert responder.receive(b"AT Alford +0.1 kiwi +1+1 1").failure == "not a herdserver/2 hello"
    _, responder = pair()
    assert responder.receive(b"HELLO herdserver/2 A B bootA n1").send.startswith(b"HELLO herdserver/2 B bootB n2 ")
    assert responder.receive(b"AT Alford +0.1 kiwi +1+1 1").failure == "expected AUTH"  # no record before the proof
    assert responder.phase is Phase.FAILED


def test_the_initiator_refuses_another_server_on_that_port_and_a_replayed_proof() -> None:
    initiator, responder = pair()
    reply = responder.receive(initiator.hello().rstrip(b"\n")).send.rstrip(b"\n")
    other = InitiatorHandshake(SECRETS, b"A", b"B", b"bootA", b"n3")  # another connection, another nonce
    other.hello()
    assert other.receive(reply).failure == "the neighbor did not prove the shared secret"
    initiator2, _ = pair()
    assert initiator2.receive(reply.replace(b" B ", b" X ", 1)).failure == "the server on that port is b'X'"
    initiator3, _ = pair()
    assert initiator3.receive(b"? HELLO herdserver/2 A B bootA n1").failure == "not a herdserver/2 hello"


def test_a_proof_binds_both_names_both_nonces_and_the_role() -> None:
    p = handshake.proof(b"k", b"initiator", b"A", b"B", b"n1", b"n2")
    assert handshake.verify((b"x", b"k"), p, b"initiator", b"A", b"B", b"n1", b"n2")
    for args in [(b"responder", b"A", b"B", b"n1", b"n2"), (b"initiator", b"B", b"A", b"n1", b"n2"),
                 (b"initiator", b"A", b"B", b"n2", b"n1"), (b"initiator", b"A", b"C", b"n1", b"n2")]:  # fmt: skip
        assert not handshake.verify((b"k",), p, *args)
    assert not handshake.verify((), p, b"initiator", b"A", b"B", b"n1", b"n2")
    assert handshake.verify((), handshake.NO_PROOF, b"initiator", b"A", b"B", b"n1", b"n2")
