"""herdctl against a live in-process herd over real loopback sockets, and as installed commands."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from herdserver import ctl

from .conftest import Herd, free_ports, wait_until

ROOT = Path(__file__).resolve().parent.parent
TRIANGLE = {"Alford": ["Ball", "Hamilton"], "Ball": ["Hamilton"], "Hamilton": []}


def ini_for(herd: Herd, tmp_path: Path) -> Path:
    """The herd file of a running in-process herd, for herdctl to find its servers by name."""
    text = f"[herd]\nlog_dir = {tmp_path / 'ctl-logs'}\n"
    for name, s in herd.config.servers.items():
        text += f"[server:{name}]\nport = {s.port}\nhttp_port = {s.http_port}\nneighbors = {', '.join(s.neighbors)}\n"
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


def test_refused_commands_and_bad_input_exit_1(live: tuple[Herd, Path], capsys: Any) -> None:
    _, config = live
    assert run(config, "whatsat", "nobody", "10", "2")[0] == 1
    assert capsys.readouterr().err == "herdctl: Alford refused the command: ? WHATSAT nobody 10 2\n"
    assert run(config, "iamat", "kiwi", "north", "2")[0] == 1
    assert capsys.readouterr().err == "herdctl: latitude 'north' is not a decimal number of degrees\n"
    assert run(config, "iamat", "kiwi", "91", "2")[0] == 1
    assert "refused the command: ? IAMAT kiwi +91+2 " in capsys.readouterr().err


def test_config_errors_exit_2(tmp_path: Path, capsys: Any) -> None:
    assert ctl.main(["--config", str(tmp_path / "none.ini"), "status"]) == 2
    assert capsys.readouterr().err == f"herdctl: {tmp_path / 'none.ini'}: file not found\n"
    (tmp_path / "h.ini").write_text("[server:A]\nport = %d\nhttp_port = 0\n" % free_ports(1)[0])
    assert ctl.main(["--config", str(tmp_path / "h.ini"), "--server", "B", "status"]) == 2
    assert "no server named 'B'" in capsys.readouterr().err
    assert ctl.main(["--config", str(tmp_path / "h.ini"), "status"]) == 1
    assert capsys.readouterr().err == "herdctl: A has no HTTP side (http_port = 0 in herd.ini)\n"


def test_installed_commands() -> None:
    script = Path(sys.executable).parent / "herdctl"
    for argv in ([str(script), "--help"], [sys.executable, "-m", "herdserver.ctl", "--help"]):
        result = subprocess.run(argv, capture_output=True, text=True, timeout=20, cwd=ROOT)
        assert result.returncode == 0 and "usage: herdctl" in result.stdout
        assert all(word in result.stdout for word in ("iamat", "whatsat", "status", "watch", "--server"))
