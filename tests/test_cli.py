"""The real entry points as subprocesses: run_herd.py end to end, herdserver's CLI errors."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import gevent
import pytest

from .conftest import TEST_KEY, LineClient, free_ports, iamat, wait_until

ROOT = Path(__file__).resolve().parent.parent
NAMES = ["Alford", "Ball", "Hamilton", "Holiday", "Welsh"]
LINKS = {"Alford": "Hamilton, Welsh", "Ball": "Holiday, Welsh", "Hamilton": "Holiday", "Holiday": "", "Welsh": ""}


def write_herd(
    tmp_path: Path, places_url: str, provider: str = "google", http_ports: dict[str, int] | None = None
) -> tuple[Path, dict[str, int]]:
    """A five-server herd file on free ports; no HTTP side unless ``http_ports`` are given."""
    free = free_ports(2 * len(NAMES))
    ports = dict(zip(NAMES, free[: len(NAMES)], strict=True))
    herd_ports = dict(zip(NAMES, free[len(NAMES) :], strict=True))  # free too: port + 2000 may not be
    text = (
        "[herd]\nhost = 127.0.0.1\nlog_dir = herdlogs   ; relative to this file\n\n"
        f"[places]\nprovider = {provider}\napi_key_env = HERD_TEST_KEY\nbase_url = {places_url}\ntimeout = 2\n\n"
        "[peers]\nbackoff_max = 0.1\n"
    )
    for name in NAMES:
        text += f"\n[server:{name}]\nport = {ports[name]}\nneighbors = {LINKS[name]}\n"
        text += f"http_port = {(http_ports or {}).get(name, 0)}\nherd_port = {herd_ports[name]}\n"
    path = tmp_path / "herd.ini"
    path.write_text(text)
    return path, ports


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env
    )


def accepting(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def test_run_herd_end_to_end(tmp_path: Path, fake_places) -> None:
    config, ports = write_herd(tmp_path, fake_places.url)
    env = dict(os.environ, HERD_TEST_KEY=TEST_KEY)
    proc = subprocess.Popen(
        [sys.executable, "run_herd.py", "--config", str(config)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        table = []
        with gevent.Timeout(30, AssertionError("run_herd.py did not report a running herd")):
            while not (table and table[-1].startswith("run_herd: 5 servers up")):
                table.append(proc.stdout.readline())
        for name, line in zip(NAMES, table, strict=False):
            shape = rf"{name}\s+127\.0\.0\.1:{ports[name]}\s+neighbors: .+places: google\s+log: .*herdlogs/{name}\.log"
            assert re.match(shape, line), line
        at = LineClient(("127.0.0.1", ports["Alford"])).ask(iamat(b"e2e"))
        assert at.startswith(b"AT Alford ")
        holiday = LineClient(("127.0.0.1", ports["Holiday"]))

        def whatsat() -> bytes | None:
            holiday.send(b"WHATSAT e2e 10 3\n")
            first = holiday.readline()
            return None if first.startswith(b"?") else first + holiday.read_whatsat()

        reply = wait_until(whatsat, timeout=10, what="Holiday to answer WHATSAT e2e")
        assert reply.startswith(at) and b'"status": "OK"' in reply and reply.endswith(b"}\n\n")
        holiday.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert not any(accepting(port) for port in ports.values())
        log = (tmp_path / "herdlogs" / "Holiday.log").read_text()
        assert "event=places provider=google status=OK" in log and "event=stop" in log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_run_herd_refuses_a_port_another_program_listens_on(tmp_path: Path) -> None:
    config, ports = write_herd(tmp_path, "http://127.0.0.1:9")
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", ports["Hamilton"]))
    squatter.listen(1)
    try:
        result = run("run_herd.py", "--config", str(config))
    finally:
        squatter.close()
    assert result.returncode == 1
    assert f"Hamilton: 127.0.0.1:{ports['Hamilton']} is already in use by another program" in result.stderr
    assert "servers up" not in result.stdout
    assert not any(accepting(port) for port in ports.values())  # nothing was started


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as listing:
        return [int(child) for child in listing.read().split()]


def test_run_herd_exits_1_when_a_server_died_on_its_own(tmp_path: Path) -> None:
    config, ports = write_herd(tmp_path, "http://127.0.0.1:9")
    proc = subprocess.Popen(
        [sys.executable, "run_herd.py", "--config", str(config), "--no-restart", "Alford", "Ball"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        with gevent.Timeout(30, AssertionError("run_herd.py did not report a running herd")):
            while not proc.stdout.readline().startswith("run_herd: 2 servers up"):
                pass
        ball = next(pid for pid in _children(proc.pid) if "Ball" in Path(f"/proc/{pid}/cmdline").read_text())
        os.kill(ball, signal.SIGKILL)  # a child of the run_herd this test started
        wait_until(lambda: not accepting(ports["Ball"]), what="Ball to be gone")
        # Reaped by run_herd (it says so as it reaps): a stop before that would find Ball still dying.
        wait_until(lambda: ball not in _children(proc.pid), what="run_herd to notice Ball's exit")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 1
        assert "run_herd: Ball exited with status -9" in proc.stderr.read()
        assert not accepting(ports["Alford"])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_one_server_runs_and_stops_cleanly_on_sigint(tmp_path: Path, fake_places) -> None:
    config, ports = write_herd(tmp_path, fake_places.url)
    proc = subprocess.Popen([sys.executable, "-m", "herdserver", "Ball", "--config", str(config)], cwd=ROOT)
    try:
        wait_until(lambda: accepting(ports["Ball"]), timeout=15, what="Ball to listen")
        assert LineClient(("127.0.0.1", ports["Ball"])).ask(b"hello") == b"? hello\n"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize(
    ("ini", "expected"),
    [
        ("[server:A]\nport = 1\nneighbors = B\n", r"herd\.ini: \[server:A\] neighbors: unknown server 'B'"),
        ("[server:A]\nport = 1\ncolour = red\n", r"herd\.ini: \[server:A\] colour: unknown key"),
        ("[server:A]\nneighbors =\n", r"herd\.ini: \[server:A\] port: missing"),
        ("[places]\nprovider = bing\n[server:A]\nport = 1\n", r"herd\.ini: \[places\] provider: 'bing' is not one of"),
    ],
)
def test_broken_config_is_one_line_naming_file_section_and_key(tmp_path: Path, ini: str, expected: str) -> None:
    (tmp_path / "herd.ini").write_text(ini)
    for entry in (["-m", "herdserver", "A"], ["run_herd.py"]):
        result = run(*entry, "--config", str(tmp_path / "herd.ini"))
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert re.search(expected, result.stderr), result.stderr


def test_unknown_server_name_exits_2() -> None:
    result = run("-m", "herdserver", "Nobody")
    assert result.returncode == 2
    assert "herd.ini: no server named 'Nobody' (known: Alford, Ball, Hamilton, Holiday, Welsh)" in result.stderr


def test_help_explains_the_options() -> None:
    herd_help = run("run_herd.py", "--help").stdout
    assert "--config" in herd_help and "NAME" in herd_help and "--stop-timeout" in herd_help
    server_help = run("-m", "herdserver", "--help").stdout
    assert "--config" in server_help and "NAME" in server_help


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "herdserver"
    assert script.exists()
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=20)
    assert result.returncode == 0 and "usage: herdserver" in result.stdout


def test_entry_point_patches_before_urllib3_is_imported() -> None:
    probe = (
        "import herdserver.__main__, herdserver.server, urllib3.connectionpool as cp; "
        "print(cp.HTTPConnectionPool.QueueCls.__module__)"
    )
    result = run("-c", probe)
    assert result.stdout.strip().startswith("gevent"), result.stdout + result.stderr


def test_this_test_process_is_patched_too() -> None:
    import urllib3.connectionpool

    assert urllib3.connectionpool.HTTPConnectionPool.QueueCls.__module__.startswith("gevent")
    assert time.sleep.__module__.startswith("gevent")
