"""What a second `materialize` reruns. Nothing while another of the same run is live: it waits
for it and then finds nothing to do, or with --no-wait stops at once naming it (the lock dies
with its holder, SIGKILL included). Nothing below a partition extracted again bit-identical."""

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
from lock_holder import process_holding
from quick import quick_flags

from gemma_assets.defs.recovery import PID_TAG
from gemma_assets.runner.errors import EXIT_BUSY
from gemma_assets.runner.lock import LOCK_FILE, RunBusy, run_lock

ROOT = Path(__file__).resolve().parents[1]


def _holder(folder: Path) -> subprocess.Popen:
    """Another process holding the run's lock until killed."""
    return process_holding(
        "from pathlib import Path; from gemma_assets.runner.lock import run_lock",
        f"run_lock(Path({str(folder)!r}), 'tiny', wait=False, say=print)",
    )


def test_the_lock_names_its_holder_and_dies_with_it(tmp_path):
    holder = _holder(tmp_path)
    try:
        with pytest.raises(RunBusy, match=rf"run tiny is being materialised by pid {holder.pid} on .* -> wait"):
            with run_lock(tmp_path, "tiny", wait=False, say=print):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    said: list[str] = []
    with run_lock(tmp_path, "tiny", wait=False, say=said.append):  # free at once: the kernel released it
        assert f'"pid": {os.getpid()}' in (tmp_path / LOCK_FILE).read_text()
    assert said == []


def _materialize(tmp_path: Path, *args: str) -> subprocess.Popen:
    home = tmp_path / "dagster_home"
    home.mkdir(exist_ok=True)
    shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")
    env = {**os.environ, "DAGSTER_HOME": str(home), "GEMMA_ASSETS_DATA_ROOT": str(tmp_path / "data")}
    env.pop("GEMMA_ASSETS_CONFIG", None)
    command = [sys.executable, "-m", "gemma_assets.cli", "materialize", "--config", "tiny", *quick_flags(), *args]
    return subprocess.Popen(
        [*command, "--log-level", "WARNING"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_a_second_materialize_waits_and_runs_no_step_or_stops_with_no_wait(tmp_path):
    first = _materialize(tmp_path)
    lock = tmp_path / "data" / "tiny" / LOCK_FILE
    deadline = time.monotonic() + 120
    while not (lock.exists() and lock.read_text()) and time.monotonic() < deadline:
        time.sleep(0.2)
    busy = _materialize(tmp_path, "--no-wait")
    busy_out, _ = busy.communicate(timeout=300)
    second = _materialize(tmp_path)
    first_out, _ = first.communicate(timeout=1200)
    second_out, _ = second.communicate(timeout=300)
    assert first.returncode == 0, first_out
    assert busy.returncode == EXIT_BUSY, busy_out
    assert (
        busy_out.strip()
        .splitlines()[-1]
        .startswith(f"gemma-assets: error: run tiny is being materialised by pid {first.pid}")
    )
    assert second.returncode == 0, second_out
    assert "waiting for it to end" in second_out and "nothing to do" in second_out
    with dg.DagsterInstance.from_config(str(tmp_path / "dagster_home")) as instance:
        runs = instance.get_runs()
        assert runs and {run.tags.get(PID_TAG) for run in runs} == {str(first.pid)}  # the others ran no step


def _step_keys(tmp_path: Path, pid: int) -> set[str]:
    """The steps that succeeded in the runs of process `pid`."""
    with dg.DagsterInstance.from_config(str(tmp_path / "dagster_home")) as instance:
        runs = [run for run in instance.get_runs() if run.tags.get(PID_TAG) == str(pid)]
        events = [instance.get_records_for_run(run.run_id, of_type=dg.DagsterEventType.STEP_SUCCESS) for run in runs]
        return {record.event_log_entry.step_key for page in events for record in page.records}


def test_a_repaired_partition_reruns_nothing_below_it(tmp_path):
    first = _materialize(tmp_path)
    out, _ = first.communicate(timeout=1200)
    assert first.returncode == 0, out
    version = next((tmp_path / "data" / "tiny" / "activations" / "part-0001").glob("v-*"))
    chunk = next(path for path in sorted((version / "activations").rglob("*")) if path.is_file() and "c" in path.parts)
    chunk.unlink()
    repair = _materialize(tmp_path)
    out, _ = repair.communicate(timeout=600)
    assert repair.returncode == 0, out
    assert "activations partition 0001 is damaged (file activations/c/" in out
    assert "activations 0001: extracted again bit-identical, nothing below reruns" in out
    checks = {"activations_activations_integrity", "activations_activations_finite"}
    assert _step_keys(tmp_path, repair.pid) == {"activations", *checks}  # the partition and its checks only
    again = _materialize(tmp_path)
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0 and "nothing to do" in out, out
