"""A data root on object storage: a real S3 server on loopback (moto's server mode) with s3fs
pointed at it. The tiny run materialises there end to end through the command line, a second
run finds everything up to date, a fresh working copy (another machine, no shared volume) gets
every artefact back from the bucket, and an object deleted there is found like a deleted file;
a commit cut short leaves the previous one in force, and a damaged commit is named."""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import dagster as dg
import fsspec
import pytest
from lock_holder import process_holding
from moto.server import ThreadedMotoServer
from quick import QUICK_OVERRIDES, quick_flags

from gemma_assets.core.config import ConfigError, load_run_config
from gemma_assets.core.layout import WORKING_COPY_ENV_VAR, MissingArtefact, RunLayout
from gemma_assets.core.remote import ARTEFACTS, committed_assets, crc32_of, pull, push
from gemma_assets.core.storage import COMMIT_FILE, StorageError
from gemma_assets.defs.graph import build_definitions
from gemma_assets.defs.recovery import PID_TAG
from gemma_assets.runner.errors import EXIT_CONFIG
from gemma_assets.runner.lock import LOCK_FILE, RunBusy, remote_run_lock

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "gemma-runs"
DATA_ROOT = f"s3://{BUCKET}/nightly"
# every asset that commits artefacts (all but the activations, whose store is on the remote itself)
COMMITTING = {
    "pile_sample",
    "activation_stats",
    "whitening",
    "cluster_models",
    "cluster_density",
    "leader_clusters",
    "itda_dictionaries",
    "sae_dictionary",
    "sae_evaluation",
    "downstream_loss",
    "interpretation",
    "comparison_report",
}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class RemoteRun:
    env: dict[str, str]  # of the command line: the S3 server, its credentials, the Dagster home
    home: Path
    working_copy: Path
    first: subprocess.CompletedProcess
    first_pid: int
    second: subprocess.CompletedProcess
    second_pid: int


def _materialize(env: dict[str, str], *args: str) -> tuple[subprocess.CompletedProcess, int]:
    command = [sys.executable, "-m", "gemma_assets.cli", "materialize", "--config", "tiny", *quick_flags(), *args]
    process = subprocess.Popen(
        [*command, "--log-level", "WARNING"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    out, _ = process.communicate(timeout=900)
    return subprocess.CompletedProcess(process.args, process.returncode, out.decode()), process.pid


@pytest.fixture(scope="module")
def s3_env() -> Iterator[dict[str, str]]:
    """An S3 server on loopback with the bucket, and the environment that points s3fs at it
    (set in this process too while the module runs)."""
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    s3 = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_EC2_METADATA_DISABLED": "true",  # never ask a cloud's metadata address for credentials
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, value in s3.items():
            patch.setenv(name, value)
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        fs.mkdir(BUCKET)
        try:
            yield s3
        finally:
            fs.clear_instance_cache()  # its clients point at this server
            server.stop()


@pytest.fixture(scope="module")
def remote_run(s3_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> RemoteRun:
    folder = tmp_path_factory.mktemp("remote")
    home = folder / "dagster_home"
    home.mkdir()
    shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")
    env = {**os.environ, **s3_env, "DAGSTER_HOME": str(home), WORKING_COPY_ENV_VAR: str(folder / "cache")}
    env.pop("GEMMA_ASSETS_CONFIG", None)
    env.pop("GEMMA_ASSETS_DATA_ROOT", None)
    first, first_pid = _materialize(env, "--data-root", DATA_ROOT)
    second, second_pid = _materialize(env, "--data-root", DATA_ROOT)
    return RemoteRun(env, home, folder / "cache", first, first_pid, second, second_pid)


def _layout(working_copy: Path) -> RunLayout:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(WORKING_COPY_ENV_VAR, str(working_copy))
        return RunLayout.of(DATA_ROOT, "tiny")


def test_the_tiny_run_materialises_on_s3_and_a_second_run_recomputes_nothing(remote_run):
    assert remote_run.first.returncode == 0, remote_run.first.stdout
    fs = fsspec.filesystem("s3")
    run_url = f"{BUCKET}/nightly/tiny"
    assert fs.glob(f"{run_url}/activations/part-*/{COMMIT_FILE}")  # the store went straight to the bucket
    commits = fs.glob(f"{run_url}/{ARTEFACTS}/*/*/{COMMIT_FILE}")
    assert {path.split("/")[-3] for path in commits} >= COMMITTING
    working = _layout(remote_run.working_copy)
    assert not any(path.is_file() for path in (working.root / "activations").rglob("*"))  # no local copy
    assert remote_run.second.returncode == 0, remote_run.second.stdout
    assert "nothing to do" in remote_run.second.stdout, remote_run.second.stdout
    with dg.DagsterInstance.from_config(str(remote_run.home)) as instance:
        pids = {run.tags.get(PID_TAG) for run in instance.get_runs()}
    assert pids == {str(remote_run.first_pid)}  # the second run started none
    assert not fs.exists(f"{run_url}/{LOCK_FILE}")  # each command gave the run's lock back


def test_the_checks_run_alone_on_another_machine_read_the_committed_artefacts(remote_run, tmp_path, monkeypatch):
    """The statistics checks run without their asset (the UI's "Execute" of a check, a run pod of
    its own) in an empty working copy: each pulls what the asset's step committed."""
    assert remote_run.first.returncode == 0, remote_run.first.stdout
    monkeypatch.setenv(WORKING_COPY_ENV_VAR, str(tmp_path / "elsewhere"))
    defs = build_definitions(load_run_config("tiny", list(QUICK_OVERRIDES)), data_root=DATA_ROOT)
    checks = dg.define_asset_job("statistics_checks", selection=dg.AssetSelection.checks_for_assets("activation_stats"))
    job = dg.Definitions.merge(defs, dg.Definitions(jobs=[checks])).resolve_job_def("statistics_checks")
    with dg.instance_for_test() as instance:
        result = job.execute_in_process(instance=instance, raise_on_error=False)
    assert result.success, [event.message for event in result.all_events if event.is_failure]
    assert not result.get_asset_materialization_events()  # the checks alone: the asset was not run again
    evaluations = {evaluation.check_name: evaluation.passed for evaluation in result.get_asset_check_evaluations()}
    assert evaluations == dict.fromkeys(
        ("inputs_intact", "no_duplicate_windows", "token_norms_in_bounds", "partition_drift", "stats_expectations"),
        True,
    )
    assert (_layout(tmp_path / "elsewhere").root / "stats" / "part-0000.moments.npz").is_file()


def test_a_fresh_working_copy_gets_every_artefact_back_and_a_deleted_object_is_named(remote_run, tmp_path):
    assert remote_run.first.returncode == 0, remote_run.first.stdout
    used, fresh = _layout(remote_run.working_copy), _layout(tmp_path / "elsewhere")
    assert set(committed_assets(fresh)) >= COMMITTING
    pull(fresh, committed_assets(fresh))
    # every artefact the run wrote, and nothing else: not the sources, nor the run's lock
    written = {
        path.relative_to(used.root): crc32_of(path)
        for path in used.root.rglob("*")
        if path.is_file() and path.relative_to(used.root).parts[0] not in ("corpus", LOCK_FILE)
    }
    pulled = {path.relative_to(fresh.root): crc32_of(path) for path in fresh.root.rglob("*") if path.is_file()}
    assert pulled == written
    assert Path("stats", "part-0000.moments.npz") in pulled and Path("run_config.yaml") in pulled
    model = Path("clusters", "k-00016", "model.npz")
    assert crc32_of(fresh.root / model) == crc32_of(used.root / model)
    (fresh.root / model).write_bytes(b"damaged locally")  # a damaged working copy is fetched again
    pull(fresh, ["cluster_models"])
    assert crc32_of(fresh.root / model) == crc32_of(used.root / model)

    fs = fsspec.filesystem("s3")
    (whitening,) = fs.glob(f"{BUCKET}/nightly/tiny/{ARTEFACTS}/whitening/all/v-*/whitening/whitening.npz")
    fs.rm_file(whitening)
    with pytest.raises(MissingArtefact) as missing:
        pull(fresh, ["whitening"])
    assert str(missing.value) == (
        f"whitening/whitening.npz of whitening is gone (s3://{whitening}) -> materialise it again: dagster asset "
        "materialize -m gemma_assets.definitions --select whitening (with $GEMMA_ASSETS_CONFIG naming this run's config)"
    )


LEASE_SECONDS = 3.0  # of the lock in the test below (a command's is a minute)


def _holder_elsewhere(run_url: str) -> subprocess.Popen:
    """Another process holding the run's lock on S3 until killed: on another machine it would
    share nothing else with this one."""
    return process_holding(
        "from gemma_assets.runner.lock import remote_run_lock",
        f"remote_run_lock({run_url!r}, 'tiny', wait=False, say=print, lease_seconds={LEASE_SECONDS})",
    )


def test_the_run_lock_on_s3_keeps_commands_apart_and_passes_on_from_a_killed_holder(s3_env):
    run_url = f"s3://{BUCKET}/locks/tiny"
    lock = f"{run_url}/{LOCK_FILE}"
    fs = fsspec.filesystem("s3")
    said: list[str] = []
    held: list[bytes] = []  # the lock object while the waiter holds it
    taken, release = threading.Event(), threading.Event()

    def wait_for_the_lock() -> None:
        with remote_run_lock(run_url, "tiny", wait=True, say=said.append, lease_seconds=LEASE_SECONDS):
            fs.invalidate_cache(lock)
            held.append(fs.cat_file(lock))
            taken.set()
            release.wait(60)

    holder = _holder_elsewhere(run_url)
    waiter = threading.Thread(target=wait_for_the_lock)
    try:
        with pytest.raises(RunBusy, match=rf"run tiny is being materialised by pid {holder.pid} on .* \(lock {lock}\)"):
            with remote_run_lock(run_url, "tiny", wait=False, say=print, lease_seconds=LEASE_SECONDS):
                pass
        waiter.start()
        assert not taken.wait(2 * LEASE_SECONDS)  # a live holder renews its lease: never taken over
        holder.kill()  # SIGKILL: nothing gives the lock back
        holder.wait()
        assert taken.wait(2 * LEASE_SECONDS + 30)  # one lease after the holder's last renewal
    finally:
        holder.kill()
        release.set()
        waiter.join()
    assert said[0].startswith(f"run tiny is being materialised by pid {holder.pid} on "), said
    assert said[1].startswith(f"run tiny: took over the lock of pid {holder.pid} on "), said
    assert f'"pid": {os.getpid()}' in held[0].decode()
    fs.invalidate_cache(lock)
    assert not fs.exists(lock)  # given back at the end of the block


def test_no_bucket_lock_leaves_the_bucket_lock_to_others_and_runs(remote_run):
    """--no-bucket-lock: the command takes this machine's lock alone, so a holder of the bucket's
    lock elsewhere does not keep it out (with --no-wait it would stop at once, exit 10)."""
    holder = _holder_elsewhere(f"{DATA_ROOT}/tiny")
    try:
        result, _ = _materialize(remote_run.env, "--data-root", DATA_ROOT, "--no-wait", "--no-bucket-lock")
    finally:
        holder.kill()
        holder.wait()
        fsspec.filesystem("s3").rm_file(f"{DATA_ROOT}/tiny/{LOCK_FILE}")  # killed, it left its lock
    assert result.returncode == 0, result.stdout
    assert "nothing to do" in result.stdout, result.stdout


class _RelayDroppingConditions(BaseHTTPRequestHandler):
    """An S3-compatible store that ignores conditional writes, as some do: the loopback S3 server
    behind a relay that drops the `dropped` conditions (and its own hop's headers) from every request."""

    protocol_version = "HTTP/1.1"
    upstream = ("127.0.0.1", 0)
    dropped: frozenset[str] = frozenset()

    def _relay(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        hop = self.dropped | {"host", "connection"}
        headers = {name: value for name, value in self.headers.items() if name.lower() not in hop}
        upstream = http.client.HTTPConnection(*self.upstream, timeout=30)
        upstream.request(self.command, self.path, body=body, headers=headers)
        response = upstream.getresponse()
        payload = response.read()
        self.send_response(response.status)
        for name, value in response.getheaders():
            if name.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
                self.send_header(name, value)
        length = response.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(payload))
        self.send_header("Content-Length", length)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)
        upstream.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay

    def log_message(self, *_: object) -> None:
        pass


@contextmanager
def _store_ignoring(s3_env: dict[str, str], *conditions: str) -> Iterator[str]:
    """The endpoint URL of a store that ignores the named conditional headers, while the block runs."""
    host, port = s3_env["AWS_ENDPOINT_URL"].removeprefix("http://").split(":")
    handler = type(
        "Relay", (_RelayDroppingConditions,), {"upstream": (host, int(port)), "dropped": frozenset(conditions)}
    )
    relay = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=relay.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{relay.server_address[1]}"
    finally:
        relay.shutdown()
        relay.server_close()


def _refusal(lock: str, header: str) -> str:
    return (
        f"the object store of {lock} ignores S3's conditional writes (it accepted a PUT that {header} should have "
        "refused), so a lock there cannot keep the commands of several machines apart -> use a store that honours "
        "them (AWS S3 does), or pass --no-bucket-lock and start one materialize of the run at a time yourself"
    )


def test_a_store_that_ignores_conditional_writes_is_refused_naming_the_fix(s3_env, tmp_path):
    lock = f"s3://{BUCKET}/unconditional/tiny/{LOCK_FILE}"
    env = {**os.environ, **s3_env, "DAGSTER_HOME": str(tmp_path), WORKING_COPY_ENV_VAR: str(tmp_path / "cache")}
    with _store_ignoring(s3_env, "if-none-match", "if-match") as endpoint:
        refused, _ = _materialize({**env, "AWS_ENDPOINT_URL": endpoint}, "--data-root", f"s3://{BUCKET}/unconditional")
    assert refused.returncode == EXIT_CONFIG, refused.stdout
    assert refused.stdout.strip().splitlines()[-1] == f"gemma-assets: error: {_refusal(lock, 'If-None-Match')}"
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    assert not fs.exists(lock)  # what it wrote is no lock: removed


def test_a_store_that_ignores_if_match_alone_is_refused_too(s3_env, monkeypatch):
    """Without If-Match, two waiters could both take over a dead holder's lock."""
    run_url = f"s3://{BUCKET}/if-match-ignored/tiny"
    fs = fsspec.filesystem("s3")
    with _store_ignoring(s3_env, "if-match") as endpoint:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        fs.clear_instance_cache()  # s3fs instances are cached by their arguments, not the environment
        try:
            with pytest.raises(ConfigError) as refused:
                with remote_run_lock(run_url, "tiny", wait=False, say=print):
                    pass
        finally:
            fs.clear_instance_cache()
    assert str(refused.value) == _refusal(f"{run_url}/{LOCK_FILE}", "If-Match")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_env["AWS_ENDPOINT_URL"])
    assert not fsspec.filesystem("s3", skip_instance_cache=True).exists(f"{run_url}/{LOCK_FILE}")


def test_a_missing_bucket_or_missing_credentials_is_one_line_naming_the_fix(s3_env, tmp_path):
    env = {**os.environ, **s3_env, "DAGSTER_HOME": str(tmp_path), WORKING_COPY_ENV_VAR: str(tmp_path / "cache")}
    no_bucket, _ = _materialize(env, "--data-root", "s3://no-such-bucket/runs")
    assert no_bucket.returncode == EXIT_CONFIG
    assert no_bucket.stdout.strip().splitlines()[-1] == (
        "gemma-assets: error: the data root s3://no-such-bucket/runs cannot hold outputs (s3://no-such-bucket/runs/"
        "tiny: The specified bucket does not exist) -> create s3://no-such-bucket, or pass --data-root with a "
        "bucket that exists"
    )
    anonymous = {
        name: value for name, value in env.items() if name not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    }
    anonymous |= {"AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "AWS_CONFIG_FILE": str(tmp_path / "none")}
    no_credentials, _ = _materialize(anonymous, "--data-root", DATA_ROOT)
    assert no_credentials.returncode == EXIT_CONFIG
    assert no_credentials.stdout.strip().splitlines()[-1] == (
        f"gemma-assets: error: the data root {DATA_ROOT} cannot hold outputs ({DATA_ROOT}/tiny: Unable to locate "
        "credentials) -> set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE); AWS_ENDPOINT_URL for a "
        "non-AWS server"
    )


def test_a_commit_cut_short_leaves_the_previous_one_in_force(s3_env, tmp_path, monkeypatch):
    run = RunLayout(tmp_path / "here" / "run", tmp_path / "here" / "models", remote=f"s3://{BUCKET}/unit/run")
    folder = run.root / "clusters" / "k-00016"
    folder.mkdir(parents=True)
    for name in ("model.npz", "records.json"):
        (folder / name).write_text(f"{name} v1")
    push(run, "cluster_models", ["16"], [folder])
    for name in ("model.npz", "records.json"):
        (folder / name).write_text(f"{name} v2")
    fs = fsspec.filesystem("s3")
    put_file, puts = fs.put_file, []

    def crash_after_the_first_object(local: str, stored: str) -> None:
        if puts:
            raise ConnectionError("killed mid-commit")
        puts.append(stored)
        put_file(local, stored)

    monkeypatch.setattr(fs, "put_file", crash_after_the_first_object)
    with pytest.raises(ConnectionError):
        push(run, "cluster_models", ["16"], [folder])
    monkeypatch.undo()
    elsewhere = replace(run, root=tmp_path / "elsewhere" / "run")
    pull(elsewhere, ["cluster_models"])  # the first commit, whole: nothing of the cut one
    pulled = elsewhere.root / "clusters" / "k-00016"
    assert {path.name: path.read_text() for path in pulled.iterdir()} == {
        "model.npz": "model.npz v1",
        "records.json": "records.json v1",
    }
    commit = push(run, "cluster_models", ["16"], [folder])  # the next commit clears the cut one's objects
    versions = fs.ls(f"{BUCKET}/unit/run/{ARTEFACTS}/cluster_models/16", detail=False)
    assert sorted(path.rsplit("/", 1)[-1] for path in versions) == sorted([COMMIT_FILE, commit["version"]])
    pointer = f"{BUCKET}/unit/run/{ARTEFACTS}/cluster_models/16/{COMMIT_FILE}"
    fs.pipe_file(pointer, b'{"version": "v-1"')  # cut off: not JSON
    with pytest.raises(StorageError, match=rf"s3://{pointer} is not a commit of cluster_models \(corrupt\) -> "):
        pull(elsewhere, ["cluster_models"])
