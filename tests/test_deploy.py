"""deploy/: the compose file, its herd file and the systemd unit agree with each other and with herd.ini.

No docker or systemd here: these read the files (compose.yaml by its simple, fixed shape).
"""

from __future__ import annotations

import configparser
import re
from pathlib import Path
from typing import Any

from herdserver import config

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def compose_services() -> dict[str, dict[str, str]]:
    """service -> {"command": its first argument, "ports": the ports line}, from compose.yaml."""
    text = (DEPLOY / "compose.yaml").read_text()
    services = text.split("\nservices:\n", 1)[1]
    found = {}
    for block in re.split(r"\n(?=  [a-z]+:\n)", services.strip("\n")):
        name = re.match(r"  ([a-z]+):\n", block + "\n")
        command = re.search(r'command: \["(\w+)", "--config", "/etc/herd/herd.ini"\]', block)
        ports = re.search(r"ports: \[(.*)\]", block)
        assert name and command and ports and "<<: *server" in block, block
        found[name.group(1)] = {"command": command.group(1), "ports": ports.group(1)}
    return found


def test_compose_runs_each_server_of_its_herd_file_under_its_host_name() -> None:
    herd = config.load(DEPLOY / "herd.compose.ini")
    services = compose_services()
    assert {s.host: name for name, s in herd.servers.items()} == {
        service: info["command"] for service, info in services.items()
    }
    assert herd.log_dir == "-"  # docker compose logs


def test_compose_publishes_the_default_herds_ports() -> None:
    default = config.load(DEPLOY.parent / "herd.ini")
    herd = config.load(DEPLOY / "herd.compose.ini")
    for service, info in compose_services().items():
        name = info["command"]
        inside = herd.servers[name]
        outside = default.servers[name]
        assert info["ports"] == (
            f'"127.0.0.1:{outside.port}:{inside.port}", "127.0.0.1:{outside.http_port}:{inside.http_port}"'
        ), service
    text = (DEPLOY / "compose.yaml").read_text()
    assert "/readyz" in text and "healthcheck:" in text
    assert "EXPOSE 12000 13000" in (DEPLOY / "Dockerfile").read_text()


def test_the_systemd_unit_is_hardened_and_restarts() -> None:
    unit = configparser.ConfigParser(interpolation=None, strict=True)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(DEPLOY / "herdserver@.service")
    service = unit["Service"]
    assert service["ExecStart"].endswith("herdserver %i --config /etc/herdserver/herd.ini")
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["Restart"] == "on-failure"
    assert service["NoNewPrivileges"] == "yes" and service["ProtectSystem"] == "strict"
    assert service["StateDirectory"] == "herdserver"
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_compose_keeps_each_servers_state_on_a_volume_and_passes_the_secret() -> None:
    text = (DEPLOY / "compose.yaml").read_text()
    herd = config.load(DEPLOY / "herd.compose.ini")
    assert herd.state_dir == "/var/lib/herdserver" and herd.secret_env == "HERD_SECRET"
    assert "HERD_SECRET: ${HERD_SECRET:?" in text  # required: each container's volume would make its own file
    top_volumes = text.split("\nvolumes:", 1)[1]
    for name in compose_services():
        assert f'"{name}-state:/var/lib/herdserver"' in text
        assert f"\n  {name}-state:" in top_volumes
    assert "HERDSERVER_CACHE_DIR" in (DEPLOY / "Dockerfile").read_text()


PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool"}
PROMETHEUS_OWN = {"up"}  # series Prometheus makes for every target, not in /metrics


def selectors(expr: str) -> list[tuple[str, dict[str, tuple[str, str]]]]:
    """The series an expression selects: (metric, {label: (operator, value)})."""
    expr = re.sub(r"\b(by|without)\s*\([^)]*\)", " ", expr)  # grouping labels
    expr = re.sub(r"\[[^\]]*\]", " ", expr)  # ranges: [5m]
    found = []
    for match in re.finditer(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*(\{[^}]*\})?(\s*\()?", expr):
        name, braces, call = match.groups()
        if call or name in PROMQL_WORDS:
            continue  # a function, an aggregation or an operator word
        matchers = re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"', braces or "")
        found.append((name, {label: (op, value) for label, op, value in matchers}))
    return found


def test_the_alert_rules_name_metrics_a_server_exports(make_herd: Any) -> None:
    import yaml

    from .test_http import scrape

    rules = yaml.safe_load((DEPLOY / "alerts.yml").read_text())
    [group] = rules["groups"]
    alerts = {rule["alert"]: rule for rule in group["rules"]}
    assert {"HerdServerDown", "HerdLinkDown", "HerdPlacesErrors", "HerdStateNotWritable"} <= set(alerts)
    assert alerts["HerdLinkDown"]["for"] == "1m"
    herd = make_herd({"Alford": ["Ball"], "Ball": []}, http=True)
    samples = scrape(herd, "Alford")  # a fresh server: every series a rule uses is there from the start
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("page", "warn") and rule["annotations"]["summary"], name
        used = selectors(rule["expr"])
        assert used, name
        for metric, matchers in used:
            if metric in PROMETHEUS_OWN:
                continue
            series = [dict(labels) for sample, labels in samples if sample == metric]
            assert series, f"{name}: {metric} is not in /metrics"
            for label, (op, value) in matchers.items():
                where = f"{name}: {metric}{{{label}{op}{value!r}}}"
                assert all(label in s for s in series), f"{where}: no such label"
                wanted = op in ("=", "=~")  # a series the matcher keeps must exist
                assert any(bool(re.fullmatch(value, s[label])) == wanted for s in series), f"{where}: selects none"


def test_selectors_are_read_out_of_promql() -> None:
    expr = 'sum by (instance, provider) (rate(herd_x_total{status!~"OK|Z", a="b"}[5m])) / sum(rate(herd_x_total[5m]))'
    assert selectors(expr) == [("herd_x_total", {"status": ("!~", "OK|Z"), "a": ("=", "b")}), ("herd_x_total", {})]
    assert selectors('up{job="herdserver"} == 0') == [("up", {"job": ("=", "herdserver")})]
