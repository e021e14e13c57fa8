"""Interop with SAELens: every clustering dictionary and trained SAE exported as an SAELens SAE
folder, loaded in a fresh process, and any SAELens SAE folder used as a comparison dictionary."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from gemma_assets.cli import main

EXPORTED = ["kmeans-64", "gain-shape-64", "top4-kmeans-64", "topk-64-k4"]  # and the leader clustering

FRESH_PROCESS_CHECK = """
import json, sys
import gemma_assets.core.interop  # registers the architecture of exported dictionaries
from sae_lens import SAE
from gemma_assets.core.storage import ActivationStore

store_root, keys, folders = sys.argv[1], sys.argv[2].split(","), sys.argv[3:]
x = ActivationStore(store_root).load_tokens(keys)[0].double()  # held-out, BOS excluded
out = {}
for folder in folders:
    sae = SAE.load_from_disk(folder)
    x_hat = sae.decode(sae.encode(x.float())).double()
    out[folder] = {
        "fvu": float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()),
        "w_dec_norm_error": float((sae.W_dec.norm(dim=1) - 1).abs().max()),
        "forward_matches": bool((sae(x.float()) - x_hat.float()).abs().max() < 1e-3),
        "w_dec_shape": list(sae.W_dec.shape),
    }
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def exports(tiny_run, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("exports")
    leader = tiny_run.layout.leader_records()[0].name
    folders = {}
    for name in [*EXPORTED, leader]:
        folders[name] = out / name
        config = [
            "--config",
            "tiny",
            "--set",
            f"seeds={tiny_run.profile.seeds}",
            "--data-root",
            str(tiny_run.data_root),
        ]
        main(["export", name, *config, "--out", str(folders[name])])
    return folders


def test_exports_load_in_a_fresh_process_with_the_projects_fvu(tiny_run, exports):
    keys = ",".join(tiny_run.profile.heldout_partition_keys)
    store = str(tiny_run.data_root / "tiny")
    done = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS_CHECK, store, keys, *map(str, exports.values())],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    records = tiny_run.records()
    for name, folder in exports.items():
        got = measured[str(folder)]
        assert got["fvu"] == pytest.approx(records[name]["heldout_fvu"], rel=1e-6), name
        assert got["w_dec_norm_error"] < 1e-5 and got["forward_matches"], (name, got)
        assert got["w_dec_shape"][1] == 64  # [d_sae, d_model]
        config = json.loads((folder / "cfg.json").read_text())
        assert (
            config["architecture"] == "gemma_assets" and config["metadata"]["hook_name"] == "blocks.2.hook_resid_post"
        )
        provenance = config["metadata"]["gemma_assets"]
        assert provenance["run"] == "tiny" and provenance["config_digest"] == tiny_run.profile.digest()
        assert provenance["dictionary"] == name and provenance["preprocessing"] == "center"


def test_an_exported_folder_is_a_comparison_dictionary_with_the_same_metrics(tiny_run, exports, tmp_path):
    shutil.copytree(tiny_run.data_root / "tiny", tmp_path / "tiny")
    (tmp_path / "models").symlink_to(tiny_run.data_root / "models")
    run_file = tmp_path / "imported.yaml"
    run_file.write_text(
        "base: tiny\nname: tiny\nsaes:\n  train: []\n  pretrained:\n"
        f"    - {{name: imported-kmeans-64, path: {exports['kmeans-64']}}}\n"
        f"    - {{name: imported-topk-64-k4, path: {exports['topk-64-k4']}}}\n"
    )
    from gemma_assets.core.config import load_run_config
    from gemma_assets.defs.graph import build_definitions

    run = load_run_config(str(run_file))
    defs = build_definitions(run, str(tmp_path))
    with dg.instance_for_test() as instance:
        result = defs.resolve_job_def("analyse").execute_in_process(
            instance=instance,
            asset_selection=[
                dg.AssetKey(name) for name in ("sae_dictionary", "sae_evaluation", "downstream_loss", "interpretation")
            ],
        )
    assert result.success
    imported_run = defs.resources["storage"].layout()
    evaluated = {r.name: r.row() for r in imported_run.sae_records()}
    records = tiny_run.records()
    for imported, original in [("imported-kmeans-64", "kmeans-64"), ("imported-topk-64-k4", "topk-64-k4")]:
        for metric in ("heldout_fvu", "heldout_mse", "heldout_l0", "heldout_cosine", "heldout_relative_norm"):
            assert evaluated[imported][metric] == pytest.approx(records[original][metric], rel=1e-6), (imported, metric)
    # the same splice and interpretation as every dictionary
    spliced = {r["name"]: r for r in imported_run.downstream()["dictionaries"]}
    original_ce = {r["name"]: r for r in tiny_run.layout.downstream()["dictionaries"]}
    # spliced CE to float rounding (the centroid rebuilt as mean + gain x unit direction)
    assert spliced["imported-kmeans-64"]["ce"] == pytest.approx(original_ce["kmeans-64"]["ce"], rel=1e-6)
    interpretation = imported_run.interpretation()
    assert {row["sae"] for row in interpretation["alignment"]} == {"imported-kmeans-64", "imported-topk-64-k4"}
    # a later process reloads what sae_dictionary stored (the architecture registers itself)
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; from gemma_assets.core.sae import load_dictionary; "
            "print(load_dictionary(Path(sys.argv[1])).n_features)",
            str(tmp_path / "tiny" / "saes" / "imported-kmeans-64"),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )


def test_mismatched_d_in_or_hook_fails_before_compute_naming_both(tiny_run, exports, tmp_path, capsys):
    wrong_width = tmp_path / "wrong-width"
    shutil.copytree(exports["kmeans-64"], wrong_width)
    config = json.loads((wrong_width / "cfg.json").read_text())
    config["d_in"] = 2304
    (wrong_width / "cfg.json").write_text(json.dumps(config))
    for folder, overrides, expected in [
        (wrong_width, [], ["d_in=2304", "d_model=64"]),
        (exports["kmeans-64"], ["--set", "model.layer=1"], ["blocks.2.hook_resid_post", "blocks.1.hook_resid_post"]),
    ]:
        argv = ["config", "validate", "--config", "tiny", "--data-root", str(tmp_path / "data"), *overrides]
        argv += ["--set", f"saes.pretrained=[{{name: imported, path: {folder}}}]"]
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert exit_info.value.code == 2 and all(value in last for value in expected), last


def test_export_names_the_dictionaries_a_run_has(tiny_run, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "kmeans-65", "--config", "tiny", "--data-root", str(tiny_run.data_root)])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2 and "no dictionary 'kmeans-65'" in last and "kmeans-64" in last
