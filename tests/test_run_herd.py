"""run_herd.py as a real subprocess: supervision, start-up, command-line errors."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from herdserver import supervisor
from herdserver.config import load

from .conftest import TEST_KEY, wait_until, wakeups
from .procnet import kill_by_port, pids_on_port
from .test_cli import accepting, free_ports

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, HERD_TEST_KEY=TEST_KEY)


def write_herd(
    tmp_path: Path, names: list[str], log_dir: str = "herdlogs", key_env: str = "HERD_TEST_KEY"
) -> tuple[Path, dict[str, int]]:
    """A herd of ``names`` in a chain on free loopback ports (client, HTTP and herd, all from the
    kernel: never a guessed port + 1000 or + 2000); Places points at a closed port."""
    free = free_ports(3 * len(names))
    ports = dict(zip(names, free[: len(names)], strict=True))
    text = (
        f"[herd]\nhost = 127.0.0.1\nlog_dir = {log_dir}\n\n"
        f"[places]\nprovider = google\napi_key_env = {key_env}\nbase_url = http://127.0.0.1:1\ntimeout = 0.5\n\n"
        "[peers]\nbackoff_max = 0.1\n[limits]\nshutdown_grace = 0.5\n"
    )
    for i, name in enumerate(names):
        neighbors = names[i + 1] if i + 1 < len(names) else ""
        text += f"\n[server:{name}]\nport = {ports[name]}\nneighbors = {neighbors}\n"
        text += f"http_port = {free[len(names) + i]}\nherd_port = {free[2 * len(names) + i]}\n"
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


def alive(pid: int) -> bool:
    """Running (a zombie waiting for a parent to reap it does not count)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


class Herd:
    """run_herd.py as a subprocess, its output in files (servers inherit them: no pipe to block on)."""

    def __init__(self, tmp_path: Path, config: Path, ports: dict[str, int], *args: str) -> None:
        self.ports = ports
        self.config = load(config)
        self.out_path, self.err_path = tmp_path / "stdout", tmp_path / "stderr"
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "run_herd.py", "--config", str(config), *args],
                cwd=ROOT, env=ENV, stdout=out, stderr=err,
            )
        self.seen: set[int] = set()  # every server PID seen: the processes this test may end

    @property
    def stdout(self) -> str:
        return self.out_path.read_text()

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()

    def wait_for(self, text: str, stream: str = "stdout", timeout: float = 15) -> None:
        wait_until(lambda: text in getattr(self, stream), timeout=timeout, what=f"{text!r} on {stream}")

    def wait_up(self) -> dict[str, int]:
        self.wait_for(f"run_herd: {len(self.ports)} servers up")
        return self.servers()

    def servers(self) -> dict[str, int]:
        """NAME -> PID of the running herdserver children of run_herd."""
        found = {}
        try:
            with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as listing:
                pids = [int(pid) for pid in listing.read().split()]
        except FileNotFoundError:
            return {}
        for pid in pids:
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except FileNotFoundError:
                continue
            if b"herdserver" in argv and alive(pid):  # not a child forked but not yet exec'd
                found[argv[argv.index(b"herdserver") + 1].decode()] = pid
                self.seen.add(pid)
        return found

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for port in self.ports.values():  # leftovers, if a test failed: only servers this test saw
            kill_by_port(port, self.seen, signal.SIGKILL)


@pytest.fixture
def herd(tmp_path: Path) -> Iterator[object]:
    started: list[Herd] = []

    def start(names: list[str], *args: str, key_env: str = "HERD_TEST_KEY") -> Herd:
        config, ports = write_herd(tmp_path, names, key_env=key_env)
        started.append(Herd(tmp_path, config, ports, *args))
        return started[-1]

    try:
        yield start
    finally:
        for h in started:
            h.close()


def test_a_killed_server_is_restarted_with_doubling_delays(herd) -> None:
    h = herd(["Alford", "Ball"], "--restart-initial", "0.05", "--restart-max", "0.1")
    first = h.wait_up()
    pids = [first["Ball"]]
    for delay in ("0.05", "0.1", "0.1"):
        os.kill(pids[-1], signal.SIGKILL)  # a server this test's run_herd started
        h.wait_for(f"run_herd: Ball exited with status -9; restarting in {delay}s\n", "stderr")
        wait_until(lambda: h.servers().get("Ball") not in (None, *pids), what="a new Ball process")
        pids.append(h.servers()["Ball"])
        wait_until(lambda: accepting(h.ports["Ball"]), timeout=10, what="the new Ball to listen")
    assert h.servers()["Alford"] == first["Alford"]  # the others are left alone
    h.proc.send_signal(signal.SIGTERM)
    assert h.proc.wait(timeout=15) == 1  # stopped cleanly, but a server had died meanwhile
    assert h.stderr.count("restarting in") == 3
    assert not any(accepting(port) for port in h.ports.values())


def test_no_restart_reports_the_exit_and_ends_when_no_server_is_left(herd) -> None:
    h = herd(["Alford"], "--no-restart", "--restart-initial", "0.01")
    os.kill(h.wait_up()["Alford"], signal.SIGKILL)
    assert h.proc.wait(timeout=15) == 1
    own = "".join(line for line in h.stderr.splitlines(True) if not line.startswith("herdserver: "))
    assert own == "run_herd: Alford exited with status -9\nrun_herd: every server has exited\n"
    assert not accepting(h.ports["Alford"])


def test_backoff_doubles_to_the_cap_and_resets_after_a_long_run() -> None:
    backoff = supervisor.Backoff(initial=1, maximum=30, reset_after=60)
    assert [backoff.delay(uptime=5) for _ in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    assert backoff.delay(uptime=59.9) == 30
    assert [backoff.delay(uptime=60), backoff.delay(uptime=1)] == [1, 2]


def test_kill_9_of_run_herd_stops_every_server(herd, tmp_path: Path) -> None:
    h = herd(["Alford", "Ball", "Hamilton"])
    servers = h.wait_up()
    # Each holds its own port, and its neighbors' forwarders hold connections to it.
    assert len(servers) == 3 and all(pid in pids_on_port(h.ports[name]) for name, pid in servers.items())
    h.proc.kill()  # SIGKILL: run_herd cannot stop anything itself
    h.proc.wait()
    wait_until(lambda: not any(alive(pid) for pid in servers.values()), timeout=10, what="every server to exit")
    assert all(pids_on_port(port) == [] for port in h.ports.values())
    for name in servers:  # each stopped gracefully, on the SIGTERM the kernel sent it
        wait_until(lambda n=name: "event=stop" in (tmp_path / "herdlogs" / f"{n}.log").read_text(), what="stop")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_during_start_up_stops_what_was_started_and_exits_0(herd, signum: int) -> None:
    h = herd(["Alford", "Ball"])
    pids = wait_until(lambda: (found := h.servers()) and len(found) == 2 and found, what="two server processes")
    os.kill(pids["Ball"], signal.SIGSTOP)  # Ball cannot get to listening: run_herd is still starting up
    try:
        if accepting(h.ports["Ball"]):
            pytest.skip("Ball was listening before this test could hold it")
        h.proc.send_signal(signum)
        h.wait_for("run_herd: stopping\n")
    finally:
        # It now gets the SIGTERM run_herd sends it; or it had already died of it, stopped as it
        # was, if that came while it was still importing (no handler yet: a fatal signal kills at once).
        with contextlib.suppress(ProcessLookupError):
            os.kill(pids["Ball"], signal.SIGCONT)
    assert h.proc.wait(timeout=15) == 0, h.stderr
    assert "servers up" not in h.stdout
    assert h.stderr == ""
    wait_until(lambda: not any(alive(pid) for pid in pids.values()), what="every server to exit")


# A parent that starts one server with the kernel's parent-death signal unavailable (as off Linux).
POLLING_PARENT = """
import os, subprocess, sys
server = (
    "import sys, herdserver.__main__ as m; m._set_parent_death_signal = lambda signum: False; "
    "m.PARENT_POLL_INTERVAL = 0.02; sys.exit(m.main(sys.argv[1:]))"
)
child = subprocess.Popen([sys.executable, "-c", server, *sys.argv[1:], "--parent-pid", str(os.getpid())])
print(child.pid, flush=True)
child.wait()
"""


def test_without_pdeathsig_a_server_polls_for_its_parent(tmp_path: Path) -> None:
    config, ports = write_herd(tmp_path, ["Alford"])
    parent = subprocess.Popen(
        [sys.executable, "-c", POLLING_PARENT, "Alford", "--config", str(config)],
        cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True,
    )
    assert parent.stdout is not None
    server = int(parent.stdout.readline())
    try:
        wait_until(lambda: accepting(ports["Alford"]), timeout=10, what="Alford to listen")
        parent.kill()
        parent.wait()
        wait_until(lambda: not alive(server), timeout=10, what="Alford to notice")
        log = tmp_path / "herdlogs" / "Alford.log"
        wait_until(lambda: "event=stop" in log.read_text(), what="a graceful stop")
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        parent.stdout.close()
        kill_by_port(ports["Alford"], {server}, signal.SIGKILL)


def test_the_table_shows_each_servers_pid(herd) -> None:
    h = herd(["Alford", "Ball"])
    servers = h.wait_up()
    rows = {line.split()[0]: line for line in h.stdout.splitlines() if not line.startswith("run_herd:")}
    assert {name: int(re.search(r" pid: (\d+) ", row).group(1)) for name, row in rows.items()} == servers


def test_sighup_reopens_every_log_and_the_herd_keeps_running(herd, tmp_path: Path) -> None:
    h = herd(["Alford", "Ball"])
    servers = h.wait_up()
    logs = tmp_path / "herdlogs"
    for name in servers:  # what logrotate does before its postrotate: move the file away
        (logs / f"{name}.log").rename(logs / f"{name}.log.1")
    h.proc.send_signal(signal.SIGHUP)
    h.wait_for("run_herd: SIGHUP passed on to Alford, Ball (each reopens its log)\n")
    wait_until(lambda: all((logs / f"{n}.log").exists() for n in servers), what="each log opened again by name")
    assert h.proc.poll() is None and h.servers() == servers and all(accepting(p) for p in h.ports.values())
    h.proc.send_signal(signal.SIGTERM)
    assert h.proc.wait(timeout=15) == 0, h.stderr
    assert all("event=stop" in (logs / f"{n}.log").read_text() for n in servers)  # the new files, not the moved


def test_a_busy_http_port_is_named_before_any_server_starts(tmp_path: Path) -> None:
    config, _ = write_herd(tmp_path, ["Alford", "Ball"])
    http_port = load(config).servers["Ball"].http_port
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", http_port))
        squatter.listen(1)
        result = run("run_herd.py", "--config", str(config))
    assert result.returncode == 1
    expected = f"run_herd: Ball: 127.0.0.1:{http_port} is already in use by another program ([server:Ball] http_port)\n"
    assert result.stderr == expected
    assert result.stdout == "" and list((tmp_path / "herdlogs").iterdir()) == []  # no server ever ran


def test_a_server_dying_during_start_up_is_said_once(tmp_path: Path) -> None:
    config, _ = write_herd(tmp_path, ["Alford", "Ball"])
    text = config.read_text().replace("[herd]\n", "[herd]\nstate_dir = state\n")
    config.write_text(text)
    (tmp_path / "state").mkdir()
    with open(tmp_path / "state" / "Ball.state.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a second process on Ball's state would find it
        result = run("run_herd.py", "--config", str(config))
    assert result.returncode == 1
    own = [line for line in result.stderr.splitlines() if line.startswith("run_herd: ")]
    assert own == ["run_herd: Ball exited with status 2 before listening; stopping the herd"], result.stderr


def test_a_hung_server_is_killed_and_restarted(herd) -> None:
    h = herd(["Alford", "Ball"], "--liveness-timeout", "1", "--restart-initial", "0.05")
    first = h.wait_up()
    os.kill(first["Ball"], signal.SIGSTOP)  # hung: its port still accepts (the kernel's backlog), nothing answers
    try:
        h.wait_for(f"run_herd: Ball (pid {first['Ball']}) has not answered /livez for ", "stderr", timeout=10)
        h.wait_for("run_herd: Ball exited with status -9; restarting in 0.05s\n", "stderr")
    finally:
        with contextlib.suppress(ProcessLookupError):  # if it was not killed after all
            os.kill(first["Ball"], signal.SIGCONT)
    again = wait_until(lambda: h.servers().get("Ball") not in (None, first["Ball"]) and h.servers(), what="a new Ball")
    h.wait_for(f"run_herd: Ball restarted, pid {again['Ball']}\n", "stderr")
    wait_until(lambda: accepting(h.ports["Ball"]), timeout=10, what="the new Ball to listen")
    assert h.servers()["Alford"] == first["Alford"] and "run_herd: Alford" not in h.stderr  # left alone
    h.proc.send_signal(signal.SIGTERM)
    assert h.proc.wait(timeout=15) == 1  # a server had to be killed meanwhile


def test_a_google_provider_with_no_key_is_said_at_start(herd, tmp_path: Path) -> None:
    h = herd(["Alford"], key_env="HERD_TEST_NO_SUCH_KEY")
    h.wait_up()
    problem = "provider google has no API key (HERD_TEST_NO_SUCH_KEY unset): every WHATSAT will answer REQUEST_DENIED"
    assert re.search(r"^Alford .* places: google \(NO API KEY\) +log: ", h.stdout, re.M), h.stdout
    h.wait_for(f"run_herd: places: {problem}\n", "stderr")
    h.wait_for(f"herdserver: Alford: {problem}\n", "stderr")
    log = (tmp_path / "herdlogs" / "Alford.log").read_text()
    assert "WARNING Alford event=places_problem problem=" in log and "REQUEST_DENIED" in log
    h.proc.send_signal(signal.SIGTERM)
    assert h.proc.wait(timeout=15) == 0


def test_liveness_and_start_options_are_checked() -> None:
    for args in (["--liveness-timeout", "-1"], ["--liveness-timeout", "soon"], ["--start-timeout", "0"]):
        result = run("run_herd.py", *args)
        assert result.returncode == 2 and "is not a" in result.stderr, result.stderr


def test_an_idle_herd_leaves_run_herd_asleep(herd) -> None:
    """It waits for a signal (SIGCHLD included) or a timer, not in a polling loop."""
    h = herd(["Alford"], "--liveness-timeout", "0")
    h.wait_up()
    before = wakeups(h.proc.pid)
    time.sleep(1)  # a window to measure, not a wait for something: the old loop woke 5 times in it
    assert wakeups(h.proc.pid) - before <= 1
    os.kill(h.servers()["Alford"], signal.SIGKILL)
    h.wait_for("run_herd: Alford exited with status -9; restarting in 1s\n", "stderr")
