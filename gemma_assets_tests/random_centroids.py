"""A dictionary method declared the way a researcher adds one: this module alone, named in a run
config under `methods`. Random centroids (Gaussian draws with the train split's mean and per-
dimension spread, each token coded as its nearest one) are the floor any clustering must beat.

test_methods.py checks that it reaches the report, the splice and the feature pages.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from gemma_assets.core import bootstrap, methods, metrics
from gemma_assets.core.codes import Codes, unit_rows
from gemma_assets.core.config import RunConfig
from gemma_assets.core.dictionaries import Member
from gemma_assets.core.files import atomic_dir, load_arrays, save_arrays, write_json
from gemma_assets.core.layout import WINDOWS_FILE, RunLayout
from gemma_assets.core.records import DictionaryRecord, Family
from gemma_assets.defs.stage_methods import fitted_by

ASSET = "random_centroids"
FAMILY = Family.define("random-centroids", "random centroids (floor)")


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a mistyped key is an error, not a default

    k: int = Field(16, ge=1, description="centroids")
    seed: int = 0


@dataclass(frozen=True)
class NearestCentroid:
    centroids: torch.Tensor  # [k, d]

    @property
    def n_features(self) -> int:
        return len(self.centroids)

    def encode(self, x: torch.Tensor) -> Codes:
        nearest = torch.cdist(x.float(), self.centroids).argmin(1)
        return Codes.one_hot(nearest, torch.ones(len(x)))

    def decode(self, codes: Codes) -> torch.Tensor:
        return self.centroids[codes.indices[:, 0]]

    def directions(self) -> torch.Tensor:
        return unit_rows(self.centroids)


def _folder(layout: RunLayout) -> Path:
    return layout.artefact(ASSET, ASSET, "model.npz").parent


def fit(layout: RunLayout, run: RunConfig, device: str) -> dict[str, Any]:
    """Random centroids around the train mean, evaluated on the held-out tokens."""
    settings = methods.settings_of(RANDOM_CENTROIDS, run)
    moments = layout.moments("train")
    spread = np.sqrt(np.diag(moments.comoment) / max(moments.count - 1, 1))
    draws = np.random.default_rng(settings.seed).standard_normal((settings.k, moments.d_model))
    dictionary = NearestCentroid(torch.from_numpy(moments.mean + draws * spread).float())
    store, keys = layout.activation_store(), run.heldout_partition_keys
    name = f"random-{settings.k}"
    heldout, windows = metrics.evaluate_windows(store.window_batches(keys)(), dictionary, "cpu", name)
    record = DictionaryRecord.of_fit(name, FAMILY, settings.k, 1, heldout, {"parameters": dictionary.centroids.numel()})
    with atomic_dir(_folder(layout)) as staging:
        save_arrays(staging / "model.npz", {"centroids": dictionary.centroids.numpy()})
        write_json(staging / "records.json", [record.to_json()])
        save_arrays(staging / WINDOWS_FILE, bootstrap.flatten({name: windows}))
    return {"heldout_fvu": record.fvu}


def _records(layout: RunLayout, run: RunConfig) -> list[DictionaryRecord]:
    path = layout.existing(ASSET, _folder(layout) / "records.json", "random centroids")
    return [DictionaryRecord.from_json(r) for r in json.loads(path.read_text())]


def _members(layout: RunLayout, run: RunConfig, device: str) -> list[Member]:
    model = load_arrays(layout.existing(ASSET, _folder(layout) / "model.npz", "random centroids"))
    return [
        Member(r.name, FAMILY, NearestCentroid(torch.from_numpy(model["centroids"])), 1) for r in _records(layout, run)
    ]


RANDOM_CENTROIDS = methods.register(
    methods.Method(
        name="random-centroids",
        module=__name__,
        build=fitted_by(ASSET, fit, reads=("activation_stats", "activations"), version="1"),
        dictionary_assets=(ASSET,),
        record_assets=(ASSET,),
        records=_records,
        window_files=lambda layout, run: [_folder(layout) / WINDOWS_FILE],
        members=_members,
        interpreted=_members,
        settings=Settings,
    )
)
