"""Shared fixtures: one real end-to-end Dagster run of the tiny profile per test session."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest

from gemma_assets.cli import materialize_all
from gemma_assets.core.config import RunConfig, load_run_config
from gemma_assets.defs.graph import build_definitions


@dataclass
class TinyRun:
    profile: RunConfig
    defs: dg.Definitions
    instance: dg.DagsterInstance
    data_root: Path
    results: list

    @property
    def storage(self):
        return self.defs.resources["storage"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> TinyRun:
    data_root = tmp_path_factory.mktemp("data")
    profile = load_run_config("tiny")
    defs = build_definitions(profile, data_root=str(data_root))
    with dg.instance_for_test() as instance:
        results = materialize_all(profile, defs, instance, log_level="WARNING")
        yield TinyRun(profile, defs, instance, data_root, results)
