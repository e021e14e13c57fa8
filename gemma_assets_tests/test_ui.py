"""The UI: dagster-webserver on loopback serving the tiny profile, the asset graph and the checks
of a partitioned asset rendered by headless Chromium (screenshot + DOM), and the schedule,
sensors and check statuses seen through GraphQL."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest

from gemma_assets.core.config import load_run_config
from gemma_assets.defs.graph import build_definitions

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# set to 1 to refresh the screenshot kept in the docs
UPDATE_SCREENSHOT_ENV_VAR = "GEMMA_ASSETS_UPDATE_SCREENSHOT"

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium not installed (apt-get install chromium; .ci/run does)"
)

GRAPHQL_QUERY = """{
  assetNodes { assetKey { path } groupName }
  repositoriesOrError { ... on RepositoryConnection { nodes {
    schedules { name scheduleState { status } }
    sensors { name sensorState { status } }
  } } }
}"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def graphql(base: str, query: str) -> dict:
    request = urllib.request.Request(
        f"{base}/graphql", data=json.dumps({"query": query}).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)["data"]


@dataclass(frozen=True)
class Webserver:
    url: str
    home: Path  # $DAGSTER_HOME of its instance
    data_root: Path


@pytest.fixture(scope="module")
def webserver(tmp_path_factory) -> Iterator[Webserver]:
    """dagster-webserver -w workspace.yaml on a free loopback port, in a throwaway instance
    configured by the project's own dagster.yaml (no first-visit dialog)."""
    home, data = tmp_path_factory.mktemp("dagster_home"), tmp_path_factory.mktemp("data")
    shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "GEMMA_ASSETS_PROFILE": "tiny",
        "GEMMA_ASSETS_DATA_ROOT": str(data),
    }
    port = free_port()
    script = Path(sys.executable).with_name("dagster-webserver")
    command = [str(script) if script.exists() else "dagster-webserver", "-h", "127.0.0.1", "-p", str(port)]
    log = (home / "webserver.log").open("w")
    server = subprocess.Popen(
        [*command, "-w", "workspace.yaml"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:  # up once the server answers and the code location has loaded
            assert server.poll() is None, (home / "webserver.log").read_text()[-3000:]
            try:
                if graphql(base, "{ assetNodes { id } }")["assetNodes"]:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "webserver did not come up in 180 s"
            time.sleep(1)
        yield Webserver(base, home, data)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def chromium(url: str, profile_dir: Path, *action: str) -> subprocess.CompletedProcess:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={profile_dir}",
        # wide enough for the graph to be drawn with readable asset names
        "--window-size=2400,3200",
        "--virtual-time-budget=30000",
    ]
    return subprocess.run([CHROMIUM, *flags, *action, url], capture_output=True, text=True, timeout=180, check=True)


def test_asset_graph_page(webserver, tmp_path):
    data = graphql(webserver.url, GRAPHQL_QUERY)
    nodes = {"/".join(node["assetKey"]["path"]): node["groupName"] for node in data["assetNodes"]}
    assets = [key.to_user_string() for key in tiny_definitions(webserver).resolve_asset_graph().get_all_asset_keys()]
    assert set(assets) == set(nodes)
    [repository] = data["repositoriesOrError"]["nodes"]
    states = {s["name"]: s["scheduleState"]["status"] for s in repository["schedules"]}
    states |= {s["name"]: s["sensorState"]["status"] for s in repository["sensors"]}
    expected = {
        "nightly_activations": "RUNNING",
        "check_failure_alerts": "RUNNING",
        "default_automation_condition_sensor": "RUNNING",
    }
    assert expected.items() <= states.items()  # on by default, no click needed

    # the global lineage page with every group expanded (the UI's group ids: global@global:<group>)
    expanded = ",".join(f"global@global:{group}" for group in sorted(set(nodes.values())))
    url = f"{webserver.url}/asset-groups?expanded={expanded}"
    screenshot = tmp_path / "asset_graph.png"
    chromium(url, tmp_path / "chrome-1", f"--screenshot={screenshot}")
    png = screenshot.read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 30_000  # a rendered page, not a blank one
    dom = chromium(url, tmp_path / "chrome-2", "--dump-dom").stdout
    assert "Global asset lineage" in dom
    for asset in assets:
        assert f">{asset}<" in dom, asset  # drawn as a node of the graph
    if os.environ.get(UPDATE_SCREENSHOT_ENV_VAR) == "1":
        shutil.copy(screenshot, ROOT / "docs" / "ui_asset_graph.png")


def tiny_definitions(webserver: Webserver) -> dg.Definitions:
    return build_definitions(load_run_config("tiny"), data_root=str(webserver.data_root))


CHECKS_QUERY = """{ assetNodeOrError(assetKey: {path: ["activations"]}) { ... on AssetNode {
  assetChecksOrError { ... on AssetChecks { checks {
    name
    executionForLatestMaterialization { status }
    partitionStatuses { ... on AssetCheckDefaultPartitionStatuses {
      succeededPartitions skippedPartitions failedPartitions inProgressPartitions executionFailedPartitions } }
  } } }
} } }"""


def test_each_partition_shows_its_own_passed_checks(webserver, tmp_path):
    """One run extracts every partition (as `gemma-assets materialize` and the schedule do); the
    Checks tab then shows both activation checks passed, on every partition, none "Skipped"."""
    from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

    defs, keys = tiny_definitions(webserver), load_run_config("tiny").partition_keys
    with dg.DagsterInstance.from_config(str(webserver.home)) as instance:
        sample = [dg.AssetKey("pile_sample")]
        assert defs.resolve_job_def("analyse").execute_in_process(instance=instance, asset_selection=sample).success
        span = {ASSET_PARTITION_RANGE_START_TAG: keys[0], ASSET_PARTITION_RANGE_END_TAG: keys[-1]}
        assert defs.resolve_job_def("extract_activations").execute_in_process(instance=instance, tags=span).success
    node = graphql(webserver.url, CHECKS_QUERY)["assetNodeOrError"]
    checks = {check["name"]: check for check in node["assetChecksOrError"]["checks"]}
    assert set(checks) == {"activations_integrity", "activations_finite"}
    for name, check in checks.items():
        statuses = check["partitionStatuses"]
        assert sorted(statuses.pop("succeededPartitions")) == keys, name
        assert not any(statuses.values()), (name, statuses)
        assert check["executionForLatestMaterialization"]["status"] == "SUCCEEDED", name
    dom = chromium(f"{webserver.url}/assets/activations?view=checks", tmp_path / "chrome", "--dump-dom").stdout
    assert "activations_integrity" in dom and "activations_finite" in dom
    assert "Skipped" not in dom and "Passed" in dom


def test_a_run_page_shows_the_steps_progress_lines(webserver, tmp_path):
    """The run page's log (what a user watches in `dagster dev`) holds the step's progress
    lines: the task, its position as i/n, and its wall time once done."""
    defs = tiny_definitions(webserver)
    with dg.DagsterInstance.from_config(str(webserver.home)) as instance:
        sample = [dg.AssetKey("pile_sample")]
        result = defs.resolve_job_def("analyse").execute_in_process(instance=instance, asset_selection=sample)
    assert result.success
    n_windows = load_run_config("tiny").sampling.n_windows
    dom = chromium(f"{webserver.url}/runs/{result.run_id}", tmp_path / "chrome", "--dump-dom").stdout
    assert f"sampling windows from the corpus: 0/{n_windows} windows, started" in dom
    assert f"sampling windows from the corpus: {n_windows}/{n_windows} windows" in dom and "done in" in dom
