"""Logs: logfmt values escaped so a client can never write a log line of its own."""

from __future__ import annotations

import logging
import re
import unicodedata
from pathlib import Path

import pytest

from herdserver import logs
from herdserver.logs import escape, fields

STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z"


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("kiwi.cs.ucla.edu", "kiwi.cs.ucla.edu"),
        ("+34.068930-118.445127", "+34.068930-118.445127"),
        ("127.0.0.1:40512", "127.0.0.1:40512"),
        ("a_b@c/d,e", "a_b@c/d,e"),
        (3, "3"),
        (None, "None"),
        ("", '""'),
        (b"", '""'),
        ("a b", '"a b"'),
        ("a=b", '"a=b"'),
        ('say "hi"', r'"say \"hi\""'),
        ("back\\slash", r'"back\\slash"'),
        ("a\nb", r'"a\nb"'),
        ("\r\t", r'"\r\t"'),
        ("\x00\x1b[31m", r'"\x00\x1b[31m"'),
        ("\x0b\x0c\x1c\x1f", r'"\x0b\x0c\x1c\x1f"'),
        ("\x7f", r'"\x7f"'),
        ("\x85", r'"\u0085"'),
        ("\x9f", r'"\u009f"'),
        ("a\u2028b", r'"a\u2028b"'),
        ("\u2029", r'"\u2029"'),
        ("caf\u00e9", '"caf\u00e9"'),  # printable non-ASCII is kept, quoted
        (b"IAMAT kiwi +34-118 1", '"IAMAT kiwi +34-118 1"'),
        (b"\xff\xfe", r'"\xff\xfe"'),  # bytes that are not UTF-8: the bytes, as escapes
        (b"ok\xc3\xa9\xc3", '"ok\u00e9\\xc3"'),
        (bytearray(b"a\nb"), r'"a\nb"'),
        (memoryview(b"plain"), "plain"),
    ],
)
def test_escape(value: object, text: str) -> None:
    assert escape(value) == text


def test_different_inputs_never_log_the_same() -> None:
    # A byte that is not UTF-8, the C1 character of that number, and the text of an escape.
    values = [b"A\x85", "A\x85", b"A\\x85", b"A\xc2\x85", "A\\u0085", "A\ud800", b"A\\\x85"]
    logged = [escape(v) for v in values]
    assert logged[1] == logged[3]  # the same character, from str or from UTF-8 bytes
    assert len(set(logged)) == len(values) - 1, logged


def test_escaped_values_never_contain_line_breaks() -> None:
    every = "".join(chr(i) for i in range(0x100)) + "\u2028\u2029"
    out = escape(every)
    assert len(out.splitlines()) == 1
    assert [c for c in out if unicodedata.category(c) in ("Cc", "Zl", "Zp")] == []
    out_bytes = escape(bytes(range(256)))
    assert len(out_bytes.splitlines()) == 1
    assert [c for c in out_bytes if unicodedata.category(c) in ("Cc", "Zl", "Zp")] == []


def test_fields() -> None:
    assert fields(conn=3, peer="127.0.0.1:40512", line=b"IAMAT kiwi +34-118 1") == (
        'conn=3 peer=127.0.0.1:40512 line="IAMAT kiwi +34-118 1"'
    )
    assert fields() == ""
    assert fields(client=b'k"i\nwi') == r'client="k\"i\nwi"'


FORGED = b'x\n2026-11-24T17:54:23.123456Z INFO Alford event=in conn=9 line="IAMAT evil +0+0 1"'


def test_forged_log_line_stays_on_one_line() -> None:
    value = escape(FORGED)
    assert "\n" not in value
    assert value == r'"x\n2026-11-24T17:54:23.123456Z INFO Alford event=in conn=9 line=\"IAMAT evil +0+0 1\""'


def read_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def test_setup_writes_logfmt_after_flush(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "Alford.log"  # the directory is created
    log = handler = logs.setup("Alford", str(path))
    try:
        log.info("in", conn=3, peer="127.0.0.1:40512", line=b"IAMAT kiwi +34-118 1")
        log.info("open")
        log.debug("hidden", conn=1)  # below INFO: never written
        assert path.read_text() == ""  # buffered until flushed
        handler.flush()
        lines = read_lines(path)
        assert len(lines) == 2
        assert re.fullmatch(
            STAMP + r' INFO Alford event=in conn=3 peer=127\.0\.0\.1:40512 line="IAMAT kiwi \+34-118 1"', lines[0]
        ), lines[0]
        assert re.fullmatch(STAMP + " INFO Alford event=open", lines[1]), lines[1]
        log.warning("neighbor_down", peer="Ball")  # warnings are written at once
        assert re.fullmatch(STAMP + " WARNING Alford event=neighbor_down peer=Ball", read_lines(path)[2])
        assert log.enabled() and not log.enabled(logging.DEBUG)
    finally:
        handler.close()


def test_debug_level(tmp_path: Path) -> None:
    path = tmp_path / "Ball.log"
    log = handler = logs.setup("Ball", str(path), "DEBUG")
    log.debug("at_dropped", client=b"kiwi")
    handler.close()  # close flushes
    [line] = read_lines(path)
    assert re.fullmatch(STAMP + " DEBUG Ball event=at_dropped client=kiwi", line), line


def test_forged_client_id_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / "Alford.log"
    log = handler = logs.setup("Alford", str(path))
    log.info("in", conn=1, line=b"IAMAT " + FORGED + b" +0+0 1")
    log.info("in", conn=1, line=b"bad \xff\xfe bytes \x1b[2J\xe2\x80\xa8")
    handler.close()
    lines = read_lines(path)
    assert len(lines) == 2
    assert [line for line in lines if line.startswith("2026-11-24T17:54:23.123456Z")] == []
    assert r'line="IAMAT x\n2026-11-24T17:54:23.123456Z INFO Alford event=in conn=9 line=\"IAMAT evil' in lines[0]
    assert sum(bool(re.match(STAMP + " INFO Alford event=in ", line)) for line in lines) == 2
    assert lines[1].endswith(r'event=in conn=1 line="bad \xff\xfe bytes \x1b[2J\u2028"')


def test_traffic_one_event_per_line_one_time_stamp(tmp_path: Path) -> None:
    path = tmp_path / "Alford.log"
    log = logs.setup("Alford", str(path))
    log.traffic("out", "neighbor", "Hamilton", "line", [b"AT Alford +0.1 a +1+1 1", b"AT Ball -0.2 b +2+2 2"])
    log.traffic("in", "conn", 3, "line", [])
    log.close()
    lines = read_lines(path)
    assert len(lines) == 2
    pattern = STAMP + ' INFO Alford event=out neighbor=Hamilton line="AT Alford \\+0.1 a \\+1\\+1 1"'
    assert re.fullmatch(pattern, lines[0])
    assert lines[1].endswith('event=out neighbor=Hamilton line="AT Ball -0.2 b +2+2 2"')
    assert lines[0][:27] == lines[1][:27]  # one write, one timestamp


def test_traceback_folded_into_one_line(tmp_path: Path) -> None:
    path = tmp_path / "Alford.log"
    log = handler = logs.setup("Alford", str(path))
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        log.exception("connection_crashed", conn=7)
    lines = read_lines(path)  # errors are written at once, no flush needed
    handler.close()
    assert len(lines) == 1
    line = lines[0]
    assert re.match(STAMP + ' ERROR Alford event=connection_crashed conn=7 traceback="Traceback ', line), line
    assert r"Traceback (most recent call last):\n  File \"" in line
    assert line.endswith(r'ValueError: boom\nsecond line"')


def test_instances_do_not_share_handlers(tmp_path: Path) -> None:
    a_log = a_handler = logs.setup("Same", str(tmp_path / "a.log"))
    b_log = b_handler = logs.setup("Same", str(tmp_path / "b.log"))
    a_log.info("only_a")
    b_log.info("only_b")
    a_handler.close()
    b_handler.close()
    assert [line.split()[-1] for line in read_lines(tmp_path / "a.log")] == ["event=only_a"]
    assert [line.split()[-1] for line in read_lines(tmp_path / "b.log")] == ["event=only_b"]


def test_a_busy_server_still_writes_a_line_within_the_age_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server flushes when its loop falls idle; one too busy to fall idle has its
    lines written by the first line logged more than MAX_AGE_NS after the oldest waiting."""
    path = tmp_path / "Alford.log"
    log = logs.setup("Alford", str(path))
    now = [1_764_000_000_000_000_000]
    monkeypatch.setattr(logs.time, "time_ns", lambda: now[0])
    try:
        log.info("first")
        now[0] += logs.MAX_AGE_NS
        log.info("second")  # exactly the bound: still waiting
        assert path.read_text() == ""
        now[0] += 1
        log.traffic("in", "conn", 1, "line", [b"IAMAT kiwi +34-118 1"])  # past it: everything is written
        assert [line.split(" event=")[1].split(" ")[0] for line in read_lines(path)] == ["first", "second", "in"]
    finally:
        log.close()
