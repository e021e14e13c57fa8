"""A dictionary method added from one module (random_centroids.py, named in the run config under
`methods`) reaches the report, the splice and the feature pages with no edit anywhere else."""

from __future__ import annotations

import json
import shutil

import dagster as dg
import pytest

from gemma_assets.core import methods
from gemma_assets.core.config import ConfigError, load_run_config
from gemma_assets.defs.graph import build_definitions

MODULE = "gemma_assets_tests.random_centroids"


def test_a_method_from_one_module_reaches_report_splice_and_feature_pages(tiny_run, tmp_path):
    run = load_run_config("tiny", ["seeds=2", f"methods={{{MODULE}: {{k: 12}}}}"])
    data_root = tmp_path / "data"
    shutil.copytree(tiny_run.data_root, data_root)  # the tiny run's inputs and other methods, as they are
    defs = build_definitions(run, data_root=str(data_root))
    graph = defs.resolve_asset_graph()
    assert dg.AssetKey("random_centroids") in graph.get(dg.AssetKey("downstream_loss")).parent_keys
    assert dg.AssetKey("random_centroids") in graph.get(dg.AssetKey("comparison_report")).parent_keys
    selection = ["random_centroids", "downstream_loss", "interpretation", "comparison_report"]
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            list(defs.assets or []),
            selection=selection,
            resources=defs.resources,
            instance=instance,
        )
    assert result.success
    root = data_root / run.name
    report = (root / "report" / "report.md").read_text()
    assert "random-12" in report and "random centroids (floor)" in report
    figures = json.loads((root / "report" / "report.json").read_text())
    row = next(r for r in figures["dictionaries"] if r["name"] == "random-12")
    assert row["heldout_fvu"]["low"] <= row["heldout_fvu"]["value"] <= row["heldout_fvu"]["high"]
    spliced = json.loads((root / "evaluation" / "downstream.json").read_text())
    assert "random-12" in {d["name"] for d in spliced["dictionaries"]}
    assert (root / "report" / "features" / "random-12" / "index.html").exists()
    assert len(list((root / "report" / "features" / "random-12").glob("feature-*.html"))) == 12
    # random centroids are a floor: k-means at a larger k reconstructs better
    kmeans = next(r for r in figures["dictionaries"] if r["name"].startswith("kmeans-"))
    assert kmeans["heldout_fvu"]["value"] < row["heldout_fvu"]["value"]


def test_a_method_only_joins_the_runs_that_name_it():
    import gemma_assets_tests.random_centroids  # noqa: F401 - registered in this process

    assert "random-centroids" not in {m.name for m in methods.methods_of(load_run_config("tiny"))}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("methods={no_such_module_xyz: {}}", "cannot import 'no_such_module_xyz'"),
        ("methods={json: {}}", "module 'json' declares no method"),
        (f"methods={{{MODULE}: {{k: 0}}}}", f"methods.{MODULE}: k: Input should be greater than or equal to 1"),
        (f"methods={{{MODULE}: {{kk: 2}}}}", f"methods.{MODULE}: kk: Extra inputs are not permitted"),
    ],
)
def test_a_bad_method_module_is_a_config_error(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        methods.methods_of(load_run_config("tiny", [override]))
