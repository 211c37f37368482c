"""A herd across hosts: three servers, each in its own network namespace with its own address,
partitioned by cutting a link, updated on both sides, healed; every server converges.

Runs only as root where ``ip netns`` works (CI), else skips. The namespaces, the bridge and
the veth pairs are created by this test inside namespaces of its own (nothing is added to
the host's namespace) and removed by the fixture whatever happens; addresses are
10.131.0.0/24, which exist only inside those namespaces. Clients are herdctl, run in a
server's namespace.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import TEST_KEY, wait_until

ROOT = Path(__file__).resolve().parent.parent
NAMES = ("Alford", "Ball", "Hamilton")
ADDRESSES = {"Alford": "10.131.0.1", "Ball": "10.131.0.2", "Hamilton": "10.131.0.3"}
PORT, HTTP_PORT = 12000, 13000  # each server has an address of its own, so the same ports


def run(*argv: str, timeout: float = 20, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: exit {result.returncode}: {result.stderr.strip()}")
    return result


def _netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (ip netns)"
    if shutil.which("ip") is None:
        return "needs iproute2's ip"
    probe = f"herdt{os.getpid()}probe"
    added = run("ip", "netns", "add", probe, check=False)
    if added.returncode != 0:
        return f"ip netns does not work here: {added.stderr.strip()}"
    run("ip", "netns", "del", probe, check=False)
    return None


class Lab:
    """The namespaces: one 'switch' with a bridge, one per server with a veth to the bridge."""

    def __init__(self, tmp_path: Path):
        tag = f"herdt{os.getpid()}"
        self.switch = f"{tag}sw"
        self.ns = {name: f"{tag}{name[0].lower()}" for name in NAMES}
        self.made: list[str] = []
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.config = tmp_path / "herd.ini"
        self.tmp_path = tmp_path

    def build(self) -> None:
        for ns in (self.switch, *self.ns.values()):
            run("ip", "netns", "add", ns)
            self.made.append(ns)
            run("ip", "-n", ns, "link", "set", "lo", "up")
        run("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", self.switch, "link", "set", "br0", "up")
        for name, ns in self.ns.items():
            port = self.port(name)
            run("ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", port, "netns", self.switch)
            run("ip", "-n", self.switch, "link", "set", port, "master", "br0")
            run("ip", "-n", self.switch, "link", "set", port, "up")
            run("ip", "-n", ns, "addr", "add", f"{ADDRESSES[name]}/24", "dev", "eth0")
            run("ip", "-n", ns, "link", "set", "eth0", "up")

    @staticmethod
    def port(name: str) -> str:
        return f"p{name.lower()}"  # its bridge port, in the switch namespace

    def write_herd(self) -> None:
        text = (
            f"[herd]\nlog_dir = {self.tmp_path / 'logs'}\n\n"
            "[places]\nprovider = google\napi_key_env = HERD_TEST_KEY\nbase_url = http://127.0.0.1:9\ntimeout = 1\n\n"
            "[peers]\nbackoff_initial = 0.05\nbackoff_max = 0.2\nconnect_timeout = 0.5\n"
        )
        neighbors = {"Alford": "Ball, Hamilton", "Ball": "Hamilton", "Hamilton": ""}
        for name in NAMES:
            text += (f"\n[server:{name}]\nhost = {ADDRESSES[name]}\nport = {PORT}\nhttp_port = {HTTP_PORT}\n"
                     f"neighbors = {neighbors[name]}\n")
        self.config.write_text(text)

    def start(self) -> None:
        env = dict(os.environ, HERD_TEST_KEY=TEST_KEY)
        for name, ns in self.ns.items():
            # `ip netns exec` execs the command in place: this PID is the server's.
            self.procs[name] = subprocess.Popen(
                ["ip", "netns", "exec", ns, sys.executable, "-m", "herdserver", name, "--config", str(self.config)],
                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )

    def ctl(self, name: str, *args: str, check: bool = True) -> str:
        """herdctl in ``name``'s namespace, talking to ``name``."""
        result = run("ip", "netns", "exec", self.ns[name], sys.executable, "-m", "herdserver.ctl",
                     "--config", str(self.config), "--server", name, "--timeout", "2", *args, check=check)
        return result.stdout

    def holds(self, name: str, client: str) -> str | None:
        """The AT line ``name`` holds for ``client`` (asked in its own namespace, so partitions do not matter)."""
        out = self.ctl(name, "client", client, check=False)
        for line in out.splitlines():
            server, _, held = line.partition("  ")
            if server.strip() == name:
                return held.strip() if held.strip().startswith("AT ") else None
        return None

    def cut(self, name: str) -> None:
        run("ip", "-n", self.switch, "link", "set", self.port(name), "down")

    def heal(self, name: str) -> None:
        run("ip", "-n", self.switch, "link", "set", self.port(name), "up")

    def close(self) -> None:
        for proc in self.procs.values():  # only the PIDs this test started
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for ns in reversed(self.made):
            run("ip", "netns", "del", ns, check=False)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    missing = _netns_unavailable()
    if missing:
        pytest.skip(missing)
    lab = Lab(tmp_path)
    try:
        lab.build()
        lab.write_herd()
        lab.start()
        yield lab
    finally:
        lab.close()
    leftover = run("ip", "netns", "list").stdout
    assert not any(ns in leftover for ns in lab.made), leftover


def test_a_partitioned_herd_converges_once_healed(lab: Lab) -> None:
    def ready(name: str) -> bool:
        out = lab.ctl(name, "status", name, check=False)
        return " ready " in out and "DOWN" not in out

    wait_until(lambda: all(ready(n) for n in NAMES), timeout=30, what="three servers up, every link up")
    lab.ctl("Alford", "iamat", "before", "+1", "+1")
    wait_until(lambda: all(lab.holds(n, "before") for n in NAMES), timeout=15, what="'before' everywhere")

    lab.cut("Hamilton")  # Hamilton on one side; Alford and Ball on the other
    left = lab.ctl("Alford", "iamat", "left", "+10", "+10").strip()
    first = lab.ctl("Ball", "iamat", "both", "+20", "+20").strip()
    right = lab.ctl("Hamilton", "iamat", "right", "+30", "+30").strip()
    newest = lab.ctl("Hamilton", "iamat", "both", "+40", "+40").strip()  # later than Ball's: it wins
    assert first != newest
    wait_until(lambda: lab.holds("Ball", "left") == left, timeout=15, what="'left' at Ball")
    assert lab.holds("Hamilton", "left") is None  # the partition is real
    assert lab.holds("Alford", "right") is None and lab.holds("Ball", "both") == first

    lab.heal("Hamilton")
    expected = {"before": None, "left": left, "right": right, "both": newest}
    expected["before"] = lab.holds("Alford", "before")

    def converged() -> bool:
        return all(lab.holds(n, client) == line for n in NAMES for client, line in expected.items())

    wait_until(converged, timeout=45, what="every server holding the same newest record for every client")
