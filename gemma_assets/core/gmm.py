"""Diagonal-covariance Gaussian mixture fitted by EM in torch, streamed over batches.

Each EM iteration is one pass over the data: each batch's responsibilities are reduced to
float64 sufficient statistics (sum r, sum r x, sum r x^2 per component) and the M-step turns
their totals into new parameters, so data larger than memory works and the fit does not
depend on how the data is batched (up to float64 summation order).

A component no token is responsible for (sum r = 0, e.g. an initial mean that is nobody's
nearest) gets weight 0 and keeps its mean and variances (the floor, if it was empty from the
start): it stays valid but no longer affects the likelihood or predictions. It is not
re-seeded, since moving it would break EM's guarantee of a non-decreasing likelihood.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import numpy as np
import torch

from gemma_assets.core import progress
from gemma_assets.core.batches import Batches
from gemma_assets.core.config import ConfigError
from gemma_assets.core.engine import Partitioned, Shard, map_reduce
from gemma_assets.core.kmeans import assign

_LOG_2PI = math.log(2 * math.pi)
JOINT_BYTES = 16 * 2**20  # [rows, k] float64 per step: cache-sized (65,536 rows at k = 16,384 are 8.6 GB)


@dataclass(frozen=True)
class GaussianMixture:
    weights: torch.Tensor  # [k] float64, sums to 1
    means: torch.Tensor  # [k, d] float64
    variances: torch.Tensor  # [k, d] float64, at least the variance floor
    log_likelihood_curve: list[float]  # mean log-likelihood per token, initially and after each M-step
    n_iter: int
    converged: bool

    @functools.cached_property
    def _joint_terms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """log weight + log normaliser [k], and the [k, 2d + 1] coefficients of [x^2, x, 1] whose
        product is sum_d (x - m)^2 / v: the whole quadratic form in one GEMM (float64 makes the
        cancellation harmless)."""
        precision = 1 / self.variances  # [k, d]
        coefficients = torch.cat(
            [precision, -2 * self.means * precision, (self.means**2 * precision).sum(1, keepdim=True)], 1
        )
        log_norm = -0.5 * (self.means.shape[1] * _LOG_2PI + self.variances.log().sum(1))
        return self.weights.log() + log_norm, coefficients

    def log_joint(self, x: torch.Tensor) -> torch.Tensor:
        """log weight_k + log N(x | mean_k, diag variance_k), [n, k] float64, for x [n, d]."""
        x = x.to(self.means)
        constant, coefficients = self._joint_terms
        return torch.addmm(constant, torch.cat([x**2, x, torch.ones_like(x[:, :1])], 1), coefficients.T, alpha=-0.5)

    def row_chunks(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x in row chunks whose [rows, k] joint stays within JOINT_BYTES."""
        return list(x.split(max(1, JOINT_BYTES // (8 * len(self.weights)))))

    def log_likelihood(self, x: torch.Tensor) -> torch.Tensor:
        """Log-density [n] float64 of each row of x [n, d]."""
        return torch.cat([torch.logsumexp(self.log_joint(rows), 1) for rows in self.row_chunks(x)])

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Most probable component [n] of each row of x [n, d]."""
        return torch.cat([self.log_joint(rows).argmax(1) for rows in self.row_chunks(x)])


@dataclass
class _Stats:
    n: int
    log_likelihood: float  # summed over tokens
    resp: torch.Tensor  # [k] sum r
    resp_x: torch.Tensor  # [k, d] sum r x
    resp_x2: torch.Tensor  # [k, d] sum r x^2

    def __add__(self, other: _Stats) -> _Stats:
        return _Stats(
            self.n + other.n,
            self.log_likelihood + other.log_likelihood,
            self.resp + other.resp,
            self.resp_x + other.resp_x,
            self.resp_x2 + other.resp_x2,
        )


def _on_shard(shard: Shard, pass_over: Callable[..., _Stats], *shared: object) -> _Stats:
    """A pass over one store partition (a task of the data's engine)."""
    return pass_over(shard.batches, *shared)


def _summed(data: Batches, pass_over: Callable[..., _Stats], *shared: object, on_rows=lambda _: None) -> _Stats:
    """`pass_over(data, *shared)`; store partitions on a cluster as tasks of its workers, their
    statistics added in partition order."""
    if not (isinstance(data, Partitioned) and data.distributed):
        return pass_over(data, *shared, on_rows)
    return map_reduce(data, _on_shard, operator.add, pass_over, *shared, on_result=lambda part: on_rows(part.n))


def _check(x: torch.Tensor, d: int) -> None:
    if x.ndim != 2 or x.shape[1] != d:
        raise ValueError(f"GMM data batches must be [n, {d}] like the initial means, got {list(x.shape)}")


def _hard_stats(batches: Batches, init_means: torch.Tensor, on_rows: Callable[[int], None] = lambda _: None) -> _Stats:
    """Sufficient statistics of the assignment of every token to its nearest initial mean."""
    k, d = init_means.shape
    zeros = init_means.new_zeros((k, d), dtype=torch.float64)
    stats = _Stats(0, 0.0, zeros[:, 0].clone(), zeros.clone(), zeros.clone())
    for x in batches():
        _check(x, d)
        x = x.to(init_means.device)
        labels, _ = assign(x.float(), init_means.float())
        x = x.double()
        stats.n += len(x)
        stats.resp += torch.bincount(labels, minlength=k)
        stats.resp_x.index_add_(0, labels, x)
        stats.resp_x2.index_add_(0, labels, x**2)
        on_rows(len(x))
    return stats


def _soft_stats(batches: Batches, gmm: GaussianMixture, on_rows: Callable[[int], None] = lambda _: None) -> _Stats:
    """E-step over every batch: the responsibilities' sufficient statistics and the log-likelihood;
    `on_rows(n)` after each n rows (progress)."""
    d = gmm.means.shape[1]
    n, log_likelihood = 0, 0.0
    sums = gmm.means.new_zeros((len(gmm.means), 1 + 2 * d))  # [sum r, sum r x, sum r x^2] per component
    for batch in batches():
        _check(batch, d)
        for x in gmm.row_chunks(batch.to(gmm.means)):
            resp = gmm.log_joint(x)  # [n, k], turned into the responsibilities in place
            log_px = torch.logsumexp(resp, 1)  # [n]
            resp.sub_(log_px[:, None]).exp_()  # exactly 0 for zero-weight components
            n += len(x)
            log_likelihood += float(log_px.sum())
            sums += resp.T @ torch.cat([torch.ones_like(x[:, :1]), x, x**2], 1)
            on_rows(len(x))
    return _Stats(n, log_likelihood, sums[:, 0], sums[:, 1 : 1 + d], sums[:, 1 + d :])


def _m_step(gmm: GaussianMixture, stats: _Stats, var_floor: float) -> GaussianMixture:
    alive = (stats.resp > 0)[:, None]  # [k, 1]
    nk = stats.resp.clamp_min(torch.finfo(torch.float64).tiny)[:, None]  # [k, 1]
    means = torch.where(alive, stats.resp_x / nk, gmm.means)
    # Flooring is the constrained maximum of the variance term, so EM still never decreases the likelihood
    variances = torch.where(alive, (stats.resp_x2 / nk - means**2).clamp_min(var_floor), gmm.variances)
    return replace(gmm, weights=stats.resp / stats.resp.sum(), means=means, variances=variances)


def fit_gmm(
    batches: Batches,
    init_means: torch.Tensor,
    max_iter: int = 100,
    tol: float = 1e-6,
    relative_var_floor: float = 1e-6,
) -> GaussianMixture:
    """EM from k-means centroids init_means [k, d] over the data `batches()` yields ([n, d] each).

    `batches` is called once per pass (max_iter + 2 passes at most). The initial weights and
    variances come from assigning each token to its nearest initial mean; every variance is
    floored at relative_var_floor times the data's mean per-dimension variance. Stops when the
    mean log-likelihood per token changes by at most tol relative to the previous iteration.
    """
    if init_means.ndim != 2 or len(init_means) < 1:
        raise ConfigError(f"the GMM needs k >= 1 initial means as a [k, d] tensor, got shape {list(init_means.shape)}")
    if max_iter < 0:
        raise ConfigError(f"max_iter must be >= 0, got {max_iter}")
    if relative_var_floor <= 0:
        raise ConfigError(f"relative_var_floor must be > 0 (a zero variance has no density), got {relative_var_floor}")
    k = len(init_means)
    hard = _summed(batches, _hard_stats, init_means)
    if k > hard.n:
        raise ConfigError(f"k={k} exceeds the {hard.n} training tokens: lower k or sample more tokens")
    total_mean = hard.resp_x.sum(0) / hard.n  # [d]
    total_variance = float((hard.resp_x2.sum(0) / hard.n - total_mean**2).mean())
    # constant data has no scale of its own: floor against unit variance so densities stay finite
    var_floor = relative_var_floor * (total_variance if total_variance > 0 else 1.0)
    means = init_means.to(torch.float64)
    # sum (x - m)^2 around the initial means, which stay the means; an empty cluster gets the floor
    scatter = hard.resp_x2 - 2 * means * hard.resp_x + means**2 * hard.resp[:, None]  # [k, d]
    variances = (scatter / hard.resp.clamp_min(1)[:, None]).clamp_min(var_floor)
    gmm = GaussianMixture(hard.resp / hard.n, means, variances, [], 0, False)
    # position in E-steps, the current one's share of the tokens included
    em = progress.task(f"EM k={k}", max_iter + 1, "E-steps", total_is_bound=tol > 0).start()

    def on_rows(n: int) -> None:
        em.update(em.position + n / hard.n)

    stats = _summed(batches, _soft_stats, gmm, on_rows=on_rows)
    curve = [stats.log_likelihood / stats.n]
    converged = False
    for iteration in range(1, max_iter + 1):
        em.update(iteration, log_likelihood=curve[-1])
        gmm = _m_step(gmm, stats, var_floor)
        stats = _summed(batches, _soft_stats, gmm, on_rows=on_rows)
        curve.append(stats.log_likelihood / stats.n)
        if abs(curve[-1] - curve[-2]) <= tol * abs(curve[-2]):
            converged = True
            break
    em.update(len(curve))
    em.finish(log_likelihood=curve[-1], iterations=len(curve) - 1)
    return replace(gmm, log_likelihood_curve=curve, n_iter=len(curve) - 1, converged=converged)


_WHERE = {"partition": "partition", "row": "row", "position": "positions", "token_id": "token_ids"}


def lowest_density(
    gmm: GaussianMixture,
    batches_with_info: Iterable[tuple[torch.Tensor, dict[str, np.ndarray]]],
    n: int,
) -> list[dict]:
    """The n tokens of lowest log-likelihood, lowest first, with where they are stored.

    batches_with_info yields (x [b, d] in the mixture's space, per-token arrays) as
    ActivationStore.iter_tokens does (with the same transform the mixture was fitted on).
    """
    if n < 1:
        raise ValueError(f"lowest_density needs n >= 1, got {n}")
    ll = np.empty(0)
    where = {name: np.empty(0, np.int64) for name in _WHERE.values()}
    for x, info in batches_with_info:
        ll = np.concatenate([ll, gmm.log_likelihood(x).cpu().numpy()])
        where = {name: np.concatenate([values, info[name]]) for name, values in where.items()}
        keep = np.argsort(ll, kind="stable")[:n]  # a running bottom-n keeps memory at O(n + b)
        ll, where = ll[keep], {name: values[keep] for name, values in where.items()}
    return [
        {"log_likelihood": float(ll[i]), **{key: int(where[name][i]) for key, name in _WHERE.items()}}
        for i in range(len(ll))
    ]
