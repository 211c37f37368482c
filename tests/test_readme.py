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


def test_the_grading_scripts_server_py_in_the_readme_runs_a_server(tmp_path: Path) -> None:
    import os
    import re
    import subprocess
    import sys

    from .conftest import LineClient, iamat, wait_until
    from .test_cli import free_ports

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    code = re.search(r"```python\n(# server.py: what the grading scripts run.*?)```", text, re.S)
    assert code is not None
    (tmp_path / "server.py").write_text(code.group(1))
    port, herd_port = free_ports(2)  # herd_port too: port + 2000 may be taken
    (tmp_path / "herd.ini").write_text(
        f"[places]\nprovider = google\napi_key_env = K\nbase_url = http://127.0.0.1:9\n[server:Alford]\nport = {port}\n"
        f"herd_port = {herd_port}\n"
    )
    env = dict(os.environ, K="k", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "server.py", "Alford"], cwd=tmp_path, env=env, stderr=subprocess.PIPE)
    try:

        def answers() -> bool:
            try:
                return LineClient(("127.0.0.1", port), timeout=2).ask(iamat()).startswith(b"AT Alford ")
            except (OSError, AssertionError):
                return proc.poll() is not None  # stop waiting if it died (asserted below)

        wait_until(answers, 15.0, what="the README's server.py to answer")
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert (tmp_path / "state" / "Alford.state").exists()  # the herd.ini beside it, with its defaults
    finally:
        proc.terminate()
        proc.wait(10)
