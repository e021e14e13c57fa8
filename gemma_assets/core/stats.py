"""Streaming activation statistics in float64 with exact merges (Chan et al.).

The co-moment, d^2 work per token, is the pass's cost. `float64` computes it in float64 (on
the GPU when there is one: cheap there). `mixed`, the CPU's default, forms float32 products
of batch-centred data over blocks of COMOMENT_BLOCK_ROWS rows and sums the blocks in float64:
twice float64's speed for the co-moment (1.2-1.4x for the whole pass on 2 cores). Rounding is
relative to each entry's own scale, so spread in per-dimension variance costs nothing; what
it limits is the correlation structure, to ~eps32 * sqrt(block rows) = 3e-6 relative
(covariances with condition numbers >= 1e7 still whiten held-out data to the identity:
test_whitening.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import ThreadpoolController

from gemma_assets.core.batches import prefetched
from gemma_assets.core.engine import Shard
from gemma_assets.core.files import load_arrays, save_arrays
from gemma_assets.core.storage import ActivationStore

NORM_BIN_EDGES = np.logspace(-3, 7, 201)  # token L2 norms, log-spaced bins
PRECISIONS = ("float64", "mixed")
COMOMENT_BLOCK_ROWS = 2048


def column_sums(x: torch.Tensor) -> torch.Tensor:
    """Column sums of x [n, d] float32, accumulated in float64, as float64 [d] on x's device
    (on the CPU through numpy: torch's float64-accumulating sum of float32 is 7x slower there)."""
    if x.device.type == "cpu":
        return torch.from_numpy(np.add.reduce(x.numpy(), axis=0, dtype=np.float64))
    return x.sum(0, dtype=torch.float64)


class Scratch:
    """Work arrays that one pass reuses from batch to batch.

    A batch's large temporaries (its rows as float32, 75 MB at 8,192 x 2304; a d x d float64,
    42 MB) are past the 32 MiB ceiling of glibc's mmap threshold, so each fresh one is mapped
    from the kernel and zeroed page by page: 300k page faults per 32,768-token partition, a
    quarter of its time. An array stays the same object until a request needs it larger or of
    another shape or dtype, so a result held in one is valid only until that name's next use."""

    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}

    def array(self, name: str, shape: tuple[int, ...], dtype: type = np.float64) -> np.ndarray:
        """Array `name` of at least `shape[0]` rows, viewed as exactly `shape` (uninitialised)."""
        found = self._arrays.get(name)
        if found is None or found.shape[1:] != shape[1:] or found.dtype != dtype or len(found) < shape[0]:
            found = self._arrays[name] = np.empty(shape, dtype)
        return found[: shape[0]]

    def tensor(
        self, name: str, like: torch.Tensor, rows: int | None = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """A tensor of `like`'s dtype (or `dtype`), device and shape, or of `rows` rows (on the
        host, array `name`; a device's caching allocator already reuses its memory)."""
        shape = (len(like) if rows is None else rows, *like.shape[1:])
        dtype = like.dtype if dtype is None else dtype
        if like.device.type != "cpu":
            return torch.empty(shape, dtype=dtype, device=like.device)
        return torch.from_numpy(self.array(name, shape, torch.empty((), dtype=dtype).numpy().dtype.type))


def batch_comoment(x: torch.Tensor, mean: torch.Tensor, precision: str, scratch: Scratch | None = None) -> np.ndarray:
    """sum of (x - mean)(x - mean)^T over the rows of x [n, d] float32 (any device), as float64
    [d, d] on the host; `mean` [d] float64 is the rows' mean. The result may be an array of
    `scratch`: valid until the next call with it."""
    scratch = scratch or Scratch()
    if precision not in PRECISIONS:
        raise ValueError(f"unknown co-moment precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    if precision == "float64":
        centred_rows = x.double() - mean
        if x.device.type != "cpu":
            gram = centred_rows.T @ centred_rows
            # a GPU's gemm may round (i, j) and (j, i) apart; the co-moment is kept exactly symmetric
            return ((gram + gram.T) / 2).cpu().numpy()
        on_host = centred_rows.numpy()
        # numpy computes a matrix times its own transpose with BLAS syrk (one triangle, half the
        # products of torch's gemm: 1.8x faster at d 2304), the same float64 sums
        return on_host.T @ on_host
    # centred on the float32-rounded mean; n * delta delta^T (delta = mean - that) restores the
    # co-moment about the exact mean, since the rows' deviations from it sum to zero
    shift = mean.float()
    centred = torch.sub(x, shift, out=scratch.tensor("centred", x)).cpu().numpy()
    total = scratch.array("comoment", (x.shape[1], x.shape[1]))
    total.fill(0)
    for product in _block_products(centred, scratch):
        total += product  # float32 syrk, summed in float64 in block order
    delta = (mean - shift.double()).cpu().numpy()
    correction = np.multiply.outer(delta, delta, out=scratch.array("outer", total.shape))
    correction *= len(centred)
    total -= correction
    return total


def _block_products(rows: np.ndarray, scratch: Scratch) -> Iterator[np.ndarray]:
    """block^T block, float32, for each COMOMENT_BLOCK_ROWS-row block of `rows`, in order.

    Each product is one single-threaded BLAS call: a threaded float32 syrk splits its sums by
    thread count on some CPUs (OpenBLAS on AMD Zen), so a partition's moments would depend on
    the threads of the process computing them, and a Dask worker of one thread would disagree
    with this process. The parallelism is over blocks instead (BLAS releases the GIL), as many
    at once as torch has threads, each block's product the same whatever the count."""
    blocks = [rows[start : start + COMOMENT_BLOCK_ROWS] for start in range(0, len(rows), COMOMENT_BLOCK_ROWS)]
    threads = torch.get_num_threads()
    products = [
        scratch.array(f"product {thread}", (rows.shape[1], rows.shape[1]), rows.dtype.type) for thread in range(threads)
    ]
    with _blas_libraries().limit(limits=1, user_api="blas"), ThreadPoolExecutor(threads) as pool:
        for first in range(0, len(blocks), threads):
            # each product is consumed before the next round overwrites its array
            yield from pool.map(
                lambda block, out: np.matmul(block.T, block, out=out), blocks[first : first + threads], products
            )


@cache
def _blas_libraries() -> ThreadpoolController:
    """The process's BLAS libraries, found once: `threadpool_limits` rescans every loaded library
    on each call (1 ms, against 0.04 ms for a limit on a found controller), once per batch here."""
    return ThreadpoolController()


@dataclass
class ActivationMoments:
    """Count, mean, co-moment matrix, extrema, non-finite count and norm histogram."""

    d_model: int
    count: int = 0
    mean: np.ndarray = field(init=False)
    comoment: np.ndarray = field(init=False)  # sum of (x - mean)(x - mean)^T
    minimum: np.ndarray = field(init=False)
    maximum: np.ndarray = field(init=False)
    nonfinite: int = 0
    norm_sum: float = 0.0
    norm_histogram: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.mean = np.zeros(self.d_model)
        self.comoment = np.zeros((self.d_model, self.d_model))
        self.minimum = np.full(self.d_model, np.inf)
        self.maximum = np.full(self.d_model, -np.inf)
        self.norm_histogram = np.zeros(len(NORM_BIN_EDGES) - 1, np.int64)

    def update(
        self,
        x: torch.Tensor,
        norms: torch.Tensor | None = None,
        precision: str = "float64",
        scratch: Scratch | None = None,
    ) -> None:
        """Add a batch x [n, d] float32 on any device (row norms optional, if already computed);
        rows with NaN/Inf are counted, not accumulated. `precision` of the co-moment: float64
        or mixed (see the module's docstring)."""
        # NaN/Inf anywhere in a row propagates into its norm (or its sum)
        finite = torch.isfinite(x.sum(1) if norms is None else norms)
        self.nonfinite += int((~finite).sum())
        if not finite.all():
            x, norms = x[finite], None if norms is None else norms[finite]
        if not len(x):
            return
        other = ActivationMoments(self.d_model)
        other.count = len(x)
        mean = column_sums(x) / len(x)
        # float64 sums: a float32 co-moment accumulated over a whole partition loses the
        # low-variance directions whitening needs (condition numbers of residual streams reach 1e6)
        scratch = scratch or Scratch()
        other.comoment = batch_comoment(x, mean, precision, scratch)
        other.mean = mean.cpu().numpy()
        other.minimum, other.maximum = x.amin(0).double().cpu().numpy(), x.amax(0).double().cpu().numpy()
        row_norms = (x.norm(dim=1) if norms is None else norms).double().cpu().numpy()
        other.norm_sum = float(row_norms.sum())
        other.norm_histogram = np.histogram(row_norms, NORM_BIN_EDGES)[0]
        self.merge(other, scratch)

    def merge(self, other: ActivationMoments, scratch: Scratch | None = None) -> None:
        """Fold another accumulator in; exact, so partitions can be combined in any order."""
        total = self.count + other.count
        if other.count:
            delta = other.mean - self.mean
            correction = np.multiply.outer(delta, delta, out=(scratch or Scratch()).array("outer", self.comoment.shape))
            correction *= self.count * other.count / total
            correction += other.comoment
            self.comoment += correction
            self.mean = self.mean + delta * (other.count / total)
            self.minimum = np.minimum(self.minimum, other.minimum)
            self.maximum = np.maximum(self.maximum, other.maximum)
        self.count = total
        self.nonfinite += other.nonfinite
        self.norm_sum += other.norm_sum
        self.norm_histogram += other.norm_histogram

    def __getstate__(self) -> dict:
        """Pickled (a task's result crossing a Dask cluster's network) with the co-moment's upper
        triangle alone. It is exactly symmetric however it was made: syrk products (numpy copies
        one triangle to the other), the GPU's product averaged with its transpose, symmetric
        corrections and merges, and `load`. The 21 MB this saves at d 2304 are a third of a
        statistics task's result, whose sending and receiving cost the worker and the driver CPU
        beside the computing (benchmarks/dask_cluster.py)."""
        return {**vars(self), "comoment": _upper_triangle(self.comoment)}

    def __setstate__(self, state: dict) -> None:
        comoment = state["comoment"]
        if comoment.ndim == 1:  # packed; a version before the packing sent the whole matrix
            comoment = _symmetric_from_upper(comoment, state["d_model"])
        vars(self).update(state, comoment=comoment)

    @property
    def covariance(self) -> np.ndarray:
        return self.comoment / max(self.count - 1, 1)

    @property
    def variance(self) -> np.ndarray:
        return np.diag(self.covariance).copy()

    def save(self, path: Path) -> None:
        save_arrays(path, vars(self))

    @classmethod
    def load(cls, path: Path) -> ActivationMoments:
        arrays = load_arrays(path)
        arrays.pop("d_model", None)  # files before it was saved lack it; the mean has its length
        moments = cls(len(arrays["mean"]))

        moments.count, moments.nonfinite = int(arrays.pop("count")), int(arrays.pop("nonfinite"))
        moments.norm_sum = float(arrays.pop("norm_sum"))
        vars(moments).update(arrays)
        if not np.array_equal(moments.comoment, moments.comoment.T):
            # saved before the GPU's product was made symmetric: as that branch now computes it
            moments.comoment = (moments.comoment + moments.comoment.T) / 2
        return moments


def _upper_triangle(square: np.ndarray) -> np.ndarray:
    """The upper triangle of a square matrix, diagonal included, row after row."""
    size = len(square)
    packed = np.empty(size * (size + 1) // 2, square.dtype)
    start = 0
    for row in range(size):
        packed[start : start + size - row] = square[row, row:]
        start += size - row
    return packed


def _symmetric_from_upper(packed: np.ndarray, size: int) -> np.ndarray:
    """The symmetric matrix whose upper triangle `_upper_triangle` packed."""
    square = np.empty((size, size), packed.dtype)
    start = 0
    for row in range(size):
        square[row, row:] = square[row:, row] = packed[start : start + size - row]
        start += size - row
    return square


QUANTILES = (0.01, 0.5, 0.99)
MASSIVE_TOKENS_KEPT = 16


@dataclass
class PartitionStats:
    """Everything one pass over a partition yields; saved per partition and reused while the
    partition's committed version is unchanged."""

    key: str
    version: str
    moments: ActivationMoments  # non-BOS tokens
    norms: np.ndarray  # [tokens] float32, every token (BOS included)
    positions: np.ndarray  # [tokens] int32
    strata: np.ndarray  # [tokens] int16
    sample: np.ndarray  # [m, d] float32 uniform sample of non-BOS tokens (approximate quantiles)
    massive: np.ndarray  # [MASSIVE_TOKENS_KEPT, 3] (row, dim, value) of the largest |activations|
    windows: np.ndarray  # [n_windows, 2] (doc_id, offset of position 1): window identity
    precision: str = ""  # of the co-moment (PRECISIONS); caches from before it was recorded have ""

    @classmethod
    def compute(
        cls, store, key: str, sample_size: int, seed: int = 0, precision: str = "float64", device: str = "cpu"
    ) -> PartitionStats:
        """One pass over partition `key`; the moments' arithmetic runs on `device`."""
        part = store.open(key)
        moments = ActivationMoments(part.manifest["d_model"])
        context_len = part.manifest["attrs"]["context_len"]
        non_bos = np.flatnonzero(np.arange(part.n_tokens) % context_len != 0)
        rng = np.random.default_rng([seed, int(key)])
        chosen = rng.choice(non_bos, min(sample_size, len(non_bos)), replace=False)
        scratch = Scratch()
        columns: dict[str, list] = {
            name: [] for name in ("norms", "positions", "strata", "doc_ids", "doc_offsets", "sample", "massive")
        }
        for stored, info in prefetched(store.iter_tokens([key], exclude_bos=False, as_stored=True)):
            acts = _float32_batch(stored, device, scratch)
            bos = torch.from_numpy(info["positions"] == 0).to(device)
            norms = acts.norm(dim=1)
            moments.nonfinite += int((~torch.isfinite(norms[bos])).sum())
            kept = (~bos).nonzero().squeeze(1)
            rows_without_bos = torch.index_select(acts, 0, kept, out=scratch.tensor("non-BOS rows", acts, len(kept)))
            moments.update(rows_without_bos, norms[kept], precision, scratch)
            columns["norms"].append(norms.cpu().numpy())
            for name in ("positions", "strata", "doc_ids", "doc_offsets"):
                columns[name].append(info[name])
            columns["sample"].append(acts[torch.from_numpy(np.isin(info["row"], chosen)).to(device)].cpu().numpy())
            top, dim = largest_magnitudes(acts, MASSIVE_TOKENS_KEPT)
            peak_values = acts[top, dim].cpu().numpy()
            columns["massive"].append(np.stack([info["row"][top.cpu().numpy()], dim.cpu().numpy(), peak_values], 1))
        merged = {name: np.concatenate(values) for name, values in columns.items()}
        massive = merged["massive"][np.argsort(-np.abs(merged["massive"][:, 2]))[:MASSIVE_TOKENS_KEPT]]
        starts = merged["positions"] == 1
        windows = np.stack([merged["doc_ids"][starts], merged["doc_offsets"][starts]], 1)
        return cls(
            key,
            part.manifest["version"],
            moments,
            merged["norms"].astype(np.float32),
            merged["positions"],
            merged["strata"],
            merged["sample"],
            massive,
            windows,
            precision,
        )

    def __getstate__(self) -> dict:
        """Pickled (a statistics task's result on Dask) with the quantile sample as bfloat16 bits
        when that is exact, as it is for rows of stored activations widened to float32: 9.4 MB
        less to send at d 2304 and 2,048 rows."""
        state = dict(vars(self))
        bits = np.ascontiguousarray(self.sample).view(np.uint32) if self.sample.dtype == np.float32 else None
        if bits is not None and not (bits & 0xFFFF).any():
            # the high half of each float32, every bit kept (a NaN's sign and payload too)
            state["sample"] = (bits >> 16).astype(np.uint16)
        return state

    def __setstate__(self, state: dict) -> None:
        if state["sample"].dtype == np.uint16:
            state = {**state, "sample": (state["sample"].astype(np.uint32) << 16).view(np.float32)}
        vars(self).update(state)

    def save(self, path: Path) -> None:
        self.moments.save(moments_path(path))
        # written last: its presence marks the cache entry complete
        save_arrays(path, {name: value for name, value in vars(self).items() if name != "moments"})

    @classmethod
    def load(cls, path: Path) -> PartitionStats:
        arrays = load_arrays(path)
        key, version = str(arrays.pop("key")), str(arrays.pop("version"))
        precision = str(arrays.pop("precision", ""))
        return cls(key, version, ActivationMoments.load(moments_path(path)), **arrays, precision=precision)


def _float32_batch(stored: torch.Tensor, device: str, scratch: Scratch) -> torch.Tensor:
    """A bfloat16 batch as float32 on `device`, converted there (half the bytes to move to a
    GPU); on the host into the one batch array of `scratch` (a fresh 75 MB batch per 8,192 rows
    at d 2304 cost 18,000 page faults, 7% of a pass's CPU time)."""
    moved = stored.to(device)
    return scratch.tensor("batch", moved, dtype=torch.float32).copy_(moved)


def peak_magnitudes(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's largest |value| and the first dimension holding it; NaN counts as 0 and +-inf
    as the largest float."""
    return torch.abs(rows).nan_to_num_(0).max(1)


def largest_magnitudes(x: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `count` rows of x with the largest peak |value| (`peak_magnitudes`), and each one's
    dimension of it. The peaks come from two row reductions, 5x faster than |x| and an argmax
    over all of it; only a row with a NaN (which the reductions propagate) is measured directly."""
    peak = torch.maximum(x.amax(1), x.amin(1).neg_())
    unmeasured = peak.isnan().nonzero().squeeze(1)
    if len(unmeasured):
        peak[unmeasured] = peak_magnitudes(x[unmeasured])[0]
    top = peak.nan_to_num_(0).topk(min(count, len(peak))).indices
    return top, peak_magnitudes(x[top])[1]


def compute_partition_stats(shard: Shard, sample_size: int, precision: str, device: str) -> PartitionStats:
    """One partition's pass, as a task of an engine (a worker without CUDA computes on its CPU)."""
    device = device if torch.cuda.is_available() else "cpu"
    return PartitionStats.compute(
        ActivationStore(shard.store_url), shard.key, sample_size, precision=precision, device=device
    )


def moments_path(path: Path) -> Path:
    """Where a partition's moments sit beside its statistics file."""
    return path.with_suffix(".moments.npz")
