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


# The Dask cluster beside Dagster (deploy/dask/daskcluster.yaml) and how the Dagster side reaches it.
# The operator names the scheduler's Service CLUSTER-scheduler and labels the scheduler pod with
# these (dask-kubernetes, operator/controller: build_scheduler_service_spec, build_scheduler_pod_spec).
DASK_SCHEDULER_LABELS = ("dask.org/cluster-name", "dask.org/component")


def helm_values() -> dict:
    return yaml.safe_load((DEPLOY / "helm" / "values.yaml").read_text(encoding="utf-8"))


def code_deployment() -> dict:
    (deployment,) = helm_values()["dagster-user-deployments"]["deployments"]
    return deployment


def dask_cluster() -> dict:
    return yaml.safe_load((DEPLOY / "dask" / "daskcluster.yaml").read_text(encoding="utf-8"))


def dask_containers(cluster: dict) -> dict[str, list[dict]]:
    return {role: cluster["spec"][role]["spec"]["containers"] for role in ("scheduler", "worker")}


def container_env(container: dict) -> dict[str, str]:
    return {entry["name"]: entry.get("value", "") for entry in container.get("env", [])}


def test_the_dask_cluster_has_what_the_operator_requires():
    """The DaskCluster CRD's schema (dask-kubernetes, operator/customresources/templates.yaml):
    spec.scheduler needs a pod spec and a service spec, spec.worker a pod spec and replicas."""
    cluster = dask_cluster()
    assert (cluster["apiVersion"], cluster["kind"]) == ("kubernetes.dask.org/v1", "DaskCluster")
    assert cluster["metadata"]["name"]
    spec = cluster["spec"]
    assert isinstance(spec["worker"]["replicas"], int) and spec["worker"]["replicas"] >= 1
    for role, containers in dask_containers(cluster).items():
        assert containers, f"{role}: no container"
        for container in containers:
            assert container["name"] and container["image"] and container["args"][:2] == ["dask", role], container
    service = spec["scheduler"]["service"]
    assert service["ports"], "the scheduler's Service publishes no port"
    # the Service reaches the scheduler pod only if it selects the labels the operator gives it
    assert service["selector"] == {
        DASK_SCHEDULER_LABELS[0]: cluster["metadata"]["name"],
        DASK_SCHEDULER_LABELS[1]: "scheduler",
    }


def test_dask_runs_the_code_image_of_the_dagster_deployment():
    """Workers unpickle the steps' functions: scheduler, workers and run pods need the same code and dask."""
    image = code_deployment()["image"]
    code_image = f"{image['repository']}:{image['tag']}"
    images = {c["image"] for containers in dask_containers(dask_cluster()).values() for c in containers}
    assert images == {code_image}


def test_the_dagster_pods_address_the_scheduler_service_and_its_port():
    cluster = dask_cluster()
    env = container_env(code_deployment())
    address = re.fullmatch(r"tcp://([a-z0-9.-]+):(\d+)", env["GEMMA_ASSETS_DASK_CLUSTER"])
    assert address, env["GEMMA_ASSETS_DASK_CLUSTER"]
    host, port = address[1].split(".")[0], int(address[2])  # SERVICE or SERVICE.NAMESPACE.svc...
    assert host == f"{cluster['metadata']['name']}-scheduler"
    (service_port,) = [p for p in cluster["spec"]["scheduler"]["service"]["ports"] if p["port"] == port]
    (scheduler,) = dask_containers(cluster)["scheduler"]
    target = {p["name"]: p["containerPort"] for p in scheduler["ports"]}[service_port["targetPort"]]
    assert target == 8786, "the Service's port must lead to the scheduler's comm port (dask scheduler --port)"


def test_dask_workers_run_one_thread_per_process():
    for worker in dask_containers(dask_cluster())["worker"]:
        args = worker["args"]
        assert args[args.index("--nthreads") + 1] == "1", args
        assert "--nworkers" not in args, "one worker process per pod: replicas count the workers"
        assert container_env(worker).get("OMP_NUM_THREADS") == "1"


def test_dask_workers_read_the_store_as_the_run_pods_do():
    """The same secret (AWS credentials for s3://) and the same data volume at the same path."""
    deployment = code_deployment()
    cluster = dask_cluster()
    secrets = {s["name"] for s in deployment["envSecrets"]}
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in deployment["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in deployment["volumeMounts"]}
    worker_claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"] for v in cluster["spec"]["worker"]["spec"]["volumes"]
    }
    for worker in dask_containers(cluster)["worker"]:
        assert {s["secretRef"]["name"] for s in worker["envFrom"]} == secrets
        worker_mounts = {worker_claims[m["name"]]: m["mountPath"] for m in worker["volumeMounts"]}
        assert worker_mounts == {claims[name]: path for name, path in mounts.items()}
        assert container_env(worker)["GEMMA_ASSETS_DATA_ROOT"] == container_env(deployment)["GEMMA_ASSETS_DATA_ROOT"]


def test_the_dask_dashboard_stays_inside_the_cluster():
    """Dask's dashboard has no login, like Dagster's UI: no node port, load balancer or external IP."""
    service = dask_cluster()["spec"]["scheduler"]["service"]
    assert service.get("type", "ClusterIP") == "ClusterIP"
    assert not service.get("externalIPs") and all("nodePort" not in port for port in service["ports"])


def test_compose_gives_the_daemon_every_variable_the_run_launcher_copies():
    """The DockerRunLauncher copies env_vars from the daemon and fails a launch when one is unset."""
    instance = yaml.safe_load((DEPLOY / "dagster.yaml").read_text(encoding="utf-8"))
    copied = instance["run_launcher"]["config"]["env_vars"]
    daemon = compose_services()["daemon"]["environment"]
    assert sorted(set(copied) - set(daemon)) == []
    assert {"GEMMA_ASSETS_DASK_CLUSTER", "GEMMA_ASSETS_DASK_WORKERS", "GEMMA_ASSETS_DASK_THREADS"} <= set(copied)
