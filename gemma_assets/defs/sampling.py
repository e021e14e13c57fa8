"""pile_sample: stratified token windows from the run's corpus."""

import dagster as dg
import polars as pl

from gemma_assets.core import model, sampling
from gemma_assets.core.config import RunConfig
from gemma_assets.core.files import atomic_file
from gemma_assets.defs.common import code_version, corpus_documents, model_source, table_md
from gemma_assets.defs.resources import RunResource, StorageResource


def build_sample_asset(run_config: RunConfig, location: str) -> dg.AssetsDefinition:
    """`location` (where the run's outputs live) is part of the root's version: outputs of the
    same config somewhere else are not these."""

    @dg.asset(
        # the tokenizer depends on the model's source, not on its layer or dtype
        code_version=code_version(
            "1", run_config, ("model.kind", "model.name", "corpus", "sampling"), depends_on=location
        ),
        group_name="data",
        kinds={"numpy"},
    )
    def pile_sample(
        context: dg.AssetExecutionContext, run: RunResource, storage: StorageResource
    ) -> dg.MaterializeResult:
        """Token windows (BOS first, one document each) sampled at a fixed document rate, shuffled
        with the seed and dealt to activation partitions; the last partitions are held out."""
        prof = run.config
        spec = prof.sampling
        tokenizer = model.load_tokenizer(model_source(prof, storage))
        sample, census = sampling.sample_windows(corpus_documents(prof, storage), tokenizer, spec)
        path = storage.path("sample", "windows.npz")
        sampling.save_sample(path, sample)
        census_table = pl.DataFrame([{"stratum": name, **row} for name, row in census.items()])
        with atomic_file(storage.path("sample", "strata.parquet")) as staging:
            census_table.write_parquet(staging)
        context.log.info(f"sampled {spec.n_windows} windows x {spec.context_len} tokens into {path}")
        return dg.MaterializeResult(
            metadata={
                "windows": spec.n_windows,
                "tokens": spec.n_windows * spec.context_len,
                "context_len": spec.context_len,
                "partitions": spec.partitions,
                "heldout_partitions": dg.MetadataValue.text(", ".join(prof.heldout_partition_keys)),
                "strata": table_md(census_table),
                "path": dg.MetadataValue.path(str(path)),
            }
        )

    return pile_sample
