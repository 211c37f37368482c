"""The README's two commands are the ones CI runs: keep them from drifting apart."""

from __future__ import annotations

from pathlib import Path

from herdserver import config

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines[:20] if line.startswith("    python3 -m venv")]


def test_readme_starts_with_the_two_commands() -> None:
    run_herd, run_tests = readme_commands()
    assert run_herd.endswith("run_herd.py")
    assert run_tests.endswith("-m pytest")


def test_ci_runs_the_readme_test_command_word_for_word() -> None:
    _, run_tests = readme_commands()
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()]
    assert run_tests in ci_lines


def test_default_herd_needs_no_key_and_no_network() -> None:
    herd = config.load(ROOT / "herd.ini")
    assert config.effective_provider(herd.places, {}) == "offline"
    assert {(s.host, s.port) for s in herd.servers.values()} == {("127.0.0.1", p) for p in range(12000, 12005)}
