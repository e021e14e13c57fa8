"""pile_sample: stratified token windows from the run's corpus."""

from __future__ import annotations

from collections.abc import Iterable

import polars as pl

from gemma_assets.core import sampling
from gemma_assets.core.config import RunConfig
from gemma_assets.core.corpus import Document
from gemma_assets.core.files import atomic_file
from gemma_assets.core.layout import RunLayout


def draw_sample(layout: RunLayout, run: RunConfig, documents: Iterable[Document], tokenizer) -> pl.DataFrame:
    """Token windows (BOS first, one document each) sampled at a fixed document rate, shuffled
    with the seed and dealt to activation partitions; saved with the stratum census, which is
    returned (one row per stratum)."""
    sample, census = sampling.sample_windows(documents, tokenizer, run.sampling)
    sampling.save_sample(layout.sample_file, sample)
    table = pl.DataFrame([{"stratum": name, **row} for name, row in census.items()])
    with atomic_file(layout.strata_file) as staging:
        table.write_parquet(staging)
    return table
