"""ITDA: a dictionary of real train tokens of exactly its width, coded by matching pursuit, and
its rows in a real tiny run (held-out FVU, L0 = m, spliced delta CE)."""

from __future__ import annotations

import math

import pytest
import torch

from gemma_assets.core.codes import centred_units
from gemma_assets.core.config import ConfigError, load_run_config
from gemma_assets.core.itda import fit_itda, itda_name, itda_shapes


def correlated_tokens(n: int, d: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=generator) @ torch.randn(d, d, generator=generator) + 3


def in_batches(x: torch.Tensor, size: int):
    return lambda: (x[start : start + size] for start in range(0, len(x), size))


def test_atoms_are_real_tokens_centred_and_unit_norm():
    x = correlated_tokens(2000, 24)
    mean = x.mean(0)
    result = fit_itda(in_batches(x, 300), mean, width=96, m=4, threshold=0.1)
    assert result.atoms.shape == (96, 24) and result.passes == 1 and result.threshold == 0.1
    assert torch.allclose(result.atoms.norm(dim=1), torch.ones(96), atol=1e-6)
    # each atom is the centred, unit-normalised train token it was taken from, and no token twice
    assert torch.equal(result.atoms, centred_units(x[result.token_indices], mean))
    assert len(set(result.token_indices.tolist())) == 96
    # whatever the recorded positions, every atom is some input row
    nearest = (result.atoms @ centred_units(x, mean).T).max(1).values
    assert (nearest > 1 - 1e-6).all()
    codes = result.dictionary().encode(x[1000:1200])
    # m = 4 pursuit steps: fewer atoms where a step picks an atom again
    assert (codes.l0() <= 4).all() and codes.l0().float().mean() > 3


def test_the_threshold_halves_until_the_dictionary_is_full():
    x = correlated_tokens(400, 8, seed=1)
    # in 8 dimensions, 4 atoms explain all but a little of most tokens: 0.9 admits few per pass
    # (batches of 4: the first group, coded with no atom at all, adds only 4)
    result = fit_itda(in_batches(x, 4), x.mean(0), width=40, m=4, threshold=0.9)
    assert len(result.atoms) == 40
    assert result.passes >= 2
    assert result.threshold == pytest.approx(0.9 * 0.5 ** (result.passes - 1))
    assert result.n_tokens_seen > len(x)  # the split was streamed again
    assert len(set(result.token_indices.tolist())) == 40


def test_tokens_the_dictionary_explains_are_not_added():
    d = 16
    basis = torch.eye(d)
    first = basis[:2] * torch.tensor([[2.0], [3.0]])  # two orthogonal directions
    weights = torch.randn(200, 2, generator=torch.Generator().manual_seed(2))
    explained = weights @ basis[:2]  # in their span: matching pursuit with m = 2 reconstructs them exactly
    fresh = torch.randn(30, d, generator=torch.Generator().manual_seed(3))
    x = torch.cat([first, explained, fresh])
    batches = lambda: iter([first, explained, fresh])  # noqa: E731 - the first group holds only the two
    result = fit_itda(batches, torch.zeros(d), width=12, m=2, threshold=0.1)
    indices = result.token_indices.tolist()
    assert indices[:2] == [0, 1]
    assert not any(2 <= i < 202 for i in indices), "a token in the span of the atoms was added"
    assert torch.equal(result.atoms, centred_units(x[result.token_indices], torch.zeros(d)))


def test_duplicates_are_never_atoms_and_too_few_distinct_tokens_is_a_config_error():
    distinct = correlated_tokens(5, 16, seed=4)
    x = distinct.repeat(40, 1)  # 5 distinct tokens, each 40 times, several in every group
    result = fit_itda(x, x.mean(0), width=5, m=2, threshold=0.1)
    assert len(set(result.token_indices.remainder(5).tolist())) == 5
    with pytest.raises(ConfigError, match="holds only 5 distinct tokens.*fewer than ITDA width 6.*itda.widths"):
        fit_itda(x, x.mean(0), width=6, m=2, threshold=0.1)


@pytest.mark.parametrize(
    ("width", "m", "threshold", "message"),
    [(0, 4, 0.1, "width and an m of at least 1"), (8, 4, 1.5, "threshold must be in \\(0, 1\\)")],
)
def test_bad_settings_are_config_errors(width, m, threshold, message):
    x = correlated_tokens(50, 4)
    with pytest.raises(ConfigError, match=message):
        fit_itda(x, x.mean(0), width, m, threshold)


def test_shapes_follow_the_trained_saes_and_the_config():
    tiny = load_run_config("tiny")
    assert itda_shapes(tiny) == [(width, m) for width in (64, 128, 256) for m in (1, 4, 16)]
    assert itda_shapes(load_run_config("tiny", ["itda.widths=[8, 32]", "itda.l0s=[8, 2]"])) == [
        (8, 2),
        (32, 8),
        (32, 2),
    ]
    assert itda_shapes(load_run_config("tiny", ["itda.enabled=false"])) == []
    with pytest.raises(ConfigError, match="itda.threshold"):
        load_run_config("tiny", ["itda.threshold=1"])
    with pytest.raises(ConfigError, match="itda.widths"):
        load_run_config("tiny", ["itda.widths=[8, 8]"])
    with pytest.raises(ConfigError, match="itda: width 100000 exceeds the 4,464 train tokens"):
        load_run_config("tiny", ["itda.widths=[100000]"])


def test_itda_rows_in_the_tiny_run(tiny_run):
    records = tiny_run.records()
    spliced = {row["name"]: row for row in tiny_run.layout.downstream()["dictionaries"]}
    names = [itda_name(width, m) for width, m in itda_shapes(tiny_run.profile)]
    assert len(names) == 9 and "itda-128-m1" in names  # every k-means reading's L0 at every SAE width
    for name in names:
        row = records[name]
        assert row["family"] == "ITDA (real activations, matching pursuit)"
        assert 0 < row["heldout_fvu"] < 1
        assert row["m"] / 2 < row["heldout_l0"] <= row["m"]  # an atom picked again counts once
        assert math.isfinite(spliced[name]["delta_ce"]) and spliced[name]["family"] == "itda"
        assert row["parameters"] == row["k"] * 64
    # more atoms per token reconstruct better at every width
    for width in (64, 128, 256):
        fvus = [records[itda_name(width, m)]["heldout_fvu"] for m in (1, 4, 16)]
        assert fvus == sorted(fvus, reverse=True), (width, fvus)
    report = tiny_run.layout.report_file("report.md").read_text()
    assert "| itda-256-m16 |" in report
    assert (tiny_run.layout.features_site / "itda-128-m4" / "index.html").exists()
