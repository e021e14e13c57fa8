"""Whitening from streamed moments: identity on held-out data, exact inverses, every preprocessing."""

from __future__ import annotations

import pytest
import torch

from gemma_assets.core.stats import ActivationMoments
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
