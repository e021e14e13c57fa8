"""The deployments publish the UI, which has no login, on loopback or inside the cluster only."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any

import yaml

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def with_defaults(text: str) -> str:
    """Compose's `${VAR:-default}` / `${VAR-default}` / `${VAR}` as they read with VAR unset."""
    return re.sub(r"\$\{\w+(?::?-([^}]*))?\}", lambda match: match[1] or "", text)


def host_address(port: Any) -> str:
    """The host address a compose port publishes on by default; "" is every interface."""
    if isinstance(port, dict):  # long syntax: target, published, host_ip, protocol
        return with_defaults(str(port.get("host_ip", "")))
    parts = with_defaults(str(port)).split("/")[0].rsplit(":", 2)  # [HOST_IP:][HOST:]CONTAINER
    return parts[0].strip("[]") if len(parts) == 3 else ""


def on_every_interface(address: str) -> bool:
    return not address or ipaddress.ip_address(address).is_unspecified


def compose_services() -> dict[str, dict]:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text(encoding="utf-8"))["services"]


def test_compose_publishes_the_webserver_on_loopback_by_default():
    ports = compose_services()["webserver"].get("ports", [])
    assert ports, "the webserver publishes no port: the UI would be unreachable"
    for port in ports:
        address = host_address(port)
        assert not on_every_interface(address) and ipaddress.ip_address(address).is_loopback, port


def test_compose_publishes_no_port_on_every_interface_by_default():
    published = {(name, str(port)) for name, service in compose_services().items() for port in service.get("ports", [])}
    exposed = sorted((name, port) for name, port in published if on_every_interface(host_address(port)))
    assert not exposed, f"published on every interface of the host: {exposed}"


def test_port_reading_resolves_defaults_and_forms():
    assert host_address("${GEMMA_ASSETS_UI_BIND:-127.0.0.1}:3000:3000") == "127.0.0.1"
    assert host_address("${UI_BIND-::1}:3000:3000/tcp") == "::1"
    assert host_address("[::1]:3000:3000") == "::1"
    assert on_every_interface(host_address("3000:3000"))
    assert on_every_interface(host_address("${UI_BIND}:3000:3000"))
    assert on_every_interface(host_address("0.0.0.0:3000:3000"))
    assert on_every_interface(host_address({"target": 3000, "published": 3000}))
    assert host_address({"target": 3000, "published": 3000, "host_ip": "127.0.0.1"}) == "127.0.0.1"


def test_helm_keeps_the_webserver_service_inside_the_cluster():
    values = yaml.safe_load((DEPLOY / "helm" / "values.yaml").read_text(encoding="utf-8"))
    assert values["dagsterWebserver"]["service"]["type"] == "ClusterIP"
