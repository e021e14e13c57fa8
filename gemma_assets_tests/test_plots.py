"""Plots of a run that lacks what they compare say so on the figure, without a warning."""

from __future__ import annotations

import warnings

import numpy as np

from gemma_assets.core import plots


def test_the_alignment_histogram_of_a_run_without_saes_says_so_and_warns_nothing(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's "No artists with labels found" was one
        empty = plots.alignment_histogram({}, "kmeans-64", tmp_path / "empty.png", 0.9)
        drawn = plots.alignment_histogram(
            {"topk-64-k4": np.linspace(0, 1, 64)}, "kmeans-64", tmp_path / "drawn.png", 0.9
        )
    assert empty.read_bytes().startswith(b"\x89PNG") and drawn.read_bytes().startswith(b"\x89PNG")
