"""K-means: k-means||, greedy k-means++ or random-row seeding and exact Lloyd iterations, in memory or streamed.

Backends behind one results contract (`KMeansResult`):
- "torch": exact Lloyd over batches (CPU or CUDA); data may be a tensor or a callable that
  streams batches (larger than memory). Bounds skip distances that provably cannot change an
  assignment: on the CPU Elkan's per-centroid bounds (core/elkan.py) while their [n, k]
  float32 fit the `bounds_mb` budget, otherwise (and on a GPU, where the GEMM is cheap)
  Hamerly's one bound per point, which skips the distance GEMM for whole rows;
- "minibatch": Sculley's mini-batch k-means for very large N (approximate by design);
- "cuml": cuML's KMeans on a CUDA GPU, when importable; on a Dask cluster of GPU workers
  (dask-cuda), cuML's multi-GPU `cuml.dask.cluster.KMeans` over the store partitions.

Data held as store partitions (`engine.Partitioned`) on a Dask cluster is fitted by map-reduce
instead: each Lloyd pass sends the centroids to the workers, each partition's task assigns its
rows and returns its cluster sums in float64, and the driver adds them in partition order. The
bounds are per-point state that would have to stay on the workers between passes, so there
every pass computes every distance. Cluster sums are float64 on both paths, so they agree to
float64 rounding and the centroids (float32) to the bit.
"""

from __future__ import annotations

import math
import operator
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from gemma_assets.core import progress
from gemma_assets.core.batches import Batches, as_batches
from gemma_assets.core.codes import Codes, cosine_to, unit_rows
from gemma_assets.core.config import ConfigError
from gemma_assets.core.elkan import centroid_gaps, elkan_pass
from gemma_assets.core.engine import Partitioned, Shard, map_reduce
from gemma_assets.core.storage import ActivationStore
from gemma_assets.core.whitening import Preprocessor

BACKENDS = ("torch", "minibatch", "cuml")
_ROWS_PER_GEMM = 2048  # rows per distance GEMM: measured fastest on CPU (fits cache), fine on GPU


@dataclass
class KMeansResult:
    centroids: torch.Tensor  # [k, d] float32
    inertia_curve: list[float]  # sum of squared distances after each assignment step
    n_iter: int
    converged: bool
    fit_seconds: float
    sizes: torch.Tensor  # [k] points per cluster at the last assignment
    distances_computed: int = 0  # point-centroid distances evaluated (the bounds skip the rest)
    distances_possible: int = 0  # what evaluating every distance in every assignment pass would be

    @property
    def distances_skipped_share(self) -> float:
        return 1 - self.distances_computed / self.distances_possible


# A row whose two nearest centroids are within NEAR_TIE of 3 ||x||^2 + 2 d^2 in squared distance
# (d: the distance to the nearest) is settled in float64. float32 rounds a squared distance
# ||x||^2 - 2 x.c + ||c||^2 by a few 1e-7 of ||x||^2 + ||c||^2 (GEMM or Elkan's compiled dot
# products, at d_model in the thousands), and a centroid that close has ||c||^2 <= 2 ||x||^2 +
# 2 d^2: every other row's float32 answer is the exact argmin. So the GEMM path, Elkan's and
# Hamerly's bounds and the map-reduce over partitions all assign every token alike.
NEAR_TIE = 1e-5


def settle(x: torch.Tensor, centroids: torch.Tensor, dist_sq: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """`dist_sq` [n, k] (float64) with the `candidates` entries (a row's near-tied centroids) made
    exact: squared distances summed from the differences in float64, each pair on its own, so a
    row's value does not depend on what else is computed with it. The argmin (lowest index on a
    tie) is then the exact nearest centroid: the others are farther by more than float32 rounds."""
    rows, columns = candidates.nonzero(as_tuple=True)
    exact = (x[rows].double() - centroids[columns].double()).square_().sum(1)
    return dist_sq.index_put((rows, columns), exact)


def near_ties(gap_sq: torch.Tensor, x_sq: torch.Tensor, nearest_sq: torch.Tensor) -> torch.Tensor:
    """Which rows' squared-distance margin `gap_sq` to a runner-up is within NEAR_TIE (rows with
    squared norm `x_sq`, at squared distance `nearest_sq` from their nearest centroid)."""
    return gap_sq <= NEAR_TIE * (3 * x_sq + 2 * nearest_sq)


def nearest_two(
    x: torch.Tensor, centroids: torch.Tensor, c_sq: torch.Tensor, x_sq: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(label, squared distance to nearest, squared distance to second nearest) per row of x;
    c_sq / x_sq are the squared row norms of centroids / x (x_sq computed when not given).
    Near ties are settled by exact distances (NEAR_TIE), ties going to the lower index."""
    if x_sq is None:
        x_sq = (x**2).sum(1)
    labels, first, second = [], [], []
    for start in range(0, len(x), _ROWS_PER_GEMM):
        rows = slice(start, start + _ROWS_PER_GEMM)
        # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; the row term is added after the top-2 search
        dist = torch.addmm(c_sq, x[rows], centroids.T, alpha=-2.0)
        if dist.shape[1] > 1:
            best, index = dist.topk(2, dim=1, largest=False)
        else:
            best = torch.cat([dist, torch.full_like(dist, float("inf"))], 1)
            index = torch.zeros_like(best, dtype=torch.long)
        labels.append(index[:, 0])
        first.append(best[:, 0] + x_sq[rows])
        second.append(best[:, 1] + x_sq[rows])
    label, nearest, runner_up = torch.cat(labels), torch.cat(first).clamp_min_(0), torch.cat(second).clamp_min_(0)
    tied = near_ties(runner_up - nearest, x_sq, nearest).nonzero().flatten()
    if len(tied) and len(centroids) > 1:
        dist = torch.addmm(c_sq, x[tied], centroids.T, alpha=-2.0).add_(x_sq[tied, None]).double()
        candidates = near_ties(dist - nearest[tied, None].double(), x_sq[tied, None], nearest[tied, None])
        settled = settle(x[tied], centroids, dist, candidates)
        label[tied] = settled.argmin(1)
        nearest[tied] = settled.gather(1, label[tied, None]).squeeze(1).to(nearest.dtype)
        runner_up[tied] = settled.scatter(1, label[tied, None], float("inf")).amin(1).to(nearest.dtype)
    return label, nearest, runner_up


def distance_matrix(x: torch.Tensor, centroids: torch.Tensor, c_sq: torch.Tensor, x_sq: torch.Tensor) -> torch.Tensor:
    """Euclidean distance from every row of x to every centroid [n, k]."""
    out = torch.empty(len(x), len(centroids), device=x.device)
    for start in range(0, len(x), _ROWS_PER_GEMM):
        rows = slice(start, start + _ROWS_PER_GEMM)
        chunk = torch.addmm(c_sq, x[rows], centroids.T, alpha=-2.0, out=out[rows])
        chunk.add_(x_sq[rows, None]).clamp_min_(0).sqrt_()  # while the chunk is in cache
    return out


def cluster_sums(labels: torch.Tensor, rows: torch.Tensor, k: int) -> torch.Tensor:
    """Sum of the rows of each cluster [k, d], accumulated in float64: the same sums to float64
    rounding however the rows are grouped (by batch, by partition, by the rows that moved)."""
    sums = torch.zeros(k, rows.shape[1], dtype=torch.float64, device=rows.device)
    return sums.index_add_(0, labels, rows.double())


def assign(x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of each row of x [n, d]: (labels [n], squared distances [n])."""
    labels, first, _ = nearest_two(x, centroids, (centroids**2).sum(1))
    return labels, first


def kmeans_plusplus(
    x: torch.Tensor, k: int, generator: torch.Generator, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Greedy k-means++ seeding (as scikit-learn): 2 + log(k) candidates per step, keep the one
    that lowers the (weighted) cost most. `weights` [n] count how many points each row stands for."""
    weights = torch.ones(len(x), dtype=torch.float64) if weights is None else weights.double().cpu()
    on_device = weights.to(x.device)
    trials = 2 + int(math.log(k))
    centroids = torch.empty(k, x.shape[1], dtype=x.dtype, device=x.device)
    centroids[0] = x[int(torch.multinomial(weights, 1, generator=generator).item())]
    closest = ((x - centroids[0]) ** 2).sum(1)
    x_sq = (x**2).sum(1)
    with progress.task(f"k-means++ seeding over {len(x):,} rows", k, "centroids") as seeding:
        for i in range(1, k):
            mass = weights * closest.double().cpu()
            picks = torch.multinomial(mass / mass.sum(), trials, replacement=True, generator=generator)
            candidates = x[picks.to(x.device)]  # [trials, d]
            dist = (x_sq[:, None] - 2 * x @ candidates.T + (candidates**2).sum(1)).clamp_min_(0)  # [n, trials]
            updated = torch.minimum(closest[:, None], dist)
            best = (on_device[:, None] * updated.double()).sum(0).argmin()
            centroids[i] = candidates[best]
            closest = updated[:, best]
            seeding.update(i + 1)
    return centroids


# k-means|| defaults, and the rows seeding samples; core/costs.py estimates seeding from them
PARALLEL_ROUNDS = 5
OVERSAMPLING = 2.0
INIT_SAMPLE_ROWS = 100_000


def kmeans_parallel(
    x: torch.Tensor,
    k: int,
    generator: torch.Generator,
    rounds: int = PARALLEL_ROUNDS,
    oversampling: float = OVERSAMPLING,
) -> torch.Tensor:
    """k-means|| seeding (Bahmani et al. 2012): a few passes that each add every row with
    probability oversampling * k * d^2 / cost, then greedy k-means++ over those candidates, each
    weighted by the rows nearest to it. Each pass is one distance GEMM against the new
    candidates, where k-means++ reads all rows once per centroid (k memory-bound passes)."""
    first = int(torch.randint(len(x), (1,), generator=generator).item())
    chosen = [x[first : first + 1]]
    closest = ((x - x[first]) ** 2).sum(1)
    owner = torch.zeros(len(x), dtype=torch.long, device=x.device)  # index of the nearest candidate
    n_candidates = 1
    with progress.task("k-means|| oversampling", rounds, "rounds", total_is_bound=True) as oversampled:
        for round_number in range(1, rounds + 1):
            cost = float(closest.double().sum())
            if cost == 0.0:
                break
            chance = (oversampling * k * closest.double().cpu() / cost).clamp_max_(1.0)
            picked = (torch.rand(len(x), generator=generator, dtype=torch.float64) < chance).nonzero().flatten()
            if not len(picked):
                continue
            chosen.append(x[picked.to(x.device)])
            labels, dist = assign(x, chosen[-1])
            nearer = dist < closest
            closest = torch.where(nearer, dist, closest)
            owner = torch.where(nearer, labels + n_candidates, owner)
            n_candidates += len(picked)
            oversampled.update(round_number, candidates=n_candidates)
    if n_candidates <= k:  # too few distinct rows were drawn to choose from: seed on all rows
        return kmeans_plusplus(x, k, generator)
    weights = torch.bincount(owner.cpu(), minlength=n_candidates)
    return kmeans_plusplus(torch.cat(chosen), k, generator, weights)


def random_rows(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Forgy seeding: k distinct rows drawn uniformly. One pass, where both k-means++ variants
    read all rows once per centroid: what a shape rehearsal of k in the tens of thousands on a
    CPU can afford (the seeding quality is the price)."""
    return x[torch.randperm(len(x), generator=generator)[:k].to(x.device)].clone()


Seeding = Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]  # rows, k, generator -> centroids
SEEDINGS: dict[str, Seeding] = {"k-means||": kmeans_parallel, "k-means++": kmeans_plusplus, "random": random_rows}


def init_centroids(
    data: torch.Tensor | Batches | Partitioned,
    k: int,
    seed: int,
    sample_rows: int = INIT_SAMPLE_ROWS,
    seeding: str = "k-means||",
    device: str = "cpu",
) -> torch.Tensor:
    """Seed k centroids (k-means||, greedy k-means++ or random rows) from a uniform sample of at
    most sample_rows rows of the data, on `device` (k-means++ reads the sample once per centroid:
    16,384 passes over 100k x 2304 floats at the research k). Store partitions are sampled by
    `partition_sample`, the same rows on any engine."""
    generator = torch.Generator().manual_seed(seed)
    if isinstance(data, Partitioned):
        kept = partition_sample(data, sample_rows, seed)
    else:
        kept = _stream_sample(as_batches(data), sample_rows, generator)
    if len(kept) < k:
        raise ConfigError(f"k={k} exceeds the {len(kept)} training tokens: lower k or sample more tokens")
    return SEEDINGS[seeding](kept.to(device), k, generator)


def _stream_sample(batches: Batches, sample_rows: int, generator: torch.Generator) -> torch.Tensor:
    """At most sample_rows rows drawn uniformly without replacement: the bottom-k of random keys."""
    kept: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    for batch in batches():
        batch_keys = torch.rand(len(batch), generator=generator)
        kept = batch if kept is None else torch.cat([kept, batch])
        keys = batch_keys if keys is None else torch.cat([keys, batch_keys])
        if len(kept) > sample_rows:
            order = keys.argsort()[:sample_rows]
            kept, keys = kept[order.to(kept.device)], keys[order]
    return torch.empty(0) if kept is None else kept


def _rows_below(shard: Shard, seed: int, below: float) -> tuple[np.ndarray, torch.Tensor, int]:
    """A partition's rows whose random key is below `below`: (their keys, the rows, rows read).
    Keys come from a generator of (seed, partition), so they do not depend on who reads it."""
    generator = np.random.default_rng([seed, int(shard.key)])
    keys, rows, read = [np.empty(0)], [], 0
    for x in shard.batches():
        batch_keys = generator.random(len(x))
        kept = batch_keys < below
        keys.append(batch_keys[kept])
        rows.append(x[torch.from_numpy(kept)])
        read += len(x)
    return np.concatenate(keys), torch.cat(rows) if rows else torch.empty(0), read


def partition_sample(data: Partitioned, rows: int, seed: int) -> torch.Tensor:
    """`rows` rows of the partitions drawn uniformly without replacement (all of them if fewer):
    those of the smallest random keys. Each task returns only its rows with keys under a threshold
    a little above rows / tokens, so about `rows` rows cross the network, not a partition's worth
    each; a threshold that proves too low (rare) is doubled and the pass repeated."""
    tokens = sum(ActivationStore(s.store_url).token_count([s.key]) for s in data.shards)  # BOS included: >= rows read
    below = min(1.0, (1.25 * rows + 10 * math.sqrt(rows)) / max(tokens, 1))
    while True:
        found = list(data.engine.imap(_rows_below, data.shards, seed, below))
        read, kept = sum(part[2] for part in found), sum(len(part[0]) for part in found)
        if kept >= min(rows, read) or below >= 1.0:
            break
        below = min(1.0, 2 * below)
    if not kept:
        return torch.empty(0)
    keys = np.concatenate([part[0] for part in found])
    order = np.argsort(keys, kind="stable")[:rows]
    return torch.cat([part[1] for part in found if len(part[0])])[torch.from_numpy(order)]


def _validate(k: int, backend: str, device: str, seeding: str, on_cluster: bool) -> None:
    if k < 1:
        raise ConfigError(f"k must be at least 1, got {k}")
    if seeding not in SEEDINGS:
        raise ConfigError(f"unknown k-means seeding {seeding!r}; valid: {', '.join(SEEDINGS)}")
    if backend not in BACKENDS:
        raise ConfigError(f"unknown k-means backend {backend!r}; valid: {', '.join(BACKENDS)}")
    # on a cluster cuML runs on the workers' GPUs: the step's own machine may have none
    if ((backend == "cuml" and not on_cluster) or device.startswith("cuda")) and not torch.cuda.is_available():
        raise ConfigError(
            f"backend {backend!r} on {device!r} needs a CUDA GPU and none is visible: use backend 'torch' on 'cpu'"
        )


def fit_kmeans(
    data: torch.Tensor | Batches,
    k: int,
    max_iter: int = 50,
    tol: float = 1e-4,
    seed: int = 0,
    init: torch.Tensor | None = None,
    backend: str = "torch",
    device: str = "cpu",
    minibatch_steps: int = 200,
    init_sample_rows: int = INIT_SAMPLE_ROWS,
    bounds_mb: float = 2048,
    seeding: str = "k-means||",
    label: str = "k-means",
) -> KMeansResult:
    """Fit k centroids to `data` (a tensor [n, d] or a callable streaming [n_i, d] batches).

    Without `init`, `seeding` (k-means|| or greedy k-means++) runs on a uniform sample of
    `init_sample_rows` rows (the only rows held in memory besides one batch when data is
    streamed). `bounds_mb` caps the memory of Elkan's per-centroid bounds (n x k float32) on the
    CPU; batches beyond it use Hamerly's. Seeding and iterations report progress as `label`."""
    on_cluster = isinstance(data, Partitioned) and data.distributed
    _validate(k, backend, device, seeding, on_cluster)
    batches = as_batches(data)
    started = time.perf_counter()
    with progress.within(f"{label} k={k} seed {seed}"):
        if init is None:
            init = init_centroids(batches, k, seed, init_sample_rows, seeding, device)
        elif len(init) != k:
            raise ConfigError(f"init has {len(init)} centroids, k={k}")
        init = init.to(device)
        if backend == "torch" and isinstance(data, Partitioned) and data.distributed:
            result = _fit_lloyd_mapped(data, init, max_iter, tol)
        elif backend == "cuml" and isinstance(data, Partitioned) and data.distributed:
            result = _fit_cuml_on_cluster(data, init, max_iter, tol)
        elif backend == "cuml":
            result = _fit_cuml(batches, init, max_iter, tol)
        elif backend == "minibatch":
            result = _fit_minibatch(batches, init, minibatch_steps, seed)
        else:
            result = _fit_lloyd(batches, init, max_iter, tol, bounds_mb)
    result.fit_seconds = time.perf_counter() - started
    result.centroids, result.sizes = result.centroids.cpu(), result.sizes.cpu()  # callers read them on the CPU
    return result


@dataclass
class _Bounds:
    """Per-point state for one batch: label, upper bound on the distance to its centroid,
    lower bounds, and squared row norms. `lower` is [n, k] for Elkan (a bound per centroid)
    or [n] for Hamerly (one bound on the distance to every other centroid)."""

    labels: torch.Tensor
    upper: torch.Tensor
    lower: torch.Tensor
    x_sq: torch.Tensor

    @property
    def elkan(self) -> bool:
        return self.lower.dim() == 2


def _first_assignment(x: torch.Tensor, centroids: torch.Tensor, c_sq: torch.Tensor, elkan: bool) -> _Bounds:
    """Every distance of the batch, kept whole for Elkan or reduced to the nearest two for Hamerly."""
    x_sq = (x**2).sum(1)
    if elkan:
        lower = distance_matrix(x, centroids, c_sq, x_sq)
        upper, labels = lower.min(1)
        state = _Bounds(labels, upper, lower, x_sq)
        if len(centroids) > 1:
            two = torch.cat([rows.topk(2, dim=1, largest=False).values for rows in lower.split(_ROWS_PER_GEMM)])
            first_sq = two[:, 0].square()
            _settle_elkan_ties(x, centroids, c_sq, state, near_ties(two[:, 1].square() - first_sq, x_sq, first_sq))
        return state
    labels, first, second = nearest_two(x, centroids, c_sq, x_sq)
    return _Bounds(labels, first.sqrt(), second.sqrt(), x_sq)


def _settle_elkan_ties(
    x: torch.Tensor, centroids: torch.Tensor, c_sq: torch.Tensor, state: _Bounds, tied: torch.Tensor
) -> int:
    """The `tied` rows of an Elkan state, whose lower bounds are exact (float32) wherever a
    centroid is within NEAR_TIE of the nearest: those centroids get exact distances, the label is
    the nearest of them and the bounds are tightened to them. Returns the distances computed."""
    rows = tied.nonzero().flatten()
    if not len(rows) or len(centroids) < 2:
        return 0
    labels = state.labels[rows, None]
    lower = state.lower[rows].scatter(1, labels, state.upper[rows, None]).double()
    upper_sq = state.upper[rows].double().square()[:, None]
    candidates = near_ties(lower.square() - upper_sq, state.x_sq[rows, None], upper_sq)
    candidates.scatter_(1, labels, True)
    settled = settle(x[rows], centroids, torch.full(candidates.shape, float("inf"), dtype=torch.float64), candidates)
    state.labels[rows] = settled.argmin(1)
    state.upper[rows] = settled.amin(1).sqrt().float()
    state.lower[rows] = torch.where(candidates, settled.sqrt().float(), state.lower[rows])
    return int(candidates.sum())


def _move_rows(sums: torch.Tensor, rows: torch.Tensor, old: torch.Tensor, new: torch.Tensor) -> None:
    """Move the rows whose label changed from the old cluster's running sum to the new one's."""
    moved = (new != old).nonzero().flatten()
    if len(moved):
        k = len(sums)
        sums += cluster_sums(new[moved], rows[moved], k) - cluster_sums(old[moved], rows[moved], k)


def _hamerly_chunk(
    x: torch.Tensor,
    state: _Bounds,
    centroids: torch.Tensor,
    c_sq: torch.Tensor,
    shift: torch.Tensor,
    sums: torch.Tensor,
) -> int:
    """Reassign rows x (a chunk of a batch; `state` is the matching view) after the centroids
    moved by `shift`, moving changed rows between the running cluster sums. Returns how many
    rows needed the distance GEMM."""
    state.upper += shift[state.labels]
    state.lower -= shift.max()
    # Hamerly (2010): a row whose upper bound is below its lower bound keeps its centroid.
    # (Tightening the upper bound first would need a gather per row that costs about what the
    # GEMM on that row costs at k in the hundreds, so the GEMM is done directly.)
    # a row within NEAR_TIE of no proof is recomputed too: nearest_two settles its tie exactly
    upper_sq = state.upper.square()
    tied = near_ties(state.lower.clamp_min(0).square() - upper_sq, state.x_sq, upper_sq)
    redo = (tied | (state.upper > state.lower)).nonzero().flatten()
    if not len(redo):
        return 0
    old = state.labels[redo]
    rows = x[redo]
    labels, first, second = nearest_two(rows, centroids, c_sq, state.x_sq[redo])
    state.labels[redo], state.upper[redo], state.lower[redo] = labels, first.sqrt(), second.sqrt()
    _move_rows(sums, rows, old, labels)
    return len(redo)


def _inertia(centroids: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor, x_sq_total: float) -> float:
    """sum ||x - c_a||^2 from the cluster sums: sum ||x||^2 - 2 sum_j c_j . S_j + sum_j n_j ||c_j||^2."""
    c64 = centroids.double()
    return x_sq_total - 2 * float((c64 * sums).sum()) + float((counts * (c64**2).sum(1)).sum())


def _stops(curve: list[float], iteration: int, max_iter: int, tol: float) -> bool:
    """The last pass, or the inertia changed by at most `tol` of itself."""
    return iteration == max_iter or (len(curve) > 1 and abs(curve[-2] - curve[-1]) <= tol * curve[-2])


def _updated(
    centroids: torch.Tensor,
    sums: torch.Tensor,
    counts: torch.Tensor,
    farthest_rows: Callable[[int], torch.Tensor],
) -> torch.Tensor:
    """The clusters' means; an empty cluster takes one of the rows farthest from their centroid."""
    updated = (sums / counts.clamp_min(1).unsqueeze(1)).float()
    empty = (counts == 0).nonzero().flatten()
    if len(empty):
        updated[empty] = farthest_rows(len(empty)).to(updated)
    return updated


def _fit_lloyd(
    batches: Batches, centroids: torch.Tensor, max_iter: int, tol: float, bounds_mb: float = 0.0
) -> KMeansResult:
    """Exact Lloyd. Cluster sums are kept across iterations and only the rows that change
    cluster move between them; inertia follows from the sums:
    sum ||x - c_a||^2 = sum ||x||^2 - 2 sum_j c_j . S_j + sum_j n_j ||c_j||^2."""
    k, device = len(centroids), centroids.device
    bounds: list[_Bounds] = []
    elkan_bytes_left = bounds_mb * 2**20 if device.type == "cpu" else 0.0
    sums = torch.zeros(centroids.shape, dtype=torch.float64, device=device)
    x_sq_total, computed, n_points = 0.0, 0, 0
    shift = torch.zeros(k, device=device)  # how far each centroid moved in the last update
    curve: list[float] = []
    converged = False
    # a pass assigns every row; the first (from the seeds) is not an iteration, hence max_iter + 1
    lloyd = progress.task("Lloyd", max_iter + 1, "passes", total_is_bound=tol > 0).start()
    for iteration in range(max_iter + 1):
        c_sq = (centroids**2).sum(1)
        gaps = centroid_gaps(centroids) if iteration and any(b.elkan for b in bounds) else None
        for index, batch in enumerate(batches()):
            if iteration:
                lloyd.update(iteration + index / len(bounds))
            else:  # the first pass, the costliest (every distance), does not know its batches yet
                lloyd.update(0, rows_assigned=n_points)
            x = batch.to(device, torch.float32)
            if iteration == 0:
                elkan = len(x) * k * 4 <= elkan_bytes_left
                elkan_bytes_left -= len(x) * k * 4 if elkan else 0
                state = _first_assignment(x, centroids, c_sq, elkan)
                bounds.append(state)
                for start in range(0, len(x), _ROWS_PER_GEMM):
                    rows = slice(start, start + _ROWS_PER_GEMM)
                    sums += cluster_sums(state.labels[rows], x[rows], k)
                x_sq_total += float(state.x_sq.double().sum())
                computed += len(x) * k
                n_points += len(x)
                continue
            state = bounds[index]
            if state.elkan:
                assert gaps is not None  # computed in every iteration after the first that has Elkan bounds
                old = state.labels.clone()
                passed, tied = elkan_pass(
                    x, state.x_sq, centroids, c_sq, shift, gaps, NEAR_TIE, state.labels, state.upper, state.lower
                )
                computed += passed + _settle_elkan_ties(x, centroids, c_sq, state, tied)
                _move_rows(sums, x, old, state.labels)
                continue
            # cache-sized row chunks: whole-batch temporaries cost more than the arithmetic
            for start in range(0, len(x), _ROWS_PER_GEMM):
                rows = slice(start, start + _ROWS_PER_GEMM)
                chunk = _Bounds(state.labels[rows], state.upper[rows], state.lower[rows], state.x_sq[rows])
                computed += k * _hamerly_chunk(x[rows], chunk, centroids, c_sq, shift, sums)
        counts = torch.bincount(torch.cat([b.labels for b in bounds]), minlength=k)
        curve.append(_inertia(centroids, sums, counts, x_sq_total))
        if _stops(curve, iteration, max_iter, tol):
            converged = iteration < max_iter
            break
        updated = _updated(centroids, sums, counts, lambda n: _farthest(batches(), centroids, n).rows)
        shift = (updated - centroids).norm(dim=1)
        centroids = updated
        if lloyd.due:  # the shift's maximum syncs a GPU: only for a line that is shown
            lloyd.update(iteration + 1, inertia=curve[-1], max_shift=float(shift.max()))
        else:
            lloyd.update(iteration + 1)
    lloyd.update(len(curve))
    lloyd.finish(inertia=curve[-1], iterations=len(curve) - 1)
    return KMeansResult(
        centroids=centroids,
        inertia_curve=curve,
        n_iter=len(curve) - 1,
        converged=converged,
        fit_seconds=0.0,
        sizes=counts.cpu(),
        distances_computed=computed,
        distances_possible=n_points * k * len(curve),
    )


@dataclass
class _PartitionSums:
    """What partitions' rows add to a Lloyd update."""

    sums: torch.Tensor  # [k, d] float64 rows of each cluster
    counts: torch.Tensor  # [k] int64
    x_sq: float  # sum of squared row norms

    def __add__(self, other: _PartitionSums) -> _PartitionSums:
        return _PartitionSums(self.sums + other.sums, self.counts + other.counts, self.x_sq + other.x_sq)


@dataclass
class _Farthest:
    """The n rows farthest from their nearest centroid among those seen: seeds for empty clusters."""

    distances: torch.Tensor  # [<= n], largest first
    rows: torch.Tensor  # [<= n, d]
    n: int

    def __add__(self, other: _Farthest) -> _Farthest:
        distances, order = torch.cat([self.distances, other.distances]).topk(
            min(self.n, len(self.distances) + len(other.distances))
        )
        return _Farthest(distances, torch.cat([self.rows, other.rows])[order], self.n)


def _task_device() -> str:
    """A worker's device: its GPU where it has one (dask-cuda gives each worker one)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _assign_partition(shard: Shard, centroids: torch.Tensor) -> _PartitionSums:
    """One partition's rows assigned to their nearest centroids, as _fit_lloyd's first pass does."""
    device = _task_device()
    centroids = centroids.to(device)
    k = len(centroids)
    c_sq = (centroids**2).sum(1)
    sums = torch.zeros(centroids.shape, dtype=torch.float64, device=device)
    counts = torch.zeros(k, dtype=torch.long, device=device)
    x_sq = 0.0
    for batch in shard.batches():
        x = batch.to(device, torch.float32)
        row_sq = (x**2).sum(1)
        labels, _, _ = nearest_two(x, centroids, c_sq, row_sq)
        for start in range(0, len(x), _ROWS_PER_GEMM):
            rows = slice(start, start + _ROWS_PER_GEMM)
            sums += cluster_sums(labels[rows], x[rows], k)
        counts += torch.bincount(labels, minlength=k)
        x_sq += float(row_sq.double().sum())
    return _PartitionSums(sums.cpu(), counts.cpu(), x_sq)


def _farthest(batches: Iterable[torch.Tensor], centroids: torch.Tensor, n: int) -> _Farthest:
    """The n rows farthest from their nearest centroid (exact assignment, as every path makes it)."""
    c_sq = (centroids**2).sum(1)
    farthest = _Farthest(centroids.new_empty(0), centroids.new_empty(0, centroids.shape[1]), n)
    for batch in batches:
        x = batch.to(centroids.device, torch.float32)
        _, first, _ = nearest_two(x, centroids, c_sq)
        farthest = farthest + _Farthest(first.sqrt(), x, n)
    return farthest


def _farthest_in_partition(shard: Shard, centroids: torch.Tensor, n: int) -> _Farthest:
    return _farthest(shard.batches(), centroids, n)


def _fit_lloyd_mapped(data: Partitioned, centroids: torch.Tensor, max_iter: int, tol: float) -> KMeansResult:
    """Exact Lloyd as map-reduce over store partitions (see the module's docstring): the same
    passes, sums, inertia and stopping rule as `_fit_lloyd`, with every distance computed."""
    k = len(centroids)
    device = centroids.device
    centroids = centroids.cpu()
    curve: list[float] = []
    converged = False
    n_points = 0
    lloyd = progress.task("Lloyd", max_iter + 1, "passes", total_is_bound=tol > 0).start()
    for iteration in range(max_iter + 1):
        total = map_reduce(data, _assign_partition, operator.add, centroids)
        sums, counts, x_sq_total = total.sums, total.counts, total.x_sq
        n_points = int(counts.sum())
        curve.append(_inertia(centroids, sums, counts, x_sq_total))
        if _stops(curve, iteration, max_iter, tol):
            converged = iteration < max_iter
            break
        updated = _updated(
            centroids,
            sums,
            counts,
            lambda n: map_reduce(data, _farthest_in_partition, operator.add, centroids, n).rows,
        )
        shift = (updated - centroids).norm(dim=1)
        centroids = updated
        lloyd.update(iteration + 1, inertia=curve[-1], max_shift=float(shift.max()))
    lloyd.update(len(curve))
    lloyd.finish(inertia=curve[-1], iterations=len(curve) - 1)
    return KMeansResult(
        centroids=centroids.to(device),
        inertia_curve=curve,
        n_iter=len(curve) - 1,
        converged=converged,
        fit_seconds=0.0,
        sizes=counts,
        distances_computed=n_points * k * len(curve),
        distances_possible=n_points * k * len(curve),
    )


def _fit_minibatch(
    batches: Batches, centroids: torch.Tensor, steps: int, seed: int, batch_size: int = 4096
) -> KMeansResult:
    """Sculley (2010): per-centre learning rate 1/count, over random mini-batches of the stream."""
    centroids = centroids.clone()
    counts = torch.zeros(len(centroids), device=centroids.device)
    generator = torch.Generator().manual_seed(seed)
    step = 0
    minibatch = progress.task("mini-batch steps", steps, "steps").start()
    while step < steps:
        for batch in batches():
            for rows in torch.randperm(len(batch), generator=generator).split(batch_size):
                x = batch[rows].to(centroids.device, torch.float32)
                labels, _ = assign(x, centroids)
                counts += torch.bincount(labels, minlength=len(centroids))
                sums = torch.zeros_like(centroids).index_add_(0, labels, x)
                hits = torch.bincount(labels, minlength=len(centroids)).unsqueeze(1)
                rate = (hits / counts.clamp_min(1).unsqueeze(1)).float()
                centroids += rate * (sums / hits.clamp_min(1) - centroids) * (hits > 0)
                step += 1
                minibatch.update(step)
                if step >= steps:
                    break
            if step >= steps:
                break
    minibatch.finish()
    final = _fit_lloyd(batches, centroids, max_iter=0, tol=0.0)  # one exact pass: inertia and sizes
    final.n_iter, final.converged = steps, False
    return final


def _fit_cuml(batches: Batches, init: torch.Tensor, max_iter: int, tol: float) -> KMeansResult:
    """cuML KMeans on the GPU (float32; the data must fit on the device)."""
    try:
        import cupy
        from cuml.cluster import KMeans
    except ImportError as error:
        raise ConfigError("backend 'cuml' needs cuML: pip install '.[gpu]' on a CUDA machine") from error
    x = cupy.asarray(torch.cat([b.to("cuda", torch.float32) for b in batches()]))
    model = KMeans(
        n_clusters=len(init), init=cupy.asarray(init.float()), n_init=1, max_iter=max_iter, tol=tol, output_type="cupy"
    )
    model.fit(x)
    centroids = torch.as_tensor(model.cluster_centers_, device="cuda")
    final = _fit_lloyd(batches, centroids, max_iter=0, tol=0.0)  # same inertia definition as the other backends
    final.n_iter, final.converged = int(model.n_iter_), int(model.n_iter_) < max_iter
    return final


def _rows_of(shard: Shard) -> int:
    """How many rows a partition's batches hold (BOS dropped): read from its small per-token arrays."""
    store = ActivationStore(shard.store_url)
    part = store.open(shard.key)
    bos = part.manifest["attrs"].get("bos_token_id")
    return int(((part.array("positions") != 0) & (part.array("token_ids") != bos)).sum())


def _rows_on_gpu(shard: Shard):  # -> cupy.ndarray
    """A partition's rows on the worker's GPU, as cuML's dask KMeans reads its chunks."""
    import cupy

    return cupy.asarray(torch.cat(list(shard.batches())).float().numpy())


def _fit_cuml_on_cluster(data: Partitioned, init: torch.Tensor, max_iter: int, tol: float) -> KMeansResult:
    """cuML's multi-GPU KMeans (centroids exchanged, rows stay on the workers' GPUs) over the
    partitions, one dask-array chunk each; then one exact mapped pass for the inertia and sizes
    every backend reports."""
    try:
        import cupy
        import dask
        import dask.array
        from cuml.dask.cluster import KMeans
    except ImportError as error:
        raise ConfigError(
            "backend 'cuml' on a Dask cluster needs cuML and dask-cuda on the GPU workers: pip install '.[gpu]'"
        ) from error
    from gemma_assets.core.engine import DaskEngine

    assert isinstance(data.engine, DaskEngine)
    d = init.shape[1]
    rows = list(data.engine.imap(_rows_of, data.shards))
    chunks = [
        dask.array.from_delayed(
            dask.delayed(_rows_on_gpu)(shard), shape=(n, d), dtype="float32", meta=cupy.empty((0, d), "float32")
        )
        for shard, n in zip(data.shards, rows, strict=True)
        if n
    ]
    model = KMeans(
        client=data.engine.client, n_clusters=len(init), init=init.float().cpu().numpy(), max_iter=max_iter, tol=tol
    )
    model.fit(dask.array.concatenate(chunks))
    centroids = torch.as_tensor(cupy.asnumpy(cupy.asarray(model.cluster_centers_)))
    final = _fit_lloyd_mapped(data, centroids, max_iter=0, tol=0.0)
    n_iter = int(getattr(model, "n_iter_", max_iter))
    final.n_iter, final.converged = n_iter, n_iter < max_iter
    return final


@dataclass(frozen=True)
class KMeansDictionary:
    """Centroids in a preprocessed space; a token is reconstructed as its nearest centroid (L0 = 1)."""

    centroids: torch.Tensor  # [k, d] in preprocessed space
    preprocessor: Preprocessor

    @property
    def n_features(self) -> int:
        return len(self.centroids)

    @cached_property
    def _raw_directions(self) -> torch.Tensor:
        return unit_rows(self.preprocessor.inverse(self.centroids) - self.preprocessor.shift)

    def directions(self) -> torch.Tensor:
        return self._raw_directions

    def encode(self, x: torch.Tensor) -> Codes:
        labels, _ = assign(self.preprocessor.forward(x), self.centroids)
        return Codes.one_hot(labels, cosine_to(x, self._raw_directions, self.preprocessor.shift, labels))

    def decode(self, codes: Codes) -> torch.Tensor:
        return self.preprocessor.inverse(self.centroids[codes.indices[:, 0]])
