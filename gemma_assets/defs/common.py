"""Helpers shared by the asset modules: metadata rendering and the model source."""

import base64
import hashlib
import itertools
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import dagster as dg
import polars as pl

from gemma_assets.core import corpus, model
from gemma_assets.core.config import RunConfig
from gemma_assets.defs.resources import StorageResource

TOKENIZER_CORPUS_DOCUMENTS = 400
# downstream stages recompute by themselves (automation daemon) once their inputs change
FOLLOW_UPSTREAM = dg.AutomationCondition.eager()


def corpus_documents(run: RunConfig, storage: StorageResource) -> Iterator[corpus.Document]:
    """The run's corpus, building the offline corpus on first use."""
    return corpus.open_corpus(run.corpus, storage.path("corpus"))


def model_source(run: RunConfig, storage: StorageResource) -> str:
    """`from_pretrained` source of the run's model (the tiny model is built once, here)."""

    def texts():  # a generator: the corpus is read only if the tiny model must be built
        documents = corpus_documents(run, storage)
        yield from (doc.text for doc in itertools.islice(documents, TOKENIZER_CORPUS_DOCUMENTS))

    return model.model_source(run.model, storage.models_dir, texts())


def code_version(
    code: str,
    run: RunConfig,
    reads: Sequence[str] = (),
    upstream: Sequence[dg.AssetsDefinition] = (),
    exclude: Sequence[str] = (),
    depends_on: str = "",
) -> str:
    """`code` plus a digest of the config keys an asset reads (dotted paths, less `exclude`), of
    its upstream assets' versions and of what else its output `depends_on` outside the config
    (the output folder, the resolved compute dtype): changing a key marks exactly the assets
    that read it, and everything below them, as stale; an identical config leaves every version
    as it was."""
    parts = [run.digest(*reads, exclude=exclude) if reads else "", depends_on]
    parts += [asset.code_versions_by_key[asset.key] or "" for asset in upstream]
    return f"{code}-{hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:10]}"


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
