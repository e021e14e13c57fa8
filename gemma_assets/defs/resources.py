"""Resources: which profile, where data lives, where compute runs. Frozen: derive, don't mutate."""

import dataclasses
import os
from pathlib import Path

import dagster as dg
import torch

from gemma_assets.core.profiles import Profile, get_profile
from gemma_assets.core.storage import ActivationStore

DATA_ROOT_ENV_VAR = "GEMMA_ASSETS_DATA_ROOT"


def default_data_root() -> str:
    return os.environ.get(DATA_ROOT_ENV_VAR) or str(Path.cwd() / "data")


class ProfileResource(dg.ConfigurableResource):
    """The run profile (tiny, demo, gemma-2-2b): model, corpus, sample sizes, k values, SAEs."""

    name: str
    # >= 0 overrides the profile's KMeansSpec.in_memory_mb for a run: a larger train split is
    # streamed from the store (e.g. 0 forces the out-of-core path)
    kmeans_in_memory_mb: int = -1

    @property
    def profile(self) -> Profile:
        profile = get_profile(self.name)
        if self.kmeans_in_memory_mb < 0:
            return profile
        return dataclasses.replace(
            profile, kmeans=dataclasses.replace(profile.kmeans, in_memory_mb=self.kmeans_in_memory_mb)
        )


class StorageResource(dg.ConfigurableResource):
    """Where outputs live: `data_root/<profile>/...` (models are shared under data_root/models).

    `activations_url` may be an fsspec URL (s3://bucket/path) for the activation store;
    by default it sits under the local data root.
    """

    data_root: str
    profile: str
    activations_url: str = ""

    def path(self, *parts: str) -> Path:
        path = Path(self.data_root, self.profile, *parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def models_dir(self) -> Path:
        return Path(self.data_root, "models")

    def activation_store(self) -> ActivationStore:
        return ActivationStore(self.activations_url or str(Path(self.data_root, self.profile)))


class ComputeResource(dg.ConfigurableResource):
    """Device, dtype and batch size for model and clustering steps."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16
    batch_size: int = 16  # windows per forward pass

    @property
    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} requested but no CUDA GPU is visible; use device 'cpu' or 'auto'")
        return self.device

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.resolved_device.startswith("cuda") else torch.float32
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype {self.dtype!r} is not supported; use auto, float32 or bfloat16")
        return getattr(torch, self.dtype)
