"""run_herd.py as a real subprocess: supervision, start-up, command-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .conftest import TEST_KEY
from .test_cli import free_ports

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, HERD_TEST_KEY=TEST_KEY)


def write_herd(tmp_path: Path, names: list[str], log_dir: str = "herdlogs") -> tuple[Path, dict[str, int]]:
    """A herd of ``names`` in a chain on free loopback ports; Places points at a closed port."""
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    text = (
        f"[herd]\nhost = 127.0.0.1\nlog_dir = {log_dir}\n\n"
        "[places]\nprovider = google\napi_key_env = HERD_TEST_KEY\nbase_url = http://127.0.0.1:1\ntimeout = 0.5\n\n"
        "[peers]\nbackoff_max = 0.1\n[limits]\nshutdown_grace = 0.5\n"
    )
    for i, name in enumerate(names):
        neighbors = names[i + 1] if i + 1 < len(names) else ""
        text += f"\n[server:{name}]\nport = {ports[name]}\nneighbors = {neighbors}\n"
    path = tmp_path / "herd.ini"
    path.write_text(text)
    return path, ports


def run(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=ENV
    )


def test_a_name_given_twice_is_an_error(tmp_path: Path) -> None:
    config, _ = write_herd(tmp_path, ["Alford", "Ball"])
    result = run("run_herd.py", "--config", str(config), "Alford", "Ball", "Alford")
    assert result.returncode == 2
    assert result.stderr == "run_herd: Alford named more than once\n"
    assert not (tmp_path / "herdlogs").exists()  # nothing was started


def test_a_log_dir_that_cannot_be_created_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "plain-file").write_text("not a directory\n")
    config, _ = write_herd(tmp_path, ["Alford"], log_dir="plain-file/logs")
    for entry in (["run_herd.py"], ["-m", "herdserver", "Alford"]):
        result = run(*entry, "--config", str(config))
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert f"{config}: [herd] log_dir: cannot create {tmp_path}/plain-file/logs: Not a directory" in lines[0]


def test_a_log_dir_that_is_a_file_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "logs").write_text("not a directory\n")
    config, _ = write_herd(tmp_path, ["Alford"], log_dir="logs")
    result = run("run_herd.py", "--config", str(config))
    assert result.returncode == 2
    assert "[herd] log_dir: cannot create" in result.stderr and len(result.stderr.splitlines()) == 1


def test_version_is_the_packages(tmp_path: Path) -> None:
    from herdserver import __version__

    herd = run("run_herd.py", "--version")
    server = run("-m", "herdserver", "--version")
    assert herd.returncode == server.returncode == 0
    assert herd.stdout == server.stdout == f"herdserver {__version__}\n"


def test_a_server_whose_parent_is_gone_does_not_start(tmp_path: Path) -> None:
    config, _ = write_herd(tmp_path, ["Alford"])
    # PID 1 is not this server's parent: as if run_herd had died before the server armed its watch.
    result = run("-m", "herdserver", "Alford", "--config", str(config), "--parent-pid", "1")
    assert result.returncode == 0
    assert result.stderr == "herdserver: Alford: parent process 1 is gone; not starting\n"
    assert not (tmp_path / "herdlogs" / "Alford.log").exists()
