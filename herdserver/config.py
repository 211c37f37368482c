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
    max_connections: int = 0  # 0: derived from the file-descriptor limit (see limits.py)
    max_connections_per_ip: int = 1000
    line_timeout: float = 10.0  # seconds from a line's first byte to its newline; 0 = no limit
    idle_timeout: float = 300.0  # seconds without a complete command before a client is closed; 0 = never
    write_timeout: float = 30.0  # seconds a client may leave our replies unread before it is dropped
    shutdown_grace: float = 2.0  # seconds to let clients finish on stop
    park_after: float = 5.0  # seconds a quiet client keeps its greenlet (~9 KB) before it is parked
    max_clock_skew: float = 60.0  # seconds a client's time may be ahead of the server's clock
    # Close a client's connection once the replies to a batch of its lines are written
    # (clients written for servers that close after answering); neighbors' connections stay.
    close_after_reply: bool = False


@dataclass(frozen=True)
class PeerSettings:
    backoff_initial: float = 0.05
    backoff_max: float = 1.0
    connect_timeout: float = 2.0
    write_timeout: float = 30.0  # a neighbor that reads nothing this long is dropped
    link_idle: float = 0.05  # seconds with nothing to send before a link's connection is closed
    trusted: tuple[str, ...] = ()  # addresses of foreign peers whose AT lines are accepted
    sync_interval: float = 30.0  # seconds between reconciliations with each neighbor; 0 = never


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


@dataclass(frozen=True)
class HttpSettings:
    """Bounds on each server's HTTP side (metrics, health, the page): nobody can hold it."""

    head_timeout: float = 5.0  # seconds to wait for a request's line and headers (keep-alive idle included)
    max_head_bytes: int = 32768  # request line + headers; beyond: 431 and the connection closed
    max_connections: int = 256  # open at once; at the cap the oldest idle one makes room for a new one
    max_connections_per_ip: int = 32  # beyond: a new connection from that address is closed at once
    max_requests: int = 64  # requests served at once (/livez and /readyz never wait for one of these)


HTTP_PORT_OFFSET = 1000  # the default http_port: the client port + 1000
HERD_PORT_OFFSET = 2000  # the default herd_port: the client port + 2000
NO_SECRET = "-"  # secret_file = - : links run unauthenticated (warned about at start)
SECRET_FILE_NAME = "herd.secret"


@dataclass(frozen=True)
class ServerConfig:
    name: str
    host: str
    port: int
    neighbors: tuple[str, ...]
    http_port: int = 0  # metrics, /status and the herd page; 0: no HTTP side (herd.ini's default: port + 1000)
    herd_port: int = 0  # where neighbors' links connect (herd.ini's default: port + 2000); 0: none (foreign)
    foreign: bool = False  # another implementation: sent plain AT lines on its client port

    def listen_ports(self) -> list[tuple[str, int]]:
        """(key, port) for every port this server listens on."""
        ports = [("port", self.port), ("http_port", self.http_port), ("herd_port", self.herd_port)]
        return [(key, port) for key, port in ports if port]

    @property
    def reach(self) -> str:
        """The host to connect to: a wildcard bind address is reached on loopback."""
        return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)

    def http_url(self, path: str) -> str:
        host = f"[{self.reach}]" if ":" in self.reach else self.reach
        return f"http://{host}:{self.http_port}{path}"

    @property
    def link_port(self) -> int:
        """Where a neighbor's link connects: the herd port, or a foreign server's client port."""
        return self.port if self.foreign else self.herd_port


@dataclass(frozen=True)
class HerdConfig:
    path: str
    servers: dict[str, ServerConfig]
    log_dir: str
    log_level: str = "INFO"
    state_dir: str | None = None  # None: memory only (no state file)
    fsync: str = "interval"
    secret_env: str = "HERD_SECRET"  # the environment variable holding the herd's shared secret(s)
    # Where the herd's secret lives when the variable is not set (made by the first server
    # that needs it); None: links run unauthenticated ([herd] secret_file = -).
    secret_file: str | None = None

    def secrets(self, environ: Mapping[str, str]) -> tuple[bytes, ...]:
        """The shared secrets, comma-separated in the variable: the first proves, any verifies."""
        raw = environ.get(self.secret_env, "")
        return tuple(part.strip().encode("utf-8") for part in raw.split(",") if part.strip())
    limits: Limits = field(default_factory=Limits)
    peers: PeerSettings = field(default_factory=PeerSettings)
    places: PlacesSettings = field(default_factory=PlacesSettings)
    http: HttpSettings = field(default_factory=HttpSettings)

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

    def state_path(self, name: str) -> str | None:
        return None if self.state_dir is None else os.path.join(self.state_dir, f"{name}.state")


_HERD_KEYS = {"host", "log_dir", "log_level", "state_dir", "fsync", "secret_env", "secret_file"}
_LIMIT_KEYS = {
    "max_line_bytes", "max_connections", "max_connections_per_ip", "line_timeout", "idle_timeout",
    "write_timeout", "shutdown_grace", "park_after", "max_clock_skew", "close_after_reply",
}  # fmt: skip
_PEER_KEYS = {
    "backoff_initial", "backoff_max", "connect_timeout", "write_timeout", "link_idle", "sync_interval", "trusted",
}  # fmt: skip
FSYNC_MODES = ("interval", "always", "never")
NO_STATE = "-"  # state_dir = - : a memory-only herd
_PLACES_KEYS = {"provider", "api_key_env", "base_url", "timeout", "connect_timeout", "pool_size", "field_mask"}
_SERVER_KEYS = {"port", "neighbors", "host", "http_port", "herd_port", "foreign"}
_HTTP_KEYS = {"head_timeout", "max_head_bytes", "max_connections", "max_connections_per_ip", "max_requests"}
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

    def boolean(self, section: str, key: str, default: bool) -> bool:
        return self.get(section, key, _yes_no, default, "yes or no")

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


def _yes_no(text: str) -> bool:
    # configparser's spellings: yes/no, true/false, on/off, 1/0 (any case).
    value = configparser.ConfigParser.BOOLEAN_STATES.get(text.lower())
    if value is None:
        raise ValueError(text)
    return value


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
    herd_ports: dict[str, int] = {}
    foreign: dict[str, bool] = {}
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
        foreign[name] = _read_yes_no(reader, section, "foreign", False)
        http_ports[name] = _port_or_default(reader, section, "http_port", port + HTTP_PORT_OFFSET, HTTP_PORT_OFFSET)
        if foreign[name]:
            if "herd_port" in reader.parser[section]:
                raise reader.error(section, "herd_port", "a foreign server has no herd port (links use its port)")
            herd_ports[name] = 0
        else:
            herd_ports[name] = _port_or_default(
                reader, section, "herd_port", port + HERD_PORT_OFFSET, HERD_PORT_OFFSET, minimum=1
            )
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
    servers = {
        name: ServerConfig(
            name, host, port, tuple(sorted(links[name])), http_ports[name], herd_ports[name], foreign[name]
        )
        for name, (host, port, _) in raw.items()
    }
    _check_ports(reader, servers)
    return servers


def _port_or_default(reader: _Reader, section: str, key: str, default: int, offset: int, minimum: int = 0) -> int:
    if key in reader.parser[section]:
        return reader.integer(section, key, 0, minimum, 65535)
    if default > 65535:
        raise reader.error(section, key, f"the default (port + {offset}) is past 65535: set it")
    return default


def _read_yes_no(reader: _Reader, section: str, key: str, default: bool) -> bool:
    text = reader.parser[section].get(key)
    if text is None:
        return default
    value = {"yes": True, "true": True, "on": True, "1": True, "no": False, "false": False, "off": False, "0": False}
    if text.strip().lower() not in value:
        raise reader.error(section, key, f"{text.strip()!r} is not yes or no")
    return value[text.strip().lower()]


def _check_ports(reader: _Reader, servers: dict[str, ServerConfig]) -> None:
    """No two ports the herd listens on may be the same address (client ports are
    checked as they are read: their message names the server that has it)."""
    taken = {(s.host, s.port): f"the client port of server {s.name}" for s in servers.values()}
    for server in servers.values():
        for key, port in server.listen_ports():
            if key == "port":
                continue
            where = (server.host, port)
            if where in taken:
                raise reader.error(f"server:{server.name}", key, f"{where[0]}:{port} is already {taken[where]}")
            taken[where] = f"the {key} of server {server.name}"


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
    known = {"herd", "places", "limits", "peers", "http"}
    for section in parser.sections():
        if section not in known and not section.startswith("server:"):
            expected = "herd, places, limits, peers, http or server:NAME"
            raise reader.error(section, None, f"unknown section (expected {expected})")
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
    fsync = reader.get("herd", "fsync", str.lower, "interval", "an fsync mode")
    if fsync not in FSYNC_MODES:
        raise reader.error("herd", "fsync", f"{fsync!r} is not one of {', '.join(FSYNC_MODES)}")
    return HerdConfig(
        path=path,
        servers=_read_servers(reader, default_host),
        log_dir=log_dir,
        log_level=log_level,
        state_dir=_read_state_dir(reader, path),
        fsync=fsync,
        secret_env=_variable_name(reader, "herd", "secret_env", "HERD_SECRET"),
        secret_file=_read_secret_file(reader, path),
        limits=_read_limits(reader),
        peers=_read_peers(reader),
        places=_read_places(reader),
        http=_read_http(reader),
    )


def _read_state_dir(reader: _Reader, path: str) -> str | None:
    state_dir = reader.get("herd", "state_dir", str, "state", "a directory")
    if not state_dir:
        raise reader.error("herd", "state_dir", f"must not be empty (use {NO_STATE} for a memory-only herd)")
    if state_dir == NO_STATE:
        return None
    if not os.path.isabs(state_dir):
        state_dir = os.path.join(os.path.dirname(os.path.abspath(path)), state_dir)
    return state_dir


def _read_secret_file(reader: _Reader, path: str) -> str | None:
    """``[herd] secret_file``: default ``herd.secret`` in the state directory (or beside
    herd.ini for a memory-only herd), so every server started from one herd.ini on one
    host finds the same file; ``-`` runs links unauthenticated."""
    secret_file = reader.get("herd", "secret_file", str, "", "a file")
    if secret_file == NO_SECRET:
        return None
    here = os.path.dirname(os.path.abspath(path))
    if not secret_file:
        state_dir = _read_state_dir(reader, path)
        return os.path.join(state_dir if state_dir is not None else here, SECRET_FILE_NAME)
    return secret_file if os.path.isabs(secret_file) else os.path.join(here, secret_file)


def prepare_log_dir(config: HerdConfig) -> None:
    """Create ``log_dir`` and ``state_dir`` (and their parents) unless they exist; a
    ConfigError naming ``[herd] log_dir`` or ``state_dir`` when one cannot be created
    or written to. The entry points call this before starting anything (``load``
    itself leaves the file system alone)."""
    for key, directory in (("log_dir", config.log_dir), ("state_dir", config.state_dir)):
        if directory is None or (key == "log_dir" and directory == LOG_STDOUT):
            continue
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as exc:
            raise ConfigError(config.path, "herd", key, f"cannot create {directory}: {exc.strerror or exc}") from None
        if not os.access(directory, os.W_OK | os.X_OK):
            raise ConfigError(config.path, "herd", key, f"{directory} is not writable")


def _variable_name(reader: _Reader, section: str, key: str, default: str) -> str:
    """The name of an environment variable (the value itself never is in the file)."""
    name = reader.get(section, key, str, default, "a variable name")
    if not name.isidentifier():
        raise reader.error(section, key, f"{name!r} is not an environment variable name")
    return name


def _read_trusted(reader: _Reader) -> tuple[str, ...]:
    raw = reader.get("peers", "trusted", str, "", "a list of addresses")
    addresses = []
    for part in (p.strip() for p in raw.split(",")):
        if not part:
            continue
        try:
            addresses.append(str(ipaddress.ip_address(part)))
        except ValueError:
            raise reader.error("peers", "trusted", f"{part!r} is not an IP address") from None
    return tuple(addresses)


def _read_limits(reader: _Reader) -> Limits:
    if reader.parser.has_section("limits"):
        reader.check_keys("limits", _LIMIT_KEYS)
    d = Limits()
    return Limits(
        # 512 at least: a herd handshake line (HELLO) must fit.
        max_line_bytes=reader.integer("limits", "max_line_bytes", d.max_line_bytes, 512, 1 << 24),
        max_connections=reader.integer("limits", "max_connections", d.max_connections, 0, 1_000_000),
        max_connections_per_ip=reader.integer(
            "limits", "max_connections_per_ip", d.max_connections_per_ip, 1, 1_000_000
        ),
        line_timeout=reader.number("limits", "line_timeout", d.line_timeout),
        idle_timeout=reader.number("limits", "idle_timeout", d.idle_timeout),
        write_timeout=reader.number("limits", "write_timeout", d.write_timeout, minimum=0.001),
        shutdown_grace=reader.number("limits", "shutdown_grace", d.shutdown_grace),
        park_after=reader.number("limits", "park_after", d.park_after, minimum=0.01),
        max_clock_skew=reader.number("limits", "max_clock_skew", d.max_clock_skew),
        close_after_reply=reader.boolean("limits", "close_after_reply", d.close_after_reply),
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
        link_idle=reader.number("peers", "link_idle", d.link_idle, minimum=0.001),
        sync_interval=reader.number("peers", "sync_interval", d.sync_interval),
        trusted=_read_trusted(reader),
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
    api_key_env = _variable_name(reader, "places", "api_key_env", d.api_key_env)
    return PlacesSettings(
        provider=provider,
        api_key_env=api_key_env,
        base_url=base_url,
        timeout=reader.number("places", "timeout", d.timeout, minimum=0.001),
        connect_timeout=reader.number("places", "connect_timeout", d.connect_timeout),
        pool_size=reader.integer("places", "pool_size", d.pool_size, 1, 10000),
        field_mask=reader.get("places", "field_mask", str, d.field_mask, "a field mask"),
    )


GOOGLE_PROVIDERS = ("google", "google-legacy")


def places_problem(settings: PlacesSettings, environ: Mapping[str, str]) -> str | None:
    """Why WHATSAT cannot work with these settings, or None: a Google provider with no key in
    the environment starts fine and then denies every request, so say it at start instead."""
    provider = effective_provider(settings, environ)
    if provider not in GOOGLE_PROVIDERS or environ.get(settings.api_key_env):
        return None
    how = "empty" if settings.api_key_env in environ else "unset"
    return (
        f"provider {provider} has no API key ({settings.api_key_env} {how}): "
        "every WHATSAT will answer REQUEST_DENIED"
    )


def check_dirs(config: HerdConfig) -> None:
    """What prepare_log_dir would find, without creating anything (``herdctl check``): a
    ConfigError when log_dir or state_dir is not a writable directory and cannot be made one."""
    for key, directory in (("log_dir", config.log_dir), ("state_dir", config.state_dir)):
        if directory is None or (key == "log_dir" and directory == LOG_STDOUT):
            continue
        existing = directory
        while not os.path.exists(existing):  # the nearest existing ancestor is where it would be made
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            raise ConfigError(config.path, "herd", key, f"cannot create {directory}: {existing} is not a directory")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(config.path, "herd", key, f"{existing} is not writable")


def _ranges(ports: list[int]) -> str:
    """[12000, 12001, 12002, 12005] -> ``12000-12002, 12005``."""
    runs: list[list[int]] = []
    for port in sorted(ports):
        if runs and port == runs[-1][-1] + 1:
            runs[-1].append(port)
        else:
            runs.append([port])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def describe(config: HerdConfig) -> str:
    """``5 servers, 5 links, port 12000-12004, http_port 13000-13004``: a herd in one line."""
    links = {frozenset((name, n)) for name, s in config.servers.items() for n in s.neighbors}
    by_key: dict[str, list[int]] = {}
    for server in config.servers.values():
        for key, port in server.listen_ports():
            by_key.setdefault(key, []).append(port)
    count = len(config.servers)
    parts = [f"{count} server{'s' * (count != 1)}", f"{len(links)} link{'s' * (len(links) != 1)}"]
    return ", ".join(parts + [f"{key} {_ranges(ports)}" for key, ports in by_key.items()])
def _read_http(reader: _Reader) -> HttpSettings:
    if reader.parser.has_section("http"):
        reader.check_keys("http", _HTTP_KEYS)
    d = HttpSettings()
    settings = HttpSettings(
        head_timeout=reader.number("http", "head_timeout", d.head_timeout, minimum=0.001),
        # 1024 at least: a browser's ordinary request head must fit.
        max_head_bytes=reader.integer("http", "max_head_bytes", d.max_head_bytes, 1024, 1 << 20),
        max_connections=reader.integer("http", "max_connections", d.max_connections, 1, 100_000),
        max_connections_per_ip=reader.integer(
            "http", "max_connections_per_ip", d.max_connections_per_ip, 1, 100_000
        ),
        max_requests=reader.integer("http", "max_requests", d.max_requests, 1, 10_000),
    )
    if settings.max_requests > settings.max_connections:
        raise reader.error("http", "max_requests", "must not be more than max_connections")
    return settings
