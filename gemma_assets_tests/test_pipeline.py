"""The whole asset graph, materialised through Dagster on the tiny profile."""

from __future__ import annotations

import json
import math
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
import torch
from reference import written_under

from gemma_assets.core import model
from gemma_assets.core.bf16 import bf16_to_bits


def test_every_asset_materialised_and_recorded(tiny_run):
    instance = tiny_run.instance
    assets = [spec.key for spec in tiny_run.defs.resolve_all_asset_specs()]
    assert len(assets) >= 12
    for key in assets:
        assert instance.get_latest_materialization_event(key) is not None, key
    assert instance.get_materialized_partitions(dg.AssetKey("activations")) == set(tiny_run.profile.partition_keys)
    assert instance.get_materialized_partitions(dg.AssetKey("cluster_models")) == {"64", "128", "256"}
    assert all(result.success for result in tiny_run.results)


def test_data_checks_pass_on_clean_data(tiny_run):
    evaluations = [e for result in tiny_run.results for e in result.get_asset_check_evaluations()]
    declared = {spec.key.name for checks in tiny_run.defs.asset_checks for spec in checks.check_specs}
    assert {e.check_name for e in evaluations} == declared
    assert all(e.passed for e in evaluations), [e.description for e in evaluations if not e.passed]


def test_every_activation_partition_has_its_own_check_evaluations(tiny_run):
    """One run extracts every partition; each partition still records a passed evaluation of
    both activation checks, targeting its own latest materialisation (what the UI shows)."""
    from dagster._core.event_api import PartitionKeyFilter
    from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus

    storage, keys = tiny_run.instance.event_log_storage, tiny_run.profile.partition_keys
    activations = dg.AssetKey("activations")
    for name in ("activations_integrity", "activations_finite"):
        check = dg.AssetCheckKey(activations, name)
        for key in keys:
            [record] = storage.get_asset_check_execution_history(
                check, limit=1, partition_filter=PartitionKeyFilter(key=key)
            )
            assert record.status == AssetCheckExecutionRecordStatus.SUCCEEDED, (name, key, record.status)
            assert record.evaluation.passed and record.evaluation.partition == key
            assert record.evaluation.target_materialization_data is not None
        info = {row.partition_key: row for row in storage.get_asset_check_partition_info([check])}
        assert set(info) == set(keys)
        assert all(row.is_current and row.latest_execution_status.value == "SUCCEEDED" for row in info.values())
        unpartitioned = storage.get_asset_check_execution_history(check, limit=100)
        assert all(record.partition in keys for record in unpartitioned)  # no evaluation outside a partition


def test_report_lists_every_dictionary_with_heldout_metrics(tiny_run):
    report = tiny_run.layout.report_file("report.md").read_text()
    for name in ["kmeans-64", "kmeans-128", "kmeans-256", *[s.name for s in tiny_run.profile.sae_specs]]:
        assert f"| {name} |" in report
    assert (tiny_run.layout.report_file("l0_fvu_frontier.png")).stat().st_size > 1000
    for record in (r.row() for r in tiny_run.layout.sae_records()):
        assert 0 < record["heldout_fvu"] < 1.5 and math.isfinite(record["heldout_mse"])
        assert record["heldout_l0"] <= record["k"]


def test_stored_activations_equal_hidden_states_bit_for_bit(tiny_run):
    assert_store_equals_hidden_states(tiny_run.profile, tiny_run.layout, tiny_run.defs.resources["compute"].batch_size)


def assert_store_equals_hidden_states(profile, layout, batch_size: int) -> None:
    """Every stored partition is hidden_states[layer + 1] of a full forward, as bf16 bits."""
    source = str(layout.models_dir / "tiny-gemma2")
    lm = model.load_model(source, profile.model.layer, "cpu", torch.float32)
    sample = layout.sample()
    store = layout.activation_store()
    for index, key in enumerate(profile.partition_keys):
        tokens = sample.partition(index, profile.sampling.windows_per_partition).tokens
        stored = store.open(key).array("activations")
        assert stored.dtype == np.uint16
        reference = []
        for start in range(0, len(tokens), batch_size):
            with torch.no_grad():
                out = lm(torch.from_numpy(tokens[start : start + batch_size]).long(), output_hidden_states=True)
            reference.append(
                bf16_to_bits(out.hidden_states[profile.model.layer + 1].reshape(-1, lm.config.hidden_size))
            )
        assert np.array_equal(stored, np.concatenate(reference)), f"partition {key} differs"
        assert np.array_equal(store.open(key).array("token_ids"), tokens.reshape(-1))


def test_heldout_partitions_never_used_for_fitting(tiny_run):
    heldout = set(tiny_run.profile.heldout_partition_keys)
    for record in tiny_run.records().values():
        assert record["train_partitions"] and not heldout & set(record["train_partitions"]), record["name"]
    for spec in tiny_run.profile.sae_specs:
        record = json.loads((tiny_run.layout.sae_dir(spec.name) / "training.json").read_text())
        assert not heldout & set(record["train_partitions"])


def test_definitions_load_for_every_profile(monkeypatch):
    from gemma_assets.core.config import SHIPPED_CONFIGS, load_run_config
    from gemma_assets.defs.graph import build_definitions

    for name in SHIPPED_CONFIGS:
        dg.Definitions.validate_loadable(build_definitions(load_run_config(name), data_root="/nonexistent"))


def test_every_stored_token_has_its_cluster(tiny_run):
    import zarr

    store = tiny_run.layout.activation_store()
    for k in tiny_run.profile.clustering.ks:
        group = zarr.open_group(str(tiny_run.layout.kmeans_dir(k) / "assignments"), mode="r")
        for key in tiny_run.profile.partition_keys:
            labels = group[f"part-{key}"][:]
            positions = store.open(key).array("positions")
            assert len(labels) == tiny_run.profile.sampling.tokens_per_partition
            assert (labels[positions == 0] == -1).all() and (
                (labels[positions != 0] >= 0) & (labels[positions != 0] < k)
            ).all()


def _runs_since(instance: dg.DagsterInstance, known: set[str]) -> list[dg.DagsterRun]:
    return [record.dagster_run for record in instance.get_run_records() if record.dagster_run.run_id not in known]


def _steps(instance: dg.DagsterInstance, runs: list[dg.DagsterRun]) -> set[str]:
    return {stat.step_key for run in runs for stat in instance.get_run_step_stats(run.run_id)}


def _materialized_partitions(instance: dg.DagsterInstance, runs: list[dg.DagsterRun], asset: str) -> set[str]:
    return {
        entry.dagster_event.partition
        for run in runs
        for entry in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION)
        if entry.dagster_event.asset_key == dg.AssetKey(asset)
    }


def test_run_file_sweep_materialises_and_reruns_only_what_changed(tmp_path, monkeypatch, capsys):
    """A run file on top of tiny (block 1, k = 16 and 32) runs end to end; an identical rerun runs
    no step; changing one k reruns only that k and what reads every k."""
    from gemma_assets.cli import main
    from gemma_assets.core.config import load_run_config
    from gemma_assets.defs.graph import build_definitions

    run_file = tmp_path / "layer1.yaml"
    # one small SAE: the sweep's k-means partitions are what is tested (the tiny run trains 14)
    run_file.write_text(
        "base: tiny\nmodel:\n  layer: 1\nclustering:\n  ks: [16, 32]\n"
        "saes:\n  train: [{architecture: topk, widths: [16], ks: [1]}]\n  trainer: {epochs: 2}\n"
    )
    data_root = tmp_path / "data"
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    argv = ["materialize", "--config", str(run_file), "--data-root", str(data_root), "--log-level", "WARNING"]
    main(argv)
    run = load_run_config(str(run_file))
    layout = build_definitions(run, str(data_root)).resources["storage"].layout()
    report = (data_root / "layer1" / "report" / "report.md").read_text()
    assert "block 1" in report.splitlines()[0]
    assert "| kmeans-16 |" in report and "| kmeans-32 |" in report and "kmeans-64" not in report
    assert "One seed (`seeds: 1`): the spread over refits is not measured" in report
    assert "  layer: 1\n" in (data_root / "layer1" / "run_config.yaml").read_text()
    assert_store_equals_hidden_states(run, layout, 16)  # hidden_states[2] for block 1

    with dg.DagsterInstance.get() as instance:
        known = {record.dagster_run.run_id for record in instance.get_run_records()}
    capsys.readouterr()
    main(argv)
    assert "nothing to do: every asset of run layer1 is up to date" in capsys.readouterr().out
    with dg.DagsterInstance.get() as instance:
        assert _runs_since(instance, known) == []

    main([*argv, "--set", "clustering.ks=[16,24]"])
    with dg.DagsterInstance.get() as instance:
        runs = _runs_since(instance, known)
        assert _steps(instance, runs) == {
            "cluster_models",
            "cluster_density",
            "downstream_loss",
            "interpretation",
            "comparison_report",
        }
        assert _materialized_partitions(instance, runs, "cluster_models") == {"24"}
        assert _materialized_partitions(instance, runs, "cluster_density") == {"24"}
    assert "| kmeans-24 |" in (data_root / "layer1" / "report" / "report.md").read_text()


@pytest.mark.reference
@written_under(Path(__file__).parent / "data" / "tiny_reference_figures.json")
def test_tiny_report_is_the_reference(tiny_run):
    """The tiny report changes only when a commit means it to. Its text is compared with the
    numbers masked and then checked as numbers: one unit in the last printed digit plus the
    figure's tolerance (reference.py), less the git revision, the numeric environment, the
    columns that time this machine, what divides by a near-zero difference, and what depends on
    which latents a trained SAE learnt (fitting noise across CPUs). A deliberate change
    regenerates it: copy the new report.md."""
    from reference import compare_text, fitting_noise, require_the_reference_sample

    data = Path(__file__).parent / "data"
    require_the_reference_sample(
        json.loads((data / "tiny_reference_figures.json").read_text()), tiny_run.layout.sample()
    )
    reference = (data / "tiny_report_reference.md").read_text()
    found = tiny_run.layout.report_file("report.md").read_text()
    problems = compare_text(reference, found, fitting_noise(tiny_run.profile))
    assert not problems, "\n".join(problems)
