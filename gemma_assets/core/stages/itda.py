"""itda_dictionaries: ITDA (Leask et al., arXiv 2505.17769), the floor of real train tokens
coded by matching pursuit, at the SAEs' widths."""

from __future__ import annotations

import time

import torch

from gemma_assets.core import bootstrap, metrics
from gemma_assets.core.batches import Batches, as_batches
from gemma_assets.core.config import RunConfig
from gemma_assets.core.engine import Engine, Partitioned
from gemma_assets.core.files import atomic_dir, save_arrays, write_json
from gemma_assets.core.itda import FAMILY, fit_itda, itda_name, itda_shapes
from gemma_assets.core.layout import WINDOWS_FILE, RunLayout
from gemma_assets.core.memory import RssTrace
from gemma_assets.core.records import DictionaryRecord


def fit_itda_dictionaries(layout: RunLayout, run: RunConfig, engine: Engine) -> list[DictionaryRecord]:
    """Every ITDA dictionary of the run (each width with each L0 below it), built from the train
    split around its mean and evaluated on the same held-out tokens as every other dictionary
    (on `engine`); atoms, records and per-window sums written under itda/."""
    store = layout.activation_store()
    mean = torch.from_numpy(layout.whitening().mean).float()
    keys = run.train_partition_keys
    train: Batches = store.batches(keys)
    d_model = len(mean)
    if run.train_tokens * d_model * 4 <= run.clustering.in_memory_mb * 2**20:
        # every dictionary makes one or more passes: read the store once when the split fits in memory
        train = as_batches(store.load_tokens(keys)[0])
    tokens = store.token_count(keys)
    heldout = Partitioned.of(engine, store, run.heldout_partition_keys)
    heldout_tokens = store.token_count(run.heldout_partition_keys)
    records, atoms, windows = [], {}, {}
    for width, m in itda_shapes(run):
        name = itda_name(width, m)
        started = time.perf_counter()
        with RssTrace() as peak:
            result = fit_itda(train, mean, width, m, run.itda.threshold, tokens)
        fit_seconds = time.perf_counter() - started
        evaluated, windows[name] = metrics.evaluate_windows(
            heldout, result.dictionary(), name=name, tokens=heldout_tokens
        )
        facts = {
            "train_partitions": keys,
            "fit_seconds": fit_seconds,
            "fit_peak_rss_mb": peak.mb,
            "parameters": result.atoms.numel(),
            "threshold": result.threshold,
            "passes": result.passes,
            "tokens_seen": result.n_tokens_seen,
        }
        records.append(DictionaryRecord.of_fit(name, FAMILY, width, m, evaluated, facts))
        atoms[name] = result.atoms.numpy()
    with atomic_dir(layout.itda_dir) as folder:
        save_arrays(folder / "model.npz", {"mean": mean.numpy(), **atoms})
        write_json(folder / "records.json", [record.to_json() for record in records])
        save_arrays(folder / WINDOWS_FILE, bootstrap.flatten(windows))
    return records
