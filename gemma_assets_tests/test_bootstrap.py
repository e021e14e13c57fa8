"""Intervals by a bootstrap over windows: nominal coverage on a known answer, per-window sums that
add up to the metrics, and findings that claim no difference the data cannot carry."""

import numpy as np
import pytest
import torch

from gemma_assets.core import bootstrap, findings
from gemma_assets.core.bootstrap import Evidence, WindowSums
from gemma_assets.core.metrics import evaluate, evaluate_windows
from gemma_assets.core.records import DictionaryRecord, Family, SeedSpread


def test_interval_of_a_mean_over_independent_windows_covers_the_truth_at_the_nominal_rate():
    rng = np.random.default_rng(0)
    true_mean, repeats, covered = 2.0, 300, 0
    for repeat in range(repeats):
        tokens_per_window = rng.integers(20, 40, size=40).astype(float)
        sums = rng.normal(true_mean, 1.0, size=40) * tokens_per_window  # window means scatter around 2
        found = bootstrap.interval(lambda w: (w @ sums) / (w @ tokens_per_window), 40, draws=400, seed=repeat)
        covered += found.low <= true_mean <= found.high
    # 95% nominal; the percentile bootstrap runs a little narrow at 40 windows
    assert 0.88 <= covered / repeats <= 0.99, covered / repeats


def test_window_sums_add_up_to_the_metrics():
    torch.manual_seed(0)
    x = torch.randn(600, 8) + 3

    class Shrink:  # a dictionary whose reconstruction is a scaled copy
        n_features = 8

        def encode(self, x):
            from gemma_assets.core.codes import Codes

            return Codes.from_dense(x * 0.5)

        def decode(self, codes):
            return codes.dense(8)

    windows = np.repeat(np.arange(20), 30)
    batches = [(x[i : i + 100], windows[i : i + 100]) for i in range(0, 600, 100)]  # windows span batches
    metrics, sums = evaluate_windows(batches, Shrink())
    plain = evaluate([x[i : i + 100] for i in range(0, 600, 100)], Shrink())
    assert sums.n_windows == 20 and sums.n.sum() == 600
    ones = np.ones((1, 20))
    assert sums.fvu(ones)[0] == pytest.approx(metrics["fvu"], rel=1e-12) == pytest.approx(plain["fvu"], rel=1e-12)
    assert sums.mse(ones)[0] == pytest.approx(metrics["mse"], rel=1e-12)
    assert sums.mean_of("cosine")(ones)[0] == pytest.approx(metrics["cosine"], rel=1e-12)


def _sums(sse: np.ndarray, rng: np.random.Generator) -> WindowSums:
    n = np.full(len(sse), 30.0)
    return WindowSums(n, sse, n * 10.0, rng.normal(0, 1, (len(sse), 4)), n * 0.8, n, n)


def _evidence(sse_a: np.ndarray, sse_b: np.ndarray) -> tuple[list[DictionaryRecord], Evidence]:
    rng = np.random.default_rng(1)
    a, b = _sums(sse_a, rng), _sums(sse_b, rng)
    b = WindowSums(a.n, sse_b, a.sq, a.x, a.cosine, a.relative_norm, a.l0)  # the same tokens
    ones = np.ones((1, len(sse_a)))
    records = [
        DictionaryRecord("kmeans-64", Family.KMEANS, 64, 1, {"fvu": float(a.fvu(ones)[0]), "l0": 1.0}),
        DictionaryRecord("topk-64-k1", Family.of_sae("topk"), 64, 1, {"fvu": float(b.fvu(ones)[0]), "l0": 1.0}),
    ]
    return records, Evidence({"kmeans-64": a, "topk-64-k1": b}, {}, 31)


def test_dictionaries_equal_up_to_noise_are_called_indistinguishable():
    rng = np.random.default_rng(2)
    errors = rng.gamma(5.0, 20.0, size=48)  # per-window error sums, varying a lot between windows
    records, evidence = _evidence(errors, errors * rng.normal(1.0, 0.02, size=48))
    [line] = [f for f in findings.findings(records, {}, evidence) if f.startswith("At L0 = 1")]
    assert "indistinguishable" in line and "windows would resolve it" in line
    assert "No SAE has a held-out FVU lower than kmeans-64" in " ".join(findings.findings(records, {}, evidence))


def test_a_clear_difference_is_claimed_with_its_interval():
    rng = np.random.default_rng(3)
    errors = rng.gamma(5.0, 20.0, size=48)
    records, evidence = _evidence(errors, errors * 0.8)
    [line] = [f for f in findings.findings(records, {}, evidence) if f.startswith("At L0 = 1")]
    assert "a lower held-out FVU than kmeans-64" in line and "paired difference -" in line
    comparison = evidence.compare("topk-64-k1", "kmeans-64", "fvu")
    assert comparison.resolved and comparison.difference.high < 0


def test_a_difference_within_the_spread_over_seeds_is_not_claimed():
    """The paired window interval excludes 0, but refits of the two overlap: no claim."""
    rng = np.random.default_rng(3)
    records, evidence = _evidence(*(lambda e: (e, e * 0.8))(rng.gamma(5.0, 20.0, size=48)))
    kmeans, sae = (r.heldout["fvu"] for r in records)
    apart = [SeedSpread("kmeans-64", {"fvu": [kmeans, kmeans * 1.01]}), SeedSpread("topk-64-k1", {"fvu": [sae, sae]})]
    overlapping = [apart[0], SeedSpread("topk-64-k1", {"fvu": [sae, kmeans * 1.005]})]
    [claimed] = [f for f in findings.findings(records, {}, evidence, apart) if f.startswith("At L0 = 1")]
    assert "a lower held-out FVU than kmeans-64" in claimed
    [line] = [f for f in findings.findings(records, {}, evidence, overlapping) if f.startswith("At L0 = 1")]
    assert "indistinguishable" in line and "but their ranges over seeds overlap" in line


def test_delta_ce_interval_is_paired_on_windows():
    rng = np.random.default_rng(4)
    clean = rng.gamma(4.0, 25.0, size=40)  # summed CE per window varies far more than the splice's effect
    spliced = clean + rng.normal(3.0, 0.5, size=40)
    evidence = Evidence({}, {"clean": clean, "a": spliced, "zero-ablation": clean + 60}, 31)
    delta = evidence.delta_ce("a")
    assert delta.low > 0 and delta.value == pytest.approx((spliced - clean).sum() / (40 * 31))
    recovered = evidence.loss_recovered("a", "zero-ablation")
    assert recovered.low < recovered.value < recovered.high and recovered.value == pytest.approx(1 - 3 / 60, abs=0.02)


def test_one_spliced_window_gives_values_and_no_interval_and_claims_nothing():
    """ce_windows=1 is a valid config (a preflight slice splices one window): the report shows
    each figure with no interval and never claims a difference it cannot resample."""
    clean, spliced = np.array([100.0]), np.array([130.0])
    evidence = Evidence({}, {"clean": clean, "a": spliced, "b": spliced + 5, "zero-ablation": clean + 60}, 31)
    delta = evidence.delta_ce("a")
    assert delta.value == pytest.approx(30 / 31) and not delta.bounded and not delta.excludes(0.0)
    assert str(delta) == f"{30 / 31:.4g} [no interval]"
    comparison = evidence.compare_delta_ce("a", "b")
    assert not comparison.resolved and comparison.windows_to_resolve() is None
    assert findings.verdict(comparison) == "indistinguishable"
    assert "no interval" in findings.spread(comparison)


def test_each_family_states_its_margin_over_the_floor_at_an_equal_width_and_l0():
    rng = np.random.default_rng(4)
    errors = rng.gamma(5.0, 20.0, size=48)
    records, evidence = _evidence(errors, errors * 0.8)
    floor = Family.of_sae("random_decoder")
    assert floor.is_floor and not Family.of_sae("topk").is_floor
    sums = evidence.windows["kmeans-64"]
    floor_sums = WindowSums(sums.n, errors * 1.3, sums.sq, sums.x, sums.cosine, sums.relative_norm, sums.l0)
    wider = WindowSums(sums.n, errors * 0.5, sums.sq, sums.x, sums.cosine, sums.relative_norm, sums.l0)
    ones = np.ones((1, len(errors)))
    records += [
        DictionaryRecord("random-decoder-64-k1", floor, 64, 1, {"fvu": float(floor_sums.fvu(ones)[0]), "l0": 1.0}),
        # no floor at 128 features: the margin is read at 64, the widest width with a floor
        DictionaryRecord("topk-128-k1", Family.of_sae("topk"), 128, 1, {"fvu": float(wider.fvu(ones)[0]), "l0": 1.0}),
    ]
    windows = dict(evidence.windows) | {"random-decoder-64-k1": floor_sums, "topk-128-k1": wider}
    evidence = Evidence(windows, {}, 31)
    records.append(DictionaryRecord("leader-90", Family.LEADER, 90, 1, {"fvu": 0.5, "l0": 1.0}))
    lines = [f for f in findings.findings(records, {}, evidence) if f.startswith("Over the floor")]
    assert len(lines) == 2  # k-means and TopK; the floor has no margin over itself
    [unmatched] = [f for f in findings.findings(records, {}, evidence) if f.startswith("No floor stands")]
    assert unmatched.endswith("of: leader (Exemplar Partitioning); their margins over the floor are not stated.")
    kmeans_line, topk_line = lines
    assert kmeans_line.startswith("Over the floor, k-means: kmeans-64 (L0 1.0) has a held-out FVU below that of")
    assert "topk-64-k1" in topk_line and "topk-128-k1" not in topk_line and "paired difference -" in topk_line
    # the floor is not an SAE the k-means readings are compared against
    assert not any("random-decoder" in f for f in findings.findings(records, {}, evidence) if f.startswith("At L0"))
