"""Operations: the nightly schedule, the check-failure alert sensor (real HTTP), a PostgreSQL
instance (real server) and the deployment files. No mocks; each test takes seconds."""

import datetime
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import import_module
from importlib.metadata import entry_points
from pathlib import Path
from urllib.parse import urlsplit

import click
import dagster as dg
import pytest
import yaml
from dagster._core.definitions.schedule_definition import ScheduleExecutionData
from dagster._core.instance.config import dagster_instance_config
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from gemma_assets.core.config import load_run_config
from gemma_assets.defs.graph import build_definitions
from gemma_assets.defs.operations import build_check_alert_sensor, build_extraction_schedule, contiguous_ranges
from gemma_assets.defs.resources import (
    ALERT_WEBHOOK_ENV_VAR,
    PARTITIONS_PER_NIGHT_ENV_VAR,
    PARTITIONS_PER_RUN_ENV_VAR,
    OperationsResource,
)

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
SECRET = "T000-B000-not-a-real-token"  # path part of the test webhook URL: must never leak


def ranges(data: ScheduleExecutionData) -> list[tuple[str, str]]:
    return [
        (request.tags[ASSET_PARTITION_RANGE_START_TAG], request.tags[ASSET_PARTITION_RANGE_END_TAG])
        for request in data.run_requests or []
    ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------------- schedule


@pytest.fixture(scope="module")
def tiny_defs(tmp_path_factory) -> dg.Definitions:
    return build_definitions(load_run_config("tiny"), data_root=str(tmp_path_factory.mktemp("data")))


def test_contiguous_ranges():
    order = [f"{i:04d}" for i in range(8)]
    assert contiguous_ranges(["0005", "0000", "0001", "0003", "0006"], order) == [
        ("0000", "0001"),
        ("0003", "0003"),
        ("0005", "0006"),
    ]
    assert contiguous_ranges([], order) == []
    assert contiguous_ranges(order[:5], order, max_len=2) == [("0000", "0001"), ("0002", "0003"), ("0004", "0004")]


def test_schedule_requests_only_missing_partitions(tiny_defs):
    activations = tiny_defs.resolve_assets_def("activations")
    keys = load_run_config("tiny").partition_keys  # 0000..0003
    schedule = build_extraction_schedule(activations)
    operations = {"operations": OperationsResource(partitions_per_night=3)}
    with dg.instance_for_test() as instance:

        def tick() -> ScheduleExecutionData:  # evaluate_tick validates like the daemon does
            return scheduled(schedule, instance, operations)

        assert "pile_sample" in tick().skip_message  # extraction needs the token windows first
        instance.report_runless_asset_event(dg.AssetMaterialization(asset_key="pile_sample"))
        assert ranges(tick()) == [("0000", "0002")]  # the first N, one run (one model load)

        instance.report_runless_asset_event(dg.AssetMaterialization(asset_key="activations", partition="0001"))
        assert ranges(tick()) == [("0000", "0000"), ("0002", "0003")]

        # a queued run for 0002..0003 (planned materialisations) is not asked for again
        job = tiny_defs.resolve_job_def("extract_activations")
        instance.create_run_for_job(
            job,
            tags={ASSET_PARTITION_RANGE_START_TAG: "0002", ASSET_PARTITION_RANGE_END_TAG: "0003"},
            asset_selection=frozenset([activations.key]),
        )
        assert ranges(tick()) == [("0000", "0000")]

        for key in keys:
            instance.report_runless_asset_event(dg.AssetMaterialization(asset_key="activations", partition=key))
        data = tick()
        assert not data.run_requests and "all 4 activation partitions" in data.skip_message


def test_scheduler_daemon_queues_range_runs(tmp_path, monkeypatch):
    """The daemon's own scheduler loop (code server and all) turns a night's tick into queued,
    retryable range runs, and the next night asks for none of those partitions again."""
    from dagster._core.test_utils import create_test_daemon_workspace_context, freeze_time
    from dagster._core.workspace.load_target import ModuleTarget
    from dagster._scheduler.scheduler import launch_scheduled_runs

    monkeypatch.setenv("GEMMA_ASSETS_PROFILE", "tiny")
    monkeypatch.setenv("GEMMA_ASSETS_DATA_ROOT", str(tmp_path))
    target = ModuleTarget(
        module_name="gemma_assets.definitions",
        attribute=None,
        working_directory=str(ROOT),
        location_name="gemma_assets",
    )
    queued = {"run_coordinator": {"module": "dagster._core.run_coordinator", "class": "QueuedRunCoordinator"}}
    with dg.instance_for_test(overrides=queued) as instance:
        instance.report_runless_asset_event(dg.AssetMaterialization(asset_key="pile_sample"))
        instance.report_runless_asset_event(dg.AssetMaterialization(asset_key="activations", partition="0001"))
        with create_test_daemon_workspace_context(target, instance) as workspace:

            def iterate(when: datetime.datetime) -> None:
                with freeze_time(when):
                    list(launch_scheduled_runs(workspace, logging.getLogger("scheduler"), when, {}))

            night = datetime.datetime(2030, 1, 1, 1, 59, tzinfo=datetime.timezone.utc)
            iterate(night)  # the schedule is seen (running by default) before its first tick
            iterate(night + datetime.timedelta(minutes=2))
            runs = instance.get_runs()
            assert {r.status for r in runs} == {dg.DagsterRunStatus.QUEUED}
            assert {
                (r.job_name, r.tags[ASSET_PARTITION_RANGE_START_TAG], r.tags[ASSET_PARTITION_RANGE_END_TAG])
                for r in runs
            } == {
                ("extract_activations", "0000", "0000"),
                ("extract_activations", "0002", "0003"),
            }
            assert all(r.tags["dagster/max_retries"] == "2" for r in runs)
            iterate(night + datetime.timedelta(days=1, minutes=2))  # still queued: nothing new
            assert len(instance.get_runs()) == 2


def test_schedule_in_definitions(tiny_defs, monkeypatch):
    schedule = tiny_defs.resolve_schedule_def("nightly_activations")
    assert schedule.job_name == "extract_activations"
    assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING
    assert dg.Definitions.validate_loadable(tiny_defs) is None
    with dg.instance_for_test() as instance:
        instance.report_runless_asset_event(dg.AssetMaterialization(asset_key="pile_sample"))
        defaults = {"operations": tiny_defs.resources["operations"]}
        data = scheduled(schedule, instance, defaults)
        assert ranges(data) == [("0000", "0003")]  # default N (8) covers the tiny profile
        monkeypatch.setenv(PARTITIONS_PER_NIGHT_ENV_VAR, "3")
        monkeypatch.setenv(PARTITIONS_PER_RUN_ENV_VAR, "2")  # e.g. two GPUs: two runs in parallel
        capped = {"operations": build_definitions(load_run_config("tiny"), "/nonexistent").resources["operations"]}
        data = scheduled(schedule, instance, capped)
        assert ranges(data) == [("0000", "0001"), ("0002", "0002")]


def test_automation_sensor_and_retry_tags(tiny_defs):
    sensor = tiny_defs.resolve_sensor_def("default_automation_condition_sensor")
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING  # Dagster's own default is STOPPED
    targeted = sensor.asset_selection.resolve(tiny_defs.resolve_asset_graph())
    assert {dg.AssetKey("activation_stats"), dg.AssetKey("comparison_report")} <= targeted
    assert tiny_defs.resolve_sensor_def("check_failure_alerts").default_status == dg.DefaultSensorStatus.RUNNING
    assert tiny_defs.resolve_job_def("extract_activations").tags["dagster/max_retries"] == "2"
    assert tiny_defs.resolve_job_def("analyse").tags["dagster/retry_on_asset_or_op_failure"] == "false"


# ------------------------------------------------------------------------------ alert sensor

PARTS = dg.StaticPartitionsDefinition(["a", "b", "c"])


@dg.asset(partitions_def=PARTS, backfill_policy=dg.BackfillPolicy.single_run())
def toy(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    return dg.MaterializeResult(metadata={"partitions": len(context.partition_keys)})


@dg.asset_check(asset=toy, partitions_def=PARTS, description="toy partitions are fine")
def toy_partition_ok(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    bad = [key for key in context.partition_keys if key == "b"]  # one result per run, like ours
    return dg.AssetCheckResult(passed=not bad, description=f"broken: rematerialise partition {', '.join(bad)}")


@dg.asset
def plain() -> None:
    pass


@dg.asset_check(asset=plain, blocking=True)
def plain_ok() -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=False, description="plain is wrong: rematerialise plain")


class Webhook:
    """A real HTTP endpoint on loopback that records the JSON bodies POSTed to it."""

    def __init__(self) -> None:
        self.received: list[dict] = []
        self.status = 200
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                hook.received.append({"path": self.path, "json": json.loads(body)})
                self.send_response(hook.status)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/services/{SECRET}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    yield hook
    hook.close()


def store_failed_checks(instance: dg.DagsterInstance, capfd: pytest.CaptureFixture) -> None:
    """One green run with a failed non-blocking check (partition b), one run failed by a
    blocking check. Their own logs are dropped so that what follows is the sensor's."""
    assert dg.materialize([toy, toy_partition_ok], partition_key="b", instance=instance).success
    assert not dg.materialize([plain, plain_ok], instance=instance, raise_on_error=False).success
    capfd.readouterr()


def scheduled(schedule: dg.ScheduleDefinition, instance: dg.DagsterInstance, resources: dict):
    """A tick as the daemon evaluates it, the context closed after (it holds the resources)."""
    with dg.build_schedule_context(instance=instance, resources=resources) as context:
        return schedule.evaluate_tick(context)


def sensed(sensor: dg.SensorDefinition, instance: dg.DagsterInstance, resources: dict, cursor: str | None = None):
    with dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources) as context:
        return sensor(context)


def from_env() -> dict[str, OperationsResource]:
    return {"operations": OperationsResource.from_environment()}


def sensor_log(capfd: pytest.CaptureFixture) -> str:
    """What the sensor's logger wrote (to stderr, as in the daemon's tick log)."""
    return capfd.readouterr().err


def test_alert_sensor_posts_failed_checks_once(webhook, monkeypatch, capfd):
    sensor = build_check_alert_sensor()
    monkeypatch.setenv(ALERT_WEBHOOK_ENV_VAR, webhook.url)
    # the webhook, a secret, is resource config read through dg.EnvVar: only the name is kept
    operations = {"operations": OperationsResource.from_environment()}
    assert SECRET not in json.dumps(operations["operations"]._get_non_default_public_field_values())
    with dg.instance_for_test() as instance:
        store_failed_checks(instance, capfd)
        webhook.status = 500  # delivery fails: the cursor stays, the alert is retried next tick
        failed = sensed(sensor, instance, operations)
        logs = sensor_log(capfd)
        assert failed.cursor is None and len(webhook.received) == 1
        assert "delivery failed: HTTP 500" in logs and "2 asset check(s) failed" in logs

        webhook.status = 200
        result = sensed(sensor, instance, operations)
        logs += sensor_log(capfd)
        assert len(webhook.received) == 2 and webhook.received[1]["path"] == f"/services/{SECRET}"
        body = webhook.received[1]["json"]
        assert set(body) == {"text"}  # Slack incoming-webhook shape
        assert "toy / toy_partition_ok (partition b)" in body["text"] and "rematerialise partition b" in body["text"]
        assert "plain / plain_ok" in body["text"] and "blocking" in body["text"]
        assert "toy / toy_partition_ok (partition b)" in logs  # always in the sensor's log too

        again = sensed(sensor, instance, operations, result.cursor)
        assert len(webhook.received) == 2 and again.cursor == result.cursor  # not re-sent

        assert dg.materialize([toy, toy_partition_ok], partition_key="c", instance=instance).success
        passing = sensed(sensor, instance, operations, result.cursor)
        assert len(webhook.received) == 2 and int(passing.cursor) > int(result.cursor)

        outputs = [logs, sensor_log(capfd), result.cursor, passing.cursor, str(failed.skip_reason)]
        assert not any(SECRET in output for output in outputs)


def test_alert_sensor_without_webhook_only_logs(webhook, monkeypatch, capfd):
    monkeypatch.delenv(ALERT_WEBHOOK_ENV_VAR, raising=False)
    with dg.instance_for_test() as instance:
        store_failed_checks(instance, capfd)
        result = sensed(build_check_alert_sensor(), instance, from_env())
    assert webhook.received == [] and result.cursor is not None
    assert "plain / plain_ok" in sensor_log(capfd) and "no webhook" in result.skip_reason.skip_message


def test_bad_webhook_url_is_not_logged(monkeypatch, capfd):
    monkeypatch.setenv(ALERT_WEBHOOK_ENV_VAR, f"hooks.example.invalid/{SECRET}")  # no scheme
    with dg.instance_for_test() as instance:
        store_failed_checks(instance, capfd)
        result = sensed(build_check_alert_sensor(), instance, from_env())
    logs = sensor_log(capfd)
    assert result.cursor is None and "not an http(s) URL" in logs and SECRET not in logs


# -------------------------------------------------------------------------------- PostgreSQL


def postgres_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parts[-3]))
    return found[-1].parent if found else None


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL server on loopback (as the `postgres` user when run as root)."""
    bindir = postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries not installed (apt-get install postgresql; .ci/run does)")
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    root = Path(tempfile.mkdtemp(prefix="gemma_pg_"))  # not under pytest's root-only tmp dirs
    if as_postgres:
        shutil.chown(root, "postgres", "postgres")
    data, port = root / "data", free_port()

    def run(*args: str) -> None:
        subprocess.run([*as_postgres, *args], check=True, capture_output=True, timeout=120)

    try:
        run(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
        run(str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start")
        run(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "dagster_test")
        yield f"postgresql://postgres@127.0.0.1:{port}/dagster_test"
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run([*as_postgres, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"])
        shutil.rmtree(root, ignore_errors=True)


def test_postgres_instance_records_partitioned_runs(postgres_url, tmp_path, monkeypatch):
    """deploy/dagster.yaml's storage section, pointed at the throwaway server."""
    monkeypatch.delenv(ALERT_WEBHOOK_ENV_VAR, raising=False)
    server = urlsplit(postgres_url)
    for name, value in [("USER", "postgres"), ("PASSWORD", "unused"), ("DB", server.path.lstrip("/"))]:
        monkeypatch.setenv(f"DAGSTER_POSTGRES_{name}", value)
    storage = yaml.safe_load((DEPLOY / "dagster.yaml").read_text())["storage"]
    storage["postgres"]["postgres_db"].update(hostname=server.hostname, port=server.port)
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump({"storage": storage}))
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        tags = {ASSET_PARTITION_RANGE_START_TAG: "a", ASSET_PARTITION_RANGE_END_TAG: "b"}  # one run, two partitions
        result = dg.materialize([toy, toy_partition_ok], instance=instance, tags=tags)
        assert result.success
        [record] = instance.get_run_records(dg.RunsFilter(run_ids=[result.run_id]))
        assert record.dagster_run.status == dg.DagsterRunStatus.SUCCESS
        assert instance.get_materialized_partitions(toy.key) == {"a", "b"}
        [failed] = [e for e in result.get_asset_check_evaluations() if not e.passed]
        assert "rematerialise partition b" in failed.description

        # the operations work on this storage too: the schedule asks for c only, the sensor
        # finds the failed check of partition b
        schedule = build_extraction_schedule(toy, job_name="toy_job")
        data = scheduled(schedule, instance, from_env())
        assert ranges(data) == [("c", "c")]
        alert = sensed(build_check_alert_sensor(), instance, from_env())
        assert alert.cursor is not None and "1 failed check" in alert.skip_reason.skip_message


# ----------------------------------------------------------------------- instance and deploy


def test_dagster_yaml_loads(tmp_path):
    shutil.copy(ROOT / "dagster.yaml", tmp_path / "dagster.yaml")
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        assert instance.run_retries_enabled and instance.run_retries_max_retries == 2
        assert instance.run_monitoring_enabled
        assert instance.get_concurrency_config().pool_config.default_pool_limit == 1  # the gpu pool


def test_deploy_yaml_files_parse():
    files = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])
    assert len(files) >= 4
    for path in files:
        assert list(yaml.safe_load_all(path.read_text())), path


def test_deploy_instance_config_matches_schemas(monkeypatch):
    for name in ("DAGSTER_POSTGRES_USER", "DAGSTER_POSTGRES_PASSWORD", "DAGSTER_POSTGRES_DB"):
        monkeypatch.setenv(name, "dagster")
    config, _ = dagster_instance_config(str(DEPLOY))  # the instance schema (raises if invalid)
    assert config["run_retries"]["enabled"] and config["run_retries"]["max_retries"] == 2

    from dagster._config import process_config, resolve_to_config_type
    from dagster_postgres import DagsterPostgresStorage

    storage = process_config(
        resolve_to_config_type(DagsterPostgresStorage.config_type()), config["storage"]["postgres"]
    )
    assert storage.success, storage.errors
    # the other pluggable classes: validate where importable here, else the image must install them
    image_packages = (DEPLOY / "Dockerfile.dagster").read_text()
    for section in ("run_launcher", "compute_logs", "run_coordinator"):
        entry = config[section]
        try:
            module = __import__(entry["module"], fromlist=[entry["class"]])
        except ImportError:
            assert entry["module"].replace("_", "-") in image_packages, entry["module"]
            continue
        cls = getattr(module, entry["class"])
        checked = process_config(resolve_to_config_type(cls.config_type()), entry.get("config") or {})
        assert checked.success, (section, checked.errors)


def compose_commands(compose: dict) -> list[list[str]]:
    commands = []
    for service in compose["services"].values():
        for key in ("entrypoint", "command"):
            if isinstance(service.get(key), list):
                commands.append(service[key])
        test = service.get("healthcheck", {}).get("test", [])
        if test and test[0] == "CMD":
            commands.append(test[1:])
    return commands


def test_compose_services_and_commands_exist():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    for name, service in compose["services"].items():
        if "build" in service:
            context = (DEPLOY / service["build"]["context"]).resolve()
            assert (context / service["build"]["dockerfile"]).is_file(), name
    # files the webserver/daemon image copies from its context (deploy/)
    for line in (DEPLOY / "Dockerfile.dagster").read_text().splitlines():
        if line.startswith("COPY "):
            assert all((DEPLOY / source).is_file() for source in line.split()[1:-1]), line

    code_cmd = re.search(r"^CMD (\[.*\])$", (DEPLOY / "Dockerfile").read_text(), re.M)
    commands = [*compose_commands(compose), json.loads(code_cmd.group(1))]
    assert {command[0] for command in commands} >= {"dagster", "dagster-webserver", "dagster-daemon"}
    scripts = {entry.name: entry for entry in entry_points(group="console_scripts")}
    for command in commands:
        # the installed console script's module holds its click command as `cli`
        cli: click.Command = import_module(scripts[command[0]].module).cli
        args = command[1:]
        while isinstance(cli, click.Group) and args:
            sub = cli.get_command(click.Context(cli), args[0])
            if sub is None:
                break
            cli, args = sub, args[1:]
        assert not isinstance(cli, click.Group), command  # resolved to a real subcommand
        cli.make_context(command[0], list(args))  # parses the options: raises on an unknown one
