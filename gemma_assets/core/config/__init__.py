"""Run configuration: one YAML file describes everything that decides *what* is computed.

Model and layer, corpus, sample, k values, density, leader and ITDA settings, SAEs, evaluation and
quality sizes. Where things run (data root, device, batch size) is decided by resources, not
here. The shipped profiles (`tiny`, `demo`, `gemma-2-2b`) are run files in
`gemma_assets/configs/`, read by the same loader as a user's file. A file may start from a
shipped profile or another file with `base:` and change only what differs.

Validation happens here, before any compute: unknown keys (named with the closest valid one),
types and ranges, and the checks that need only the file (a held-out split that leaves nothing
to train on, a k above the train tokens, missing corpus files, duplicate names).
`core.validation` adds the checks against the model's own architecture.

The package: `schema` (the sections and RunConfig), `loading` (files, `base:`, overrides, the
resolved config), `checks` (messages and the checks the file alone allows), `reference` (the
generated docs/configuration.md).
"""

from gemma_assets.core.config.checks import static_problems
from gemma_assets.core.config.loading import (
    load_run_config,
    parse_override,
    parse_resolved,
    save_resolved,
    shipped_config_path,
)
from gemma_assets.core.config.reference import reference_markdown
from gemma_assets.core.config.schema import (
    CONFIG_ENV_VAR,
    DEFAULT_CONFIG,
    PROFILE_ENV_VAR,
    RESOLVED_CONFIG_FILE,
    SHIPPED_CONFIGS,
    ConfigError,
    CorpusSpec,
    ModelSpec,
    RunConfig,
    SaeSpec,
    SampleSpec,
    TrainerSpec,
    seed_name,
)

__all__ = [
    "CONFIG_ENV_VAR",
    "DEFAULT_CONFIG",
    "PROFILE_ENV_VAR",
    "RESOLVED_CONFIG_FILE",
    "SHIPPED_CONFIGS",
    "ConfigError",
    "CorpusSpec",
    "ModelSpec",
    "RunConfig",
    "SaeSpec",
    "SampleSpec",
    "TrainerSpec",
    "load_run_config",
    "parse_override",
    "parse_resolved",
    "reference_markdown",
    "save_resolved",
    "seed_name",
    "shipped_config_path",
    "static_problems",
]
