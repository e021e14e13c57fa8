"""Private Dagster names live in gemma_assets/dagster_private.py alone. When a Dagster release
moves or renames one, this test names it (instead of an ImportError deep in a run)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import dagster

import gemma_assets
from gemma_assets import dagster_private
from gemma_assets.defs.operations import PARTITION_RANGE_END_TAG, PARTITION_RANGE_START_TAG


def test_every_private_name_still_exists_in_this_dagster():
    source = ast.parse(Path(dagster_private.__file__).read_text())
    imported = [
        (node.module, alias.name) for node in source.body if isinstance(node, ast.ImportFrom) for alias in node.names
    ]
    assert imported, "dagster_private imports nothing"
    for module, name in imported:
        assert hasattr(importlib.import_module(module), name), f"Dagster {dagster.__version__} has no {module}.{name}"
    assert set(dagster_private.__all__) == {name for _, name in imported}


def test_the_partition_range_tags_are_dagsters():
    tags = importlib.import_module("dagster._core.storage.tags")
    assert PARTITION_RANGE_START_TAG == tags.ASSET_PARTITION_RANGE_START_TAG
    assert PARTITION_RANGE_END_TAG == tags.ASSET_PARTITION_RANGE_END_TAG


def test_no_other_module_reaches_into_dagster_privately():
    package = Path(gemma_assets.__file__).parent
    offenders = []
    for path in package.rglob("*.py"):
        if path.name == "dagster_private.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            names += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            offenders += [f"{path.relative_to(package)}: {name}" for name in names if name.startswith("dagster._")]
    assert offenders == []
