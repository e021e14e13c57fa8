"""Validation of a run config against its model and its pretrained SAEs, before any compute.

The config module checks what the file alone tells; this adds what needs the model's config
(blocks, d_model; no weights) and SAELens' directory of pretrained SAEs.
"""

from __future__ import annotations

from pathlib import Path

from gemma_assets.core import model, sae
from gemma_assets.core.config import ConfigError, RunConfig, model_problems


def validate_run(run: RunConfig, models_dir: Path) -> model.ModelArchitecture:
    """Raises ConfigError listing every problem; returns the model's architecture."""
    architecture = model.architecture(run.model, models_dir)
    problems = model_problems(run, architecture)
    pretrained = [spec for spec in run.sae_specs if spec.architecture == "pretrained"]
    if pretrained and not problems:
        problems += sae.pretrained_problems(pretrained, architecture.d_model, run.model.hook_name)
    if problems:
        raise ConfigError(f"run config {run.name} is invalid:\n" + "\n".join(f"- {p}" for p in problems))
    return architecture
