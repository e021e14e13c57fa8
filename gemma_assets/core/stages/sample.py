"""pile_sample: stratified token windows from the run's corpus."""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from gemma_assets.core import sampling
from gemma_assets.core.config import RunConfig
from gemma_assets.core.corpus import CorpusRead, DocumentStream
from gemma_assets.core.files import atomic_file, write_json
from gemma_assets.core.layout import RunLayout


@dataclass(frozen=True)
class SampleCensus:
    """The sample's census: one row per stratum, and what reading the corpus met."""

    strata: pl.DataFrame
    read: CorpusRead


def draw_sample(layout: RunLayout, run: RunConfig, documents: DocumentStream, tokenizer) -> SampleCensus:
    """Token windows (BOS first, one document each) sampled at a fixed document rate, shuffled
    with the seed and dealt to activation partitions; saved with the census (the stratum table,
    and the records read and skipped)."""
    sample, census = sampling.sample_windows(documents, tokenizer, run.sampling)
    sampling.save_sample(layout.sample_file, sample)
    table = pl.DataFrame([{"stratum": name, **row} for name, row in census.items()])
    with atomic_file(layout.strata_file) as staging:
        table.write_parquet(staging)
    write_json(layout.corpus_read_file, documents.read.to_json())
    return SampleCensus(table, documents.read)
