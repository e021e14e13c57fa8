"""Real faults injected into stored partitions are caught by the right check, named, with a fix."""

from __future__ import annotations

import shutil

import dagster as dg
import numpy as np
import pytest
import torch

from gemma_assets.core.bf16 import bf16_to_bits, bits_to_float
from gemma_assets.defs.graph import build_definitions

ACTIVATIONS, STATS = dg.AssetKey("activations"), dg.AssetKey("activation_stats")


@pytest.fixture
def copy(tiny_run, tmp_path):
    """A private copy of the tiny run's data to corrupt, with its own Definitions."""
    shutil.copytree(tiny_run.data_root / "tiny", tmp_path / "tiny")
    (tmp_path / "models").symlink_to(tiny_run.data_root / "models")
    defs = build_definitions(tiny_run.profile, data_root=str(tmp_path))
    return defs, defs.resources["storage"].layout().activation_store(), tmp_path


def _run_checks(defs, instance, asset_key: dg.AssetKey, partition: str | None = None, with_asset: bool = False):
    asset = next(a for a in defs.assets if asset_key in a.keys)
    checks = [c for c in defs.asset_checks if any(k.asset_key == asset_key for k in c.check_keys)]
    selection = dg.AssetSelection.checks(*checks) | (
        dg.AssetSelection.assets(asset) if with_asset else dg.AssetSelection.assets()
    )
    result = dg.materialize(
        [asset, *checks],
        selection=selection,
        tags={"dagster/partition": partition} if partition else None,
        resources=defs.resources,
        instance=instance,
        raise_on_error=False,
    )
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def _chunk_file(root, store, key: str):
    version = store.manifest(key)["version"]
    files = sorted(
        p
        for p in (root / "tiny" / "activations" / f"part-{key}" / version / "activations" / "c").rglob("*")
        if p.is_file()
    )
    return files[0]


def _rewrite(store, key: str, change) -> None:
    """Commit a partition whose values were changed by a (buggy) writer: checksums stay valid."""
    part = store.open(key)
    arrays = {name: part.array(name) for name in part.group.array_keys()}
    change(arrays)
    store.write_partition(key, arrays, part.manifest["attrs"])


def test_flipped_bytes_in_a_chunk(copy, tiny_run):
    defs, store, root = copy
    chunk = _chunk_file(root, store, "0001")
    data = bytearray(chunk.read_bytes())
    data[len(data) // 3] ^= 0x5A
    chunk.write_bytes(bytes(data))
    found = _run_checks(defs, tiny_run.instance, ACTIVATIONS, "0001")
    check = found["activations_integrity"]
    assert not check.passed and check.severity == dg.AssetCheckSeverity.ERROR
    assert "partition 0001" in check.description and "CRC32" in check.description
    assert "rematerialise activations partition(s) 0001" in check.description
    assert _run_checks(defs, tiny_run.instance, ACTIVATIONS, "0000")["activations_integrity"].passed


def test_deleted_chunk(copy, tiny_run):
    defs, store, root = copy
    chunk = _chunk_file(root, store, "0002")
    chunk.unlink()
    check = _run_checks(defs, tiny_run.instance, ACTIVATIONS, "0002")["activations_integrity"]
    assert not check.passed and "partition 0002: chunk file" in check.description and "is missing" in check.description


def test_nan_value(copy, tiny_run):
    defs, store, _ = copy

    def plant_nan(arrays):
        arrays["activations"][70, 5] = bf16_to_bits(torch.tensor([float("nan")]))[0]

    _rewrite(store, "0000", plant_nan)
    found = _run_checks(defs, tiny_run.instance, ACTIVATIONS, "0000")
    assert found["activations_integrity"].passed  # the files are intact; the values are not
    check = found["activations_finite"]
    assert not check.passed and check.severity == dg.AssetCheckSeverity.ERROR
    assert (
        "partition 0000: nan at row 70" in check.description
        and "position 6" in check.description
        and "dim 5" in check.description
    )


def test_absurd_norm_token(copy, tiny_run):
    defs, store, _ = copy

    def blow_up(arrays):
        arrays["activations"][100] = bf16_to_bits(bits_to_float(arrays["activations"][100:101]) * 1e6)[0]

    _rewrite(store, "0003", blow_up)
    found = _run_checks(defs, tiny_run.instance, STATS, with_asset=True)
    check = found["token_norms_in_bounds"]
    assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN
    assert "partition 0003 row 100 (position 4)" in check.description
    assert found["inputs_intact"].passed and found["no_duplicate_windows"].passed


def test_truncated_array(copy, tiny_run):
    defs, store, _ = copy

    def truncate(arrays):
        for name in arrays:
            arrays[name] = arrays[name][:-64]

    _rewrite(store, "0001", truncate)
    check = _run_checks(defs, tiny_run.instance, ACTIVATIONS, "0001")["activations_integrity"]
    expected = tiny_run.profile.sampling.tokens_per_partition
    assert not check.passed
    assert f"partition 0001: {expected - 64} tokens stored, {expected} expected (truncated array)" in check.description


def test_corruption_blocks_downstream_in_the_same_run(copy, tiny_run):
    defs, store, root = copy
    chunk = _chunk_file(root, store, "0002")
    chunk.write_bytes(b"\x00" * 16)
    result = defs.resolve_job_def("analyse").execute_in_process(
        instance=tiny_run.instance,
        asset_selection=[STATS, dg.AssetKey("whitening")],
        raise_on_error=False,
    )
    evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert not evaluations["inputs_intact"].passed and "partition 0002" in evaluations["inputs_intact"].description
    assert not result.success
    whitening_done = [e for e in result.get_asset_materialization_events() if e.asset_key == dg.AssetKey("whitening")]
    assert not whitening_done
    from gemma_assets.runner import EXIT_CHECK, failure

    reported = failure(result)  # what `gemma-assets materialize` prints last
    assert reported.code == EXIT_CHECK
    assert str(reported).startswith("blocking check inputs_intact failed on activation_stats: ")
    assert "partition 0002" in str(reported) and "rematerialise activations partition(s) 0002" in str(reported)


def test_duplicate_windows_are_named():
    from gemma_assets.core.quality import duplicate_windows

    windows = {"0000": np.array([[1, 0], [2, 31]]), "0001": np.array([[3, 0], [2, 31]])}
    assert [str(finding) for finding in duplicate_windows(windows)] == [
        "partition 0001: window 1 repeats window 1 of partition 0000 (document 2, offset 31)"
    ]


def _flip(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x5A
    path.write_bytes(bytes(data))


READERS_OF_HELDOUT = [  # every asset that reads the held-out partition's activations, with a partition
    ("whitening", None),
    ("sae_evaluation", None),
    ("cluster_models", "64"),
    ("cluster_density", "64"),
    ("interpretation", None),
]


@pytest.mark.parametrize("damage", ["deleted", "flipped"])
def test_damaged_chunk_is_never_computed_on(copy, tiny_run, damage):
    """Every asset that reads a damaged partition fails naming the partition and the file (zarr
    alone would read a deleted chunk as zeros), and none of them materialises."""
    from gemma_assets.runner import EXIT_STORAGE, failure

    defs, store, root = copy
    chunk = _chunk_file(root, store, "0003")  # the held-out partition: every evaluation reads it
    name = chunk.relative_to(root / "tiny" / "activations" / "part-0003" / store.manifest("0003")["version"])
    chunk.unlink() if damage == "deleted" else _flip(chunk)
    readers = READERS_OF_HELDOUT if damage == "deleted" else READERS_OF_HELDOUT[:2]
    with dg.instance_for_test() as instance:
        for asset_name, partition in readers:
            asset = next(a for a in defs.assets if a.key == dg.AssetKey(asset_name))
            result = dg.materialize(
                [asset], partition_key=partition, resources=defs.resources, instance=instance, raise_on_error=False
            )
            assert not result.success, asset_name
            reported = failure(result)
            assert reported.code == EXIT_STORAGE, (asset_name, str(reported))
            assert f"activation partition 0003: file {name.as_posix()}" in str(reported), (asset_name, str(reported))
            assert ("is missing" if damage == "deleted" else "fails its CRC32") in str(reported)
            assert "--select activations --partition 0003" in str(reported)
            assert instance.get_latest_materialization_event(asset.key) is None, asset_name


def test_a_failed_blocking_check_is_evaluated_again_on_rerun(tiny_run):
    """Dagster counts an asset whose blocking check failed as materialised; `gemma-assets
    materialize` must run it (and what it guards) again rather than go past the check."""
    from gemma_assets.runner import failed_blocking_checks, stale_plan

    defs = tiny_run.defs
    with dg.instance_for_test() as instance:
        instance.report_runless_asset_event(
            dg.AssetCheckEvaluation(
                asset_key=ACTIVATIONS, check_name="activations_integrity", passed=False, partition="0002"
            )
        )
        instance.report_runless_asset_event(
            dg.AssetCheckEvaluation(asset_key=STATS, check_name="partition_drift", passed=False)
        )
        rerun = failed_blocking_checks(defs, instance)
    assert rerun == {ACTIVATIONS: {"0002"}}  # the non-blocking drift warning reruns nothing
    plan = stale_plan(defs, tiny_run.instance, rerun=rerun)
    assert "0002" in plan[ACTIVATIONS]
    assert {STATS, dg.AssetKey("whitening"), dg.AssetKey("comparison_report")} <= set(plan)
