"""Validation of a run config against its model and its pretrained SAEs, before any compute.

The config module checks what the file alone tells; this adds what needs the model's config
(blocks, d_model; no weights) and SAELens' directory of pretrained SAEs.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from gemma_assets.core import model, sae
from gemma_assets.core.config import ConfigError, RunConfig


def model_problems(run: RunConfig, architecture: model.ModelArchitecture) -> list[str]:
    """What is wrong with the config against the model's own architecture."""
    if run.model.layer >= architecture.n_layers:
        return [
            f"model.layer={run.model.layer} does not exist: {run.model.name} has blocks 0..{architecture.n_layers - 1}; "
            f"set model.layer to one of them (e.g. --set model.layer={architecture.n_layers // 2})"
        ]
    return []


def print_warning(message: str) -> None:
    print(f"gemma-assets: warning: {message}", file=sys.stderr, flush=True)


def validate_run(
    run: RunConfig, models_dir: Path, warn: Callable[[str], None] = print_warning
) -> model.ModelArchitecture:
    """Raises ConfigError listing every problem; returns the model's architecture. What does not
    stop the run (an optional SAE that cannot be had now) goes to `warn`."""
    architecture = model.architecture(run.model, models_dir)
    problems = model_problems(run, architecture)
    pretrained = [spec for spec in run.sae_specs if spec.architecture == "pretrained"]
    if pretrained and not problems:
        problems += sae.pretrained_problems(pretrained, architecture.d_model, run.model.hook_name, warn)
    if problems:
        raise ConfigError(f"run config {run.name} is invalid:\n" + "\n".join(f"- {p}" for p in problems))
    return architecture


def valid_summary(run: RunConfig, architecture: model.ModelArchitecture, outputs: Path) -> str:
    """What `gemma-assets config validate` says of a valid run config."""
    return (
        f"run config {run.name} is valid (digest {run.digest()}): {run.model.name}, "
        f"block {run.model.layer} of {architecture.n_layers}, d_model {architecture.d_model}; "
        f"{run.sampling.partitions} partitions of {run.sampling.windows_per_partition} windows x "
        f"{run.sampling.context_len} tokens ({run.train_tokens:,} train tokens); k in "
        f"{list(run.clustering.ks)}; {len(run.sae_specs)} SAEs; outputs in {outputs}"
    )
