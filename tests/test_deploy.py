"""deploy/: the compose file, its herd file and the systemd unit agree with each other and with herd.ini.

No docker or systemd here: these read the files (compose.yaml by its simple, fixed shape).
"""

from __future__ import annotations

import configparser
import re
from pathlib import Path

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
    assert "HERD_SECRET: ${HERD_SECRET:-}" in text
    top_volumes = text.split("\nvolumes:", 1)[1]
    for name in compose_services():
        assert f'"{name}-state:/var/lib/herdserver"' in text
        assert f"\n  {name}-state:" in top_volumes
    assert "HERDSERVER_CACHE_DIR" in (DEPLOY / "Dockerfile").read_text()
