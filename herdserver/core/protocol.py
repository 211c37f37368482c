"""The herd protocol as pure functions over bytes: no sockets, no clocks.

``parse(line)`` turns one line (without its ``\\n``) into a message object;
the ``format_*`` functions build the bytes that go back on the wire. Time is
always passed in as integer nanoseconds so callers (and tests) pin it.

Numbers are never read with ``float()``: it accepts ``nan``, ``inf``, ``1_0``
and non-ASCII digits. Every token is checked by a strict ASCII regex first and
then converted with integer arithmetic.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal

NS_PER_S = 1_000_000_000

# The longest time a real clock writes: 11 integer digits of POSIX seconds reach
# the year 5138, and no clock resolves past the nanosecond (18 fraction digits
# leave room for clients that print more than they measure). Longer fields are
# invalid: they pin a record in the far future or only cost parsing work.
MAX_TIME_INT_DIGITS = 11
MAX_TIME_FRAC_DIGITS = 18

_TIME = re.compile(rb"([0-9]{1,%d})(?:\.([0-9]{1,%d}))?" % (MAX_TIME_INT_DIGITS, MAX_TIME_FRAC_DIGITS))
_DELTA = re.compile(rb"([+-]?)([0-9]{1,%d})(?:\.([0-9]{1,%d}))?" % (MAX_TIME_INT_DIGITS, MAX_TIME_FRAC_DIGITS))
# ISO 6709 decimal degrees: both signs required; 1-2 integer digits of latitude,
# 1-3 of longitude (ISO writes them zero-padded; we accept both).
_LOCATION = re.compile(rb"([+-])([0-9]{1,2})(?:\.([0-9]+))?([+-])([0-9]{1,3})(?:\.([0-9]+))?")
_RADIUS = re.compile(rb"([0-9]{1,4})(?:\.([0-9]{0,20}))?|\.([0-9]{1,20})")
_BOUND = re.compile(rb"[0-9]{1,4}")

MAX_RADIUS_KM = 50
MAX_BOUND = 20


# Records are plain (not frozen) slotted dataclasses: frozen ones pay an
# object.__setattr__ per field, a measurable share of an IAMAT's CPU. Nothing
# mutates them after construction.


@dataclass(slots=True)
class Location:
    """A validated ISO 6709 location; the original bytes are kept for echoing."""

    raw: bytes
    lat: float
    lon: float


@dataclass(slots=True)
class IAmAt:
    client: bytes
    location: Location
    time_raw: bytes
    time_ns: int


@dataclass(slots=True)
class WhatsAt:
    client: bytes
    radius_km: Decimal
    bound: int

    @property
    def radius_m(self) -> float:
        return float(self.radius_km * 1000)


@dataclass(slots=True)
class At:
    """A location record as flooded between servers (and stored)."""

    server: bytes
    delta: bytes
    client: bytes
    location: Location
    time_raw: bytes
    time_ns: int
    line: bytes  # canonical wire form, single spaces, no newline

    @property
    def order_key(self) -> tuple[int, bytes]:
        """The one total order every server uses: client time, then the line."""
        return (self.time_ns, self.line)


@dataclass(slots=True)
class Invalid:
    line: bytes  # the command with leading/trailing white space removed
    reason: str  # for logs only; never sent to the client


Message = IAmAt | WhatsAt | At | Invalid


def parse_time(token: bytes) -> int | None:
    """POSIX seconds with an optional fraction -> integer nanoseconds (digits past
    the ninth decimal are truncated). One int() of seconds and nine fraction digits."""
    m = _TIME.fullmatch(token)
    if m is None:
        return None
    seconds, frac = m.groups()
    return int(seconds + (frac or b"")[:9].ljust(9, b"0"))


def _within(int_part: bytes, frac: bytes | None, limit: bytes) -> bool:
    """|value| <= limit, decided exactly on the digits (no int(): for ASCII digits
    of the same length, byte order is numeric order)."""
    if len(int_part) == len(limit):
        if int_part != limit:
            return int_part < limit
    elif len(int_part) < len(limit):
        return True
    elif int(int_part) != int(limit):  # zero-padded past the limit's length
        return int(int_part) < int(limit)
    return not frac or frac.strip(b"0") == b""


def parse_location(token: bytes) -> Location | None:
    m = _LOCATION.fullmatch(token)
    if m is None:
        return None
    _, lat_int, lat_frac, _, lon_int, lon_frac = m.groups()
    if not (_within(lat_int, lat_frac, b"90") and _within(lon_int, lon_frac, b"180")):
        return None
    # The regex has checked both halves: each is plain decimal syntax float() reads exactly.
    split = m.start(4)
    return Location(token, float(token[:split]), float(token[split:]))


def parse_radius(token: bytes) -> Decimal | None:
    m = _RADIUS.fullmatch(token)
    if m is None:
        return None
    text = token.decode("ascii")
    value = Decimal("0" + text if text.startswith(".") else text.rstrip("."))
    if not (0 < value <= MAX_RADIUS_KM):
        return None
    return value


def parse_bound(token: bytes) -> int | None:
    if _BOUND.fullmatch(token) is None:
        return None
    value = int(token)
    return value if 1 <= value <= MAX_BOUND else None


def _place_and_time(loc_tok: bytes, time_tok: bytes, line: bytes) -> tuple[Location, int] | Invalid:
    """The two fields IAMAT and AT share, validated the same way."""
    location = parse_location(loc_tok)
    if location is None:
        return Invalid(line.strip(), "bad location")
    time_ns = parse_time(time_tok)
    if time_ns is None:
        return Invalid(line.strip(), "bad time")
    return location, time_ns


def _parse_iamat(fields: list[bytes], line: bytes) -> Message:
    if len(fields) != 4:
        return Invalid(line.strip(), "IAMAT needs 4 fields")
    _, client, loc_tok, time_tok = fields
    checked = _place_and_time(loc_tok, time_tok, line)
    if isinstance(checked, Invalid):
        return checked
    return IAmAt(client, checked[0], time_tok, checked[1])


def _parse_whatsat(fields: list[bytes], line: bytes) -> Message:
    if len(fields) != 4:
        return Invalid(line.strip(), "WHATSAT needs 4 fields")
    _, client, radius_tok, bound_tok = fields
    radius = parse_radius(radius_tok)
    if radius is None:
        return Invalid(line.strip(), "radius must be a decimal in (0, 50] km")
    bound = parse_bound(bound_tok)
    if bound is None:
        return Invalid(line.strip(), "bound must be an integer in [1, 20]")
    return WhatsAt(client, radius, bound)


def _parse_at(fields: list[bytes], line: bytes) -> Message:
    if len(fields) != 6:
        return Invalid(line.strip(), "AT needs 6 fields")
    _, server, delta, client, loc_tok, time_tok = fields
    if _DELTA.fullmatch(delta) is None:
        return Invalid(line.strip(), "bad time difference")
    checked = _place_and_time(loc_tok, time_tok, line)
    if isinstance(checked, Invalid):
        return checked
    return At(server, delta, client, checked[0], time_tok, checked[1], b" ".join(fields))


_PARSERS = {b"IAMAT": _parse_iamat, b"WHATSAT": _parse_whatsat, b"AT": _parse_at}


def parse_at_line(line: bytes) -> At | None:
    """A stored (already validated) AT line back into its record; None if it is not one."""
    msg = parse(line)
    return msg if isinstance(msg, At) else None


def at_identity(fields: list[bytes]) -> tuple[bytes, bytes] | None:
    """(client, canonical line) of what looks like an AT line, *not* validated.

    For the duplicate check: a line byte-identical to a record already held was
    valid when it was stored, so it can be dropped without parsing it again.
    """
    if len(fields) == 6 and fields[0] == b"AT":
        return fields[3], b" ".join(fields)
    return None


def parse(line: bytes) -> Message | None:
    """Parse one line (``\\n`` already removed). ``None`` means: blank, no reply.

    ``bytes.split()`` with no argument splits on exactly the six ASCII white-space
    bytes of the spec, unlike ``str.split()``.
    """
    fields = line.split()
    if not fields:
        return None
    return parse_fields(fields, line)


def parse_fields(fields: list[bytes], line: bytes) -> Message:
    """``parse`` for a caller that already split the (non-blank) line."""
    if not line.isascii():  # the common case skips the decode entirely
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            return Invalid(line.strip(), "not UTF-8")
    parser = _PARSERS.get(fields[0])
    if parser is None:
        return Invalid(line.strip(), "unknown command")
    return parser(fields, line)


# ---------------------------------------------------------------- formatting


def format_delta(delta_ns: int) -> bytes:
    """Signed seconds with exactly nine decimals: ``+0.263873386``."""
    sign = b"+" if delta_ns >= 0 else b"-"
    seconds, ns = divmod(abs(delta_ns), NS_PER_S)
    return b"%s%d.%09d" % (sign, seconds, ns)


def make_at(server: bytes, msg: IAmAt, now_ns: int) -> At:
    """The record (and reply) a server makes for an IAMAT received at ``now_ns``."""
    delta = format_delta(now_ns - msg.time_ns)
    line = b"AT %s %s %s %s %s" % (server, delta, msg.client, msg.location.raw, msg.time_raw)
    return At(server, delta, msg.client, msg.location, msg.time_raw, msg.time_ns, line)


def format_invalid(stripped: bytes) -> bytes:
    return b"? " + stripped + b"\n"


# ---------------------------------------------------------------- framing


@dataclass(slots=True)
class Overlong:
    """A line past the limit: only its first bytes are kept, for the ``? `` reply."""

    prefix: bytes


OVERLONG_ECHO_BYTES = 256  # how much of an over-long line the ``? `` reply carries


class LineSplitter:
    """Bytes in, complete lines out, never holding more than ``limit`` bytes.

    ``feed`` returns the lines (``bytes`` without ``\\n``) and ``Overlong``
    markers completed by the data; ``finish`` returns the unterminated last
    line at the client's EOF. Once a line passes the limit it is answered at
    once and the rest of it, up to the next ``\\n``, is discarded as it arrives.
    """

    __slots__ = ("buffer", "discarding", "echo", "limit")

    def __init__(self, limit: int = 8192):
        self.limit = limit
        # Never more than the limit: every over-long line has that many bytes whatever
        # the chunking, so the ``? `` reply does not depend on how TCP split the data.
        self.echo = min(OVERLONG_ECHO_BYTES, limit)
        self.buffer = bytearray()
        self.discarding = False

    def feed(self, data: bytes) -> list[bytes | Overlong]:
        out: list[bytes | Overlong] = []
        start = 0
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                self._keep(data[start:], out)
                return out
            if self.discarding:
                self.discarding = False
            elif self.buffer:
                self.buffer += data[start:end]
                out.append(self._take(len(self.buffer)))
            elif end - start > self.limit:
                out.append(Overlong(data[start : min(end, start + self.echo)]))  # never past the \n
            else:
                out.append(data[start:end])
            start = end + 1

    def _keep(self, tail: bytes, out: list[bytes | Overlong]) -> None:
        if self.discarding or not tail:
            return
        self.buffer += tail
        if len(self.buffer) > self.limit:
            out.append(Overlong(bytes(self.buffer[: self.echo])))
            self.buffer = bytearray()
            self.discarding = True

    def _take(self, n: int) -> bytes | Overlong:
        line = bytes(self.buffer)
        self.buffer = bytearray()  # a fresh, empty buffer: idle connections hold nothing
        if n > self.limit:
            return Overlong(line[: self.echo])
        return line

    def finish(self) -> list[bytes | Overlong]:
        """At EOF: the last line if it had no ``\\n`` (and was not being discarded)."""
        if self.discarding or not self.buffer:
            return []
        return [self._take(len(self.buffer))]


def overlong_reply(marker: Overlong) -> bytes:
    return format_invalid(marker.prefix.strip())
