"""Whitening from streamed moments: identity on held-out data (also at condition number 1e7 with the
CPU's mixed-precision co-moment), exact inverses, every preprocessing."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_limits

from gemma_assets.core.stats import (
    COMOMENT_BLOCK_ROWS,
    PRECISIONS,
    ActivationMoments,
    Scratch,
    batch_comoment,
    largest_magnitudes,
    peak_magnitudes,
)
from gemma_assets.core.whitening import PREPROCESSINGS, Preprocessor, Whitening, identity_deviation


def _correlated(n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    # condition number ~1e3: well above the 1e-6 relative eigenvalue floor, which would flatten it
    mixing = torch.randn(24, 24, generator=torch.Generator().manual_seed(0)) * torch.logspace(-0.5, 0.5, 24)
    return torch.randn(n, 24, generator=generator) @ mixing + 40.0


@pytest.fixture(scope="module")
def whitening() -> Whitening:
    moments = ActivationMoments(24)
    train = _correlated(40_000, seed=1)
    for start in range(0, len(train), 4096):  # streamed, merged exactly
        moments.update(train[start : start + 4096])
    return Whitening.fit(moments.mean, moments.covariance)


@pytest.mark.parametrize("kind", ["pca", "zca"])
def test_heldout_covariance_is_close_to_identity(whitening, kind):
    heldout = _correlated(20_000, seed=2)
    assert identity_deviation(Preprocessor.from_whitening(kind, whitening).forward(heldout)) < 0.05


@pytest.mark.parametrize("kind", PREPROCESSINGS)
def test_inverse_round_trips(whitening, kind):
    x = _correlated(1000, seed=3)
    p = Preprocessor.from_whitening(kind, whitening)
    assert torch.allclose(p.inverse(p.forward(x)), x, rtol=1e-4, atol=1e-3)


def test_reduction_keeps_leading_components(whitening):
    p = Preprocessor.from_whitening("pca", whitening, n_components=4)
    z = p.forward(_correlated(5000, seed=4))
    assert z.shape == (5000, 4) and identity_deviation(z) < 0.1


def test_bad_preprocessing_is_named():
    w = Whitening.fit(torch.zeros(3).numpy(), torch.eye(3).double().numpy())
    with pytest.raises(ValueError, match="unknown preprocessing 'sphere'; valid: none, center, standardize, pca, zca"):
        Preprocessor.from_whitening("sphere", w)
    with pytest.raises(ValueError, match="n_components applies to 'center' and 'pca', not 'zca'"):
        Preprocessor.from_whitening("zca", w, n_components=2)


def _ill_conditioned(n: int, seed: int, structure: str) -> torch.Tensor:
    """32 dims, covariance condition number >= 1e7: from per-dimension SDs spread over 3.5
    decades (as in residual streams, with means far from zero), or from a random rotation of a
    1.6e7 eigenvalue spread (the hard case for float32 products: ~0.03 off white)."""
    shape = np.random.default_rng(0)
    if structure == "scales":
        mixing = shape.standard_normal((32, 32)) * np.logspace(0, 3.5, 32)
        mean = 1e3 * shape.standard_normal(32)
    else:
        rotation, _ = np.linalg.qr(shape.standard_normal((32, 32)))
        mixing = (rotation * np.sqrt(np.logspace(0, -7.2, 32))).T
        mean = 40 + shape.standard_normal(32)
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((n, 32)) @ mixing + mean).float()


@pytest.mark.parametrize("structure", ["scales", "rotation"])
def test_mixed_precision_comoment_whitens_at_condition_1e7(structure):
    train = _ill_conditioned(200_000, seed=1, structure=structure)
    moments = {precision: ActivationMoments(32) for precision in PRECISIONS}
    for precision, accumulated in moments.items():
        for start in range(0, len(train), 8192):
            accumulated.update(train[start : start + 8192], precision=precision)
    exact = Whitening.fit(moments["float64"].mean, moments["float64"].covariance, relative_floor=1e-12)
    assert np.linalg.cond(moments["float64"].covariance) >= 1e7
    # the mixed co-moment seen through the exact whitening: identity up to its rounding
    whiten = (exact.eigenvectors / np.sqrt(exact.eigenvalues)).T
    rounding = np.abs(whiten @ moments["mixed"].covariance @ whiten.T - np.eye(32)).max()
    assert rounding < (1e-4 if structure == "scales" else 0.05)
    # and the whitening fitted on it makes held-out data white
    mixed = Whitening.fit(moments["mixed"].mean, moments["mixed"].covariance, relative_floor=1e-12)
    heldout = _ill_conditioned(200_000, seed=2, structure=structure)
    assert identity_deviation(Preprocessor.from_whitening("pca", mixed).forward(heldout)) < 0.05


@pytest.mark.parametrize("precision", PRECISIONS)
def test_comoment_is_the_same_whatever_the_threads(precision):
    """A partition's moments do not depend on the computing process's threads (a 2-thread step and
    a 1-thread Dask worker agree exactly): OpenBLAS's threaded float32 syrk splits its sums by
    thread count on some CPUs, so each block's product is one single-threaded call."""
    rows = torch.from_numpy(np.random.default_rng(3).standard_normal((3 * COMOMENT_BLOCK_ROWS + 5, 96))).float()
    mean = rows.double().mean(0)
    threads = torch.get_num_threads()
    try:
        products = []
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            with threadpool_limits(count):  # as a Dask worker's OPENBLAS_NUM_THREADS=1 does
                products.append(batch_comoment(rows, mean, precision))
    finally:
        torch.set_num_threads(threads)
    assert all(np.array_equal(products[0], other) for other in products[1:])


@pytest.mark.parametrize("precision", PRECISIONS)
def test_a_pass_reusing_its_scratch_arrays_adds_up_what_fresh_ones_do(precision):
    """One Scratch serves a whole partition's batches: shrinking, growing and two block products
    in flight at once must not let one batch's arrays leak into another's moments."""
    rows = torch.from_numpy(np.random.default_rng(4).standard_normal((8 * COMOMENT_BLOCK_ROWS, 64)) * 3 + 7).float()
    sizes = [3 * COMOMENT_BLOCK_ROWS + 5, 100, 2 * COMOMENT_BLOCK_ROWS, 3 * COMOMENT_BLOCK_ROWS - 105]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        shared, fresh, scratch = ActivationMoments(64), ActivationMoments(64), Scratch()
        start = 0
        for size in sizes:
            shared.update(rows[start : start + size], precision=precision, scratch=scratch)
            fresh.update(rows[start : start + size], precision=precision)
            start += size
    finally:
        torch.set_num_threads(threads)
    assert start == len(rows) and shared.count == len(rows)
    for name, value in vars(fresh).items():
        assert np.array_equal(vars(shared)[name], value), name
    exact = np.cov(rows.double().numpy(), rowvar=False)
    assert np.abs(shared.covariance - exact).max() < 1e-5 * np.abs(exact).max()


def test_the_massive_tokens_are_the_rows_a_full_argmax_of_magnitudes_finds():
    """The pass finds its massive tokens from two row reductions, not |x| and an argmax over all
    of it: the rows and dimensions must be the full computation's, NaN, +-inf and ties included."""
    generator = torch.Generator().manual_seed(5)
    # bf16 values: few distinct magnitudes, so rows tie for their peak (the first dimension wins)
    x = (torch.randn(4096, 96, generator=generator) * 4).bfloat16().float()
    x[7, 3], x[7, 50] = -900.0, 900.0  # a tie between a negative and a positive peak
    x[11, 9], x[12, 2] = float("nan"), float("inf")  # a NaN beside a large value, an infinite peak
    x[11, 40] = 1000.0
    x[13] = float("nan")  # a row of nothing but NaN: peak 0
    x[14, 5] = -float("inf")
    x[20, 1], x[21, 2] = 500.0, -500.0  # two rows tied
    peak, dim = peak_magnitudes(x)
    for count in (1, 4, 16, 4096):
        top, top_dim = largest_magnitudes(x, count)
        assert torch.equal(top, peak.topk(count).indices), count
        assert torch.equal(top_dim, dim[top]), count
    top, top_dim = largest_magnitudes(x, 5)
    assert sorted(top[:2].tolist()) == [12, 14] and top[2:4].tolist() == [11, 7] and int(top[4]) in (20, 21)
    assert top_dim[2:4].tolist() == [40, 3]


@pytest.mark.parametrize("precision", PRECISIONS)
def test_moments_cross_a_pickle_as_they_are_with_half_the_comoment(precision):
    """The co-moment of batches and merges is exactly symmetric, so a pickle (a Dask result) can
    carry its upper triangle alone and still give back every entry bit for bit."""
    rows = torch.from_numpy(
        np.random.default_rng(5).standard_normal((2 * COMOMENT_BLOCK_ROWS + 9, 200)) * 5 + 3
    ).float()
    moments = ActivationMoments(200)
    for start in range(0, len(rows), 1500):
        moments.update(rows[start : start + 1500], precision=precision)
    assert np.array_equal(moments.comoment, moments.comoment.T)
    pickled = pickle.dumps(moments, protocol=5)
    assert len(pickled) < 0.6 * moments.comoment.nbytes
    back = pickle.loads(pickled)
    assert vars(back).keys() == vars(moments).keys()
    for name, value in vars(moments).items():
        assert np.array_equal(vars(back)[name], value), name


def test_a_partitions_statistics_cross_a_pickle_with_the_sample_as_bf16(tmp_path):
    """The quantile sample is stored activations widened to float32, so it travels as bfloat16
    bits and comes back bit for bit, NaNs included; a sample that is not bf16 travels as it is."""
    from gemma_assets.core.bf16 import bf16_to_bits
    from gemma_assets.core.stats import PartitionStats
    from gemma_assets.core.storage import ActivationStore

    n, d = 600, 64
    x = torch.from_numpy(np.random.default_rng(2).standard_normal((n, d)) * 30).float()
    positions = np.arange(n, dtype=np.int32) % 30
    arrays = {"activations": bf16_to_bits(x), "positions": positions, "strata": np.zeros(n, np.int16)}
    arrays |= {"doc_ids": np.arange(n) // 30, "doc_offsets": positions.astype(np.int64) - 1}
    store = ActivationStore(str(tmp_path))
    store.write_partition("0000", arrays, {"context_len": 30})
    stats = PartitionStats.compute(store, "0000", sample_size=400, precision="mixed")
    assert stats.sample.shape == (400, d) and stats.sample.dtype == np.float32
    pickled = pickle.dumps(stats, protocol=5)
    assert len(pickled) < len(pickle.dumps(vars(stats), protocol=5)) - stats.sample.nbytes / 2 + 1000
    with_nan = stats.sample.copy()
    with_nan.view(np.uint32)[0, :2] = [0xFFC10000, 0x7F810000]  # NaNs with a sign and payloads
    for sample in (stats.sample, with_nan, stats.sample + np.float32(1e-3)):
        stats.sample = sample
        back = pickle.loads(pickle.dumps(stats, protocol=5))
        assert back.sample.dtype == np.float32 and np.array_equal(back.sample.view(np.uint32), sample.view(np.uint32))
        assert vars(back).keys() == vars(stats).keys() and np.array_equal(back.norms, stats.norms)


def test_moments_saved_with_an_asymmetric_comoment_load_symmetric(tmp_path):
    """A file from before the GPU's product was symmetrised loads as that branch now computes it,
    so what a pickle's upper triangle carries is all there is; a pickle of the whole matrix (a
    version before the packing) still loads."""
    moments = ActivationMoments(3)
    moments.update(torch.tensor([[1.0, 2.0, 4.0], [3.0, 1.0, 0.5], [0.0, 5.0, 2.0]]), precision="float64")
    moments.comoment[0, 1] += 1e-9
    moments.save(tmp_path / "moments.npz")
    loaded = ActivationMoments.load(tmp_path / "moments.npz")
    assert np.array_equal(loaded.comoment, loaded.comoment.T)
    assert loaded.comoment[0, 1] == (moments.comoment[0, 1] + moments.comoment[1, 0]) / 2
    whole = ActivationMoments.__new__(ActivationMoments)
    whole.__setstate__(dict(vars(moments)))
    assert np.array_equal(whole.comoment, moments.comoment)
