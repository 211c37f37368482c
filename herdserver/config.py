"""Read and validate ``herd.ini`` into frozen dataclasses.

Every error names the file, the section and the key, so a broken herd file is
fixed from the message alone. Nothing here touches the network.
"""

from __future__ import annotations

import ast
import configparser
import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

PROVIDERS = ("auto", "offline", "google", "google-legacy")

T = TypeVar("T")


class ConfigError(Exception):
    """A problem in herd.ini, worded for the person who edits it."""

    def __init__(self, path: str | os.PathLike[str], section: str | None, key: str | None, problem: str):
        where = str(path)
        if section is not None:
            where += f": [{section}]"
        if key is not None:
            where += f" {key}"
        super().__init__(f"{where}: {problem}")


@dataclass(frozen=True)
class Limits:
    max_line_bytes: int = 8192
    max_connections: int = 20000
    idle_timeout: float = 0.0  # seconds; 0 keeps idle clients forever
    shutdown_grace: float = 2.0  # seconds to let clients finish on stop
    park_after: float = 5.0  # seconds a quiet client keeps its greenlet (~9 KB) before it is parked


@dataclass(frozen=True)
class PeerSettings:
    backoff_initial: float = 0.05
    backoff_max: float = 1.0
    connect_timeout: float = 2.0
    write_timeout: float = 30.0  # a neighbor that reads nothing this long is dropped


@dataclass(frozen=True)
class PlacesSettings:
    provider: str = "auto"
    api_key_env: str = "GOOGLE_PLACES_API_KEY"
    base_url: str = ""
    timeout: float = 5.0
    connect_timeout: float = 0.0  # 0: same as timeout
    pool_size: int = 100
    field_mask: str = ""  # empty: the minimal mask of places.py


def effective_provider(settings: PlacesSettings, environ: Mapping[str, str]) -> str:
    """What ``auto`` stands for: google with a key in the environment, else offline."""
    if settings.provider != "auto":
        return settings.provider
    return "google" if environ.get(settings.api_key_env) else "offline"


HTTP_PORT_OFFSET = 1000  # the default http_port: the client port + 1000


@dataclass(frozen=True)
class ServerConfig:
    name: str
    host: str
    port: int
    neighbors: tuple[str, ...]
    http_port: int = 0  # metrics, /status and the herd page; 0: no HTTP side (herd.ini's default: port + 1000)

    @property
    def reach(self) -> str:
        """The host to connect to: a wildcard bind address is reached on loopback."""
        return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)

    def http_url(self, path: str) -> str:
        host = f"[{self.reach}]" if ":" in self.reach else self.reach
        return f"http://{host}:{self.http_port}{path}"


@dataclass(frozen=True)
class HerdConfig:
    path: str
    servers: dict[str, ServerConfig]
    log_dir: str
    log_level: str = "INFO"
    limits: Limits = field(default_factory=Limits)
    peers: PeerSettings = field(default_factory=PeerSettings)
    places: PlacesSettings = field(default_factory=PlacesSettings)

    def server(self, name: str) -> ServerConfig:
        if name not in self.servers:
            known = ", ".join(self.servers)
            raise ConfigError(self.path, None, None, f"no server named {name!r} (known: {known})")
        return self.servers[name]

    def log_path(self, name: str) -> str:
        """The server's log file, or ``-`` (standard output) when ``log_dir = -``."""
        if self.log_dir == LOG_STDOUT:
            return LOG_STDOUT
        return os.path.join(self.log_dir, f"{name}.log")


_HERD_KEYS = {"host", "log_dir", "log_level"}
_LIMIT_KEYS = {"max_line_bytes", "max_connections", "idle_timeout", "shutdown_grace", "park_after"}
_PEER_KEYS = {"backoff_initial", "backoff_max", "connect_timeout", "write_timeout"}
_PLACES_KEYS = {"provider", "api_key_env", "base_url", "timeout", "connect_timeout", "pool_size", "field_mask"}
_SERVER_KEYS = {"port", "neighbors", "host", "http_port"}
LOG_STDOUT = "-"  # [herd] log_dir = - : every server logs to its standard output
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class _Reader:
    """Typed access to one parsed file with errors that point at the key."""

    def __init__(self, path: str, parser: configparser.ConfigParser):
        self.path = path
        self.parser = parser

    def error(self, section: str | None, key: str | None, problem: str) -> ConfigError:
        return ConfigError(self.path, section, key, problem)

    def check_keys(self, section: str, allowed: set[str]) -> None:
        for key in self.parser[section]:
            if key not in allowed:
                raise self.error(section, key, f"unknown key (allowed: {', '.join(sorted(allowed))})")

    def get(self, section: str, key: str, convert: Callable[[str], T], default: T, what: str) -> T:
        if not self.parser.has_section(section) or key not in self.parser[section]:
            return default
        raw = self.parser[section][key].strip()
        try:
            return convert(raw)
        except ValueError:
            raise self.error(section, key, f"{raw!r} is not {what}") from None

    def number(self, section: str, key: str, default: float, *, minimum: float = 0.0) -> float:
        value = self.get(section, key, _decimal_number, default, "a number")
        if value < minimum:
            raise self.error(section, key, f"must be at least {minimum:g}")
        return value

    def integer(self, section: str, key: str, default: int, lo: int, hi: int) -> int:
        value = self.get(section, key, _ascii_int, default, "an integer")
        if not lo <= value <= hi:
            raise self.error(section, key, f"must be between {lo} and {hi}")
        return value


def _ascii_int(text: str) -> int:
    # int() would also take "1_000", "+5" and non-ASCII digits.
    digits = text[1:] if text.startswith("-") else text
    if not (digits.isascii() and digits.isdigit()):
        raise ValueError(text)
    return int(text)


def _decimal_number(text: str) -> float:
    # float() would also take "nan", "inf", "1e3" and "1_0".
    if re.fullmatch(r"-?([0-9]+(\.[0-9]+)?|\.[0-9]+)", text) is None:
        raise ValueError(text)
    return float(text)


_DNS_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def _check_host(reader: _Reader, section: str, key: str, host: str) -> str:
    """An IP address or a DNS name (RFC 1123 labels: letters, digits, inner hyphens),
    such as a compose service name or a machine's FQDN."""
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    labels = host.split(".")
    if not host or len(host) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
        raise reader.error(section, key, f"{host!r} is not a host name or address")
    return host


def _read_servers(reader: _Reader, default_host: str) -> dict[str, ServerConfig]:
    raw: dict[str, tuple[str, int, list[str]]] = {}
    http_ports: dict[str, int] = {}
    for section in reader.parser.sections():
        if not section.startswith("server:"):
            continue
        name = section[len("server:"):].strip()
        if not name or any(c.isspace() for c in name):
            raise reader.error(section, None, "server name must be one word")
        reader.check_keys(section, _SERVER_KEYS)
        if "port" not in reader.parser[section]:
            raise reader.error(section, "port", "missing")
        port = reader.integer(section, "port", 0, 1, 65535)
        host = _check_host(reader, section, "host", reader.parser[section].get("host", default_host).strip())
        neighbors = [n.strip() for n in reader.parser[section].get("neighbors", "").split(",") if n.strip()]
        raw[name] = (host, port, neighbors)
        if "http_port" in reader.parser[section]:
            http_ports[name] = reader.integer(section, "http_port", 0, 0, 65535)
        elif port + HTTP_PORT_OFFSET > 65535:
            raise reader.error(section, "http_port", f"the default (port + {HTTP_PORT_OFFSET}) is past 65535: set it")
        else:
            http_ports[name] = port + HTTP_PORT_OFFSET
    if not raw:
        raise reader.error(None, None, "no [server:NAME] sections")
    links: dict[str, set[str]] = {name: set() for name in raw}
    addresses: dict[tuple[str, int], str] = {}
    for name, (host, port, neighbors) in raw.items():
        section = f"server:{name}"
        if (host, port) in addresses:
            raise reader.error(section, "port", f"{host}:{port} is already used by server {addresses[host, port]}")
        addresses[host, port] = name
        for neighbor in neighbors:
            if neighbor not in raw:
                raise reader.error(section, "neighbors", f"unknown server {neighbor!r}")
            if neighbor == name:
                raise reader.error(section, "neighbors", "a server cannot be its own neighbor")
            # A link named on one side only is still a link both ways.
            links[name].add(neighbor)
            links[neighbor].add(name)
    _check_http_ports(reader, raw, http_ports)
    return {
        name: ServerConfig(name, host, port, tuple(sorted(links[name])), http_ports[name])
        for name, (host, port, _) in raw.items()
    }


def _check_http_ports(reader: _Reader, raw: dict[str, tuple[str, int, list[str]]], http_ports: dict[str, int]) -> None:
    """An HTTP port must not be any server's client port or another server's HTTP port on the same host."""
    taken = {(host, port): f"the client port of server {name}" for name, (host, port, _) in raw.items()}
    for name, http_port in http_ports.items():
        if not http_port:
            continue
        where = (raw[name][0], http_port)
        if where in taken:
            raise reader.error(f"server:{name}", "http_port", f"{where[0]}:{http_port} is already {taken[where]}")
        taken[where] = f"the http_port of server {name}"


def _parse_error(path: str, exc: configparser.Error) -> ConfigError:
    """configparser's complaints, reworded as ``file: [section] key: problem`` with the line."""
    line = getattr(exc, "lineno", None)
    at = f" (line {line})" if line else ""
    if isinstance(exc, configparser.DuplicateOptionError):
        return ConfigError(path, exc.section, exc.option, f"given twice{at}")
    if isinstance(exc, configparser.DuplicateSectionError):
        return ConfigError(path, exc.section, None, f"section given twice{at}")
    if isinstance(exc, configparser.MissingSectionHeaderError):
        return ConfigError(path, None, None, f"line {exc.lineno}: {exc.line.strip()!r} comes before any [section]")
    if isinstance(exc, configparser.ParsingError):
        lines = ", ".join(f"line {n}: {_unrepr(text)!r}" for n, text in exc.errors[:3])
        return ConfigError(path, None, None, f"not 'key = value' or '[section]': {lines}")
    return ConfigError(path, None, None, " ".join(str(exc).split()))


def _unrepr(text: str) -> str:
    """configparser keeps a bad line as its repr(); the line itself, stripped."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    return value.strip() if isinstance(value, str) else text


def load(path: str | os.PathLike[str]) -> HerdConfig:
    """Parse and validate a herd file; raises ConfigError naming file, section, key."""
    path = str(path)
    parser = configparser.ConfigParser(
        inline_comment_prefixes=(";", "#"), interpolation=None, default_section="\x00unused"
    )
    try:
        with open(path, encoding="utf-8") as handle:
            parser.read_file(handle)
    except FileNotFoundError:
        raise ConfigError(path, None, None, "file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(path, None, None, f"cannot read: {exc}") from None
    except configparser.Error as exc:
        raise _parse_error(path, exc) from None
    reader = _Reader(path, parser)
    known = {"herd", "places", "limits", "peers"}
    for section in parser.sections():
        if section not in known and not section.startswith("server:"):
            raise reader.error(section, None, "unknown section (expected herd, places, limits, peers or server:NAME)")
    if parser.has_section("herd"):
        reader.check_keys("herd", _HERD_KEYS)
    default_host = _check_host(reader, "herd", "host", reader.get("herd", "host", str, "127.0.0.1", "a host"))
    log_dir = reader.get("herd", "log_dir", str, "logs", "a directory")
    if not log_dir:
        raise reader.error("herd", "log_dir", "must not be empty")
    if log_dir != LOG_STDOUT and not os.path.isabs(log_dir):
        # Relative to the file, so a herd behaves the same from any directory.
        log_dir = os.path.join(os.path.dirname(os.path.abspath(path)), log_dir)
    log_level = reader.get("herd", "log_level", str.upper, "INFO", "a log level")
    if log_level not in _LOG_LEVELS:
        raise reader.error("herd", "log_level", f"must be one of {', '.join(_LOG_LEVELS)}")
    return HerdConfig(
        path=path,
        servers=_read_servers(reader, default_host),
        log_dir=log_dir,
        log_level=log_level,
        limits=_read_limits(reader),
        peers=_read_peers(reader),
        places=_read_places(reader),
    )


def _read_limits(reader: _Reader) -> Limits:
    if reader.parser.has_section("limits"):
        reader.check_keys("limits", _LIMIT_KEYS)
    d = Limits()
    return Limits(
        max_line_bytes=reader.integer("limits", "max_line_bytes", d.max_line_bytes, 64, 1 << 24),
        max_connections=reader.integer("limits", "max_connections", d.max_connections, 1, 1_000_000),
        idle_timeout=reader.number("limits", "idle_timeout", d.idle_timeout),
        shutdown_grace=reader.number("limits", "shutdown_grace", d.shutdown_grace),
        park_after=reader.number("limits", "park_after", d.park_after, minimum=0.01),
    )


def _read_peers(reader: _Reader) -> PeerSettings:
    if reader.parser.has_section("peers"):
        reader.check_keys("peers", _PEER_KEYS)
    d = PeerSettings()
    settings = PeerSettings(
        backoff_initial=reader.number("peers", "backoff_initial", d.backoff_initial, minimum=0.001),
        backoff_max=reader.number("peers", "backoff_max", d.backoff_max, minimum=0.001),
        connect_timeout=reader.number("peers", "connect_timeout", d.connect_timeout, minimum=0.001),
        write_timeout=reader.number("peers", "write_timeout", d.write_timeout, minimum=0.001),
    )
    if settings.backoff_max < settings.backoff_initial:
        raise reader.error("peers", "backoff_max", "must not be less than backoff_initial")
    return settings


def _read_places(reader: _Reader) -> PlacesSettings:
    if reader.parser.has_section("places"):
        reader.check_keys("places", _PLACES_KEYS)
    d = PlacesSettings()
    provider = reader.get("places", "provider", str.lower, d.provider, "a provider")
    if provider not in PROVIDERS:
        raise reader.error("places", "provider", f"{provider!r} is not one of {', '.join(PROVIDERS)}")
    base_url = reader.get("places", "base_url", str, d.base_url, "a URL").rstrip("/")
    if base_url and not (base_url.startswith("http://") or base_url.startswith("https://")):
        raise reader.error("places", "base_url", f"{base_url!r} must be empty or scheme://host[:port]")
    api_key_env = reader.get("places", "api_key_env", str, d.api_key_env, "a variable name")
    if not api_key_env.isidentifier():
        raise reader.error("places", "api_key_env", f"{api_key_env!r} is not an environment variable name")
    return PlacesSettings(
        provider=provider,
        api_key_env=api_key_env,
        base_url=base_url,
        timeout=reader.number("places", "timeout", d.timeout, minimum=0.001),
        connect_timeout=reader.number("places", "connect_timeout", d.connect_timeout),
        pool_size=reader.integer("places", "pool_size", d.pool_size, 1, 10000),
        field_mask=reader.get("places", "field_mask", str, d.field_mask, "a field mask"),
    )
