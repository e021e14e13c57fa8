"""Data-quality findings on stored activations. Each finding names what is at fault.

Integrity and finiteness are per partition (corruption: the data must not be used);
norm outliers, drift and duplicates look across partitions.
"""

from __future__ import annotations

import numpy as np
import torch

from gemma_assets.core.records import Finding
from gemma_assets.core.storage import ACTIVATIONS, ActivationStore, StorageError

_SCAN_ROWS = 16384
REMATERIALISE = "rematerialise activations partition(s) {partitions}"
RESAMPLE = "the sample is broken: rematerialise pile_sample and activations"
DRIFT_FIX = "compare the strata and source of partition(s) {partitions}; rematerialise them if corrupt"


def partition_integrity(store: ActivationStore, key: str, expected_tokens: int, context_len: int) -> list[Finding]:
    """Commit present, checksums match, shapes/dtypes/attributes and positions as written."""

    def found(message: str, row: int | None = None) -> Finding:
        return Finding(message, REMATERIALISE, partition=key, row=row)

    try:
        if problems := store.verify(key):
            return [found(problem) for problem in problems]
        part = store.open(key)
    except (StorageError, OSError, KeyError, ValueError) as error:
        return [found(str(error))]
    findings = []
    try:
        acts = part.zarr_array(ACTIVATIONS)
        if acts.attrs.get("dtype") != "bfloat16" or acts.dtype != np.uint16:
            findings.append(found(f"activations are {acts.dtype} without the bfloat16 attribute"))
        if acts.shape[0] != expected_tokens:
            findings.append(found(f"{acts.shape[0]} tokens stored, {expected_tokens} expected (truncated array)"))
        for name in ("token_ids", "positions", "doc_ids", "strata"):
            if (rows := part.zarr_array(name).shape[0]) != acts.shape[0]:
                findings.append(found(f"{name} has {rows} rows, activations {acts.shape[0]}"))
        token_ids, positions = part.array("token_ids"), part.array("positions")
        vocab_size = part.manifest["attrs"]["vocab_size"]
    except (KeyError, ValueError, OSError) as error:
        return findings + [found(f"unreadable ({error})")]
    if len(token_ids) and (token_ids.min() < 0 or token_ids.max() >= vocab_size):
        bad = np.flatnonzero((token_ids < 0) | (token_ids >= vocab_size))[:5].tolist()
        findings.append(found(f"token ids outside the vocabulary of {vocab_size} at rows {bad}", bad[0]))
    expected_positions = np.arange(len(positions)) % context_len
    if not np.array_equal(positions, expected_positions):
        bad = np.flatnonzero(positions != expected_positions)[:5].tolist()
        findings.append(found(f"positions are not 0..{context_len - 1} per window at rows {bad}", bad[0]))
    bos = part.manifest["attrs"].get("bos_token_id")
    if bos is not None and len(token_ids) and not (token_ids[positions == 0] == bos).all():
        findings.append(found("a window does not start with BOS"))
    return findings


def partition_nonfinite(store: ActivationStore, key: str, context_len: int) -> list[Finding]:
    """Rows, positions and dimensions of NaN/Inf activations in one partition (or why it cannot
    be read: its values are never scanned unverified)."""
    try:
        part = store.open(key)
        return _nonfinite(part, key, context_len)
    except StorageError as error:
        return [Finding(f"cannot be scanned: {error}", REMATERIALISE, partition=key)]


def _nonfinite(part, key: str, context_len: int) -> list[Finding]:
    findings = []
    for start in range(0, part.n_tokens, _SCAN_ROWS):
        acts = part.activations(start, start + _SCAN_ROWS)
        bad = ~torch.isfinite(acts)
        if bad.any():
            rows, dims = bad.nonzero(as_tuple=True)
            positions = part.array("positions", start, start + _SCAN_ROWS)
            for row, dim in list(zip(rows.tolist(), dims.tolist(), strict=True))[:5]:
                message = (
                    f"{acts[row, dim].item()} at row {start + row} "
                    f"(window {(start + row) // context_len}, position {positions[row]}), dim {dim}"
                )
                findings.append(
                    Finding(message, REMATERIALISE, key, row=start + row, position=int(positions[row]), dim=dim)
                )
    return findings


def robust_log_norm_z(norms: np.ndarray, median: float, mad: float) -> np.ndarray:
    """Robust z-score of log norms: (log n - median) / (1.4826 MAD)."""
    return (np.log(norms) - median) / (1.4826 * max(mad, 1e-12))


def log_norm_bounds(norms: np.ndarray) -> tuple[float, float]:
    """(median, MAD) of log token norms: bounds learned from the data, robust to the outliers."""
    logs = np.log(norms[norms > 0])
    median = float(np.median(logs))
    return median, float(np.median(np.abs(logs - median)))


def duplicate_windows(windows: dict[str, np.ndarray]) -> list[Finding]:
    """Windows sampled twice: the same (document, offset) in two places. `windows[key]` is
    [n_windows, 2] of (doc_id, offset of the first non-BOS token) per partition."""
    seen: dict[tuple[int, int], tuple[str, int]] = {}
    findings = []
    for key, rows in windows.items():
        for index, (doc, offset) in enumerate(rows.tolist()):
            first = seen.setdefault((doc, offset), (key, index))
            if first != (key, index):
                message = f"window {index} repeats window {first[1]} of partition {first[0]} (document {doc}, offset {offset})"
                findings.append(Finding(message, RESAMPLE, partition=key))
    return findings


def mean_drift(partition_means: dict[str, np.ndarray], pooled_mean: np.ndarray, pooled_std: np.ndarray) -> dict:
    """Per partition: the largest per-dimension mean shift from the pooled mean, in pooled
    standard deviations, and the dimension where it happens."""
    drift = {}
    for key, mean in partition_means.items():
        shift = np.abs(mean - pooled_mean) / np.maximum(pooled_std, 1e-12)
        dim = int(shift.argmax())
        drift[key] = {"max_shift_sd": float(shift[dim]), "dim": dim}
    return drift
