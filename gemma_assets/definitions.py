"""The code location: one Definitions object for the run config named by $GEMMA_ASSETS_CONFIG
(a shipped profile or a YAML file; $GEMMA_ASSETS_PROFILE is the older name)."""

from gemma_assets.core.config import load_run_config
from gemma_assets.defs.graph import build_definitions

defs = build_definitions(load_run_config())
