"""The herd page in a real headless Chromium, against a live three-server herd of real processes.

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them) and
Selenium (the ``[test]`` extra). Without the browser the test skips, except under CI.
``HERD_PAGE_SCREENSHOT=PATH`` also saves a screenshot there (docs/herd-page.png is made so).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from .conftest import TEST_KEY, LineClient, free_ports, iamat, wait_until

ROOT = Path(__file__).resolve().parent.parent
NAMES = ("Alford", "Ball", "Hamilton")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
WAIT = 15.0  # seconds the page gets to show a change (it refreshes every second)


def _browser_missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"{path} is missing (apt-get install chromium chromium-driver)"
    return None


@pytest.fixture
def browser(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    missing = _browser_missing()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser test: {missing}")
        pytest.skip(missing)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must never try to download a driver
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1360,900", "--no-first-run", "--disable-extensions"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


class LiveHerd:
    """Three real server processes on free loopback ports, stopped by PID."""

    def __init__(self, tmp_path: Path):
        ports = free_ports(3 * len(NAMES) + 1)  # herd ports too: port + 2000 may be taken
        self.ports = dict(zip(NAMES, ports[:3], strict=True))
        self.http_ports = dict(zip(NAMES, ports[3:6], strict=True))
        self.herd_ports = dict(zip(NAMES, ports[6:9], strict=True))
        unused = ports[9]  # nothing listens there: Places answers "connection refused" at once
        text = (
            "[herd]\nlog_dir = logs\n\n"
            f"[places]\nprovider = google\napi_key_env = HERD_TEST_KEY\nbase_url = http://127.0.0.1:{unused}\n"
            "timeout = 1\n\n[peers]\nbackoff_max = 0.2\n"
        )
        neighbors = {"Alford": "Ball, Hamilton", "Ball": "Hamilton", "Hamilton": ""}
        for name in NAMES:
            text += (f"\n[server:{name}]\nport = {self.ports[name]}\nhttp_port = {self.http_ports[name]}\n"
                     f"herd_port = {self.herd_ports[name]}\nneighbors = {neighbors[name]}\n")
        self.config = tmp_path / "herd.ini"
        self.config.write_text(text)
        env = dict(os.environ, HERD_TEST_KEY=TEST_KEY)
        self.procs = {
            name: subprocess.Popen(
                [sys.executable, "-m", "herdserver", name, "--config", str(self.config)],
                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            for name in NAMES
        }

    def url(self, name: str, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.http_ports[name]}{path}"

    def ready(self, name: str) -> bool:
        try:
            return requests.get(self.url(name, "/readyz"), timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def stop(self, name: str) -> None:
        proc = self.procs[name]
        proc.send_signal(signal.SIGTERM)  # by PID: the process this test started
        assert proc.wait(timeout=10) == 0

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


@pytest.fixture
def live_herd(tmp_path: Path) -> Iterator[LiveHerd]:
    herd = LiveHerd(tmp_path)
    try:
        wait_until(lambda: all(herd.ready(n) for n in NAMES), timeout=20, what="three servers ready")
        yield herd
    finally:
        herd.close()


def test_the_page_shows_the_herd_a_new_record_and_a_link_going_down(browser: Any, live_herd: LiveHerd) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def shows(css: str, text: str | None = None) -> Any:
        """The page has an element matching ``css`` (with this text): read in one script, since
        the page redraws every second and an element found by Selenium may be gone a moment later."""
        def check(driver: Any) -> bool:
            texts = driver.execute_script(
                "return Array.from(document.querySelectorAll(arguments[0]), e => e.textContent.trim())", css
            )
            return bool(texts) and (text is None or text in texts)
        return check

    wait = WebDriverWait(browser, WAIT, poll_frequency=0.1)
    browser.get(live_herd.url("Alford"))
    wait.until(shows("#self", "Alford"))
    for name in NAMES:
        wait.until(shows(f'#servers tr[data-server="{name}"] td.records', "0"))
    for pair in ("Alford|Ball", "Alford|Hamilton", "Ball|Hamilton"):
        wait.until(shows(f'#graph line[data-link="{pair}"][data-state="up"]'))
    wait.until(shows("#events li[data-event=link_up]"))

    at = LineClient(("127.0.0.1", live_herd.ports["Ball"])).ask(iamat(b"kiwi.cs.ucla.edu")).decode().strip()
    for name in NAMES:  # Ball made it; the flood brought it to the other two
        wait.until(shows(f'#servers tr[data-server="{name}"] td.records', "1"))
    wait.until(shows('#graph g[data-node="Hamilton"] text.small', "1 rec"))

    alford = LineClient(("127.0.0.1", live_herd.ports["Alford"]))
    alford.send(b"WHATSAT kiwi.cs.ucla.edu 10 3\n")  # Places refuses the connection: an error
    assert b'"status": "UNKNOWN_ERROR"' in alford.read_whatsat()
    wait.until(shows('#servers tr[data-server="Alford"] td', "100% of 1"))

    browser.find_element(By.ID, "client-id").send_keys("kiwi.cs.ucla.edu")
    browser.find_element(By.CSS_SELECTOR, "#lookup button").click()
    for name in NAMES:
        wait.until(shows(f'#lookup-result tr[data-server="{name}"] td', at))

    live_herd.stop("Hamilton")
    wait.until(shows('#links li[data-link="Alford|Hamilton"][data-state="down"]'))
    wait.until(shows('#graph line[data-link="Ball|Hamilton"][data-state="down"]'))
    wait.until(shows('#graph g[data-node="Hamilton"][data-state="unreachable"]'))
    wait.until(shows('#servers tr[data-server="Hamilton"] .pill', "unreachable"))
    wait.until(shows("#events li[data-event=link_down]"))
    wait.until(shows('#graph line[data-link="Alford|Ball"][data-state="up"]'))
    if os.environ.get("HERD_PAGE_SCREENSHOT"):
        browser.save_screenshot(os.environ["HERD_PAGE_SCREENSHOT"])
