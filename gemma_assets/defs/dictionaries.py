"""Every fitted dictionary of a profile, reloaded from disk under its report name."""

import difflib
import json
from collections.abc import Sequence

import numpy as np
import torch

from gemma_assets.core import leader, sae
from gemma_assets.core.config import ConfigError, RunConfig, SaeSpec
from gemma_assets.core.dictionaries import Member, clustering_family
from gemma_assets.core.whitening import Preprocessor, Whitening
from gemma_assets.defs.resources import StorageResource


def clustering_members(storage: StorageResource, prof: RunConfig) -> list[Member]:
    """k-means-k and its readings for every k, then leader clustering."""
    preprocessor = Preprocessor.from_whitening(
        prof.clustering.preprocessing,
        Whitening.load(storage.path("whitening", "whitening.npz")),
        prof.clustering.n_components,
    )
    members = []
    for k in prof.clustering.ks:
        path = storage.path("clusters", f"k-{k:05d}", "model.npz")
        if not path.exists():
            raise FileNotFoundError(f"no k-means model for k={k} at {path}: materialise cluster_models[{k}]")
        model = np.load(path)
        members += clustering_family(
            k,
            torch.from_numpy(model["centroids"]),
            torch.from_numpy(model["gain_shape_atoms"]),
            preprocessor,
        )
    regions = np.load(storage.path("clusters", "leader", "model.npz"))
    name = json.loads(storage.path("clusters", "leader", "metrics.json").read_text())["name"]
    dictionary = leader.leader_dictionary(torch.from_numpy(regions["exemplars"]), torch.from_numpy(regions["mean"]))
    members.append(Member(name, leader.FAMILY, dictionary))
    return members


def sae_members(
    storage: StorageResource, prof: RunConfig, device: str, specs: Sequence[SaeSpec] | None = None
) -> list[Member]:
    """The run's SAEs (or only `specs` of them), reloaded from disk."""
    return [
        Member(
            spec.name, spec.family, sae.load_dictionary(storage.path("saes", spec.name), device), spec.active_per_token
        )
        for spec in (prof.sae_specs if specs is None else specs)
    ]


def find_member(storage: StorageResource, prof: RunConfig, name: str, device: str = "cpu") -> Member:
    """One dictionary of a finished run by its report name (only its own family is loaded)."""
    specs = [spec for spec in prof.sae_specs if spec.name == name]
    members = sae_members(storage, prof, device, specs) if specs else clustering_members(storage, prof)
    for member in members:
        if member.name == name:
            return member
    names = [member.name for member in members] + [spec.name for spec in prof.sae_specs]
    close = difflib.get_close_matches(name, names, n=1)
    raise ConfigError(
        f"run {prof.name} has no dictionary {name!r}"
        + (f"; did you mean {close[0]!r}?" if close else "")
        + f" Its dictionaries: {', '.join(names)}"
    )
