"""Optional pretrained SAEs, and Gemma Scope 2's SAEs of the demo's block, offline: stand-ins in
Gemma Scope 2's hub layout (google/gemma-scope-2-270m-pt, params.safetensors) in a real Hugging
Face cache, loaded by SAELens' own `SAE.from_pretrained` with HF_HUB_OFFLINE=1; an optional SAE
the cache lacks is skipped with one line, in the log and in the report, and the run goes on."""

from __future__ import annotations

import dataclasses
import importlib

import dagster as dg
import pytest
import sae_lens
import torch
from offline import offline_cache

from gemma_assets.core import report, sae, sae_lens_offline, standins, validation
from gemma_assets.core.config import load_run_config
from gemma_assets.core.methods import all_records, methods_of
from gemma_assets.defs.graph import build_definitions
from gemma_assets.runner import materialize_all

SCOPE_2 = "gemma-scope-2-270m-pt-res-all"
DEMO_IDS = {"layer_6_width_16k_l0_small", "layer_6_width_16k_l0_big", "layer_6_width_262k_l0_small", "layer_6_width_262k_l0_big"}  # fmt: skip


def test_saelens_still_has_the_shapes_reader_that_is_swapped():
    loaders = importlib.import_module(sae_lens_offline.LOADERS_MODULE)
    assert hasattr(loaders, sae_lens_offline.SHAPES_FUNCTION), (
        f"SAELens {sae_lens.__version__} has no {sae_lens_offline.LOADERS_MODULE}.{sae_lens_offline.SHAPES_FUNCTION}: "
        "adapt gemma_assets/core/sae_lens_offline.py to how it now reads safetensors shapes"
    )
    original = getattr(loaders, sae_lens_offline.SHAPES_FUNCTION)
    with sae_lens_offline.hub_cache_shapes():
        swapped = getattr(loaders, sae_lens_offline.SHAPES_FUNCTION)
        assert swapped.func is sae_lens_offline.cached_tensor_shapes and swapped.keywords["read_remote"] is original
    assert getattr(loaders, sae_lens_offline.SHAPES_FUNCTION) is original


def test_demo_gemma_scope_2_saes_load_offline_and_validate(tmp_path, monkeypatch):
    demo = load_run_config("demo")
    scope_2 = [spec for spec in demo.sae_specs if spec.release == SCOPE_2]
    assert {spec.sae_id for spec in scope_2} == DEMO_IDS and all(spec.optional for spec in scope_2)
    assert "gemma-scope-2-16k-l0-small" in {spec.name for spec in scope_2}
    note = report.checkpoint_note(demo)  # the report's Data section: the demo runs the quantised checkpoint
    assert "Q4_K_M-quantised GGUF" in note and "trained on the unquantised bf16 model" in note
    assert report.checkpoint_note(load_run_config("tiny")) == ""
    narrow = [spec for spec in scope_2 if "_16k_" in spec.sae_id]  # the 262k ones are 1.3 GB each
    standins.build_gemma_scope_2_saes(standins.StandIns(tmp_path), narrow, d_in=640)
    offline_cache(monkeypatch, tmp_path / "hub")

    for spec in narrow:
        dictionary = sae.load_pretrained(spec, "cpu")
        assert dictionary.sae.cfg.d_in == 640 and dictionary.n_features == 16384
        assert dictionary.sae.cfg.metadata.hook_name == demo.model.hook_name == "blocks.6.hook_resid_post"

    warnings: list[str] = []
    # what materialize, config validate and each preflight slice check first (the demo model's
    # shape is known without converting it)
    assert validation.validate_run(demo, tmp_path / "models", warnings.append).d_model == 640
    assert len(warnings) == 2 and all("262k" in w and "not in the Hugging Face cache" in w for w in warnings)
    required = dataclasses.replace(next(s for s in scope_2 if "_262k_" in s.sae_id), optional=False)
    (problem,) = sae.pretrained_problems([required], 640, demo.model.hook_name)
    assert "cannot read its config" in problem and "HF_HUB_OFFLINE is set" in problem
    with pytest.raises(sae.SaeUnavailable, match="LocalEntryNotFoundError"):
        sae.load_pretrained(required, "cpu")


def _skipped_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "skipped gemma-scope-2" in line]


@pytest.mark.timeout(1800)
def test_optional_saes_are_skipped_without_the_cache_and_reach_the_report_with_it(tmp_path, monkeypatch):
    """A reduced tiny run names two Gemma Scope 2 SAEs of its block (layer 2) as optional: with an
    empty cache both are skipped, one line each; with stand-ins of one at the tiny model's d_model
    (calibrated on the run's own activations) in the cache, it is loaded and reaches the report."""
    entry = "{{release: {0}, sae_id: layer_2_width_16k_l0_{1}, name: gemma-scope-2-16k-l0-{1}, optional: true}}"
    run = load_run_config(
        "tiny",
        [
            "saes.train=[]",
            "clustering.ks=[64]",
            "evaluation.ce_windows=8",
            f"saes.pretrained=[{entry.format(SCOPE_2, 'small')}, {entry.format(SCOPE_2, 'big')}]",
        ],
    )
    offline_cache(monkeypatch, tmp_path / "standins" / "hub")
    data_root = tmp_path / "data"
    defs = build_definitions(run, data_root=str(data_root))
    layout = defs.resources["storage"].layout()
    with dg.instance_for_test() as instance:
        results = materialize_all(run, defs, instance, log_level="WARNING")
        logged = [e.user_message for result in results for e in instance.all_logs(result.run_id)]
    markdown = (layout.root / "report" / "report.md").read_text()
    assert len(_skipped_lines("\n".join(logged))) == 2
    assert _skipped_lines(markdown) == [
        f"- skipped gemma-scope-2-16k-l0-{size}: optional SAE {SCOPE_2}/layer_2_width_16k_l0_{size} is not in the "
        "Hugging Face cache and the hub is unreachable (HF_HUB_OFFLINE is set)"
        for size in ("small", "big")
    ]
    assert not {"gemma-scope-2-16k-l0-small", "gemma-scope-2-16k-l0-big"} & {r.name for r in _records(layout, run)}

    small = [spec for spec in run.sae_specs if spec.name == "gemma-scope-2-16k-l0-small"]
    store = layout.activation_store()
    calibration = torch.cat(list(store.batches(run.train_partition_keys)())).float().numpy()
    standins.build_gemma_scope_2_saes(standins.StandIns(tmp_path / "standins"), small, 64, calibration)
    selection = ["sae_dictionary", "sae_evaluation", "downstream_loss", "interpretation", "comparison_report"]
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            list(defs.assets or []), selection=selection, resources=defs.resources, instance=instance
        )
    assert result.success
    records = {r.name: r for r in _records(layout, run)}
    assert records["gemma-scope-2-16k-l0-small"].k == 16384
    assert 0 < records["gemma-scope-2-16k-l0-small"].l0 < 13 * 4  # the published L0 is 13
    markdown = (layout.root / "report" / "report.md").read_text()
    assert "gemma-scope-2-16k-l0-small" in markdown
    assert [line.split(":")[0] for line in _skipped_lines(markdown)] == ["- skipped gemma-scope-2-16k-l0-big"]


def _records(layout, run):
    return all_records(layout, run, methods_of(run))
