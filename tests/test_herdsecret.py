"""The herd's secret: the variable wins; else one file, made once, owner-only, agreed on by racers."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from herdserver.config import HerdConfig
from herdserver.herdsecret import SecretError, load_secret, read_or_create

from .test_cli import ROOT


def config(tmp_path: Path, secret_file: str | None) -> HerdConfig:
    return HerdConfig(path=str(tmp_path / "herd.ini"), servers={}, log_dir=str(tmp_path), secret_file=secret_file)


def test_the_variable_wins_then_the_file_then_nothing(tmp_path: Path) -> None:
    path = str(tmp_path / "state" / "herd.secret")
    cfg = config(tmp_path, path)
    assert load_secret(cfg, {"HERD_SECRET": "a, b"}).secrets == (b"a", b"b")
    assert not os.path.exists(path)  # the variable set: no file made
    made = load_secret(cfg, {})
    assert made.source == path and len(made.secrets[0]) == 64
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_secret(cfg, {}).secrets == made.secrets  # the next server reads the same
    assert os.listdir(tmp_path / "state") == ["herd.secret"]  # no temporary file left
    assert load_secret(replace(cfg, secret_file=None), {}).secrets == ()


def test_a_file_others_may_read_or_an_empty_one_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "herd.secret"
    path.write_text("x" * 64)
    path.chmod(0o644)
    with pytest.raises(SecretError, match=r"may be read by others .*chmod 600"):
        read_or_create(str(path))
    path.chmod(0o600)
    path.write_text("short")
    with pytest.raises(SecretError, match="no usable secret"):
        read_or_create(str(path))


def test_servers_starting_together_agree_on_one_secret(tmp_path: Path) -> None:
    """Many processes race to make the file: every one of them reads the same secret."""
    path = tmp_path / "race" / "herd.secret"
    code = "import sys; from herdserver.herdsecret import read_or_create; print(read_or_create(sys.argv[1]).decode())"
    for _ in range(3):  # rounds: a fresh file each time
        if path.exists():
            path.unlink()
        racers = [
            subprocess.Popen([sys.executable, "-c", code, str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
            for _ in range(12)
        ]
        seen = {racer.communicate(timeout=30)[0].strip() for racer in racers}
        assert len(seen) == 1 and len(seen.pop()) == 64
        assert os.listdir(path.parent) == ["herd.secret"]


def test_a_server_refuses_to_start_on_a_secret_file_others_may_read(tmp_path: Path) -> None:
    ini = tmp_path / "herd.ini"
    ini.write_text("[herd]\nsecret_file = s\n[server:A]\nport = 1\nhttp_port = 0\nherd_port = 2\n")
    (tmp_path / "s").write_text("y" * 64)
    (tmp_path / "s").chmod(0o640)
    result = subprocess.run(
        [sys.executable, "-m", "herdserver", "A", "--config", str(ini)], cwd=ROOT, capture_output=True, text=True,
        timeout=30, env={k: v for k, v in os.environ.items() if k != "HERD_SECRET"},
    )  # fmt: skip
    assert result.returncode == 2
    secret = tmp_path / "s"
    assert result.stderr.strip() == f"herdserver: A: {secret} may be read by others (mode 0640): chmod 600 {secret}"
