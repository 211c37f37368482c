"""herd.ini: the repository's file, and every error naming file, section and key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from herdserver import config
from herdserver.config import (
    ConfigError,
    HttpSettings,
    Limits,
    PeerSettings,
    PlacesSettings,
    ServerConfig,
    effective_provider,
)

REPO = Path(__file__).resolve().parent.parent

TWO = """\
[herd]
host = 127.0.0.1
log_dir = logs

[server:A]
port = 13000
neighbors = B

[server:B]
port = 13001
neighbors = A
"""


def write(tmp_path: Path, text: str, name: str = "herd.ini") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def error(tmp_path: Path, text: str) -> tuple[Path, str]:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        config.load(path)
    return path, str(info.value)


def test_repository_herd_ini() -> None:
    cfg = config.load(REPO / "herd.ini")
    assert cfg.path == str(REPO / "herd.ini")
    assert cfg.servers == {
        "Alford": ServerConfig("Alford", "127.0.0.1", 12000, ("Hamilton", "Welsh"), 13000, 14000),
        "Ball": ServerConfig("Ball", "127.0.0.1", 12001, ("Holiday", "Welsh"), 13001, 14001),
        "Hamilton": ServerConfig("Hamilton", "127.0.0.1", 12002, ("Alford", "Holiday"), 13002, 14002),
        "Holiday": ServerConfig("Holiday", "127.0.0.1", 12003, ("Ball", "Hamilton"), 13003, 14003),
        "Welsh": ServerConfig("Welsh", "127.0.0.1", 12004, ("Alford", "Ball"), 13004, 14004),
    }
    for name, server in cfg.servers.items():  # every link both ways
        for neighbor in server.neighbors:
            assert name in cfg.servers[neighbor].neighbors
    assert sum(len(s.neighbors) for s in cfg.servers.values()) == 10
    assert cfg.log_dir == str(REPO / "logs")
    assert cfg.log_path("Welsh") == str(REPO / "logs" / "Welsh.log")
    assert cfg.log_level == "INFO"
    assert cfg.places == PlacesSettings(provider="auto", api_key_env="GOOGLE_PLACES_API_KEY", base_url="", timeout=5.0)
    assert cfg.limits == Limits()
    assert cfg.peers == PeerSettings()
    assert cfg.server("Ball").port == 12001


def test_unknown_server_name(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, TWO))
    with pytest.raises(ConfigError, match=r"herd\.ini: no server named 'C' \(known: A, B\)$"):
        cfg.server("C")


def test_inline_comments(tmp_path: Path) -> None:
    text = """\
; a comment line
[herd]
host = 127.0.0.1          ; default host
log_dir = here            ; relative to the file

[places]
provider = offline        ; no key needed
api_key_env = MY_KEY      ; the key itself is never in the file
base_url =                ; empty: Google
timeout = 2.5             ; seconds

[server:A]
port = 13000   ; the port
neighbors = B  ; one neighbor
; host = 10.0.0.5

[server:B]
port = 13001
"""
    cfg = config.load(write(tmp_path, text))
    assert cfg.servers == {
        "A": ServerConfig("A", "127.0.0.1", 13000, ("B",), 14000, 15000),
        "B": ServerConfig("B", "127.0.0.1", 13001, ("A",), 14001, 15001),
    }
    assert cfg.places == PlacesSettings(provider="offline", api_key_env="MY_KEY", base_url="", timeout=2.5)
    assert cfg.log_dir == str(tmp_path / "here")


def test_link_named_on_one_side_is_both_ways(tmp_path: Path) -> None:
    text = """\
[server:A]
port = 13000
neighbors = B, C
[server:B]
port = 13001
[server:C]
port = 13002
neighbors = A
[server:D]
port = 13003
"""
    cfg = config.load(write(tmp_path, text))
    assert {name: s.neighbors for name, s in cfg.servers.items()} == {
        "A": ("B", "C"),
        "B": ("A",),
        "C": ("A",),
        "D": (),
    }


@pytest.mark.parametrize(
    ("text", "where", "problem"),
    [
        (TWO.replace("neighbors = A", "neighbors = A, Zed"), "[server:B] neighbors", "unknown server 'Zed'"),
        (TWO.replace("neighbors = B", "neighbors = A"), "[server:A] neighbors", "a server cannot be its own neighbor"),
        (TWO.replace("13001", "13000"), "[server:B] port", "127.0.0.1:13000 is already used by server A"),
        (TWO.replace("port = 13001\n", ""), "[server:B] port", "missing"),
        (TWO.replace("13001", "0"), "[server:B] port", "must be between 1 and 65535"),
        (TWO.replace("13001", "65536"), "[server:B] port", "must be between 1 and 65535"),
        (TWO.replace("13001", "-1"), "[server:B] port", "must be between 1 and 65535"),
        (TWO.replace("13001", "abc"), "[server:B] port", "'abc' is not an integer"),
        (TWO.replace("13001", "13001.0"), "[server:B] port", "'13001.0' is not an integer"),
        (TWO.replace("13001", ""), "[server:B] port", "'' is not an integer"),
        (TWO.replace("13001", "13001;x"), "[server:B] port", "'13001;x' is not an integer"),  # ; needs a blank before
        (TWO + "prot = 1\n", "[server:B] prot", "unknown key"),
        (TWO.replace("[herd]\n", "[herd]\nhots = x\n"), "[herd] hots", "unknown key"),
        (TWO + "[places]\napikey = secret\n", "[places] apikey", "unknown key"),
        (TWO + "[limits]\nmax_line = 10\n", "[limits] max_line", "unknown key"),
        (TWO + "[peers]\nbackoff = 1\n", "[peers] backoff", "unknown key"),
        (TWO + "[http]\nmax_heads = 1\n", "[http] max_heads", "unknown key"),
        (TWO + "[http]\nhead_timeout = 0\n", "[http] head_timeout", "must be at least 0.001"),
        (TWO + "[http]\nmax_head_bytes = 100\n", "[http] max_head_bytes", "must be between 1024 and 1048576"),
        (TWO + "[http]\nmax_connections_per_ip = 0\n", "[http] max_connections_per_ip", "must be between 1"),
        (TWO + "[http]\nmax_connections = 8\n", "[http] max_requests", "must not be more than max_connections"),
        (TWO + "[places]\nprovider = bing\n", "[places] provider", "'bing' is not one of auto, offline, google"),
        (TWO + "[places]\nbase_url = ftp://x\n", "[places] base_url", "'ftp://x' must be empty or scheme://host"),
        (TWO + "[places]\nbase_url = localhost:8080\n", "[places] base_url", "'localhost:8080' must be empty"),
        (TWO + "[places]\napi_key_env = MY-KEY\n", "[places] api_key_env", "'MY-KEY' is not an environment"),
        (TWO + "[places]\ntimeout = abc\n", "[places] timeout", "'abc' is not a number"),
        (TWO + "[places]\ntimeout = nan\n", "[places] timeout", "'nan' is not a number"),
        (TWO + "[places]\ntimeout = inf\n", "[places] timeout", "'inf' is not a number"),
        (TWO + "[places]\ntimeout = 1e400\n", "[places] timeout", "'1e400' is not a number"),
        (TWO + "[places]\ntimeout = 0\n", "[places] timeout", "must be at least 0.001"),
        (TWO + "[places]\ntimeout = -5\n", "[places] timeout", "must be at least 0.001"),
        (TWO + "[places]\npool_size = 0\n", "[places] pool_size", "must be between 1 and 10000"),
        (TWO + "[places]\npool_size = 2.5\n", "[places] pool_size", "'2.5' is not an integer"),
        (TWO + "[limits]\nmax_line_bytes = 10\n", "[limits] max_line_bytes", "must be between 512 and 16777216"),
        (TWO + "[limits]\nidle_timeout = -1\n", "[limits] idle_timeout", "must be at least 0"),
        (TWO + "[peers]\nbackoff_initial = 0\n", "[peers] backoff_initial", "must be at least 0.001"),
        (
            TWO + "[peers]\nbackoff_initial = 2\nbackoff_max = 1\n",
            "[peers] backoff_max",
            "must not be less than backoff_initial",
        ),
        (TWO.replace("[herd]\n", "[herd]\nlog_level = LOUD\n"), "[herd] log_level", "must be one of DEBUG, INFO"),
        (TWO.replace("host = 127.0.0.1", "host = my_host"), "[herd] host", "'my_host' is not a host name"),
        (TWO + "host = bad..name\n", "[server:B] host", "'bad..name' is not a host name"),
        (TWO + "host = two words\n", "[server:B] host", "'two words' is not a host name"),
    ],
)
def test_errors_name_file_section_and_key(tmp_path: Path, text: str, where: str, problem: str) -> None:
    path, message = error(tmp_path, text)
    assert message.startswith(f"{path}: {where}: {problem}"), message


@pytest.mark.parametrize(
    ("text", "where"),
    [
        (TWO + "[herds]\n", "[herds]"),
        (TWO + "[DEFAULT]\nport = 1\n", "[DEFAULT]"),
        (TWO + "[server]\nport = 1\n", "[server]"),
    ],
)
def test_unknown_section(tmp_path: Path, text: str, where: str) -> None:
    path, message = error(tmp_path, text)
    assert message == f"{path}: {where}: unknown section (expected herd, places, limits, peers, http or server:NAME)"


def test_bad_server_name(tmp_path: Path) -> None:
    path, message = error(tmp_path, TWO + "[server:]\nport = 1\n")
    assert message == f"{path}: [server:]: server name must be one word"


def test_no_servers(tmp_path: Path) -> None:
    path, message = error(tmp_path, "[herd]\nhost = 127.0.0.1\n")
    assert message == f"{path}: no [server:NAME] sections"


def test_same_port_on_other_hosts_is_fine(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, TWO.replace("port = 13001", "port = 13000\nhost = 127.0.0.2")))
    assert (cfg.servers["A"].host, cfg.servers["A"].port) == ("127.0.0.1", 13000)
    assert (cfg.servers["B"].host, cfg.servers["B"].port) == ("127.0.0.2", 13000)


def test_file_not_found(tmp_path: Path) -> None:
    path = tmp_path / "nope.ini"
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert str(info.value) == f"{path}: file not found"


def test_syntax_error(tmp_path: Path) -> None:
    path, message = error(tmp_path, TWO.replace("port = 13001", "port = 13001\nthis line is garbage"))
    assert message == f"{path}: not 'key = value' or '[section]': line 11: 'this line is garbage'"


def test_no_section_header(tmp_path: Path) -> None:
    path, message = error(tmp_path, "port = 1\n" + TWO)
    assert message == f"{path}: line 1: 'port = 1' comes before any [section]"


def test_duplicate_key_names_section_and_key(tmp_path: Path) -> None:
    path, message = error(tmp_path, TWO.replace("port = 13001", "port = 13001\nport = 13002"))
    assert message == f"{path}: [server:B] port: given twice (line 11)"


def test_duplicate_section(tmp_path: Path) -> None:
    path, message = error(tmp_path, TWO + "[server:A]\nport = 13005\n")
    assert message.startswith(f"{path}: [server:A]: section given twice (line ")


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "herd.ini"
    path.write_bytes(TWO.encode() + b"; caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert str(info.value).startswith(f"{path}: cannot read: ")


def test_per_server_host(tmp_path: Path) -> None:
    text = TWO.replace("host = 127.0.0.1", "host = 0.0.0.0") + "host = herd-b.example.com\n"
    text += "[server:C]\nport = 13002\nhost = ::1\n"
    cfg = config.load(write(tmp_path, text))
    assert cfg.servers["A"].host == "0.0.0.0"
    assert cfg.servers["B"].host == "herd-b.example.com"
    assert cfg.servers["C"].host == "::1"


def test_relative_log_dir_is_resolved_against_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, TWO.replace("log_dir = logs", "log_dir = ../var/log"), "etc/herd.ini")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = config.load(os.path.join("..", "etc", "herd.ini"))
    assert cfg.log_dir == os.path.join(str(tmp_path / "etc"), "../var/log")
    assert os.path.normpath(cfg.log_dir) == str(tmp_path / "var" / "log")
    assert cfg.log_path("A") == os.path.join(cfg.log_dir, "A.log")


def test_absolute_log_dir_is_kept(tmp_path: Path) -> None:
    target = str(tmp_path / "abs" / "logs")
    cfg = config.load(write(tmp_path, TWO.replace("log_dir = logs", f"log_dir = {target}"), "sub/herd.ini"))
    assert cfg.log_dir == target


def test_defaults_when_sections_are_missing(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, "[server:Solo]\nport = 13000\n"))
    assert cfg.servers == {"Solo": ServerConfig("Solo", "127.0.0.1", 13000, (), 14000, 15000)}
    assert cfg.log_dir == str(tmp_path / "logs")
    assert cfg.places == PlacesSettings()
    assert cfg.limits == Limits()
    assert cfg.http == HttpSettings()


def test_other_settings_are_read(tmp_path: Path) -> None:
    text = TWO + (
        "[places]\nprovider = Google-Legacy\nbase_url = http://127.0.0.1:8080/\npool_size = 7\n"
        "[limits]\nmax_line_bytes = 512\nidle_timeout = 1.5\n"
        "[peers]\nbackoff_initial = 0.5\nbackoff_max = 0.5\n"
        "[http]\nhead_timeout = 2.5\nmax_head_bytes = 4096\nmax_connections = 10\nmax_connections_per_ip = 3\n"
        "max_requests = 10\n"
    )
    cfg = config.load(write(tmp_path, text))
    assert cfg.places.provider == "google-legacy"
    assert cfg.places.base_url == "http://127.0.0.1:8080"
    assert cfg.places.pool_size == 7
    assert cfg.limits == Limits(max_line_bytes=512, idle_timeout=1.5)
    assert (cfg.peers.backoff_initial, cfg.peers.backoff_max) == (0.5, 0.5)
    assert cfg.http == HttpSettings(2.5, 4096, 10, 3, 10)


@pytest.mark.parametrize(
    ("provider", "env_name", "environ", "expected"),
    [
        ("auto", "GOOGLE_PLACES_API_KEY", {"GOOGLE_PLACES_API_KEY": "k"}, "google"),
        ("auto", "GOOGLE_PLACES_API_KEY", {}, "offline"),
        ("auto", "GOOGLE_PLACES_API_KEY", {"GOOGLE_PLACES_API_KEY": ""}, "offline"),
        ("auto", "GOOGLE_PLACES_API_KEY", {"OTHER_KEY": "k"}, "offline"),
        ("auto", "MY_KEY", {"MY_KEY": "k"}, "google"),
        ("auto", "MY_KEY", {"GOOGLE_PLACES_API_KEY": "k"}, "offline"),
        ("offline", "GOOGLE_PLACES_API_KEY", {"GOOGLE_PLACES_API_KEY": "k"}, "offline"),
        ("google", "GOOGLE_PLACES_API_KEY", {}, "google"),
        ("google-legacy", "GOOGLE_PLACES_API_KEY", {}, "google-legacy"),
    ],
)
def test_effective_provider(provider: str, env_name: str, environ: dict[str, str], expected: str) -> None:
    settings = PlacesSettings(provider=provider, api_key_env=env_name)
    assert effective_provider(settings, environ) == expected


def test_config_error_text() -> None:
    assert str(ConfigError("f.ini", "places", "timeout", "bad")) == "f.ini: [places] timeout: bad"
    assert str(ConfigError("f.ini", "herds", None, "bad")) == "f.ini: [herds]: bad"
    assert str(ConfigError("f.ini", None, None, "bad")) == "f.ini: bad"


@pytest.mark.parametrize("value", ["12_000", "1e3", "+5", "\u0661\u0662", "nan", "0x10"])
def test_numbers_are_plain_ascii_digits(tmp_path: Path, value: str) -> None:
    path = tmp_path / "herd.ini"
    path.write_text(f"[server:A]\nport = {value}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"\[server:A\] port: .* is not an integer"):
        config.load(path)


@pytest.mark.parametrize("value", ["inf", "nan", "1e3", "1_0"])
def test_seconds_are_plain_decimals(tmp_path: Path, value: str) -> None:
    path = tmp_path / "herd.ini"
    path.write_text(f"[places]\ntimeout = {value}\n[server:A]\nport = 1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"\[places\] timeout: .* is not a number"):
        config.load(path)


def test_http_port_defaults_to_client_port_plus_1000_and_0_turns_it_off(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, TWO + "http_port = 0\n"))
    assert cfg.servers["A"].http_port == 14000
    assert cfg.servers["B"].http_port == 0


def test_http_port_explicit(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, TWO + "http_port = 8080\n"))
    assert cfg.servers["B"].http_port == 8080


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        ("http_port = 65536\n", "must be between 0 and 65535"),
        ("http_port = -1\n", "must be between 0 and 65535"),
        ("http_port = web\n", "'web' is not an integer"),
        ("http_port = 13000\n", "127.0.0.1:13000 is already the client port of server A"),
        ("http_port = 13001\n", "127.0.0.1:13001 is already the client port of server B"),
        ("http_port = 14000\n", "127.0.0.1:14000 is already the http_port of server A"),
    ],
)
def test_http_port_errors(tmp_path: Path, extra: str, problem: str) -> None:
    path, message = error(tmp_path, TWO + extra)
    assert message == f"{path}: [server:B] http_port: {problem}", message


def test_http_port_default_past_65535_must_be_set(tmp_path: Path) -> None:
    path, message = error(tmp_path, TWO.replace("port = 13001", "port = 65000"))
    assert message == f"{path}: [server:B] http_port: the default (port + 1000) is past 65535: set it"
    cfg = config.load(write(tmp_path, TWO.replace("port = 13001", "port = 65000") + "http_port = 0\nherd_port = 1\n"))
    assert cfg.servers["B"].http_port == 0


def test_herd_port_defaults_to_port_plus_2000_and_is_checked(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, TWO))
    assert [(s.port, s.herd_port) for s in cfg.servers.values()] == [(13000, 15000), (13001, 15001)]
    path, message = error(tmp_path, TWO.replace("port = 13001", "port = 64000") + "http_port = 0\n")
    assert message == f"{path}: [server:B] herd_port: the default (port + 2000) is past 65535: set it"
    path, message = error(tmp_path, TWO + "herd_port = 13000\n")
    assert message == f"{path}: [server:B] herd_port: 127.0.0.1:13000 is already the client port of server A"
    path, message = error(tmp_path, TWO + "herd_port = 14000\n")
    assert message == f"{path}: [server:B] herd_port: 127.0.0.1:14000 is already the http_port of server A"


def test_a_foreign_server_has_no_herd_port_and_links_to_its_client_port(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, TWO + "foreign = yes\n"))
    other = cfg.servers["B"]
    assert other.foreign and other.herd_port == 0 and other.link_port == 13001
    assert cfg.servers["A"].link_port == 15000
    path, message = error(tmp_path, TWO + "foreign = maybe\n")
    assert message == f"{path}: [server:B] foreign: 'maybe' is not yes or no"
    path, message = error(tmp_path, TWO + "foreign = yes\nherd_port = 9000\n")
    assert message == f"{path}: [server:B] herd_port: a foreign server has no herd port (links use its port)"


def test_the_secret_file_defaults_beside_the_state_files(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, TWO))
    assert cfg.secret_file == str(tmp_path / "state" / "herd.secret")
    cfg = config.load(write(tmp_path, TWO.replace("[herd]\n", "[herd]\nstate_dir = -\n")))
    assert cfg.secret_file == str(tmp_path / "herd.secret")
    cfg = config.load(write(tmp_path, TWO.replace("[herd]\n", "[herd]\nsecret_file = keys/s\n")))
    assert cfg.secret_file == str(tmp_path / "keys" / "s")
    assert config.load(write(tmp_path, TWO.replace("[herd]\n", "[herd]\nsecret_file = -\n"))).secret_file is None


def test_http_port_may_repeat_on_other_hosts(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, TWO + "host = 127.0.0.2\nhttp_port = 14000\n"))
    assert cfg.servers["A"].http_port == cfg.servers["B"].http_port == 14000


@pytest.mark.parametrize("host", ["alford", "herd-ball", "node1.herd.internal", "a", "x" * 63, "10.131.0.1", "::1"])
def test_dns_names_and_addresses_are_hosts(tmp_path: Path, host: str) -> None:
    cfg = config.load(write(tmp_path, TWO + f"host = {host}\n"))
    assert cfg.servers["B"].host == host


@pytest.mark.parametrize("host", ["-", "-a", "a-", "a..b", "x" * 64, "caf\u00e9", "a/b", "a:b"])
def test_malformed_host_names_are_errors(tmp_path: Path, host: str) -> None:
    path, message = error(tmp_path, TWO + f"host = {host}\n")
    assert message == f"{path}: [server:B] host: {host!r} is not a host name or address", message


def test_log_dir_dash_is_standard_output(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, TWO.replace("log_dir = logs", "log_dir = -")))
    assert cfg.log_dir == "-"
    assert cfg.log_path("A") == "-"


@pytest.mark.parametrize(("value", "expected"), [("yes", True), ("No", False), ("true", True), ("off", False)])
def test_close_after_reply_is_yes_or_no(tmp_path: Path, value: str, expected: bool) -> None:
    cfg = config.load(write(tmp_path, TWO + f"[limits]\nclose_after_reply = {value}\n"))
    assert cfg.limits == Limits(close_after_reply=expected)


@pytest.mark.parametrize("value", ["maybe", "", "2", "yes please"])
def test_close_after_reply_other_words_are_errors(tmp_path: Path, value: str) -> None:
    _, text = error(tmp_path, TWO + f"[limits]\nclose_after_reply = {value}\n")
    assert text.endswith(f"[limits] close_after_reply: {value!r} is not yes or no")
