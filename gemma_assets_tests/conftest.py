"""Shared fixtures: one real end-to-end Dagster run of the tiny profile per test session."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest

from gemma_assets.core.config import RunConfig, load_run_config
from gemma_assets.defs.graph import build_definitions
from gemma_assets.runner import materialize_all


def pytest_configure(config: pytest.Config) -> None:
    """pytest resets warning filters around every test: give it the package's own list."""
    from gemma_assets import ACCEPTED_WARNINGS

    for message, _ in ACCEPTED_WARNINGS:
        config.addinivalue_line("filterwarnings", f"ignore:{message}")


@pytest.fixture(autouse=True)
def hub_offline_constant_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    """model.offline_if_hub_unreachable sets the hub client's offline constant for the rest of a
    process; in the test process, for the rest of a test, so no test sees what an earlier one set."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", constants.HF_HUB_OFFLINE)


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

    @property
    def layout(self):
        return self.storage.layout()

    def records(self) -> dict[str, dict]:
        """Every dictionary's record as the report's flat row, by name."""
        from gemma_assets.core.methods import all_records, methods_of

        records = all_records(self.layout, self.profile, methods_of(self.profile))
        return {record.name: record.row() for record in records}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> TinyRun:
    data_root = tmp_path_factory.mktemp("data")
    profile = load_run_config("tiny", ["seeds=2"])  # the shipped tiny fits one seed; the tests cover refits
    defs = build_definitions(profile, data_root=str(data_root))
    with dg.instance_for_test() as instance:
        results = materialize_all(profile, defs, instance, log_level="WARNING")
        yield TinyRun(profile, defs, instance, data_root, results)
