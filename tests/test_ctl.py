"""herdctl against a live in-process herd over real loopback sockets, and as installed commands."""

from __future__ import annotations

import argparse
import io
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from herdserver import ctl

from .conftest import Herd, free_ports, iamat, wait_until

ROOT = Path(__file__).resolve().parent.parent
TRIANGLE = {"Alford": ["Ball", "Hamilton"], "Ball": ["Hamilton"], "Hamilton": []}


def ini_for(herd: Herd, tmp_path: Path) -> Path:
    """The herd file of a running in-process herd, for herdctl to find its servers by name."""
    text = f"[herd]\nlog_dir = {tmp_path / 'ctl-logs'}\n"
    for name, s in herd.config.servers.items():
        text += f"[server:{name}]\nport = {s.port}\nhttp_port = {s.http_port}\nherd_port = {s.herd_port}\n"
        text += f"neighbors = {', '.join(s.neighbors)}\n"  # herd_port as bound: port + 2000 may be another's
    path = tmp_path / "ctl.ini"
    path.write_text(text)
    return path


@pytest.fixture
def live(make_herd: Any, tmp_path: Path) -> tuple[Herd, Path]:
    herd = make_herd(TRIANGLE, http=True)
    return herd, ini_for(herd, tmp_path)


def run(config: Path, *args: str) -> tuple[int, str]:
    out = io.StringIO()
    status = ctl.main(["--config", str(config), *args], out=out)
    return status, out.getvalue()


def test_iamat_prints_the_reply_and_whatsat_pretty_prints(live: tuple[Herd, Path]) -> None:
    herd, config = live
    status, out = run(config, "iamat", "kiwi.cs.ucla.edu", "34.068930", "-118.445127")
    assert status == 0
    assert re.fullmatch(r"AT Alford \+0\.\d{9} kiwi\.cs\.ucla\.edu \+34\.068930-118\.445127 \d+\.\d{9}\n", out), out
    assert herd.holds("Alford", b"kiwi.cs.ucla.edu") == out.strip().encode()
    wait_until(lambda: herd.holds("Hamilton", b"kiwi.cs.ucla.edu"), what="kiwi at Hamilton")
    status, pretty = run(config, "--server", "Hamilton", "whatsat", "kiwi.cs.ucla.edu", "10", "3")
    assert status == 0
    lines = pretty.splitlines()
    assert lines[0] == out.strip()
    assert re.fullmatch(r"OK: \d+ results?", lines[1]), lines[1]
    assert all(re.match(r"\s+\d+\. \S", line) for line in lines[2:]) and len(lines) >= 3
    status, raw = run(config, "--server", "Hamilton", "whatsat", "kiwi.cs.ucla.edu", "10", "3", "--json")
    assert raw.startswith(out.strip() + "\n{") and raw.endswith("}\n\n")


def test_client_shows_each_servers_line(live: tuple[Herd, Path]) -> None:
    herd, config = live
    _, at = run(config, "--server", "Ball", "iamat", "kiwi", "+1.5", "+2.5")
    wait_until(lambda: all(herd.holds(n, b"kiwi") for n in TRIANGLE), what="kiwi everywhere")
    status, out = run(config, "client", "kiwi")
    assert status == 0
    assert out == "".join(f"{name:<8}  {at}" for name in sorted(TRIANGLE))


def test_status_tables(live: tuple[Herd, Path]) -> None:
    herd, config = live
    run(config, "iamat", "kiwi", "1", "2")
    wait_until(lambda: all(herd.holds(n, b"kiwi") for n in TRIANGLE), what="kiwi everywhere")
    status, out = run(config, "status")
    assert status == 0
    header, *rows = out.splitlines()
    assert header.split() == ["SERVER", "ADDRESS", "STATE", "RECORDS", "CONNS", "PLACES", "LINKS"]
    assert [row.split()[0] for row in rows] == ["Alford", "Ball", "Hamilton"]
    assert rows[0].split()[1] == "*"  # the server asked
    assert "Ball:up Hamilton:up" in rows[0] and all(" ready " in row and " 1 " in row for row in rows)
    status, one = run(config, "status", "Ball")
    assert status == 0 and len(one.splitlines()) == 2 and one.splitlines()[1].startswith("Ball *")
    herd.stop("Hamilton")
    wait_until(lambda: "Hamilton:DOWN" in run(config, "status")[1], what="Hamilton's links down")
    assert re.search(r"^Hamilton\s+\S+\s+DOWN\s+-\s+-\s+-\s+unreachable", run(config, "status")[1], re.M)


def test_watch_refreshes_count_times(live: tuple[Herd, Path]) -> None:
    _, config = live
    status, out = run(config, "watch", "--count", "2", "--interval", "0.05")
    assert status == 0
    assert out.count("herd as Alford sees it") == 2 and out.count("SERVER") == 2
    assert "link_up" in out


def test_a_server_that_is_down_is_one_line_and_exit_1(live: tuple[Herd, Path], capsys: Any) -> None:
    herd, config = live
    herd.stop("Ball")
    ball = herd.config.servers["Ball"]
    for args, message in [
        (("iamat", "kiwi", "1", "2"), f"herdctl: Ball (127.0.0.1:{ball.port}) is not answering: Connection refused"),
        (("whatsat", "kiwi", "10", "2"), f"herdctl: Ball (127.0.0.1:{ball.port}) is not answering: Connection refused"),
        (("status",), f"herdctl: Ball's HTTP side (127.0.0.1:{ball.http_port}) is not answering: Connection refused"),
        (("client", "kiwi"), "herdctl: Ball's HTTP side"),
    ]:
        assert run(config, "--server", "Ball", *args)[0] == 1
        err = capsys.readouterr().err
        assert err.startswith(message) and len(err.splitlines()) == 1, err


def test_refused_commands_exit_1(live: tuple[Herd, Path], capsys: Any) -> None:
    _, config = live
    assert run(config, "whatsat", "nobody", "10", "2")[0] == 1
    assert capsys.readouterr().err == "herdctl: Alford refused the command: ? WHATSAT nobody 10 2\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["whatsat", "kiwi", "51", "3"], "argument RADIUS_KM: radius must be 0 < r <= 50 km, in plain digits (got '5"),
        (["whatsat", "kiwi", "1e1", "3"], "radius must be 0 < r <= 50 km"),
        (["whatsat", "kiwi", "0", "3"], "radius must be 0 < r <= 50 km"),
        (["whatsat", "kiwi", "10", "21"], "argument BOUND: bound must be a whole number from 1 to 20 (got '21')"),
        (["whatsat", "kiwi", "10", "2.0"], "bound must be a whole number from 1 to 20"),
        (["whatsat", "a b", "10", "3"], "argument CLIENT: a client id must be one word, with no white space (got"),
        (["client", ""], "a client id must be one word"),
        (["iamat", "kiwi\t2", "1", "2"], "a client id must be one word"),
        (["iamat", "kiwi", "north", "2"], "argument LAT: latitude must be decimal degrees from -90 to 90, e.g. 34.06"),
        (["iamat", "kiwi", "90.5", "2"], "latitude must be decimal degrees from -90 to 90"),
        (["iamat", "kiwi", "1", "-180.0001"], "argument LON: longitude must be decimal degrees from -180 to 180"),
    ],
)
def test_usage_errors_name_the_rule_before_sending_anything(
    tmp_path: Path, capsys: Any, args: list[str], message: str
) -> None:
    # Nothing listens on this port: a command that got as far as sending would fail "not answering", exit 1.
    (tmp_path / "h.ini").write_text("[server:A]\nport = %d\n" % free_ports(1)[0])
    with pytest.raises(SystemExit) as exit:
        ctl.main(["--config", str(tmp_path / "h.ini"), *args])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "not answering" not in err, err


RADII = ["10", "50", "50.0", "50.000", "50.0001", "0", "0.0", ".5", "5.", "0050", "1234", "12345", "1e1", "+5", "-1"]
BOUNDS = ["1", "20", "020", "21", "0", "5.0", "-1", "x"]
LATITUDES = ["90", "-90.000", "90.0001", "+91", "09", "009", "1.", ".5", "-45.5", "1e1"]
LONGITUDES = ["180", "-180.0", "180.1", "0180", "099", "1000", "-0", "+7.25"]


def accepts(check: Any, text: str) -> bool:
    try:
        check(text)
        return True
    except argparse.ArgumentTypeError:
        return False


def answered(client: Any, line: bytes) -> bool:
    """True when the server took the command (a WHATSAT's whole reply is read), False on "? "."""
    if client.ask(line).startswith(b"? "):
        return False
    if line.startswith(b"WHATSAT"):
        client.read_until(b"\n\n")
    return True


def test_the_argument_rules_are_the_servers(live: tuple[Herd, Path]) -> None:
    """herdctl refuses exactly what the server would answer with "? " (kept from drifting apart)."""
    herd, config = live
    run(config, "iamat", "kiwi", "1", "2")
    client = herd.client("Alford")
    for r in RADII:
        assert accepts(ctl.radius, r) == answered(client, b"WHATSAT kiwi %s 1" % r.encode()), r
    for b in BOUNDS:
        assert accepts(ctl.bound, b) == answered(client, b"WHATSAT kiwi 1 %s" % b.encode()), b
    for what, texts in (("latitude", LATITUDES), ("longitude", LONGITUDES)):
        check = ctl.degrees(what)
        for text in texts:
            signed = text if text[:1] in "+-" else "+" + text
            location = signed + "+1" if what == "latitude" else "+1" + signed
            assert accepts(check, text) == answered(client, iamat(b"probe", location.encode())), text


def test_status_exits_0_only_when_every_server_answers_and_is_ready(live: tuple[Herd, Path], capsys: Any) -> None:
    herd, config = live
    status, out = run(config, "status", "--json")
    assert status == 0
    answer = json.loads(out)
    assert sorted(answer["servers"]) == sorted(TRIANGLE) and all(s["ready"]["ok"] for s in answer["servers"].values())
    status, out = run(config, "status", "Ball", "--json")
    assert status == 0 and json.loads(out)["name"] == "Ball"
    herd.stop("Hamilton")
    wait_until(lambda: run(config, "status")[0] == 1, what="status to see Hamilton gone")
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("herdctl: not every server is up and ready: Hamilton: unreachable"), last
    status, out = run(config, "status", "--json")
    assert status == 1 and "error" in json.loads(out)["servers"]["Hamilton"]


def test_client_json(live: tuple[Herd, Path]) -> None:
    herd, config = live
    _, at = run(config, "iamat", "kiwi", "1", "2")
    wait_until(lambda: all(herd.holds(n, b"kiwi") for n in TRIANGLE), what="kiwi everywhere")
    status, out = run(config, "client", "kiwi", "--json")
    assert status == 0
    held = {name: held["at"] for name, held in json.loads(out)["servers"].items()}
    assert held == dict.fromkeys(TRIANGLE, at.strip())


def write_ini(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "check.ini"
    path.write_text(text)
    return path


def test_check_a_good_file_is_one_line_and_exit_0(tmp_path: Path, capsys: Any) -> None:
    path = write_ini(tmp_path, "[herd]\nlog_dir = deep/logs\n" + "".join(
        f"[server:{n}]\nport = {12000 + i}\nneighbors = {nb}\n" for i, (n, nb) in enumerate(
            [("A", "B"), ("B", "C"), ("C", "A"), ("D", "")]
        )
    ))  # fmt: skip
    assert ctl.main(["check", "--config", str(path)]) == 0
    out, err = capsys.readouterr()
    ports = "port 12000-12003, http_port 13000-13003, herd_port 14000-14003"
    assert out == f"{path}: ok: 4 servers, 3 links, {ports}\n" and err == ""
    assert not (tmp_path / "deep").exists()  # checked, not created
    assert ctl.main(["--config", str(ROOT / "herd.ini"), "check"]) == 0
    summary = "herd.ini: ok: 5 servers, 5 links, port 12000-12004, http_port 13000-13004, herd_port 14000-14004\n"
    assert capsys.readouterr().out.endswith(summary)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[server:A]\nport = 1\nneighbors = B\n", "[server:A] neighbors: unknown server 'B'"),
        ("[server:A]\nport = 65536\n", "[server:A] port: must be between 1 and 65535"),
        ("[server:A]\nport = 65000\n", "[server:A] http_port: the default (port + 1000) is past 65535: set it"),
        ("[server:A]\nport = 1\nhttp_port = 1\n", "[server:A] http_port: 127.0.0.1:1 is already the client port of"),
        ("[herd]\nlog_dir = file/logs\n[server:A]\nport = 1\n", "[herd] log_dir: cannot create "),
        ("[places]\nprovider = bing\n[server:A]\nport = 1\n", "[places] provider: 'bing' is not one of"),
    ],
)
def test_check_a_broken_file_is_exit_2_with_the_reason(tmp_path: Path, capsys: Any, text: str, message: str) -> None:
    (tmp_path / "file").write_text("not a directory\n")
    path = write_ini(tmp_path, text)
    assert ctl.main(["check", "--config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"herdctl: {path}: {message}") and len(err.splitlines()) == 1, err


def test_check_warns_of_a_google_provider_with_no_key(tmp_path: Path, capsys: Any, monkeypatch: Any) -> None:
    monkeypatch.delenv("HERD_CHECK_KEY", raising=False)
    path = write_ini(tmp_path, "[places]\nprovider = google\napi_key_env = HERD_CHECK_KEY\n[server:A]\nport = 1\n")
    assert ctl.main(["check", "--config", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"{path}: ok: 1 server, 0 links")
    assert err == (
        f"herdctl: warning: {path}: [places] provider google has no API key (HERD_CHECK_KEY unset): "
        "every WHATSAT will answer REQUEST_DENIED\n"
    )
    monkeypatch.setenv("HERD_CHECK_KEY", "k")
    assert ctl.main(["check", "--config", str(path)]) == 0 and capsys.readouterr().err == ""


def test_config_errors_exit_2(tmp_path: Path, capsys: Any) -> None:
    assert ctl.main(["--config", str(tmp_path / "none.ini"), "status"]) == 2
    assert capsys.readouterr().err == f"herdctl: {tmp_path / 'none.ini'}: file not found\n"
    (tmp_path / "h.ini").write_text("[server:A]\nport = %d\nhttp_port = 0\n" % free_ports(1)[0])
    assert ctl.main(["--config", str(tmp_path / "h.ini"), "--server", "B", "status"]) == 2
    assert "no server named 'B'" in capsys.readouterr().err
    assert ctl.main(["--config", str(tmp_path / "h.ini"), "status"]) == 1
    assert capsys.readouterr().err == "herdctl: A has no HTTP side (http_port = 0 in herd.ini)\n"


def test_the_three_commands_print_one_version() -> None:
    from herdserver import __version__

    scripts = [str(Path(sys.executable).parent / name) for name in ("herdctl", "herdserver", "run_herd")]
    outputs = {subprocess.run([s, "--version"], capture_output=True, text=True, timeout=20).stdout for s in scripts}
    assert outputs == {f"herdserver {__version__}\n"}


def test_installed_commands() -> None:
    script = Path(sys.executable).parent / "herdctl"
    for argv in ([str(script), "--help"], [sys.executable, "-m", "herdserver.ctl", "--help"]):
        result = subprocess.run(argv, capture_output=True, text=True, timeout=20, cwd=ROOT)
        assert result.returncode == 0 and "usage: herdctl" in result.stdout
        assert all(word in result.stdout for word in ("iamat", "whatsat", "status", "watch", "check", "--server"))
