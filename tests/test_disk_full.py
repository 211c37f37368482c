"""The state directory on a 2 MB filesystem that fills and frees (a tmpfs the test mounts).

Acknowledged means written: every ``AT`` reply's record survives a restart; an IAMAT
whose record the disk refused gets ``? `` and is neither stored nor flooded;
/readyz says 503 while the state file is not writable and 200 once space returns;
the first record after recovery is whole; compaction that failed is tried again.
Skipped where mounting is not allowed (not root, no CAP_SYS_ADMIN).
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import requests

from herdserver import server as server_mod
from herdserver import statefile as state_mod
from herdserver.statefile import ReplayReport, read_records

from .conftest import FAST_PEERS, Herd, LineClient, iamat, wait_until
from .test_cli import ROOT, free_ports

SIZE = "2m"


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB tmpfs at tmp_path/small, unmounted whatever happens."""
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE}", "tmpfs", str(mount)],
                            capture_output=True, text=True, timeout=10)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True, timeout=10).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=10)


def fill(path: Path, leave: int = 0) -> None:
    """Write ``path`` until the filesystem has about ``leave`` bytes free (0: until ENOSPC)."""
    stat = os.statvfs(path.parent)
    todo = max(0, stat.f_bavail * stat.f_frsize - leave) if leave else 1 << 40
    with open(path, "ab", buffering=0) as handle:
        block = b"\0" * 65536
        try:
            while todo > 0:
                todo -= handle.write(block[: min(len(block), todo)])
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


def post(client: LineClient, lines: list[bytes]) -> list[bytes]:
    """Pipelined IAMATs on one connection; their reply lines."""
    client.send(b"".join(line + b"\n" for line in lines))
    return [client.readline()[:-1] for _ in lines]


def until_refused(client: LineClient, prefix: bytes) -> tuple[dict[bytes, bytes], list[bytes]]:
    """IAMATs in batches until the server refuses some: (client -> acknowledged AT line, refused lines)."""
    acked: dict[bytes, bytes] = {}
    refused: list[bytes] = []
    for batch in range(200):
        lines = [iamat(b"%s-%d-%d" % (prefix, batch, i)) for i in range(50)]
        for line, reply in zip(lines, post(client, lines), strict=True):
            if reply.startswith(b"AT "):
                acked[line.split()[1]] = reply
            else:
                assert reply == b"? " + line  # the IAMAT itself, as for any refused command
                refused.append(line)
        if refused:
            return acked, refused
    raise AssertionError("the disk never filled")


# -- a real server process ----------------------------------------------------------------


class OneServer:
    def __init__(self, tmp_path: Path, state_dir: Path):
        # herd_port too: the default, port + 2000, may be taken on a busy machine
        self.port, self.http_port, self.herd_port = free_ports(3)
        self.config = tmp_path / "herd.ini"
        self.config.write_text(
            f"[herd]\nlog_dir = {tmp_path / 'logs'}\nstate_dir = {state_dir}\n\n"
            "[places]\nprovider = google\napi_key_env = HERD_TEST_KEY\nbase_url = http://127.0.0.1:9\ntimeout = 1\n\n"
            f"[server:Alford]\nport = {self.port}\nhttp_port = {self.http_port}\nherd_port = {self.herd_port}\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = dict(os.environ, HERD_TEST_KEY="k")
        self.proc = subprocess.Popen([sys.executable, "-m", "herdserver", "Alford", "--config", str(self.config)],
                                     cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: self.ready() == 200, 15, what="Alford ready")

    def get(self, path: str) -> requests.Response:
        return requests.get(f"http://127.0.0.1:{self.http_port}{path}", timeout=5)

    def ready(self) -> int:
        try:
            return self.get("/readyz").status_code
        except requests.RequestException:
            return 0

    def metric(self, name: str) -> float:
        for line in self.get("/metrics").text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(f"no {name}")

    def kill(self) -> None:  # by PID: the process this test started
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture
def one_server(tmp_path: Path, small_fs: Path) -> Iterator[OneServer]:
    server = OneServer(tmp_path, small_fs / "state")
    yield server
    server.kill()  # before small_fs unmounts


def test_a_real_server_on_a_full_disk_acknowledges_only_what_it_wrote(one_server: OneServer, small_fs: Path) -> None:
    server = one_server
    server.start()
    filler, top_up = small_fs / "filler", small_fs / "top-up"
    fill(filler, leave=48 << 10)
    client = LineClient(("127.0.0.1", server.port))
    acked, refused = until_refused(client, b"c")
    fill(top_up)  # what the cut-back freed, taken too: full for good
    assert post(client, [refused[0]]) == [b"? " + refused[0]]
    wait_until(lambda: server.ready() == 503, what="/readyz 503 while full")
    assert "not writable" in server.get("/readyz").text
    assert server.metric("herd_state_writable") == 0 and server.metric("herd_state_write_failures_total") >= 1
    kiwi = next(iter(acked))
    client.send(b"WHATSAT %s 10 1\n" % kiwi)  # reads keep being served
    assert client.read_whatsat().split(b"\n", 1)[0] == acked[kiwi]

    filler.unlink()
    top_up.unlink()
    wait_until(lambda: server.ready() == 200, 10, what="/readyz 200 once space returns (no client writing)")
    assert server.metric("herd_state_writable") == 1
    after = post(client, [iamat(b"after"), refused[0]])
    assert all(reply.startswith(b"AT Alford ") for reply in after)
    acked[b"after"], acked[refused[0].split()[1]] = after
    client.close()

    server.kill()  # kill -9: what was acknowledged was handed to the OS
    report = ReplayReport()
    on_disk = {line.split()[3]: line for _, _, line in read_records(str(small_fs / "state" / "Alford.state"), report)}
    assert report.corrupt == 0 and not report.torn_tail  # the record after recovery is whole
    assert {c: on_disk.get(c) for c in acked} == acked  # 0 acknowledged records lost
    assert not {line.split()[1] for line in refused[1:]} & set(on_disk)  # refused: never written
    server.start()
    assert server.get("/status").json()["records"] == len(acked)


# -- in process: not flooded, neighbors' records held in memory, compaction retried -----------


def test_a_refused_record_is_not_flooded_and_compaction_resumes(
    make_herd: Callable[..., Herd], small_fs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server_mod, "COMPACT_CHECK_SECONDS", 0.02)
    monkeypatch.setattr(server_mod, "COMPACT_BACKOFF_MAX_SECONDS", 0.05)
    monkeypatch.setattr(state_mod, "COMPACT_MIN_LINES", 1 << 30)  # none until the disk is full
    monkeypatch.setattr(state_mod, "PROBE_SECONDS", 0.05)
    # [peers] trusted: the test sends Ball AT lines of its own on the client port, as a foreign peer would.
    peers = replace(FAST_PEERS, trusted=("127.0.0.1",))
    herd = make_herd({"Alford": ["Ball"], "Ball": []}, state=True, start=False, peers=peers)
    herd.config = replace(herd.config, state_dir=str(small_fs / "state"))  # both state files on the small disk
    alford, ball = herd.start("Alford"), herd.start("Ball")
    wait_until(herd.links_up, what="the link up")
    client = herd.client("Alford")
    post(client, [iamat(b"kiwi", t=b"%d" % (1_000_000_000 + t)) for t in range(1000)])  # dead lines
    filler = small_fs / "filler"
    fill(filler, leave=32 << 10)
    acked, refused = until_refused(client, b"c")
    fill(small_fs / "top-up")
    assert alford.state is not None and ball.state is not None and not alford.state.writable
    wait_until(lambda: all(ball.store.get(c) == line for c, line in acked.items()), what="Ball has them all")
    # A neighbor's record Ball cannot write is held in memory all the same.
    # (Many at once: a few bytes would fit in the slack of the file's last page.)
    direct = [b"AT Alford +0.000000001 direct-%d +34.068930-118.445127 1000000000.5" % i for i in range(100)]
    herd.client("Ball").send(b"".join(line + b"\n" for line in direct))
    wait_until(lambda: all(ball.store.get(line.split()[3]) == line for line in direct), what="Ball holds them")
    wait_until(lambda: not ball.state.writable, what="Ball's write of it failed")  # type: ignore[union-attr]
    monkeypatch.setattr(state_mod, "COMPACT_MIN_LINES", 20)
    log = Path(herd.config.log_dir) / "Alford.log"
    wait_until(lambda: alford.log.flush() or b"event=state_compact_failed" in log.read_bytes(),
               what="a compaction that failed")

    for path in (filler, small_fs / "top-up"):
        path.unlink()
    wait_until(lambda: alford.status().readiness()[0], 10, what="Alford ready again")
    assert post(client, [iamat(b"marker")])[0].startswith(b"AT Alford ")
    wait_until(lambda: ball.store.get(b"marker") is not None, what="the marker flooded")  # FIFO: refused ones first
    assert not any(line.split()[1] in ball.store or line.split()[1] in alford.store for line in refused)
    wait_until(lambda: alford.log.flush() or b"event=state_compacted" in log.read_bytes(), 10,
               what="compaction resumed")
    assert not alford.stats.crashes and alford.stats.iamat_unwritten >= len(refused)
