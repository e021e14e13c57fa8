"""The research path rehearsed offline at its true shapes: `gemma-assets preflight --config
gemma-2-2b --offline-standins` builds the stand-ins (google/gemma-2-2b at d_model 2304 with 26
blocks, Gemma Scope params.npz at the real paths, Pile-format shards) and runs every asset of
the profile on a slice, with HF_HUB_OFFLINE=1 and no network. Several minutes on two cores, so
it runs as its own CI step: `python -m pytest -m rehearsal`."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest

from gemma_assets.core.config import load_run_config

pytestmark = [pytest.mark.rehearsal, pytest.mark.timeout(2400)]


def test_gemma_2_2b_rehearses_offline_at_its_true_shapes(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}  # the command sets its own
    out = tmp_path / "preflight.json"
    command = [
        sys.executable, "-m", "gemma_assets.cli", "preflight", "--config", "gemma-2-2b", "--offline-standins",
        "--points", "1", "--set", "clustering.max_iter=1", "--set", "clustering.seeding=random", "--set", "density.max_iter=1",
        "--set", "evaluation.logit_effect_features=64", "--set", "saes.trainer.epochs=0.25",
        "--data-root", str(tmp_path), "--json", str(out),
    ]  # fmt: skip
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=2300)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    assert "estimate for the full run gemma-2-2b" in finished.stdout

    research = load_run_config("gemma-2-2b")
    document = json.loads(out.read_text())
    (measured,) = document["slices"]
    assert measured["d_model"] == 2304 and measured["n_layers"] == 26 and measured["layer"] == 12
    assert measured["hf_hub_offline"] is True and document["clipped"] == []

    pretrained = {sae["name"]: sae for sae in measured["pretrained_saes"]}
    assert set(pretrained) == {spec.name for spec in research.sae_specs if not spec.is_trained}
    assert {sae["features"] for sae in pretrained.values()} == {16384, 65536}
    for spec in research.sae_specs:
        if spec.is_trained:
            continue
        sae = pretrained[spec.name]
        assert sae["loaded_with"] == "SAE.from_pretrained" and sae["sae_id"] == spec.sae_id
        published = {"canonical": {16384: 82, 65536: 72}[sae["features"]]}.get(
            spec.sae_id.rsplit("/", 1)[-1], None
        ) or int(re.search(r"average_l0_(\d+)", spec.sae_id).group(1))
        assert published / 2 < sae["heldout_l0"] < published * 2, (spec.name, sae["heldout_l0"])
        assert 0 < sae["heldout_fvu"] < 1.5

    dictionaries = {d["name"]: d for d in measured["dictionaries"]}
    for k in research.clustering.ks:
        assert dictionaries[f"kmeans-{k}"]["features"] == k
        assert math.isfinite(dictionaries[f"kmeans-{k}"]["heldout_fvu"])
    for spec in research.sae_specs:  # the SAEs trained here, at Gemma Scope's width, in one pass
        if spec.is_trained:
            assert dictionaries[spec.name]["features"] == spec.width
            assert math.isfinite(dictionaries[spec.name]["heldout_fvu"])
    assert measured["ce_windows"] >= 1
    assert all(math.isfinite(d["delta_ce"]) for d in dictionaries.values() if d["delta_ce"] is not None)
    assert math.isfinite(dictionaries["gemma-scope-65k-canonical"]["delta_ce"])
    assert measured["report"] and os.path.exists(measured["report"])

    # the alignments and feature pages are measured apart: the estimate keeps them out of the token line
    interpretation = {row["asset"]: row for row in measured["assets"]}["interpretation"]
    assert 0 < interpretation["width_seconds"] < interpretation["seconds"]
    assert interpretation["width_flops"] > 0

    estimated = {row["asset"] for row in document["estimate"]["assets"]}
    assert {"activations", "activation_stats", "cluster_models", "sae_evaluation", "downstream_loss"} <= estimated
    assert document["estimate"]["store_bytes"] > 0
