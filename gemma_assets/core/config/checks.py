"""What is wrong with a run config, said so a person can fix it: pydantic's errors as one line
per key (the closest valid key for a typo), and the checks the file alone allows."""

from __future__ import annotations

import difflib
import glob
import json
import os
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import ErrorDetails

from gemma_assets.core.config.schema import CorpusSpec, RunConfig

# Names users write for a key, matched on meaning where difflib matches only spelling (it offers
# `dataset` for `paths`); offered only where the key exists in the unknown key's own section.
KEY_SYNONYMS = {
    "path": "data_files",
    "paths": "data_files",
    "files": "data_files",
    "glob": "data_files",
    "text_key": "text_field",
    "text_column": "text_field",
    "column": "text_field",
    "limit": "max_documents",
    "layer_index": "layer",
    "block": "layer",
    "precision": "dtype",
    "max_length": "context_len",
    "k": "ks",
    "k_values": "ks",
    "n_clusters": "ks",
    "num_clusters": "ks",
    "init": "seeding",
    "iterations": "max_iter",
}


def section_models(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if isinstance(annotation, typing.ForwardRef | str):
        return []
    origin = typing.get_origin(annotation)
    if origin in (tuple, list, typing.Union, types.UnionType):
        return [m for arg in typing.get_args(annotation) for m in section_models(arg)]
    return []


def _model_at(loc: Sequence[Any]) -> type[BaseModel] | None:
    model: type[BaseModel] | None = RunConfig
    for part in loc:
        if isinstance(part, int):
            continue
        if model is None or part not in model.model_fields:
            return None
        found = section_models(model.model_fields[part].annotation)
        model = found[0] if found else None
    return model


def _dotted(loc: Sequence[Any]) -> str:
    return ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in loc).replace(".[", "[")


def describe(error: ErrorDetails) -> str:
    loc = [p for p in error["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
    where = _dotted(loc)
    if error["type"] == "extra_forbidden":
        parent = _model_at(loc[:-1])
        valid = list(parent.model_fields) if parent else []
        synonym = KEY_SYNONYMS.get(str(loc[-1]))
        close = [synonym] if synonym in valid else difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        prefix = _dotted(loc[:-1])
        if close:
            return f"- unknown key '{where}': did you mean '{prefix + '.' if prefix else ''}{close[0]}'?"
        return (
            f"- unknown key '{where}': valid keys {'of ' + prefix if prefix else 'at the top'} are {', '.join(valid)}"
        )
    if error["type"] == "missing":
        field = _model_at(loc[:-1])
        info = field.model_fields.get(str(loc[-1])) if field else None
        meaning = f" ({info.description})" if info and info.description else ""
        return f"- '{where}' is required{meaning}: add it to the file or --set {where}=..."
    message = error["msg"].removeprefix("Value error, ")
    got = error.get("input")
    shown = "" if isinstance(got, dict) else f" (got {json.dumps(got, default=str)})"
    return f"- {where or 'run config'}: {message}{shown}"


def static_problems(run: RunConfig) -> list[str]:
    """What is wrong with a config that the file alone tells (no model, no network)."""

    problems = []
    sample = run.sampling
    if sample.holdout_partitions >= sample.partitions:
        problems.append(
            f"sampling.holdout_partitions={sample.holdout_partitions} leaves no partition to train on "
            f"(sampling.partitions={sample.partitions}): lower holdout_partitions or raise partitions"
        )
    elif (largest := max(run.clustering.ks)) > run.train_tokens:
        problems.append(
            f"clustering.ks: k={largest} exceeds the {run.train_tokens:,} train tokens the sample will hold "
            f"({len(run.train_partition_keys)} train partitions x {sample.windows_per_partition} windows x "
            f"{sample.context_len - 1} non-BOS tokens): lower k or raise sampling.windows_per_partition / partitions"
        )
    if run.train_tokens and run.itda_widths and (widest := max(run.itda_widths)) > run.train_tokens:
        problems.append(
            f"itda: width {widest} exceeds the {run.train_tokens:,} train tokens the sample will hold (its atoms are "
            "train tokens): lower itda.widths (default: the trained SAEs' widths) or raise "
            "sampling.windows_per_partition / partitions"
        )
    corpus = run.corpus
    if corpus.kind == "files":
        for pattern in corpus.data_files:
            if "://" not in pattern and not glob.glob(os.path.expanduser(pattern)):
                problems.append(
                    f"corpus.data_files: no file matches {pattern!r}: fix the path (relative paths are relative "
                    "to the run file, or to the working directory with --set) or point it at existing jsonl / "
                    "jsonl.zst / parquet files"
                )
        suffixes = {CorpusSpec.file_format(pattern) for pattern in corpus.data_files}
        if len(suffixes) > 1:
            problems.append(f"corpus.data_files mixes formats ({', '.join(sorted(suffixes))}): use one format per run")
    for spec in run.sae_specs:
        if spec.path and not Path(spec.path, "cfg.json").is_file():
            problems.append(
                f"saes.pretrained {spec.name}: no SAELens SAE at {spec.path} (no cfg.json) -> point path at a folder "
                "`gemma-assets export` or SAELens' save_model wrote"
            )
    names = [f"kmeans-{k}" for k in run.clustering.ks] + [spec.name for spec in run.sae_specs]
    if repeated := sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"dictionary names must be distinct: {', '.join(repeated)}")
    return problems
