"""pile_sample: stratified token windows from the profile's corpus."""

import dagster as dg
import polars as pl

from gemma_assets.core import corpus, model, sampling
from gemma_assets.core.files import atomic_file
from gemma_assets.defs.common import corpus_files, model_source, table_md
from gemma_assets.defs.resources import ProfileResource, StorageResource


@dg.asset(code_version="1", group_name="data", kinds={"numpy"})
def pile_sample(
    context: dg.AssetExecutionContext, profile: ProfileResource, storage: StorageResource
) -> dg.MaterializeResult:
    """Token windows (BOS first, one document each) sampled at a fixed document rate, shuffled
    with the seed and dealt to activation partitions; the last partitions are held out."""
    spec = profile.profile.sample
    files = corpus_files(profile, storage)
    tokenizer = model.load_tokenizer(model_source(profile, storage))
    sample, census = sampling.sample_windows(corpus.iter_documents(files), tokenizer, spec)
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
            "partitions": spec.n_partitions,
            "heldout_partitions": dg.MetadataValue.text(", ".join(profile.profile.heldout_partition_keys)),
            "strata": table_md(census_table),
            "path": dg.MetadataValue.path(str(path)),
        }
    )
