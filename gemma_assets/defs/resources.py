"""Resources: which run, where data lives, where compute runs. Frozen: derive, don't mutate."""

import os
from pathlib import Path

import dagster as dg
import torch

from gemma_assets.core.config import RunConfig, parse_resolved
from gemma_assets.core.storage import ActivationStore

DATA_ROOT_ENV_VAR = "GEMMA_ASSETS_DATA_ROOT"


def default_data_root() -> str:
    return os.environ.get(DATA_ROOT_ENV_VAR) or str(Path.cwd() / "data")


class RunResource(dg.ConfigurableResource):
    """The resolved run config (model, corpus, sample, k values, SAEs, ...) as YAML, so the UI
    shows exactly what a run computes."""

    config_yaml: str

    @classmethod
    def of(cls, run: RunConfig) -> "RunResource":
        return cls(config_yaml=run.to_yaml(one_line=True))

    @property
    def config(self) -> RunConfig:
        return parse_resolved(self.config_yaml)


class StorageResource(dg.ConfigurableResource):
    """Where outputs live: `data_root/<run name>/...` (models are shared under data_root/models).

    `activations_url` may be an fsspec URL (s3://bucket/path) for the activation store;
    by default it sits under the local data root.
    """

    data_root: str
    # the run's folder name comes from the run config itself, so storage can never point at
    # another run's folder
    run: RunResource
    activations_url: str = ""

    @property
    def run_root(self) -> Path:
        return Path(self.data_root, self.run.config.name)

    def path(self, *parts: str) -> Path:
        path = self.run_root.joinpath(*parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def models_dir(self) -> Path:
        return Path(self.data_root, "models")

    def activation_store(self) -> ActivationStore:
        return ActivationStore(self.activations_url or str(self.run_root))


class ComputeResource(dg.ConfigurableResource):
    """Device and batch size for model and clustering steps (the compute dtype is run config)."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    batch_size: int = 16  # windows per forward pass

    @property
    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} requested but no CUDA GPU is visible; use device 'cpu' or 'auto'")
        return self.device

    def torch_dtype(self, dtype: str) -> torch.dtype:
        """The run's `model.dtype` on this device: auto = bfloat16 on a GPU, float32 on the CPU."""
        if dtype == "auto":
            return torch.bfloat16 if self.resolved_device.startswith("cuda") else torch.float32
        return getattr(torch, dtype)
