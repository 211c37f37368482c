"""The legacy Nearby Search JSON on the wire: exact bytes, newline runs, cutting, errors."""

from __future__ import annotations

import json
from typing import Any

import pytest

from herdserver.core import places_json
from herdserver.core.places_json import cut_results, format_places_json, format_whatsat_reply, places_error

AT_LINE = b"AT Alford +0.263873386 kiwi.cs.ucla.edu +34.068930-118.445127 1479413884.392014450"


PAYLOAD = {"html_attributions": [], "results": [{"name": "A"}], "status": "OK"}
PAYLOAD_JSON = (
    b'{\n   "html_attributions": [],\n   "results": [\n      {\n         "name": "A"\n      }\n   ],\n'
    b'   "status": "OK"\n}'
)


def test_whatsat_reply_exact_bytes() -> None:
    assert format_places_json(PAYLOAD) == PAYLOAD_JSON
    assert format_whatsat_reply(AT_LINE, PAYLOAD) == AT_LINE + b"\n" + PAYLOAD_JSON + b"\n\n"


@pytest.mark.parametrize(
    "payload",
    [
        PAYLOAD,
        {"results": [], "status": "ZERO_RESULTS", "note": "a\n\n\nb\n\n"},
        {"results": [{"name": "Caf\u00e9 \u2028\U0001f95d", "vicinity": ""}], "status": "OK"},
        {"results": [{"name": "lone \ud800 surrogate"}], "status": "OK"},
        {"html_attributions": ["a", "b"], "results": [{"nested": {"deep": [1, 2.5, None, True]}}]},
        {},
    ],
)
def test_whatsat_reply_shape(payload: dict[str, Any]) -> None:
    reply = format_whatsat_reply(AT_LINE, payload)
    assert reply.startswith(AT_LINE + b"\n{")
    assert reply.endswith(b"}\n\n")
    assert reply.count(b"\n\n") == 1  # only the final empty line
    body = reply[len(AT_LINE) + 1 : -2]
    assert json.loads(body.decode("utf-8")) == payload


def test_places_json_collapses_newline_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    # No JSON encoder writes blank lines itself; make one, to exercise the rule.
    monkeypatch.setattr(places_json, "dumps_indented", lambda *a, **k: '{\n\n\n  "a": 1,\n\n  "b": 2\n}\n\n\n')
    assert format_places_json({}) == b'{\n  "a": 1,\n  "b": 2\n}'
    assert format_whatsat_reply(b"AT x", {}) == b'AT x\n{\n  "a": 1,\n  "b": 2\n}\n\n'


@pytest.mark.parametrize(
    "value",
    [
        {"html_attributions": [], "results": [{"name": "A", "geometry": {"location": {"lat": 34.1, "lng": -118.4}}}]},
        {"a": [], "b": {}, "c": [[], {}, [[1]]], "d": "", "e": 0, "f": -0.0, "g": 1e300, "h": 12345678901234567890},
        {"t": True, "f": False, "n": None, "list": [True, False, None, 1, 2.5, "x"]},
        {"caf\u00e9": "\u2028 \U0001f95d \x00 \x1f \\ \" \n", "lone": "\ud800"},
        {"nan": float("nan"), "inf": [float("inf"), float("-inf")]},  # NaN/Infinity: the stdlib's spelling
        {"tuple": (1, 2)}, {1: "int key"}, {True: "bool key"}, {None: "none key"}, {1.5: "float key"},
        [1, {"x": [2]}], "just a string", 7, 2.5, None, {}, [],
    ],
)
def test_dumps_indented_is_exactly_json_dumps_indent_3(value: Any) -> None:
    assert places_json.dumps_indented(value) == json.dumps(value, indent=3, ensure_ascii=False)


def test_cut_results() -> None:
    payload: dict[str, Any] = {"html_attributions": ["x"], "results": [{"n": i} for i in range(5)], "status": "OK"}
    cut = cut_results(payload, 3)
    assert cut == {"html_attributions": ["x"], "results": [{"n": 0}, {"n": 1}, {"n": 2}], "status": "OK"}
    assert len(payload["results"]) == 5  # the original is not touched
    assert cut_results(payload, 5) == payload
    assert cut_results(payload, 20)["results"] == payload["results"]
    assert cut_results(payload, 1)["results"] == [{"n": 0}]
    assert cut_results({"status": "ZERO_RESULTS"}, 3) == {"status": "ZERO_RESULTS"}
    assert cut_results({"results": "odd"}, 1) == {"results": "odd"}


def test_places_error_shape() -> None:
    err = places_error("REQUEST_DENIED", "no API key")
    assert err == {"html_attributions": [], "results": [], "status": "REQUEST_DENIED", "error_message": "no API key"}
    assert list(err) == ["html_attributions", "results", "status", "error_message"]
    reply = format_whatsat_reply(AT_LINE, err)
    assert reply == (
        AT_LINE + b'\n{\n   "html_attributions": [],\n   "results": [],\n   "status": "REQUEST_DENIED",\n'
        b'   "error_message": "no API key"\n}\n\n'
    )


