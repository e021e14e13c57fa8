"""Refits with other seeds: the spread over seeds and how much of a dictionary reappears in a refit
(the tiny run fits two seeds)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gemma_assets.core import interpret, progress
from gemma_assets.core.methods import all_records, all_seed_spreads, methods_of
from gemma_assets.core.records import SEED_METRICS, Family
from gemma_assets.core.stages.interpretation import load_eval_tokens, seed_agreement


def test_partition_f1_known_answers():
    labels = np.array([0, 0, 1, 1, 2, 2, 2, 2])
    relabelled = np.array([2, 2, 0, 0, 1, 1, 1, 1])
    np.testing.assert_array_equal(interpret.partition_f1(labels, relabelled, 3, 3), [1, 1, 1])
    split = np.array([0, 0, 1, 1, 2, 2, 3, 3])  # cluster 2 of `labels` split in halves
    f1 = interpret.partition_f1(labels, split, 3, 4)
    np.testing.assert_allclose(f1, [1, 1, 2 * 2 / (4 + 2)])
    np.testing.assert_allclose(interpret.partition_f1(labels, split, 4, 4)[3], 0)  # an empty cluster


def test_every_refittable_dictionary_has_its_spread_over_seeds(tiny_run):
    layout, run = tiny_run.layout, tiny_run.profile
    assert run.seeds == 2
    spreads = {spread.name: spread for spread in all_seed_spreads(layout, run, methods_of(run))}
    deterministic = ("leader", "leader-mean", "itda")  # fitted once: streamed in store order, no seed
    fitted = [r for r in all_records(layout, run, methods_of(run)) if r.family.value not in deterministic]
    assert set(spreads) == {r.name for r in fitted}  # k-means, gain-shape, top-m and every trained SAE
    for record in fitted:
        spread = spreads[record.name]
        assert spread.seeds == 2
        for metric in SEED_METRICS:
            first, refit = spread.values[metric]
            assert first == record.heldout[metric]  # seed 0 is the record the tables show
            assert spread.mean(metric) == pytest.approx((first + refit) / 2)
            assert spread.sd(metric) == pytest.approx(abs(first - refit) / np.sqrt(2))
    for name in ("kmeans-64", "gain-shape-128", "topk-64-k4"):  # a refit is a different fit
        assert spreads[name].values["fvu"][0] != spreads[name].values["fvu"][1], name
    replica = layout.kmeans_seed_records(64)["kmeans-64"][0]
    assert replica.name == "kmeans-64-seed1" and replica.facts["seed"] == 1
    training = json.loads((layout.sae_dir("topk-64-k4-seed1") / "training.json").read_text())
    assert training["seed"] == 1


def test_seed_agreement_compares_each_dictionary_with_its_refit(tiny_run):
    layout, run = tiny_run.layout, tiny_run.profile
    rows = {row["dictionary"]: row for row in layout.interpretation()["seed_agreement"]}
    assert set(rows) == {f"kmeans-{k}" for k in run.clustering.ks} | {s.name for s in run.sae_specs}
    for k in run.clustering.ks:
        row = rows[f"kmeans-{k}"]
        assert row["other_seed"] == f"kmeans-{k}-seed1"
        low, high = row["clusters_matched_f1_interval"]
        assert 0 <= low <= row["clusters_matched_f1"] <= high <= 1
    # the twin share recomputed from the saved centroids (centring: a centroid is its centred direction)
    assert run.clustering.preprocessing == "center"
    row, (refit,) = rows["kmeans-64"], layout.kmeans_seed_centroids(64)
    first = torch.from_numpy(layout.kmeans_model(64)["centroids"])
    units = [torch.nn.functional.normalize(c, dim=1) for c in (first, refit)]
    best = (units[0] @ units[1].T).max(1).values
    assert row["features_with_twin"] == pytest.approx(float((best >= interpret.TWIN_COSINE).float().mean()))
    report = layout.report_file("report.md").read_text()
    assert "### Spread over seeds" in report and "| kmeans-64 | 2 |" in report
    assert "| kmeans-64 | kmeans-64-seed1 |" in report


def test_seed_agreement_reports_its_alignments_in_cosines_and_recomputes_the_stored_rows(tiny_run):
    layout, run = tiny_run.layout, tiny_run.profile
    spec = run.evaluation
    tokens = load_eval_tokens(
        layout.activation_store(),
        run.heldout_partition_keys,
        spec.interpret_tokens,
        run.sampling.context_len,
        spec.context_width,
    )
    clusters = [m for m in layout.kmeans_members(run) if m.family is Family.KMEANS]
    latents = layout.sae_members(run.sae_specs)
    acts = {
        m.name: interpret.FeatureActivations.from_codes([m.dictionary.encode(tokens.x)], m.dictionary.n_features)
        for m in clusters
    }
    updates: list[progress.Update] = []
    with progress.reporting(updates.append, "interpretation"):
        rows = seed_agreement(
            layout,
            clusters,
            latents,
            lambda m: layout.sae_members(run.sae_seed_replicas.get(m.name, ())),
            tokens,
            acts,
            "cpu",
        )
    assert rows == layout.interpretation()["seed_agreement"]
    # one task per dictionary with a refit, counted in the cosines of its alignment (each has one refit)
    ends = {u.task: u for u in updates if u.final and u.task.startswith("seed agreement of ")}
    widths = {m.name: m.dictionary.n_features for m in [*clusters, *latents]}
    assert set(ends) == {f"seed agreement of {name}" for name in widths}
    for name, n in widths.items():
        end = ends[f"seed agreement of {name}"]
        assert end.unit == "cosines" and end.total == end.position == n * n
    # each refit's clusters are encoded with a task of their own, its member sets matched by F1
    assert {u.task for u in updates if u.final} >= {f"encoding {len(tokens.x):,} held-out tokens with kmeans-64-seed1"}
    (refit,) = layout.kmeans_seed_centroids(64)
    first = torch.from_numpy(layout.kmeans_model(64)["centroids"])
    centred = tokens.x - torch.from_numpy(layout.moments("train").mean).float()  # centroids are centred
    labels = [torch.cdist(centred, c.float()).argmin(1) for c in (first, refit)]
    matched = interpret.partition_f1(labels[0].numpy(), labels[1].numpy(), 64, 64) > interpret.MATCH_F1
    kmeans_row = next(r for r in rows if r["dictionary"] == "kmeans-64")
    assert kmeans_row["clusters_matched_f1"] == pytest.approx(matched.mean())
