"""Atomic replacement of local files and folders: written beside the target, then renamed.

Readers (and a rerun after a crash) find the old version or the new one, never half of one;
a failed write leaves the old version in place and no staging debris behind.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np


def staging_path(target: Path) -> Path:
    """A unique hidden sibling of `target` to write into first (same suffix, so writers that
    add one, like numpy's savez, keep the name)."""
    return target.with_name(f".{target.name}.{uuid.uuid4().hex}{target.suffix}")


@contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """A path to write `target`'s new content to; it replaces `target` when the block ends
    without an error."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_path(target)
    try:
        yield staging
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """An empty folder to build `target`'s new content in; it replaces `target` as a whole
    when the block ends without an error."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_path(target)
    staging.mkdir()
    try:
        yield staging
        if target.exists():  # the old folder steps aside first, so target is never half-deleted
            retired = staging_path(target)
            target.rename(retired)
            staging.rename(target)
            shutil.rmtree(retired)
        else:
            staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_text(target: Path, text: str) -> None:
    with atomic_file(target) as staging:
        staging.write_text(text, encoding="utf-8")


def write_json(target: Path, value: Any) -> None:
    write_text(target, json.dumps(value, indent=1, default=str))


def save_arrays(target: Path, arrays: Mapping[str, Any]) -> None:
    """Named arrays (or scalars) as one uncompressed .npz, written atomically."""
    with atomic_file(target) as staging:
        np.savez(staging, **arrays)


def load_arrays(source: Path) -> dict[str, np.ndarray]:
    """Every array of an .npz written by `save_arrays`, in memory (the file is closed)."""
    with np.load(source) as data:
        return {name: data[name] for name in data.files}


def writable_folder(path: Path) -> str | None:
    """Why `path` cannot hold outputs (None: it can): created if missing, then written once."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        return error.strerror or type(error).__name__
    return None
