"""Operating the logs: SIGHUP reopens (logrotate), log_dir = - (standard output), WHATSAT bodies
only at DEBUG, the one line a server prints on stderr when it is up."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import gevent

from herdserver import logs
from herdserver.core import places_json

from .conftest import LineClient, free_ports, iamat, wait_until

ROOT = Path(__file__).resolve().parent.parent
AT_REPLY = b"AT Alford +0.000000001 kiwi +34.068930-118.445127 1.000000000\n"


def whatsat_reply(status: str = "OK", results: int = 2) -> bytes:
    payload = {"html_attributions": [], "results": [{"name": f"place {i}"} for i in range(results)], "status": status}
    return places_json.format_whatsat_reply(AT_REPLY.rstrip(b"\n"), payload)


def read_log(tmp_path: Path, level: str) -> str:
    log = logs.EventLog("Alford", str(tmp_path / f"{level}.log"), level)
    log.replies(3, [AT_REPLY, whatsat_reply(), b"? hello\n"])
    log.close()
    return (tmp_path / f"{level}.log").read_text()


def test_whatsat_json_is_summarised_at_info(tmp_path: Path) -> None:
    lines = read_log(tmp_path, "INFO").splitlines()
    assert [line.split(" ", 4)[4] for line in lines] == [
        'conn=3 data="AT Alford +0.000000001 kiwi +34.068930-118.445127 1.000000000\\n"',
        'conn=3 data="AT Alford +0.000000001 kiwi +34.068930-118.445127 1.000000000\\n" status=OK results=2',
        'conn=3 data="? hello\\n"',
    ]
    assert all(" INFO Alford event=out " in line for line in lines)


def test_whatsat_json_is_logged_whole_at_debug(tmp_path: Path) -> None:
    lines = read_log(tmp_path, "DEBUG").splitlines()
    assert len(lines) == 3
    assert '\\"results\\": [' in lines[1] and '\\"name\\": \\"place 1\\"' in lines[1]


def test_nothing_at_warning(tmp_path: Path) -> None:
    assert read_log(tmp_path, "WARNING") == ""


def test_whatsat_from_a_real_server_is_summarised(herd: Any) -> None:
    client = herd.client("Alford")
    client.ask(iamat(b"kiwi"))
    client.send(b"WHATSAT kiwi 10 3\n")
    reply = client.read_whatsat()
    results = len(json.loads(reply.split(b"\n", 1)[1])["results"])
    log = herd.servers["Alford"].log
    log.flush()
    text = Path(log.path).read_text()
    assert re.search(rf'event=out conn=\d+ data="AT Alford [^"]+ kiwi [^"]+\\n" status=OK results={results}\n', text)
    assert '\\"results\\"' not in text  # no JSON at INFO


def test_a_server_writes_its_log_once_its_event_loop_falls_idle(herd: Any) -> None:
    """No flush call and no timer of its own: the lines of a request reach the file as soon
    as the server has nothing else to do, and then the buffer is empty."""
    client = herd.client("Alford")
    client.ask(iamat(b"idleflush"))
    log = herd.servers["Alford"].log
    wait_until(lambda: b"idleflush" in Path(log.path).read_bytes() and not log.pending, 5.0,
               what="the IAMAT's lines in the file")  # fmt: skip
    text = Path(log.path).read_text()
    assert re.search(r"event=in conn=\d+ line=\"IAMAT idleflush ", text)
    assert re.search(r"event=out conn=\d+ data=\"AT Alford [^\"]+ idleflush ", text)


def test_reopen_writes_to_a_new_file_after_a_rename(tmp_path: Path) -> None:
    path = tmp_path / "Alford.log"
    log = logs.EventLog("Alford", str(path), "INFO")
    log.info("before")
    log.flush()
    path.rename(tmp_path / "Alford.log.1")
    log.info("still_old")  # buffered: written to the old file by reopen's flush
    log.reopen()
    log.info("after")
    log.close()
    assert "event=before" in (tmp_path / "Alford.log.1").read_text()
    assert "event=still_old" in (tmp_path / "Alford.log.1").read_text()
    assert "event=after" in path.read_text() and "event=before" not in path.read_text()
    assert log.lines_written == 3 and log.lines_dropped == 0


def write_one(tmp_path: Path, log_dir: str) -> tuple[Path, int, int]:
    port, http_port, herd_port = free_ports(3)  # herd_port too: port + 2000 may be taken
    path = tmp_path / "herd.ini"
    path.write_text(
        f"[herd]\nhost = 127.0.0.1\nlog_dir = {log_dir}\n[places]\nprovider = offline\n"
        f"[server:Alford]\nport = {port}\nhttp_port = {http_port}\nherd_port = {herd_port}\n"
    )
    return path, port, http_port


def start(config: Path, **pipes: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "herdserver", "Alford", "--config", str(config)],
        cwd=ROOT, text=True, **pipes,
    )


def read_line(stream: Any, timeout: float = 20) -> str:
    with gevent.Timeout(timeout, AssertionError("no line in time")):
        line: str = stream.readline()
    return line


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_sighup_reopens_the_log_and_the_server_says_it_is_up(tmp_path: Path) -> None:
    config, port, http_port = write_one(tmp_path, "logs")
    proc = start(config, stderr=subprocess.PIPE)
    log = tmp_path / "logs" / "Alford.log"
    try:
        up = read_line(proc.stderr)
        assert up == f"herdserver: Alford up on 127.0.0.1:{port} (http 127.0.0.1:{http_port}), log {log}\n"
        LineClient(("127.0.0.1", port)).ask(iamat(b"first"))
        wait_until(lambda: "first" in log.read_text(), what="the first line logged")
        log.rename(tmp_path / "logs" / "Alford.log.1")  # what logrotate does
        proc.send_signal(signal.SIGHUP)
        wait_until(log.exists, what="a new log file after SIGHUP")
        LineClient(("127.0.0.1", port)).ask(iamat(b"second"))
        wait_until(lambda: "second" in log.read_text(), what="the second line in the new file")
        assert "second" not in (tmp_path / "logs" / "Alford.log.1").read_text()
        assert proc.poll() is None  # SIGHUP did not stop it
    finally:
        stop(proc)
    assert proc.returncode == 0
    assert "event=stop" in log.read_text()


def test_log_dir_dash_logs_to_standard_output(tmp_path: Path) -> None:
    config, port, _ = write_one(tmp_path, "-")
    proc = start(config, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert read_line(proc.stderr).endswith(", log standard output\n")
        assert " INFO Alford event=state_loaded " in read_line(proc.stdout)  # replayed before it listens
        assert " INFO Alford event=start " in read_line(proc.stdout)
        LineClient(("127.0.0.1", port)).ask(iamat(b"kiwi"))
        proc.send_signal(signal.SIGHUP)  # nothing to reopen: harmless
        stop(proc)
        out = proc.stdout.read()
    finally:
        stop(proc)
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == 0
    assert re.search(r" INFO Alford event=in conn=\d+ line=\"IAMAT kiwi ", out)
    assert " INFO Alford event=stop " in out
    assert not (tmp_path / "-").exists() and not list(tmp_path.glob("*.log"))
    assert sorted(os.listdir(tmp_path)) == ["herd.ini", "state"]  # no log files: only the state
