"""Pure tests of herdserver.protocol: bytes in, values out (no sockets, no clocks)."""

from __future__ import annotations

from decimal import Decimal

import pytest

from herdserver.core import protocol
from herdserver.core.protocol import (
    At,
    IAmAt,
    Invalid,
    LineSplitter,
    Location,
    Overlong,
    WhatsAt,
    format_delta,
    format_invalid,
    make_at,
    overlong_reply,
    parse,
)

KIWI = b"kiwi.cs.ucla.edu"
LOC = b"+34.068930-118.445127"
T = b"1479413884.392014450"
T_NS = 1_479_413_884_392_014_450


def iamat(client: bytes = KIWI, loc: bytes = LOC, t: bytes = T) -> bytes:
    return b"IAMAT %s %s %s" % (client, loc, t)


def invalid(line: bytes) -> None:
    """Assert ``line`` parses as Invalid carrying the stripped command."""
    msg = parse(line)
    assert isinstance(msg, Invalid), msg
    assert msg.line == line.strip()


# ---------------------------------------------------------------- IAMAT


def test_iamat_example_of_the_spec() -> None:
    assert parse(iamat()) == IAmAt(KIWI, Location(LOC, 34.06893, -118.445127), T, T_NS)


@pytest.mark.parametrize(
    "line",
    [
        b"IAMAT",
        b"IAMAT kiwi",
        b"IAMAT kiwi +34-118",
        b"IAMAT kiwi +34-118 1 extra",
        b"IAMAT kiwi +34-118 1 2 3",
    ],
)
def test_iamat_needs_exactly_four_fields(line: bytes) -> None:
    invalid(line)


@pytest.mark.parametrize(
    "line",
    [
        b"iamat kiwi +34-118 1",
        b"Iamat kiwi +34-118 1",
        b"IAmAt kiwi +34-118 1",
        b"whatsat kiwi 10 5",
        b"Whatsat kiwi 10 5",
        b"at Alford +0.1 kiwi +34-118 1",
        b"At Alford +0.1 kiwi +34-118 1",
        b"HELLO",
        b"IAMATX kiwi +34-118 1",
        b"XIAMAT kiwi +34-118 1",
        b"IAM AT kiwi +34-118 1",
        b"? kiwi",
        b"\xef\xbc\xa9AMAT kiwi +34-118 1",  # fullwidth I
    ],
)
def test_lower_case_and_unknown_commands_are_invalid(line: bytes) -> None:
    invalid(line)


@pytest.mark.parametrize(
    ("loc", "lat", "lon"),
    [
        (b"+34.068930-118.445127", 34.06893, -118.445127),
        (b"+90+180", 90.0, 180.0),
        (b"-90-180", -90.0, -180.0),
        (b"+90.0-180.0", 90.0, -180.0),
        (b"-90.000000000000+180.000000000000", -90.0, 180.0),
        (b"+89.9999999+179.9999999", 89.9999999, 179.9999999),
        (b"+0+0", 0.0, 0.0),
        (b"-0-0", 0.0, 0.0),
        (b"+0.5-0.25", 0.5, -0.25),
        (b"+9+9", 9.0, 9.0),
        (b"+09-009", 9.0, -9.0),
        (b"+09.50-009.5", 9.5, -9.5),
        (b"-33.8688197+151.2092955", -33.8688197, 151.2092955),
    ],
)
def test_valid_locations(loc: bytes, lat: float, lon: float) -> None:
    msg = parse(iamat(loc=loc))
    assert isinstance(msg, IAmAt)
    assert msg.location == Location(loc, lat, lon)


@pytest.mark.parametrize(
    "loc",
    [
        b"+90.0000001+0",  # just past the pole
        b"-90.0000001+0",
        b"+0+180.0000001",
        b"+0-180.0000001",
        b"+90.0000000000000000001+0",
        b"+91+0",
        b"+0+181",
        b"+99.5+0",
        b"+0+999",
        b"34.068930-118.445127",  # latitude sign missing
        b"+34.068930118.445127",  # longitude sign missing
        b"34.068930118.445127",
        b"++34-118",
        b"+34--118",
        b"+34-118-1",
        b"+34-118+",
        b"+34",
        b"+34-",
        b"-118",
        b"+34.-118",  # a dot needs digits after it
        b"+34-118.",
        b"+.5+1",
        b"+1.+1",
        b"+034-118",  # three latitude digits
        b"+34-0118",  # four longitude digits
        b"+1e5+0",
        b"+1E1+0",
        b"+0+1e2",
        b"+nan+0",
        b"+0+nan",
        b"+inf+0",
        b"-inf-inf",
        b"+1_0+0",
        b"+0+1_0",
        b"+34,5-118",
        b"+0x1+0",
        b"+\xd9\xa3\xd9\xa4-118",  # Arabic-Indic 34
        b"+34-\xd9\xa1\xd9\xa1\xd9\xa8",  # Arabic-Indic 118
        b"+\xef\xbc\x93\xef\xbc\x94-118",  # fullwidth 34
        b"+34-\xef\xbc\x91\xef\xbc\x91\xef\xbc\x98",  # fullwidth 118
        b"\xe2\x88\x9234-118",  # U+2212 minus sign
        b"+34.0\x00-118",
    ],
)
def test_invalid_locations(loc: bytes) -> None:
    invalid(iamat(loc=loc))


def test_float_would_have_accepted_what_the_parser_refuses() -> None:
    # The reason for strict regexes: float() takes all of these.
    for text in ("nan", "inf", "1_0", "1e5", "\u0663\u0664", "\uff13\uff14", " 5 "):
        float(text)
    for token in (b"nan", b"inf", b"1_0", b"1e5", "\u0663\u0664".encode(), "\uff13\uff14".encode()):
        assert protocol.parse_time(token) is None
        assert protocol.parse_radius(token) is None


@pytest.mark.parametrize(
    ("t", "ns"),
    [
        (b"1479413884", 1_479_413_884_000_000_000),
        (b"1479413884.392014450", T_NS),
        (b"1479413884.5", 1_479_413_884_500_000_000),
        (b"1479413884.000000001", 1_479_413_884_000_000_001),
        (b"0", 0),
        (b"0.0", 0),
        (b"0001", 1_000_000_000),
        (b"1.1234567891", 1_123_456_789),  # tenth digit truncated, not rounded
        (b"1.9999999999999999", 1_999_999_999),
        (b"1479413884.392014450999", T_NS),
        (b"9" * 11, int(b"9" * 11) * 1_000_000_000),  # the longest a real clock writes (year 5138)
    ],
)
def test_valid_times(t: bytes, ns: int) -> None:
    msg = parse(iamat(t=t))
    assert isinstance(msg, IAmAt)
    assert (msg.time_raw, msg.time_ns) == (t, ns)


@pytest.mark.parametrize(
    "t",
    [
        b"+1479413884",
        b"-1479413884",
        b"+0",
        b"1e9",
        b"1E9",
        b"1.5e3",
        b"nan",
        b"NaN",
        b"inf",
        b"-inf",
        b"1_479_413_884",
        b".5",
        b"1.",
        b"1.2.3",
        b"0x10",
        b"1,5",
        b"\xd9\xa1",  # Arabic-Indic one
        b"1479413884.\xd9\xa1",
        b"\xef\xbc\x91",  # fullwidth one
        b"9" * 12,  # past any real clock
        b"1." + b"0" * 19,  # more fraction digits than any clock writes
    ],
)
def test_invalid_times(t: bytes) -> None:
    invalid(iamat(t=t))


# ---------------------------------------------------------------- WHATSAT


@pytest.mark.parametrize(
    ("radius", "km", "metres"),
    [
        (b"50", Decimal("50"), 50000.0),
        (b"50.0", Decimal("50"), 50000.0),
        (b"50.000000", Decimal("50"), 50000.0),
        (b"10", Decimal("10"), 10000.0),
        (b"05", Decimal("5"), 5000.0),
        (b".5", Decimal("0.5"), 500.0),
        (b"5.", Decimal("5"), 5000.0),
        (b"0.001", Decimal("0.001"), 1.0),
        (b"49.9999", Decimal("49.9999"), 49999.9),
    ],
)
def test_valid_radius(radius: bytes, km: Decimal, metres: float) -> None:
    msg = parse(b"WHATSAT kiwi %s 5" % radius)
    assert isinstance(msg, WhatsAt)
    assert (msg.client, msg.radius_km, msg.bound) == (b"kiwi", km, 5)
    assert msg.radius_m == metres


@pytest.mark.parametrize(
    "radius",
    [
        b"0",
        b"0.0",
        b".0",
        b"0.",
        b"000",
        b"50.0001",
        b"50.000000001",
        b"51",
        b"100",
        b"-5",
        b"-0.5",
        b"+5",
        b".",
        b"5..",
        b"5.5.5",
        b"1e1",
        b"nan",
        b"inf",
        b"1_0",
        b"\xd9\xa5",  # Arabic-Indic five
        b"\xef\xbc\x95",  # fullwidth five
        b"5km",
    ],
)
def test_invalid_radius(radius: bytes) -> None:
    invalid(b"WHATSAT kiwi %s 5" % radius)


@pytest.mark.parametrize(("bound", "n"), [(b"1", 1), (b"20", 20), (b"05", 5), (b"10", 10), (b"0020", 20)])
def test_valid_bound(bound: bytes, n: int) -> None:
    assert parse(b"WHATSAT kiwi 10 %s" % bound) == WhatsAt(b"kiwi", Decimal(10), n)


@pytest.mark.parametrize(
    "bound",
    [b"0", b"00", b"21", b"100", b"-1", b"+1", b"1.0", b"1.", b"1e1", b"1_0", b"\xd9\xa5", b"\xef\xbc\x95", b"five"],
)
def test_invalid_bound(bound: bytes) -> None:
    invalid(b"WHATSAT kiwi 10 %s" % bound)


@pytest.mark.parametrize(
    "line",
    [b"WHATSAT", b"WHATSAT kiwi", b"WHATSAT kiwi 10", b"WHATSAT kiwi 10 5 5", b"WHATSAT kiwi 10 5 extra words"],
)
def test_whatsat_needs_exactly_four_fields(line: bytes) -> None:
    invalid(line)


@pytest.mark.parametrize("limit", [b"90", b"180"])
def test_range_check_on_digits_agrees_with_integers(limit: bytes) -> None:
    # Every integer part of 1-3 digits (zero-padded too) against exact arithmetic.
    for digits in range(1, 4):
        for value in range(10**digits):
            int_part = str(value).zfill(digits).encode()
            for frac in (None, b"0", b"000", b"1", b"0001"):
                zero = not frac or not frac.strip(b"0")
                expected = value < int(limit) or (value == int(limit) and zero)
                assert protocol._within(int_part, frac, limit) is expected, (int_part, frac)


# ---------------------------------------------------------------- AT

AT_LINE = b"AT Alford +0.263873386 " + KIWI + b" " + LOC + b" " + T


def test_at_example_of_the_spec() -> None:
    assert parse(AT_LINE) == At(
        b"Alford", b"+0.263873386", KIWI, Location(LOC, 34.06893, -118.445127), T, T_NS, AT_LINE
    )


def test_at_line_is_canonical_single_spaces() -> None:
    messy = b"  AT\tAlford  +0.263873386\t\t" + KIWI + b"\x0b" + LOC + b"\x0c" + T + b" \r"
    msg = parse(messy)
    assert isinstance(msg, At)
    assert msg.line == AT_LINE


@pytest.mark.parametrize("delta", [b"+0.263873386", b"-0.000000001", b"-12.5", b"+0", b"0.5", b"+1" + b"0" * 10])
def test_at_accepts_signed_deltas(delta: bytes) -> None:
    msg = parse(b"AT Alford %s kiwi +1+1 1" % delta)
    assert isinstance(msg, At)
    assert msg.delta == delta


@pytest.mark.parametrize(
    "delta", [b"+", b"-", b"++1", b"+-1", b"1e3", b"+nan", b"+inf", b"+0.5.5", b"+.5", b"+1.", b"+1_0", b"+\xd9\xa1"]
)
def test_at_rejects_bad_deltas(delta: bytes) -> None:
    invalid(b"AT Alford %s kiwi +1+1 1" % delta)


@pytest.mark.parametrize(
    "line",
    [
        b"AT Alford +0.1 kiwi +34-118",
        b"AT Alford +0.1 kiwi +34-118 1 extra",
        b"AT +0.1 kiwi +34-118 1",
        b"AT",
        b"AT Alford +0.1 kiwi +91-118 1",  # location checked as for IAMAT
        b"AT Alford +0.1 kiwi +34-118 -1",  # time checked as for IAMAT
        b"AT Alford +0.1 kiwi +34-118 nan",
    ],
)
def test_at_invalid(line: bytes) -> None:
    invalid(line)


def test_at_identity_is_the_client_and_the_canonical_line_of_a_six_field_at() -> None:
    messy = b"  AT\tAlford  +0.263873386\t\t" + KIWI + b"\x0b" + LOC + b"\x0c" + T + b" \r"
    assert protocol.at_identity(messy.split()) == (KIWI, AT_LINE)
    # Not validated (that is parse's job), only shaped: the store decides what it is worth.
    assert protocol.at_identity(b"AT a b c d e".split()) == (b"c", b"AT a b c d e")


@pytest.mark.parametrize("line", [b"AT a b c d", b"AT a b c d e f", b"IAMAT a b c d e", b"at a b c d e"])
def test_at_identity_is_none_for_anything_else(line: bytes) -> None:
    assert protocol.at_identity(line.split()) is None


# ---------------------------------------------------------------- white space


@pytest.mark.parametrize(
    "line",
    [
        b"IAMAT kiwi +34-118 1",
        b"IAMAT\tkiwi\t+34-118\t1",
        b"IAMAT kiwi +34-118 1\r",
        b"  IAMAT   kiwi \t\t +34-118  1  ",
        b"\t\x0b\x0c\rIAMAT\x0bkiwi\x0c+34-118\r1\t\x0b\x0c\r ",
        b"IAMAT kiwi +34-118 1\n",
    ],
)
def test_white_space_runs_separate_fields(line: bytes) -> None:
    assert parse(line) == IAmAt(b"kiwi", Location(b"+34-118", 34.0, -118.0), b"1", 1_000_000_000)


@pytest.mark.parametrize("line", [b"", b" ", b"\r", b"\t", b"\x0b", b"\x0c", b"\n", b" \t\r\x0b\x0c \n  "])
def test_blank_lines_get_no_reply(line: bytes) -> None:
    assert parse(line) is None


@pytest.mark.parametrize(
    "odd",
    [
        "\u2028",  # LINE SEPARATOR
        "\u2029",  # PARAGRAPH SEPARATOR
        "\x1c",  # FILE SEPARATOR
        "\x1d",
        "\x1e",
        "\x1f",
        "\x85",  # NEL
        "\xa0",  # NO-BREAK SPACE
        "\u3000",  # IDEOGRAPHIC SPACE
        "\u2003",  # EM SPACE
        "\x00",
        "\x1b",
    ],
)
def test_unicode_white_space_is_part_of_the_client_id(odd: str) -> None:
    client = ("kiwi" + odd + "x").encode("utf-8")
    msg = parse(iamat(client=client))
    assert isinstance(msg, IAmAt)
    assert msg.client == client


def test_str_split_differs_from_the_protocol() -> None:
    # The test above proves something: str.split() splits on U+2028 and \x1c, bytes.split() does not.
    assert "a\u2028b\x1cc".split() == ["a", "b", "c"]
    msg = parse(iamat(client="a\u2028b\x1cc".encode()))
    assert isinstance(msg, IAmAt)
    assert msg.client == "a\u2028b\x1cc".encode()


@pytest.mark.parametrize(
    "line",
    [
        iamat(client=b"kiwi\xff"),
        iamat(client=b"caf\xe9"),  # Latin-1, not UTF-8
        iamat(client=b"\xc0\xaf"),  # over-long encoding of '/'
        iamat(client=b"\xed\xa0\x80"),  # a UTF-16 surrogate
        iamat(client=b"\xe2\x80"),  # truncated sequence
        iamat(client=b"\xf4\x90\x80\x80"),  # past U+10FFFF
        b"\xff",
        b"  \xfe\xff  ",
        b"WHATSAT kiwi\x80 10 5",
        AT_LINE + b"\xff",
    ],
)
def test_non_utf8_is_invalid(line: bytes) -> None:
    msg = parse(line)
    assert isinstance(msg, Invalid)
    assert msg.line == line.strip()
    assert msg.reason == "not UTF-8"


def test_valid_utf8_client_id_is_kept() -> None:
    client = "café-\U0001f95d".encode()
    msg = parse(iamat(client=client))
    assert isinstance(msg, IAmAt)
    assert msg.client == client


# ---------------------------------------------------------------- "? " replies


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"HELLO", b"? HELLO\n"),
        (b"  \t HELLO  there\t\tyou \r", b"? HELLO  there\t\tyou\n"),
        (b"\x0b\x0cIAMAT kiwi +91-118 1\x0c\x0b", b"? IAMAT kiwi +91-118 1\n"),
        (b"iamat  kiwi\t+34-118\x0b1\r", b"? iamat  kiwi\t+34-118\x0b1\n"),
        (b" IAMAT kiwi\xff +34-118 1 ", b"? IAMAT kiwi\xff +34-118 1\n"),
        ("WHATSAT kiwi\u2028 51 5".encode(), "? WHATSAT kiwi\u2028 51 5\n".encode()),
        (b"\xe2\x80\xa8 lone", "? \u2028 lone\n".encode()),  # U+2028 is not white space: kept
    ],
)
def test_invalid_reply_strips_only_the_ends(line: bytes, reply: bytes) -> None:
    msg = parse(line)
    assert isinstance(msg, Invalid)
    assert format_invalid(msg.line) == reply


# ---------------------------------------------------------------- AT replies


@pytest.mark.parametrize(
    ("delta_ns", "text"),
    [
        (0, b"+0.000000000"),
        (1, b"+0.000000001"),
        (-1, b"-0.000000001"),
        (999_999_999, b"+0.999999999"),
        (1_000_000_000, b"+1.000000000"),
        (-1_000_000_000, b"-1.000000000"),
        (-1_000_000_005, b"-1.000000005"),
        (263_873_386, b"+0.263873386"),
        (-263_873_386, b"-0.263873386"),
        (123_456_789_012_345_678_901, b"+123456789012.345678901"),
    ],
)
def test_format_delta(delta_ns: int, text: bytes) -> None:
    assert format_delta(delta_ns) == text


def test_make_at_spec_example() -> None:
    msg = parse(iamat())
    assert isinstance(msg, IAmAt)
    at = make_at(b"Alford", msg, T_NS + 263_873_386)
    assert at.line == AT_LINE
    assert at == At(b"Alford", b"+0.263873386", KIWI, msg.location, T, T_NS, AT_LINE)
    assert parse(at.line) == at  # what a neighbor makes of it


@pytest.mark.parametrize(
    ("now_ns", "delta"),
    [
        (T_NS, b"+0.000000000"),
        (T_NS - 1, b"-0.000000001"),
        (T_NS - 1_500_000_000, b"-1.500000000"),
        (T_NS + 86_400_000_000_001, b"+86400.000000001"),
        (0, b"-1479413884.392014450"),
    ],
)
def test_make_at_signs(now_ns: int, delta: bytes) -> None:
    msg = parse(iamat())
    assert isinstance(msg, IAmAt)
    assert make_at(b"Alford", msg, now_ns).line == b"AT Alford " + delta + b" " + KIWI + b" " + LOC + b" " + T


def test_make_at_is_exact_where_float_is_not() -> None:
    now_ns = 1_479_413_884_655_887_837
    msg = parse(iamat())
    assert isinstance(msg, IAmAt)
    exact = make_at(b"Alford", msg, now_ns).delta
    assert exact == b"+0.263873387"
    # The same computation through floats: 19 significant digits do not fit in a double.
    via_float = b"%+.9f" % (now_ns / 1e9 - float(T))
    assert via_float != exact


def test_make_at_copies_fields_byte_for_byte() -> None:
    client = "\u2028k\x1ciwi\x00".encode()
    line = b"\tIAMAT  " + client + b" \x0b+09.50-009.500\x0c 01479413884.10000000000009\r"
    msg = parse(line)
    assert isinstance(msg, IAmAt)
    at = make_at(b"Ball", msg, 1_479_413_884_100_000_000)
    assert at.line == b"AT Ball +0.000000000 " + client + b" +09.50-009.500 01479413884.10000000000009"
    assert parse(at.line) == at


# ---------------------------------------------------------------- total order


def at(server: bytes, t: bytes, client: bytes = b"kiwi") -> At:
    msg = parse(b"AT %s +0.0 %s +1+1 %s" % (server, client, t))
    assert isinstance(msg, At)
    return msg


def test_order_key_is_time_then_line() -> None:
    a = at(b"Zulu", b"1")  # earliest time, largest line
    b = at(b"Alford", b"1.5")
    c = at(b"Ball", b"1.500")  # same instant as b, line "AT Ball" > "AT Alford"
    d = at(b"Alford", b"2")
    assert b.order_key[0] == c.order_key[0] == 1_500_000_000
    assert sorted([d, c, a, b], key=lambda r: r.order_key) == [a, b, c, d]
    assert a.order_key < b.order_key < c.order_key < d.order_key
    assert at(b"Alford", b"2").order_key == d.order_key


def test_order_key_ignores_truncated_digits_only_for_time() -> None:
    x = at(b"A", b"1.0000000001")
    y = at(b"A", b"1.0000000002")
    assert x.time_ns == y.time_ns == 1_000_000_000
    assert x.order_key < y.order_key  # decided by the line bytes


# ---------------------------------------------------------------- framing


def run(splitter: LineSplitter, chunks: list[bytes]) -> list[bytes | Overlong]:
    out: list[bytes | Overlong] = []
    for chunk in chunks:
        out += splitter.feed(chunk)
        assert len(splitter.buffer) <= splitter.limit  # never more than the limit held
    return out + splitter.finish()


def test_line_split_byte_by_byte() -> None:
    stream = b"IAMAT kiwi +34-118 1\nWHATSAT kiwi 10 5\n"
    s = LineSplitter()
    out: list[bytes | Overlong] = []
    for i in range(len(stream)):
        got = s.feed(stream[i : i + 1])
        out += got
        if stream[i : i + 1] != b"\n":
            assert got == []
    assert out == [b"IAMAT kiwi +34-118 1", b"WHATSAT kiwi 10 5"]
    assert s.finish() == []


def test_several_lines_in_one_feed() -> None:
    s = LineSplitter()
    assert s.feed(b"a\nbb\n\nccc\r\nd") == [b"a", b"bb", b"", b"ccc\r"]
    assert s.feed(b"d\n") == [b"dd"]
    assert s.finish() == []


def test_crlf_keeps_the_cr_for_the_parser() -> None:
    s = LineSplitter()
    [line] = s.feed(b"IAMAT kiwi +34-118 1\r\n")
    assert line == b"IAMAT kiwi +34-118 1\r"
    assert isinstance(parse(line), IAmAt)


def test_last_line_without_newline() -> None:
    s = LineSplitter()
    assert s.feed(b"one\ntw") == [b"one"]
    assert s.feed(b"o") == []
    assert s.finish() == [b"two"]
    assert s.finish() == []


def test_empty_feed_and_finish() -> None:
    s = LineSplitter()
    assert s.feed(b"") == []
    assert s.finish() == []


@pytest.mark.parametrize("chunks", [[b"x" * 16 + b"\n"], [b"x" * 8, b"x" * 8, b"\n"], [b"x" * 16, b"\n"]])
def test_line_of_exactly_limit_bytes_is_accepted(chunks: list[bytes]) -> None:
    assert run(LineSplitter(16), chunks) == [b"x" * 16]


def test_last_line_of_exactly_limit_bytes_at_eof() -> None:
    assert run(LineSplitter(16), [b"x" * 10, b"x" * 6]) == [b"x" * 16]


@pytest.mark.parametrize(
    "chunks",
    [[b"x" * 17 + b"\n"], [b"x" * 16, b"x\n"], [b"x" * 17, b"\n"], [b"x" * 8, b"x" * 9 + b"\n"], [b"x" * 17]],
)
def test_limit_plus_one_is_overlong(chunks: list[bytes]) -> None:
    assert run(LineSplitter(16), chunks) == [Overlong(b"x" * 16)]


def test_overlong_answered_once_rest_discarded() -> None:
    stream = b"y" * 1000 + b"\nok\n"
    s = LineSplitter(16)
    out: list[bytes | Overlong] = []
    for i in range(len(stream)):
        out += s.feed(stream[i : i + 1])
    assert out == [Overlong(b"y" * 16), b"ok"]


def test_overlong_prefix_stops_at_the_newline() -> None:
    # The "? " reply of an over-long line must not carry the next command's bytes.
    s = LineSplitter(64)  # the smallest limit herd.ini allows
    assert s.feed(b"z" * 65 + b"\nIAMAT kiwi +34-118 1\n") == [Overlong(b"z" * 64), b"IAMAT kiwi +34-118 1"]
    assert overlong_reply(Overlong(b"z" * 64)) == b"? " + b"z" * 64 + b"\n"


def test_overlong_with_default_limit() -> None:
    line = b"w" * 100_000
    whole = run(LineSplitter(), [line + b"\nok\n"])
    chunked = run(LineSplitter(), [line[i : i + 1000] for i in range(0, len(line), 1000)] + [b"\nok\n"])
    assert whole == chunked == [Overlong(b"w" * protocol.OVERLONG_ECHO_BYTES), b"ok"]
    assert LineSplitter().limit == 8192


def test_overlong_reply() -> None:
    assert overlong_reply(Overlong(b" \tIAMAT  kiwi \r")) == b"? IAMAT  kiwi\n"
    assert overlong_reply(Overlong(b"ab\xffcd")) == b"? ab\xffcd\n"


SAMPLE = b"".join(
    [
        b"short\n",
        b"A" * 16 + b"\n",  # exactly the limit
        b"  " + b"B" * 30 + b" tail\r\n",  # over-long, leading blanks
        b"\n",  # empty line
        b"C" * 17 + b"\n",  # limit + 1
        b"ok\r\n",
        b"D" * 15 + b"\r\n",  # 16 with the \r: still fits
        b"E" * 40 + b"\n",
        b"last",  # no \n: finish()
    ]
)
SAMPLE_LINES: list[bytes | Overlong] = [
    b"short",
    b"A" * 16,
    Overlong(b"  " + b"B" * 14),
    b"",
    Overlong(b"C" * 16),
    b"ok\r",
    b"D" * 15 + b"\r",
    Overlong(b"E" * 16),
    b"last",
]


def test_sample_stream_unsplit() -> None:
    assert run(LineSplitter(16), [SAMPLE]) == SAMPLE_LINES


def test_sample_stream_byte_by_byte() -> None:
    assert run(LineSplitter(16), [SAMPLE[i : i + 1] for i in range(len(SAMPLE))]) == SAMPLE_LINES


def test_sample_stream_every_split_point() -> None:
    n = len(SAMPLE)
    for i in range(n + 1):
        for j in range(i, n + 1):
            chunks = [SAMPLE[:i], SAMPLE[i:j], SAMPLE[j:]]
            assert run(LineSplitter(16), chunks) == SAMPLE_LINES, (i, j)


def test_overlong_last_line_at_eof_every_split_point() -> None:
    stream = b"ok\n" + b"F" * 40
    for i in range(len(stream) + 1):
        assert run(LineSplitter(16), [stream[:i], stream[i:]]) == [b"ok", Overlong(b"F" * 16)], i
