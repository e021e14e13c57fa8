"""Helpers shared by the asset modules: metadata rendering and the model source."""

import base64
import itertools
from pathlib import Path

import dagster as dg
import polars as pl

from gemma_assets.core import corpus, model
from gemma_assets.defs.resources import ProfileResource, StorageResource

TOKENIZER_CORPUS_DOCUMENTS = 400
# downstream stages recompute by themselves (automation daemon) once their inputs change
FOLLOW_UPSTREAM = dg.AutomationCondition.eager()


def corpus_files(profile: ProfileResource, storage: StorageResource) -> str | list[str]:
    """The profile's corpus shards, building the offline corpus on first use."""
    spec = profile.profile.corpus
    if spec.data_files:
        return spec.data_files
    files = corpus.build_offline_corpus(storage.path("corpus"), max_documents=spec.max_documents)
    return [str(path) for path in files]


def model_source(profile: ProfileResource, storage: StorageResource) -> str:
    """`from_pretrained` source of the profile's model (the tiny model is built once, here)."""

    def texts():  # a generator: the corpus is read only if the tiny model must be built
        documents = corpus.iter_documents(corpus_files(profile, storage))
        yield from (doc.text for doc in itertools.islice(documents, TOKENIZER_CORPUS_DOCUMENTS))

    return model.model_source(profile.profile.model, storage.models_dir, texts())


def table_md(frame: pl.DataFrame, float_format: str = "{:.4g}") -> dg.MetadataValue:
    return dg.MetadataValue.md(markdown_table(frame, float_format))


def markdown_table(frame: pl.DataFrame, float_format: str = "{:.4g}") -> str:
    def cell(value) -> str:
        return float_format.format(value) if isinstance(value, float) else str(value)

    header = "| " + " | ".join(frame.columns) + " |\n|" + "---|" * len(frame.columns) + "\n"
    return header + "\n".join("| " + " | ".join(cell(v) for v in row) + " |" for row in frame.iter_rows())


def image_md(path: Path) -> dg.MetadataValue:
    encoded = base64.b64encode(path.read_bytes()).decode()
    return dg.MetadataValue.md(f"![{path.stem}](data:image/png;base64,{encoded})")
