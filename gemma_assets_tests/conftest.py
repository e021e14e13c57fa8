"""Shared fixtures: one real end-to-end Dagster run of the tiny profile per test session."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest

from gemma_assets.cli import materialize_all
from gemma_assets.core.profiles import Profile, get_profile
from gemma_assets.definitions import build_definitions


@dataclass
class TinyRun:
    profile: Profile
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
    profile = get_profile("tiny")
    defs = build_definitions(profile, data_root=str(data_root))
    with dg.instance_for_test() as instance:
        results = materialize_all(defs, instance, log_level="WARNING")
        yield TinyRun(profile, defs, instance, data_root, results)
