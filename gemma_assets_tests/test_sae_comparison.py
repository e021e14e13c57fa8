"""The SAE side of the comparison: the metric suite checked against SAELens directly, the
spliced cross-entropy, interpretation measures on known answers, and the tiny run's outputs."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

from gemma_assets.core import interpret, model, sae, splice
from gemma_assets.core.codes import Codes, centred_units
from gemma_assets.core.itda import itda_shapes
from gemma_assets.core.metrics import evaluate
from gemma_assets.core.stages.downstream import heldout_windows


def _direct_fvu_and_l0(x: torch.Tensor, sae_module) -> tuple[float, float]:
    """Plain torch on SAELens' own encode/decode, nothing from this project in between."""
    with torch.no_grad():
        feats = sae_module.encode(x)
        x_hat = sae_module.decode(feats)
    x64, x_hat64 = x.double(), x_hat.double()
    fvu = float(((x64 - x_hat64) ** 2).sum() / ((x64 - x64.mean(0)) ** 2).sum())
    return fvu, float((feats != 0).sum(1).double().mean())


def test_trained_sae_metrics_equal_saelens_encode_decode(tiny_run):
    store, prof = tiny_run.layout.activation_store(), tiny_run.profile
    x, _ = store.load_tokens(prof.heldout_partition_keys)
    evaluation = {r.name: r.row() for r in tiny_run.layout.sae_records()}
    for spec in prof.sae_specs:
        dictionary = sae.load_dictionary(tiny_run.layout.sae_dir(spec.name))
        fvu, l0 = _direct_fvu_and_l0(x, dictionary.sae)
        assert evaluation[spec.name]["heldout_fvu"] == pytest.approx(fvu, rel=1e-6)
        assert evaluation[spec.name]["heldout_l0"] == pytest.approx(l0, rel=1e-9)
        assert l0 <= (spec.active_per_token or spec.width)


def test_variable_l0_sae_metrics_equal_saelens_encode_decode():
    # a JumpReLU SAE (Gemma Scope's architecture): L0 varies per token
    torch.manual_seed(0)
    module = JumpReLUSAE(JumpReLUSAEConfig(d_in=16, d_sae=48))
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.3)
        module.threshold.copy_(torch.rand(48) * 0.5)
    x = torch.randn(500, 16) * 2 + 1
    dictionary = sae.SaeDictionary(module.eval())
    suite = evaluate([x[:200], x[200:]], dictionary)
    fvu, l0 = _direct_fvu_and_l0(x, module)
    assert suite["fvu"] == pytest.approx(fvu, rel=1e-6) and suite["l0"] == pytest.approx(l0, rel=1e-9)
    counts = (module.encode(x) != 0).sum(1)
    assert counts.min() < counts.max()  # the case this test is about


def test_spliced_cross_entropy_of_perfect_reconstruction_is_clean(tiny_run):
    prof = tiny_run.profile
    lm = model.load_model(str(tiny_run.layout.models_dir / "tiny-gemma2"), prof.model.layer, "cpu", torch.float32)
    windows = heldout_windows(tiny_run.layout.activation_store(), prof.heldout_partition_keys, 32, 12)
    noise = torch.Generator().manual_seed(0)
    per_window = splice.cross_entropies(
        lm,
        windows,
        prof.model.layer,
        {
            "perfect": lambda x: x.clone(),
            "noisy": lambda x: x + 5 * torch.randn(x.shape, generator=noise),
            "zero": torch.zeros_like,
        },
        batch_size=5,
        device="cpu",
    )
    assert all(losses.shape == (len(windows),) for losses in per_window.values())  # one sum per window
    ce = {name: float(losses.sum() / windows[:, 1:].size) for name, losses in per_window.items()}
    assert ce["perfect"] == pytest.approx(ce["clean"], abs=1e-6)
    assert ce["noisy"] != pytest.approx(ce["clean"], abs=1e-3)  # the splice reaches the logits
    # the clean CE is the model's own loss on these windows
    with torch.no_grad():
        ids = torch.from_numpy(windows.astype(np.int64))
        reference = float(lm(input_ids=ids, labels=ids).loss)
    assert ce["clean"] == pytest.approx(reference, rel=1e-5)
    assert splice.loss_recovered(ce["clean"], ce["clean"], ce["zero"]) == 1.0
    assert splice.loss_recovered(ce["zero"], ce["clean"], ce["zero"]) == 0.0


def _random_gemma(kind: str) -> torch.nn.Module:
    """A small random Gemma-2 (softcapped logits) or Gemma 3 (local and global layers, the
    demo's architecture) with a sliding window shorter than the windows."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

    shape = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=2)
    shape |= dict(num_key_value_heads=1, head_dim=16, sliding_window=8, attn_implementation="eager")
    torch.manual_seed(0)
    if kind == "gemma2":
        return Gemma2ForCausalLM(Gemma2Config(**shape, final_logit_softcapping=30.0)).eval()
    return Gemma3ForCausalLM(Gemma3TextConfig(**shape, sliding_window_pattern=3)).eval()


@pytest.mark.parametrize("kind", ["gemma2", "gemma3"])
def test_shared_prefix_splice_equals_a_full_forward_per_dictionary(kind, monkeypatch):
    """Blocks 0..L run once and the chunked log-softmax give what a full forward per replacement
    gives (the benchmark's baseline), at every layer, including the softcapped and the
    local/global-attention models; a logit chunk of 7 positions splits windows mid-way."""
    from benchmarks.splice import per_dictionary_forward

    monkeypatch.setattr(splice, "LOGIT_CHUNK_BYTES", 7 * 4 * 300)
    lm = _random_gemma(kind)
    windows = np.random.default_rng(0).integers(3, 300, size=(5, 20)).astype(np.int32)
    basis = torch.linalg.qr(torch.randn(32, 4, generator=torch.Generator().manual_seed(1)))[0]
    replacements = {"zero": torch.zeros_like, "rank-4": lambda x: (x @ basis) @ basis.T, "scaled": lambda x: 0.5 * x}
    for layer in (0, 2, 5):
        ours = splice.cross_entropies(lm, windows, layer, replacements, batch_size=2, device="cpu")
        reference = per_dictionary_forward(lm, windows, layer, replacements, batch_size=2)
        assert set(ours) == set(reference) == {"clean", *replacements}
        for name in reference:
            np.testing.assert_allclose(ours[name], reference[name], rtol=1e-5, err_msg=f"{kind} {name} layer {layer}")
        assert not np.allclose(ours["rank-4"], ours["clean"])  # the replacement reaches the logits
    with pytest.raises(ValueError, match="'clean' names the unreplaced model"):
        splice.cross_entropies(lm, windows, 1, {"clean": torch.zeros_like}, 2, "cpu")


def test_downstream_and_interpretation_cover_every_dictionary(tiny_run):
    layout, prof = tiny_run.layout, tiny_run.profile
    downstream = layout.downstream()
    names = {r["name"] for r in downstream["dictionaries"]}
    assert {f"kmeans-{k}" for k in prof.clustering.ks} | {s.name for s in prof.sae_specs} <= names
    assert all(math.isfinite(r["delta_ce"]) for r in downstream["dictionaries"])
    interpretation = layout.interpretation()
    # every k-means k against every other interpreted dictionary: the SAEs and ITDA
    assert len(interpretation["alignment"]) == len(prof.clustering.ks) * (len(prof.sae_specs) + len(itda_shapes(prof)))
    for pair in interpretation["alignment"]:  # the matched share with its interval over clusters
        low, high = pair["clusters_matched_f1_interval"]
        assert low <= pair["clusters_matched_f1"] <= high
    assert [p["features"] for p in interpretation["probes"][:2]] == ["majority class (baseline)", "raw activations"]
    site = layout.features_site
    page = (site / "kmeans-64" / "feature-00000.html").read_text()
    assert "Top examples" in page or "Dead on these tokens" in page
    assert any("<mark>" in p.read_text() for p in (site / "topk-64-k1").glob("feature-*.html"))
    report = layout.report_file("report.md").read_text()
    for section in ("Experiment 1", "Experiment 2", "Experiment 3", "## Findings", "git revision"):
        assert section in report
    assert "<table>" in layout.report_file("report.html").read_text()
    for plot in ("l0_fvu_frontier", "l0_delta_ce", "quality_across_k", "alignment_histogram"):
        assert layout.report_file(f"{plot}.png").stat().st_size > 1000


def test_intervals_reach_the_report_json_and_the_asset_metadata(tiny_run):
    import dagster as dg

    layout = tiny_run.layout
    figures = json.loads(layout.report_file("report.json").read_text())
    assert figures["run"] == "tiny" and figures["config_digest"] == tiny_run.profile.digest()
    assert figures["intervals"]["resampled"] == "held-out windows" and figures["intervals"]["ce_windows"] == 48
    rows = {row["name"]: row for row in figures["dictionaries"]}
    assert set(rows) == set(tiny_run.records())
    for row in rows.values():
        for metric in (
            "heldout_fvu",
            "heldout_mse",
            "heldout_cosine",
            "heldout_l0",
            "delta_ce",
            "loss_recovered_vs_zero",
        ):
            assert row[metric]["low"] <= row[metric]["value"] <= row[metric]["high"], (row["name"], metric)
    # the point estimate from the per-window sums is the record's FVU (to rounding)
    assert rows["kmeans-64"]["heldout_fvu"]["value"] == pytest.approx(tiny_run.records()["kmeans-64"]["heldout_fvu"])
    assert {s["name"] for s in figures["seed_spread"]} >= {"kmeans-64", "topk-64-k1"}
    assert figures["findings"] and all(isinstance(line, str) for line in figures["findings"])
    for asset, table in (("comparison_report", "heldout_metrics"), ("interpretation", "alignment")):
        event = tiny_run.instance.get_latest_materialization_event(dg.AssetKey(asset))
        text = event.asset_materialization.metadata[table].value
        assert re.search(r"\| [-0-9.e+]+ \[[-0-9.e+]+, [-0-9.e+]+\] \|", text), (asset, text[:300])


def test_activation_f1_and_alignment_on_known_answers():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    # latent 0 fires exactly on cluster 0; latent 1 on cluster 1 plus one weaker stray token
    codes = Codes(
        torch.tensor([[0], [0], [0], [1], [1], [1], [2], [2]]),
        torch.tensor([[3.0], [2.0], [1.0], [5.0], [4.0], [0.5], [1.0], [1.0]]),
        torch.tensor([[True]] * 8),
    )
    latents = interpret.FeatureActivations.from_codes([codes], 3)
    f1, best = interpret.activation_f1(labels, 4, latents)  # cluster 3 is empty
    assert f1[3] == 0.0 and best[3] == -1
    assert f1[0] == 1.0 and best[0] == 0
    assert f1[1] == 1.0 and best[1] == 1  # top-2 of latent 1 are exactly cluster 1
    assert f1[2] == pytest.approx(2 * 2 / (3 + 2)) and best[2] == 2
    directions = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    blocks: list[int] = []  # blocks of at most 12 cosines against 4 directions: 3 rows, then 1 row
    best_ab, index_ab, best_ba, index_ba = interpret.alignment(
        directions, directions[[2, 0, 3, 1]], block_cosines=12, aligned=blocks.append
    )
    assert blocks == [12, 4]
    assert torch.allclose(best_ab, torch.ones(4)) and index_ab.tolist() == [1, 3, 0, 2]
    assert torch.allclose(best_ba, torch.ones(4)) and index_ba.tolist() == [2, 0, 3, 1]
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.nn.functional.normalize(torch.randn(n, 16, generator=generator), dim=1) for n in (50, 30))
    whole, blocked = interpret.alignment(a, b), interpret.alignment(a, b, block_cosines=7 * 30)
    for one, other in zip(whole, blocked, strict=True):  # best values, and the indices they came from
        assert torch.equal(one, other) if one.dtype == torch.long else torch.allclose(one, other, atol=1e-6)


def test_summaries_contexts_and_probes_on_known_answers():
    token_ids = np.arange(20)
    contexts = interpret.contexts_of(token_ids, np.array([0, 9, 10]), context_len=10, width=2)
    assert contexts.tolist() == [[-1, -1, 0, 1, 2], [7, 8, 9, -1, -1], [-1, -1, 10, 11, 12]]
    x = torch.tensor([[1.0, 0.0], [2.0, 0.1], [0.0, 1.0], [0.1, 3.0]])
    tokens = interpret.EvalTokens(
        x, np.array([5, 5, 6, 7]), np.array([0, 0, 1, 1]), ("a", "b"), np.zeros((4, 1), int), np.arange(4)
    )
    codes = Codes(
        torch.tensor([[0], [0], [1], [1]]),
        torch.tensor([[1.0], [2.0], [0.5], [3.0]]),
        torch.ones(4, 1, dtype=torch.bool),
    )
    summaries = interpret.summarise(
        interpret.FeatureActivations.from_codes([codes], 3), tokens, centred_units(x, torch.zeros(2))
    )
    assert [t for t, _ in summaries[0]["top_examples"]] == [1, 0]  # strongest first
    assert summaries[0]["stratum_purity"] == 1.0 and summaries[0]["token_entropy_bits"] == 0.0
    assert summaries[1]["token_entropy_bits"] == 1.0 and summaries[1]["coherence"] > 0.9
    assert summaries[2]["count"] == 0
    rng = np.random.default_rng(0)
    y = rng.integers(2, size=400)
    features = rng.normal(size=(400, 30))
    features[:, 7] += 4 * y
    assert interpret.select_by_class_separation(features, y, 1).tolist() == [7]
    assert (interpret.sparse_probe(features[:200], y[:200], features[200:]) == y[200:]).mean() > 0.95
    # a stratum-balanced subset: equal tokens per kept stratum in each half; a tiny stratum is left out, named
    strata = np.array([0] * 60 + [1] * 100 + [2] * 6)
    train = np.arange(len(strata)) % 2 == 0
    mask, left_out = interpret.stratum_balanced(strata, train, ("code", "prose", "rare"), minimum=5)
    assert [int((mask & train & (strata == s)).sum()) for s in (0, 1, 2)] == [30, 30, 0]
    assert list(left_out) == ["rare"] and "3 train and 3 test tokens" in left_out["rare"]
    assert [interpret.token_class(t) for t in (" the", "42", " ,", "\n", "x1")] == [
        "word",
        "number",
        "punctuation",
        "whitespace",
        "other",
    ]


def test_pretrained_sae_ids_exist_in_saelens_directory():
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    from gemma_assets.core.config import SHIPPED_CONFIGS, load_run_config

    directory = get_pretrained_saes_directory()
    runs = [load_run_config(name) for name in SHIPPED_CONFIGS]
    specs = [s for run in runs for s in run.sae_specs if s.architecture == "pretrained"]
    assert specs
    for spec in specs:
        assert spec.release in directory, spec.release
        assert spec.sae_id in directory[spec.release].saes_map, f"{spec.release}/{spec.sae_id}"


def test_nothing_to_evaluate_on_is_a_clear_error(tiny_run):
    from gemma_assets.core.stages.interpretation import load_eval_tokens

    store, keys = tiny_run.layout.activation_store(), tiny_run.profile.heldout_partition_keys
    with pytest.raises(ValueError, match="raise evaluation.ce_windows"):
        heldout_windows(store, keys, 32, 0)
    with pytest.raises(ValueError, match="raise evaluation.interpret_tokens"):
        load_eval_tokens(store, keys, 0, 32, 5)
