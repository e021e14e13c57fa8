"""quantisation_shift on a reduced tiny run: the tiny model plays the quantised checkpoint and a
copy of it with known small noise added to every weight matrix plays the unquantised model it
was made from; a random TopK SAE saved by SAELens is the run's pretrained SAE. With the stand-in
out of reach (a hub id, an empty Hugging Face cache, HF_HUB_OFFLINE=1) the run completes and the
report has one skip line; with the local stand-in the asset's figures match a recomputation from
both models' hidden states, and reach the report."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import numpy as np
import pytest
import torch

from gemma_assets.core import model
from gemma_assets.core.config import ConfigError, ModelSpec, load_run_config
from gemma_assets.core.stages.downstream import heldout_windows
from gemma_assets.core.stages.quantisation import tokenizer_mismatch
from gemma_assets.defs.graph import build_definitions
from gemma_assets.runner import materialize_all
from gemma_assets_tests.test_pretrained_optional import offline_cache

NOISE = 0.05  # of each weight matrix's own standard deviation
SAE_NAME = "random-topk-128"
MISSING_HUB_ID = "google/gemma-3-270m"


def _perturbed_copy(source: str, target: Path, seed: int = 1) -> None:
    """The model at `source` with N(0, (NOISE x std)^2) added to every weight matrix, and its
    tokenizer, saved to `target`."""
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    generator = np.random.default_rng(seed)
    with torch.no_grad():
        for parameter in lm.parameters():
            if parameter.ndim >= 2:
                noise = generator.standard_normal(tuple(parameter.shape)) * NOISE * float(parameter.std())
                parameter.add_(torch.from_numpy(noise).float())
    lm.save_pretrained(target)
    model.load_tokenizer(source).save_pretrained(target)


def _random_topk_sae(target: Path, d_in: int, hook_name: str) -> None:
    """A TopK SAE of random unit directions, encoder = decoder transposed, saved by SAELens."""
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=128, k=8, metadata=SAEMetadata(hook_name=hook_name)))
    directions = torch.nn.functional.normalize(
        torch.randn(128, d_in, generator=torch.Generator().manual_seed(0)), dim=1
    )
    with torch.no_grad():
        sae.W_dec.copy_(directions)
        sae.W_enc.copy_(directions.T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    sae.save_model(str(target))


def _block_outputs(source: str, windows: np.ndarray, layer: int, bos: int) -> np.ndarray:
    """hidden_states[layer + 1] of a plain transformers forward, rounded to bf16 as the store keeps
    them, BOS and position 0 dropped: [tokens, d] float64."""
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        hidden = lm(torch.from_numpy(windows.astype(np.int64)), output_hidden_states=True).hidden_states[layer + 1]
    keep = np.ones(windows.shape, bool)
    keep[:, 0] = False
    keep &= windows != bos
    return hidden.to(torch.bfloat16).double().numpy()[keep]


def _data_lines(markdown: str) -> str:
    return markdown.split("## Data", 1)[1].split("## Findings", 1)[0]


@pytest.mark.timeout(1800)
def test_quantisation_shift_is_skipped_out_of_reach_and_measured_against_a_local_stand_in(tmp_path, monkeypatch):
    offline_cache(monkeypatch, tmp_path / "empty-hub")
    tiny = load_run_config("tiny")
    sae_folder = tmp_path / SAE_NAME
    _random_topk_sae(sae_folder, model.TINY_CONFIG["hidden_size"], tiny.model.hook_name)
    reduced = [
        "saes.train=[]",
        "clustering.ks=[64]",
        "evaluation.ce_windows=8",
        f"saes.pretrained=[{{path: {sae_folder}, name: {SAE_NAME}}}]",
    ]
    data_root = tmp_path / "data"

    # out of reach: the run completes, the report says in one line that the comparison was skipped
    run = load_run_config("tiny", [*reduced, f"model.unquantised={MISSING_HUB_ID}"])
    defs = build_definitions(run, data_root=str(data_root))
    layout = defs.resources["storage"].layout()
    with dg.instance_for_test() as instance:
        assert all(result.success for result in materialize_all(run, defs, instance, log_level="WARNING"))
    expected = (
        f"skipped the quantisation comparison with {MISSING_HUB_ID}: not in the Hugging Face cache and the hub "
        "is unreachable (HF_HUB_OFFLINE is set)"
    )
    assert layout.quantisation_shift() == {"skipped": expected}
    data = _data_lines((layout.root / "report" / "report.md").read_text())
    assert [line for line in data.splitlines() if "quantisation" in line] == [f"- {expected}"]

    # a local stand-in of the unquantised model: the comparison and the report's lines
    source = layout.model_source(run)
    stand_in = tmp_path / "unquantised"
    _perturbed_copy(source, stand_in)
    run = load_run_config("tiny", [*reduced, f"model.unquantised={stand_in}"])
    defs = build_definitions(run, data_root=str(data_root))
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            list(defs.assets or []),
            selection=["quantisation_shift", "comparison_report"],
            resources=defs.resources,
            instance=instance,
        )
    assert result.success
    shift = layout.quantisation_shift()

    store, keys = layout.activation_store(), run.heldout_partition_keys
    windows = heldout_windows(store, keys, run.sampling.context_len, run.evaluation.ce_windows)
    bos = model.load_tokenizer(source).bos_token_id
    quantised = _block_outputs(source, windows, run.model.layer, bos)
    unquantised = _block_outputs(str(stand_in), windows, run.model.layer, bos)
    direct_fvu = ((quantised - unquantised) ** 2).sum() / ((unquantised - unquantised.mean(0)) ** 2).sum()
    assert shift["windows"] == len(windows) == 8 and shift["tokens"] == len(quantised)
    assert 0 < shift["fvu"]["value"] == pytest.approx(direct_fvu, rel=1e-3)
    assert shift["fvu"]["low"] <= shift["fvu"]["value"] <= shift["fvu"]["high"]
    cosine = (quantised * unquantised).sum(1) / np.linalg.norm(quantised, axis=1) / np.linalg.norm(unquantised, axis=1)
    assert shift["cosine"]["value"] == pytest.approx(cosine.mean(), rel=1e-4)

    (sae,) = shift["saes"]
    fvus = (sae["fvu_unquantised"]["value"], sae["fvu_quantised"]["value"])
    assert sae["name"] == SAE_NAME and all(np.isfinite(fvus)) and fvus[0] != fvus[1]
    assert sae["fvu_difference"]["value"] == pytest.approx(fvus[1] - fvus[0])

    data = _data_lines((layout.root / "report" / "report.md").read_text())
    assert "Quantisation shift" in data and f"FVU {shift['fvu']['value']:.4g} [" in data
    assert f"- {SAE_NAME}: {fvus[0]:.4g} [" in data and f"-> {fvus[1]:.4g} [" in data
    assert "skipped the quantisation comparison" not in data


def test_a_stand_in_with_another_tokenizer_is_named_as_such():
    texts = [f"document {i}: the quick brown fox {i * 7} jumps over the lazy dog" for i in range(200)]
    ours = model.train_tokenizer(texts, 300)
    theirs = model.train_tokenizer([text.upper() for text in texts], 300)
    windows = np.array([ours(text)["input_ids"][:8] for text in texts[:2]])
    assert tokenizer_mismatch(ours, ours, windows) is None
    assert "held-out window 0: id " in (tokenizer_mismatch(ours, theirs, windows) or "")


def test_unquantised_must_name_another_model():
    with pytest.raises(ValueError, match="model.unquantised is the run's own model"):
        ModelSpec(kind="hub", name="google/gemma-2-2b", layer=6, unquantised="google/gemma-2-2b")
    assert ModelSpec(kind="gguf_demo", name="demo", layer=6, unquantised=" google/gemma-3-270m ").unquantised == (
        "google/gemma-3-270m"
    )
    assert load_run_config("demo").model.unquantised == "google/gemma-3-270m"
    with pytest.raises(ConfigError, match="model.unquantised is the run's own model"):
        load_run_config("gemma-2-2b", ["model.unquantised=google/gemma-2-2b"])
