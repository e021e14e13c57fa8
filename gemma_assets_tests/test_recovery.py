"""Crash safety, with real processes: a run killed with SIGKILL never blocks the next one, SIGTERM
stops the command within seconds, damaged stores are never computed on, and bad data roots fail
before any model is loaded with one line naming the cause and the fix."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest
from quick import quick_flags

from gemma_assets.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _start(tmp_path: Path, *args: str) -> subprocess.Popen:
    """`gemma-assets materialize` on the quick tiny run in its own process, instance and data root
    (the project's dagster.yaml: the `gpu` pool has one slot)."""
    home = tmp_path / "dagster_home"
    home.mkdir(exist_ok=True)
    shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")
    env = {**os.environ, "DAGSTER_HOME": str(home), "GEMMA_ASSETS_DATA_ROOT": str(tmp_path / "data")}
    env.pop("GEMMA_ASSETS_CONFIG", None)
    command = [sys.executable, "-m", "gemma_assets.cli", "materialize", "--config", "tiny", *quick_flags()]
    command += ["--log-level", "WARNING"]
    return subprocess.Popen(
        [*command, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _instance(tmp_path: Path) -> dg.DagsterInstance:
    return dg.DagsterInstance.from_config(str(tmp_path / "dagster_home"))


def _wait_for_gpu_slot(tmp_path: Path, process: subprocess.Popen, timeout_s: float = 240) -> str:
    """The run id holding the `gpu` pool's slot, once the extraction step has claimed it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read()
        if (home := tmp_path / "dagster_home").exists() and any(home.iterdir()):
            try:
                with _instance(tmp_path) as instance:
                    claimed = instance.event_log_storage.get_concurrency_info("gpu").claimed_slots
            except Exception:  # noqa: BLE001 - the instance's database is still being created
                claimed = []
            if claimed:
                return claimed[0].run_id
        time.sleep(0.05)
    raise AssertionError("the extraction step never claimed the gpu slot")


def test_sigkilled_run_is_released_and_the_rerun_finishes_bit_exact(tmp_path, tiny_run):
    killed = _start(tmp_path)
    run_id = _wait_for_gpu_slot(tmp_path, killed)
    killed.send_signal(signal.SIGKILL)  # what an out-of-memory kill looks like
    killed.wait(30)
    with _instance(tmp_path) as instance:
        assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.STARTED  # killed mid-run
        assert instance.event_log_storage.get_concurrency_info("gpu").claimed_slots  # and holding the slot

    rerun = _start(tmp_path)
    out, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, out
    assert f"released stale run {run_id[:8]} (job extract_activations" in out
    with _instance(tmp_path) as instance:
        assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.FAILURE
        assert not instance.event_log_storage.get_concurrency_info("gpu").claimed_slots
    # the partitions equal those of the clean run, bit for bit
    from gemma_assets.core.storage import ActivationStore

    clean, recovered = tiny_run.layout.activation_store(), ActivationStore(str(tmp_path / "data" / "tiny"))
    for key in tiny_run.profile.partition_keys:
        for name in ("activations", "token_ids", "positions"):
            assert (clean.open(key).array(name) == recovered.open(key).array(name)).all(), (key, name)


def test_sigterm_stops_within_seconds_and_frees_the_slot(tmp_path):
    process = _start(tmp_path)
    run_id = _wait_for_gpu_slot(tmp_path, process)
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=30)
    assert time.monotonic() - sent < 10
    assert process.returncode != 0 and "interrupted by" in out.strip().splitlines()[-1], out
    with _instance(tmp_path) as instance:
        assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.FAILURE
        assert not instance.event_log_storage.get_concurrency_info("gpu").claimed_slots


@pytest.mark.parametrize(
    ("data_root", "expected"),
    [
        ("/proc/gemma-assets-cannot-write-here", "cannot hold outputs"),
        ("", "--data-root is empty"),
    ],
    ids=["unwritable", "empty"],
)
def test_bad_data_root_fails_before_any_model_load(tmp_path, capsys, monkeypatch, data_root, expected):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    with pytest.raises(SystemExit) as exit_info:
        main(["materialize", "--config", "tiny", "--data-root", data_root])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert exit_info.value.code == 2 and expected in last and "--data-root" in last and "Traceback" not in err
    assert not (tmp_path / "home").exists()  # not even the instance was touched


def test_empty_data_root_variable_is_an_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GEMMA_ASSETS_DATA_ROOT", " ")
    with pytest.raises(SystemExit) as exit_info:
        main(["materialize", "--config", "tiny"])
    assert exit_info.value.code == 2
    assert "$GEMMA_ASSETS_DATA_ROOT is set but empty" in capsys.readouterr().err.strip().splitlines()[-1]


def test_storage_cannot_point_at_another_runs_folder(tiny_run):
    """The storage's run folder comes from the run config; a launch that tries to set it is
    refused by Dagster's config validation before any step."""
    job = tiny_run.defs.resolve_job_def("analyse")
    with pytest.raises(dg.DagsterInvalidConfigError, match="run_name"):
        job.execute_in_process(
            instance=tiny_run.instance,
            asset_selection=[dg.AssetKey("pile_sample")],
            run_config={"resources": {"storage": {"config": {"run_name": "demo"}}}},
        )


def test_waiting_for_a_live_runs_slot_names_it_and_times_out(tmp_path, capsys, monkeypatch):
    from gemma_assets.defs.recovery import process_tags

    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with dg.DagsterInstance.get() as instance:  # a live run (this process) holds the only gpu slot
        holder = dg.DagsterRun(job_name="extract_activations", status=dg.DagsterRunStatus.STARTED, tags=process_tags())
        instance.add_run(holder)
        instance.event_log_storage.initialize_concurrency_limit_to_default("gpu")
        assert instance.event_log_storage.claim_concurrency_slot("gpu", holder.run_id, "activations").is_claimed
    with pytest.raises(SystemExit) as exit_info:
        main(["materialize", "--config", "tiny", "--data-root", str(tmp_path / "data"), "--wait-timeout", "2"])
    captured = capsys.readouterr()
    assert exit_info.value.code == 7
    assert (
        f"waiting for a free slot: pool 'gpu' held by run {holder.run_id[:8]} (job extract_activations" in captured.out
    )
    last = captured.err.strip().splitlines()[-1]
    assert f"held by run {holder.run_id[:8]}" in last and "still after 2s" in last and "--wait-timeout" in last
