"""A full disk: ENOSPC ends with its own exit code (9) and a last line naming the data root, its
free space and what the run needs; materialize refuses to start on a data root with less free
space than that; nothing is left half-visible, and the same command completes once there is room.
Real filesystems only: the disks that fill up are small tmpfs mounts (root only; skipped elsewhere)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import pytest
from quick import QUICK_OVERRIDES, quick_flags

from gemma_assets.cli import main
from gemma_assets.core import costs
from gemma_assets.core.config import load_run_config
from gemma_assets.core.files import write_text
from gemma_assets.core.model import architecture
from gemma_assets.core.storage import ActivationStore
from gemma_assets.runner.errors import EXIT_DISK_FULL, DiskFull, failure, is_enospc
from gemma_assets.runner.lock import LOCK_FILE

ROOT = Path(__file__).resolve().parents[1]
SMALL = "5m"  # fills during the statistics pass, after the sample and the activations (estimate: 8.6 MB)
LARGE = "64m"


@contextmanager
def tmpfs(folder: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `folder`, unmounted when the block ends, whatever happens."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], check=True)  # busy: detach it now, free it when idle


def _tiny(*overrides: str):
    run = load_run_config("tiny", list(overrides))
    return run, architecture(run.model, Path("unused")).d_model  # the tiny model's shape needs no files


def test_config_estimate_of_tiny_is_positive_and_linear_in_partitions():
    estimates = {}
    for partitions in (4, 8, 16):
        run, d_model = _tiny(f"sampling.partitions={partitions}")
        estimate = costs.config_disk_estimate(run, d_model)
        assert set(estimate) == set(costs.DISK_GROWTH) and all(value >= 0 for value in estimate.values())
        bfloat16_values = run.sampling.n_windows * run.sampling.context_len * d_model
        assert estimate["store"] >= 2 * bfloat16_values  # uncompressed: the activations alone
        estimates[partitions] = sum(estimate.values())
    assert estimates[4] > 0
    # twice the partitions adds twice what the step before added: linear, with fixed costs apart
    first, second = estimates[8] - estimates[4], estimates[16] - estimates[8]
    assert first > 0 and second == pytest.approx(2 * first, rel=1e-9)


def test_recorded_preflight_estimate_is_preferred_and_what_is_on_disk_counts(tmp_path):
    run, d_model = _tiny()
    root, models = tmp_path / "tiny", tmp_path / "models"
    fresh = costs.disk_need(run, d_model, root, models)
    assert fresh.source == costs.CONFIG_SOURCE and fresh.present == 0
    assert fresh.remaining == pytest.approx(fresh.total)  # nothing there yet, the tiny model's copy included
    assert "estimate from the run config" in fresh.describe() and "upper bound" in fresh.describe()

    recorded = dict.fromkeys(costs.DISK_GROWTH, 1e6)
    costs.record_disk_estimate(root, run, recorded)
    need = costs.disk_need(run, d_model, root, models)
    assert need.source == costs.PREFLIGHT_SOURCE and "preflight's estimate" in need.describe()
    assert need.total == pytest.approx(5e6 + costs.MODEL_COPY_BYTES["tiny"])
    other, _ = _tiny("sampling.partitions=8")  # another config (another digest): counted from its config
    assert costs.disk_need(other, d_model, root, models).source == costs.CONFIG_SOURCE

    # a half-finished run: one committed partition of four, and a fixed file
    commit = root / "activations" / "part-0000" / "COMMIT.json"
    write_text(commit, "{}")
    write_text(root / "report" / "report.md", "x" * 300_000)
    half = costs.disk_need(run, d_model, root, models)
    present = costs.disk_use(root, allocated=True)
    assert half.present == sum(present.values()) and present["fixed"] >= 300_000
    # the store counts its committed partitions; the other categories what they hold
    other_categories = 3 * 1e6 + (1e6 - present["fixed"])
    assert half.remaining == pytest.approx(0.75 * 1e6 + other_categories + costs.MODEL_COPY_BYTES["tiny"])


def test_enospc_is_found_in_a_raised_chain_and_in_a_failed_steps_error(tmp_path):
    with tmpfs(tmp_path / "disk", "64k") as disk:
        try:
            try:
                (disk / "big").write_bytes(b"\0" * 2**20)
            except OSError as error:
                raise RuntimeError("writing failed") from error
        except RuntimeError as error:
            assert is_enospc(error)
        assert not is_enospc(RuntimeError("writing failed")) and not is_enospc(OSError(13, "Permission denied"))

        @dg.op
        def writes_a_megabyte() -> None:
            (disk / f"big-{uuid.uuid4().hex}").write_bytes(b"\0" * 2**20)

        @dg.job
        def fill() -> None:
            writes_a_megabyte()

        with dg.instance_for_test() as instance:
            result = fill.execute_in_process(instance=instance, raise_on_error=False)
        full = failure(result)
        assert isinstance(full, DiskFull) and full.code == EXIT_DISK_FULL == 9
        assert "step writes_a_megabyte" in str(full) and "[Errno 28]" in str(full) and "--data-root" in str(full)


def _materialize(home: Path, data_root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    for name in ("GEMMA_ASSETS_CONFIG", "GEMMA_ASSETS_DATA_ROOT"):
        env.pop(name, None)
    command = [sys.executable, "-m", "gemma_assets.cli", "materialize", "--config", "tiny", *quick_flags()]
    return subprocess.run(
        [*command, "--log-level", "WARNING", "--data-root", str(data_root), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )


def _last_line(done: subprocess.CompletedProcess) -> str:
    return done.stderr.strip().splitlines()[-1]


def _files(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if path.is_file()]


def _staging(path: Path) -> bool:
    """A file written beside its target, not yet renamed into place (the run's lock is no such file)."""
    return path.name != LOCK_FILE and (path.name.startswith(".") or path.name.endswith(".tmp"))


def test_full_disk_ends_with_its_code_leaves_nothing_half_visible_and_the_rerun_completes(tmp_path):
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")
    with tmpfs(tmp_path / "data", SMALL) as data_root:
        # less free space than the estimate: refused before anything is written or run
        refused = _materialize(home, data_root)
        assert refused.returncode == EXIT_DISK_FULL, refused.stderr
        line = _last_line(refused)
        assert line.startswith("gemma-assets: error: the data root ") and str(data_root) in line
        assert "estimate from the run config" in line and "--ignore-free-space" in line
        assert _files(data_root) == [] and sorted(p.name for p in home.iterdir()) == ["dagster.yaml"]

        # started anyway: the disk fills midway
        full = _materialize(home, data_root, "--ignore-free-space")
        assert full.returncode == EXIT_DISK_FULL, full.stderr[-3000:]
        line = _last_line(full)
        assert line.startswith("gemma-assets: error: no space left on device") and "[Errno 28]" in line
        assert f"the data root {data_root} has " in line and "estimate from the run config" in line
        assert "free on its filesystem" in line and "run the same command again" in line
        assert "Traceback" not in full.stderr
        layout_root = data_root / "tiny"
        assert not (layout_root / "report" / "report.md").exists()
        store = ActivationStore(str(layout_root))
        committed = store.committed_keys()
        assert committed, "the disk was meant to fill after the activations, not before"
        # nothing half-visible: what reads as committed is whole, and no staging file is left
        assert all(store.verify(key) == [] for key in committed)
        assert [p for p in _files(data_root) if _staging(p)] == []

        # still short of space: refused again, counting what the run already holds
        again = _materialize(home, data_root)
        assert again.returncode == EXIT_DISK_FULL and "already on disk" in _last_line(again)

        # more room, nothing copied: the same command completes
        subprocess.run(["mount", "-o", f"remount,size={LARGE}", str(data_root)], check=True)
        done = _materialize(home, data_root)
        assert done.returncode == 0, done.stderr[-3000:]
        assert (layout_root / "report" / "report.md").exists()
        run = load_run_config("tiny", list(QUICK_OVERRIDES))
        assert store.committed_keys() == run.partition_keys
        assert all(store.verify(key) == [] for key in run.partition_keys)
        # the estimate from the run config is an upper bound of what the run took
        estimate = sum(costs.config_disk_estimate(run, 64).values()) + costs.MODEL_COPY_BYTES["tiny"]
        assert shutil.disk_usage(data_root).used <= estimate


def test_enospc_in_the_commands_own_writes_ends_with_its_code(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    with tmpfs(tmp_path / "data", "256k") as data_root:
        with pytest.raises(OSError), (data_root / "filler").open("wb") as filler:
            while True:  # every block taken: the next write anywhere on this disk is ENOSPC
                filler.write(b"\0" * 4096)
                filler.flush()
        with pytest.raises(SystemExit) as exit_info:
            main(["materialize", "--config", "tiny", "--data-root", str(data_root), "--ignore-free-space"])
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]
        assert exit_info.value.code == EXIT_DISK_FULL and "Traceback" not in err
        assert "[Errno 28]" in last and f"the data root {data_root} has 0 B free" in last
        assert "estimate from the run config" in last
