"""What a user gets from pip: the wheel and the sdist built as a user would build them, the
wheel installed into a fresh virtualenv, its commands run from an empty directory.

Building and installing take about 10 s, once per session (``installed``); the installed
commands then run with no PYTHONPATH and away from the repository, so they can only find
the installed package.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from herdserver import __version__

from .conftest import TEST_KEY, wait_until
from .test_cli import accepting, free_ports

ROOT = Path(__file__).resolve().parent.parent
NAME = f"herdserver-{__version__}"
# The installed commands must find the installed package only: no PYTHONPATH into the repository.
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HERD_TEST_KEY": TEST_KEY}


@dataclass(frozen=True)
class Installed:
    wheel: Path
    sdist: Path
    bin: Path  # the fresh virtualenv's bin/, where pip put the console scripts


def check_run(*argv: str | Path, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(a) for a in argv], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{argv}: {result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="session")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    work = tmp_path_factory.mktemp("packaging")
    # As a user builds it (isolated, from the sdist): a file missing from the sdist breaks the wheel too.
    check_run(sys.executable, "-m", "build", "--outdir", work / "dist", ROOT, cwd=work)
    wheel, sdist = work / "dist" / f"{NAME}-py3-none-any.whl", work / "dist" / f"{NAME}.tar.gz"
    check_run(sys.executable, "-m", "venv", work / "venv", cwd=work)
    check_run(work / "venv" / "bin" / "pip", "install", "-q", wheel, cwd=work)
    return Installed(wheel, sdist, work / "venv" / "bin")


@pytest.fixture
def empty(tmp_path: Path) -> Path:
    """An empty directory, away from the repository, to run the installed commands in."""
    path = tmp_path / "empty"
    path.mkdir()
    return path


def test_the_starter_herd_file_is_the_repositorys() -> None:
    assert (ROOT / "herdserver" / "default_herd.ini").read_text() == (ROOT / "herd.ini").read_text()


def test_wheel_and_sdist_carry_the_license_and_the_data(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = set(wheel.namelist())
    assert f"{NAME}.dist-info/licenses/LICENSE" in names
    assert {"herdserver/default_herd.ini", "herdserver/ops/herd_page.html", "herdserver/supervisor.py"} <= names
    with tarfile.open(installed.sdist) as sdist:
        members = set(sdist.getnames())
    assert {f"{NAME}/LICENSE", f"{NAME}/run_herd.py", f"{NAME}/herd.ini", f"{NAME}/tests/conftest.py"} <= members
    assert "Copyright (c) 2026 the herdserver authors" in (ROOT / "LICENSE").read_text()


def test_the_three_commands_print_one_version(installed: Installed, empty: Path) -> None:
    commands = ("herdserver", "herdctl", "run_herd")
    outputs = {check_run(installed.bin / name, "--version", cwd=empty).stdout for name in commands}
    assert outputs == {f"herdserver {__version__}\n"}


def test_init_writes_the_starter_herd_and_never_overwrites(installed: Installed, empty: Path) -> None:
    first = check_run(installed.bin / "run_herd", "--init", cwd=empty)
    assert first.stdout.startswith("run_herd: wrote herd.ini (5 servers, 5 links, port 12000-12004")
    assert (empty / "herd.ini").read_text() == (ROOT / "herd.ini").read_text()
    (empty / "herd.ini").write_text("; mine\n")
    again = subprocess.run([installed.bin / "run_herd", "--init"], cwd=empty, env=ENV, capture_output=True, text=True)
    assert again.returncode == 2
    assert again.stderr == "run_herd: herd.ini already exists; not overwriting it (edit it, or --init --config OTHER)\n"
    assert (empty / "herd.ini").read_text() == "; mine\n"


def test_the_installed_run_herd_starts_and_stops_a_herd(installed: Installed, empty: Path) -> None:
    ports = free_ports(6)
    (empty / "herd.ini").write_text(
        "[places]\nprovider = google\napi_key_env = HERD_TEST_KEY\nbase_url = http://127.0.0.1:1\n"
        f"[server:Alford]\nport = {ports[0]}\nhttp_port = {ports[1]}\nherd_port = {ports[4]}\nneighbors = Ball\n"
        f"[server:Ball]\nport = {ports[2]}\nhttp_port = {ports[3]}\nherd_port = {ports[5]}\n"
    )
    client, http, herd = sorted(ports[0:4:2]), sorted(ports[1:4:2]), sorted(ports[4:])  # listed in order
    assert check_run(installed.bin / "herdctl", "check", cwd=empty).stdout == (
        f"herd.ini: ok: 2 servers, 1 link, port {client[0]}, {client[1]}, http_port {http[0]}, {http[1]}, "
        f"herd_port {herd[0]}, {herd[1]}\n"
    )
    out = empty / "stdout"
    with open(out, "w") as stdout:
        herd = subprocess.Popen([installed.bin / "run_herd"], cwd=empty, env=ENV, stdout=stdout, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: "run_herd: 2 servers up" in out.read_text(), timeout=30, what="the herd's table")
        assert check_run(installed.bin / "herdctl", "status", cwd=empty).stdout.count(" ready ") == 2
        herd.send_signal(signal.SIGTERM)
        assert herd.wait(timeout=15) == 0
    finally:
        if herd.poll() is None:
            herd.kill()  # its servers stop by themselves (--parent-pid)
            herd.wait()
        assert herd.stderr is not None
        herd.stderr.close()
    assert not any(accepting(port) for port in ports)
    assert (empty / "logs" / "Alford.log").exists()  # relative to the herd file, in the user's directory


def test_the_sdist_carries_a_test_suite_that_collects(installed: Installed, tmp_path: Path) -> None:
    with tarfile.open(installed.sdist) as sdist:
        sdist.extractall(tmp_path, filter="data")
    unpacked = tmp_path / NAME
    modules = sorted(p.name for p in (ROOT / "tests").glob("*.py"))
    assert sorted(p.name for p in (unpacked / "tests").glob("*.py")) == modules
    # This interpreter has pytest and the dependencies; pytest puts the unpacked directory first on sys.path.
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-qq", "--override-ini=addopts=", "-p", "no:cacheprovider"],
        cwd=unpacked, env=ENV, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    counted = dict(line.split(": ") for line in result.stdout.splitlines() if line.startswith("tests/"))
    assert sorted(counted) == [f"tests/{m}" for m in modules if m.startswith("test_")], result.stdout
