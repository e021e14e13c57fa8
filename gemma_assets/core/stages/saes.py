"""sae_dictionary and sae_evaluation: the SAE side of the comparison, through SAELens."""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass
from typing import Any

import torch

from gemma_assets.core import bootstrap, metrics, sae
from gemma_assets.core.config import RunConfig, SaeSpec
from gemma_assets.core.engine import Engine, Partitioned
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
    k: int  # topk, batchtopk, matryoshka: (average) active latents per token; 0 otherwise
    seed: int
    parameters: int
    # trained: fit_seconds (its own steps), pass_seconds (the whole shared pass), train_tokens,
    # fit_peak_rss_mb (of the pass), scale (folded into the weights unless whitened),
    # train_partitions, its sparsity setting (target_l0, l1_coefficient, levels) and whitened;
    # pretrained: load_seconds
    facts: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "architecture": self.architecture,
            "width": self.width,
            "k": self.k,
            "seed": self.seed,
            "parameters": self.parameters,
            **self.facts,
        }


def make_saes(layout: RunLayout, run: RunConfig, device: str) -> list[SaeTraining]:
    """Every SAE of the run, seed replicas included: the trained ones in one streamed pass of
    SAELens SAETrainers over the stored train split, the pretrained ones loaded through SAELens;
    each saved with its training facts under saes/<name>/. An optional pretrained SAE that
    neither the cache nor the hub gives is skipped: saes/skipped.json names it with the reason
    (written every time, so a rerun that can load it forgets the skip)."""
    replicas = itertools.chain(*run.sae_seed_replicas.values())
    trained_specs = [spec for spec in [*run.sae_specs, *replicas] if spec.is_trained]
    made = []
    if trained_specs:
        moments = layout.moments("train")
        with RssTrace() as peak:
            trained = sae.train_saes(
                trained_specs,
                layout.activation_store().batches(run.train_partition_keys),
                d_in=moments.d_model,
                n_tokens=moments.count,
                mean=torch.from_numpy(moments.mean).float(),
                mean_norm=moments.norm_sum / moments.count,
                trainer=run.saes.trainer,
                device=device,
                whitening=layout.whitening() if any(spec.whitened for spec in trained_specs) else None,
            )
        shared = {
            "pass_seconds": trained.seconds,
            "train_tokens": trained.train_tokens,
            "fit_peak_rss_mb": peak.mb,
            **trained.facts,
            "train_partitions": run.train_partition_keys,
        }
        for one in trained.saes:
            facts = {"fit_seconds": one.step_seconds, **shared, **_sparsity(one.spec)}
            made.append(_save(layout, one.spec, one.dictionary, facts))
    skipped: dict[str, str] = {}
    for spec in run.sae_specs:
        if not spec.is_trained:
            started = time.perf_counter()
            try:
                dictionary = sae.load_pretrained(spec, device)
            except sae.SaeUnavailable as error:
                if not spec.optional:
                    raise
                skipped[spec.name] = f"optional SAE {spec.release}/{spec.sae_id} is {error.reason}"
                continue
            made.append(_save(layout, spec, dictionary, {"load_seconds": time.perf_counter() - started}))
    write_json(layout.sae_skipped_file, skipped)
    return made


def _sparsity(spec: SaeSpec) -> dict[str, Any]:
    """The sparsity setting and input space of a trained SAE besides its k."""
    setting = {
        "target_l0": spec.target_l0,
        "l1_coefficient": spec.l1_coefficient,
        "levels": list(spec.levels),
        "whitened": spec.whitened,
    }
    return {key: value for key, value in setting.items() if value}


def _save(layout: RunLayout, spec: SaeSpec, dictionary: sae.SaeDictionary, facts: dict[str, Any]) -> SaeTraining:
    training = SaeTraining(
        name=spec.name,
        architecture=spec.architecture,
        width=spec.width or dictionary.n_features,
        k=spec.k,
        seed=spec.seed,
        parameters=dictionary.n_parameters,
        facts=facts,
    )
    with atomic_dir(layout.sae_dir(spec.name)) as staging:  # weights and their training record together
        dictionary.save(staging)
        write_json(staging / TRAINING_FILE, training.to_json())
    return training


def evaluate_sae(
    layout: RunLayout, run: RunConfig, spec: SaeSpec, device: str, engine: Engine
) -> tuple[DictionaryRecord, bootstrap.WindowSums]:
    """The metric suite (FVU computed by us, MSE, cosine, relative norm, L0, usage, encode
    throughput) of one SAE on held-out non-BOS tokens, with its per-window sums; the partitions
    are tasks of `engine` (a cluster's workers encode on their CPUs)."""
    folder = layout.sae_dir(spec.name)
    store, keys = layout.activation_store(), run.heldout_partition_keys
    heldout_windows = Partitioned.of(engine, store, keys)
    device = "cpu" if heldout_windows.distributed else device
    dictionary = sae.load_dictionary(folder, device)
    training = json.loads((folder / TRAINING_FILE).read_text())
    heldout, windows = metrics.evaluate_windows(heldout_windows, dictionary, device, spec.name, store.token_count(keys))
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
