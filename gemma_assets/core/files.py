"""Atomic replacement of local files and folders: written beside the target, then renamed."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path


def staging_path(target: Path) -> Path:
    """A unique hidden sibling of `target` to write into first (same suffix, so writers that
    add one, like numpy's savez, keep the name)."""
    return target.with_name(f".{target.name}.{uuid.uuid4().hex}{target.suffix}")


def replace_dir(staging: Path, target: Path) -> None:
    """Put a fully written folder in place of `target`: readers find the old folder or the new
    one, never half of one."""
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
