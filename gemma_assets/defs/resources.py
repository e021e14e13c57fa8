"""Resources: which run, where data lives, where compute runs, how operations behave. Frozen:
derive, don't mutate."""

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dagster as dg
import torch

from gemma_assets.core.config import ConfigError, RunConfig, parse_resolved
from gemma_assets.core.engine import Engine, InProcess, open_engine
from gemma_assets.core.files import writable_folder
from gemma_assets.core.layout import WORKING_COPY_ENV_VAR, RunLayout, is_url
from gemma_assets.core.remote import url_problem

DATA_ROOT_ENV_VAR = "GEMMA_ASSETS_DATA_ROOT"


def default_data_root() -> str:
    return os.environ.get(DATA_ROOT_ENV_VAR) or str(Path.cwd() / "data")


def normalised_data_root(data_root: str) -> str:
    """A URL data root (s3://bucket/prefix) less any trailing slash; a folder, absolute."""
    if is_url(data_root):
        return data_root.rstrip("/")
    return str(Path(data_root).expanduser().resolve())


def resolve_data_root(option: str | None) -> str:
    """The data root of a command (its --data-root, then $GEMMA_ASSETS_DATA_ROOT, then ./data),
    never empty; an option given is exported, so the definitions the command builds see it."""
    if option is not None:
        if not option.strip():
            raise ConfigError("--data-root is empty: pass a folder, or leave the option out to use ./data")
        os.environ[DATA_ROOT_ENV_VAR] = normalised_data_root(option)
    elif DATA_ROOT_ENV_VAR in os.environ and not os.environ[DATA_ROOT_ENV_VAR].strip():
        raise ConfigError(f"${DATA_ROOT_ENV_VAR} is set but empty: set it to a folder, or unset it to use ./data")
    return normalised_data_root(default_data_root())


def require_writable(data_root: str, run: RunConfig) -> None:
    """Refuse, with the fix, a data root where the run's outputs cannot be written (on a URL data
    root: the run's URL, and the local working copy its steps write in)."""
    layout = RunLayout.of(data_root, run.name)
    if layout.remote and (remote_problem := url_problem(layout.remote)):
        problem, fix = remote_problem
        raise ConfigError(f"the data root {data_root} cannot hold outputs ({layout.remote}: {problem}) -> {fix}")
    if local_problem := writable_folder(layout.root):
        if layout.remote:
            raise ConfigError(
                f"the working copy of the data root {data_root} cannot be written ({layout.root}: {local_problem}) "
                f"-> set ${WORKING_COPY_ENV_VAR} to a writable folder"
            )
        raise ConfigError(
            f"the data root {data_root} cannot hold outputs ({layout.root}: {local_problem}) -> pass --data-root "
            f"with a writable folder, or set ${DATA_ROOT_ENV_VAR}"
        )


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

    `data_root` may be an fsspec URL (s3://bucket/prefix): steps then work in a local working
    copy and commit their artefacts there (core.remote). `activations_url` may be an fsspec URL
    for the activation store alone; by default it sits under the data root.
    """

    data_root: str
    # the run's folder name comes from the run config itself, so storage can never point at
    # another run's folder
    run: RunResource
    activations_url: str = ""

    def layout(self, context: dg.AssetExecutionContext | dg.AssetCheckExecutionContext | None = None) -> RunLayout:
        """The run's artefacts; inside an asset or check, only those of the assets it declares
        (an undeclared read raises UndeclaredDependency)."""
        layout = RunLayout.of(self.data_root, self.run.config.name, self.activations_url)
        if context is None:
            return layout
        assets_def = context.op_execution_context.assets_def
        own = {key.to_user_string() for key in assets_def.keys}
        own |= {check.asset_key.to_user_string() for check in assets_def.check_keys}
        # a check's dependencies (its asset and any additional deps) are inputs, not dependency keys
        upstream = set(assets_def.dependency_keys) | set(assets_def.keys_by_input_name.values())
        declared = own | {key.to_user_string() for key in upstream}

        return layout.bound(", ".join(sorted(own)), declared)


def run_layout(defs: dg.Definitions) -> RunLayout:
    """The whole layout of the run a project's Definitions were built for (outside any asset)."""
    storage = (defs.resources or {}).get("storage")
    if not isinstance(storage, StorageResource):
        raise TypeError("these Definitions have no gemma_assets storage resource: build them with build_definitions")
    return storage.layout()


DASK_CLUSTER_ENV_VAR = "GEMMA_ASSETS_DASK_CLUSTER"
DASK_WORKERS_ENV_VAR = "GEMMA_ASSETS_DASK_WORKERS"
DASK_THREADS_ENV_VAR = "GEMMA_ASSETS_DASK_THREADS"


class ComputeResource(dg.ConfigurableResource):
    """Device and batch size for model and clustering steps (the compute dtype is run config),
    and the engine of the passes over the store (core/engine.py): `cluster` "" runs them in the
    step's process; "local" on a Dask LocalCluster of `workers` processes (0: one per core, or
    one per GPU on a CUDA machine with dask-cuda) of `threads_per_worker` threads; anything else
    is a Dask scheduler's address (tcp://host:8786). Results do not depend on it."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    batch_size: int = 16  # windows per forward pass
    cluster: str = ""  # $GEMMA_ASSETS_DASK_CLUSTER
    workers: int = 0  # $GEMMA_ASSETS_DASK_WORKERS
    threads_per_worker: int = 1  # $GEMMA_ASSETS_DASK_THREADS

    @classmethod
    def from_environment(cls) -> "ComputeResource":
        """The engine as the deployment's environment sets it (unset or blank: the default)."""
        knobs: dict[str, Any] = {}
        if cluster := os.environ.get(DASK_CLUSTER_ENV_VAR, "").strip():
            knobs["cluster"] = cluster
        for field, variable in (("workers", DASK_WORKERS_ENV_VAR), ("threads_per_worker", DASK_THREADS_ENV_VAR)):
            if value := os.environ.get(variable, "").strip():
                if not value.isdigit():
                    raise ConfigError(f"${variable} is {value!r}, not a whole number -> set it to e.g. 2, or unset it")
                knobs[field] = int(value)
        return cls(**knobs)

    @contextmanager
    def engine(self, log: Callable[[str], None]) -> Iterator[Engine]:
        """The engine of this step's passes over the store, open for the block's length."""
        with open_engine(self.cluster, self.workers, self.threads_per_worker) as engine:
            if not isinstance(engine, InProcess):
                log(f"passes over the store run on Dask ({self.cluster}): {engine.workers} workers")
            yield engine

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

    def comoment_precision(self, setting: str) -> str:
        """The run's `quality.comoment_precision` on this device: auto = float64 on a GPU, mixed on the CPU."""
        if setting == "auto":
            return "float64" if self.resolved_device.startswith("cuda") else "mixed"
        return setting


ALERT_WEBHOOK_ENV_VAR = "GEMMA_ASSETS_ALERT_WEBHOOK"
PARTITIONS_PER_NIGHT_ENV_VAR = "GEMMA_ASSETS_PARTITIONS_PER_NIGHT"
PARTITIONS_PER_RUN_ENV_VAR = "GEMMA_ASSETS_PARTITIONS_PER_RUN"


class OperationsResource(dg.ConfigurableResource):
    """How the schedule and the alert sensor behave. Set in the deployment's environment: each
    field is read through `dg.EnvVar` from the variable named beside it when that is set, so
    the webhook URL (a secret) never shows in the UI, the logs or the run config."""

    alert_webhook: str = ""  # $GEMMA_ASSETS_ALERT_WEBHOOK: Slack-style incoming webhook for failed checks
    partitions_per_night: int = 8  # $GEMMA_ASSETS_PARTITIONS_PER_NIGHT: most activation partitions a night requests
    # $GEMMA_ASSETS_PARTITIONS_PER_RUN: split nightly ranges into runs of at most this many
    # partitions, e.g. to spread a night over N GPUs (each run loads the model once and holds one
    # slot of the `gpu` pool). 0: no split
    partitions_per_run: int = 0

    @classmethod
    def from_environment(cls) -> "OperationsResource":
        knobs: dict[str, Any] = {  # Dagster reads each when a run starts; unset or blank: the default
            "alert_webhook": dg.EnvVar(ALERT_WEBHOOK_ENV_VAR),
            "partitions_per_night": dg.EnvVar.int(PARTITIONS_PER_NIGHT_ENV_VAR),
            "partitions_per_run": dg.EnvVar.int(PARTITIONS_PER_RUN_ENV_VAR),
        }
        return cls(**{field: var for field, var in knobs.items() if os.environ.get(var.env_var_name, "").strip()})
