"""sae_dictionary and sae_evaluation: the SAE side of the comparison, through SAELens."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import torch

from gemma_assets.core import bootstrap, metrics, sae
from gemma_assets.core.config import RunConfig, SaeSpec
from gemma_assets.core.files import atomic_dir, save_arrays, write_json
from gemma_assets.core.layout import RunLayout
from gemma_assets.core.memory import RssTrace
from gemma_assets.core.records import DictionaryRecord

TRAINING_FILE = "training.json"


@dataclass(frozen=True)
class SaeTraining:
    """How one SAE of the run was made, as saes/<name>/training.json holds it."""

    name: str
    architecture: str
    width: int
    k: int  # active latents per token (0: not fixed, a pretrained SAE)
    seed: int
    scale: float
    parameters: int
    # trained: fit_seconds, train_tokens, fit_peak_rss_mb, train_partitions; pretrained: load_seconds
    facts: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "architecture": self.architecture,
            "width": self.width,
            "k": self.k,
            "seed": self.seed,
            "scale": self.scale,
            "parameters": self.parameters,
            **self.facts,
        }


def make_sae(layout: RunLayout, run: RunConfig, spec: SaeSpec, device: str) -> SaeTraining:
    """One SAE of the run: a TopK SAE trained with SAELens' SAETrainer on the stored train split,
    or a pretrained one loaded with SAE.from_pretrained; saved with its training facts under
    saes/<name>/."""
    facts: dict[str, Any]
    if spec.architecture == "pretrained":
        started = time.perf_counter()
        dictionary = sae.load_pretrained(spec, device)
        facts = {"load_seconds": time.perf_counter() - started}
    else:
        moments = layout.moments("train")
        with RssTrace() as peak:
            dictionary, facts = sae.train_topk(
                spec,
                layout.activation_store().batches(run.train_partition_keys),
                d_in=moments.d_model,
                n_tokens=moments.count,
                scale=sae.activation_scale(moments.norm_sum / moments.count, moments.d_model),
                epochs=run.saes.train_epochs,
                mean=torch.from_numpy(moments.mean).float(),
                batch_size=run.saes.batch_size,
                device=device,
                seed=spec.seed,
            )
        facts |= {"fit_peak_rss_mb": peak.mb, "train_partitions": run.train_partition_keys}
    training = SaeTraining(
        name=spec.name,
        architecture=spec.architecture,
        width=spec.width or dictionary.n_features,
        k=spec.k,
        seed=spec.seed,
        scale=dictionary.scale,
        parameters=dictionary.n_parameters,
        facts=facts,
    )
    with atomic_dir(layout.sae_dir(spec.name)) as staging:  # weights and their training record together
        dictionary.save(staging)
        write_json(staging / TRAINING_FILE, training.to_json())
    return training


def evaluate_sae(
    layout: RunLayout, run: RunConfig, spec: SaeSpec, device: str
) -> tuple[DictionaryRecord, bootstrap.WindowSums]:
    """The metric suite (FVU computed by us, MSE, cosine, relative norm, L0, usage, encode
    throughput) of one SAE on held-out non-BOS tokens, with its per-window sums."""
    folder = layout.sae_dir(spec.name)
    dictionary = sae.load_dictionary(folder, device)
    training = json.loads((folder / TRAINING_FILE).read_text())
    store, keys = layout.activation_store(), run.heldout_partition_keys
    heldout, windows = metrics.evaluate_windows(
        store.window_batches(keys)(), dictionary, device, spec.name, store.token_count(keys)
    )
    facts = {key: value for key, value in training.items() if key not in ("name", "width", "k")}
    record = DictionaryRecord.of_fit(spec.name, spec.family, training["width"], spec.active_per_token, heldout, facts)
    return record, windows


def save_evaluation(
    layout: RunLayout,
    evaluated: list[tuple[DictionaryRecord, bootstrap.WindowSums]],
    replicas: dict[str, list[DictionaryRecord]],
) -> None:
    """The SAEs' records with their per-window sums, and the records of their seed replicas
    (by the seed-0 name)."""
    save_arrays(layout.sae_windows_file, bootstrap.flatten({record.name: windows for record, windows in evaluated}))
    write_json(layout.sae_seeds_file, {name: [r.to_json() for r in records] for name, records in replicas.items()})
    write_json(layout.sae_evaluation_file, [record.to_json() for record, _ in evaluated])
