"""The metric suite on cases with known answers."""

from __future__ import annotations

import pytest
import torch

from gemma_assets.core.codes import Codes
from gemma_assets.core.metrics import ReconstructionMetrics, evaluate, fvu
from gemma_assets.core.report import LeakageError, check_no_leakage


class Identity:
    """Every dimension a feature: decodes to exactly the input."""

    def __init__(self, d: int) -> None:
        self.n_features = d

    def encode(self, x: torch.Tensor) -> Codes:
        return Codes.from_dense(x)

    def decode(self, codes: Codes) -> torch.Tensor:
        return codes.dense(self.n_features)


X = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]])  # mean 0, total variance 10


def test_fvu_known_answer():
    x_hat = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 0.0], [0.0, 0.0]])  # misses 8 of 10
    assert fvu(X, x_hat) == pytest.approx(0.8)
    assert fvu(X, X) == 0.0
    assert fvu(X, X.mean(0).expand_as(X)) == pytest.approx(1.0)
    # the mean is the held-out set's own: shifting data and reconstruction changes nothing
    assert fvu(X + 1000.0, x_hat + 1000.0) == pytest.approx(0.8)


def test_streaming_suite_equals_direct_formula():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 16, generator=generator) * 5 + 3
    x_hat = x + torch.randn(1000, 16, generator=generator)
    batches = [x[i : i + 128] for i in range(0, 1000, 128)]
    perfect = evaluate(batches, Identity(16))
    assert perfect["fvu"] == 0.0 and perfect["l0"] == 16.0 and perfect["relative_norm"] == pytest.approx(1.0)
    assert perfect["dead_features"] == 0 and perfect["dense_features"] == 16
    assert perfect["usage_entropy_normalized"] == pytest.approx(1.0)
    metrics = ReconstructionMetrics(n_features=10)
    for start in range(0, 1000, 128):
        rows = slice(start, start + 128)
        n = len(x[rows])
        # features 0..2 fire on every token, feature 3 on the first token only
        indices = torch.tensor([[0, 1, 2, 3]]).repeat(n, 1)
        active = torch.tensor([[True, True, True, False]]).repeat(n, 1)
        active[0, 3] = start == 0
        metrics.update(x[rows], x_hat[rows], Codes(indices, torch.ones(n, 4), active))
    streamed = metrics.result()
    assert streamed["fvu"] == pytest.approx(fvu(x, x_hat), rel=1e-9)
    assert streamed["mse"] == pytest.approx(float(((x - x_hat) ** 2).mean()), rel=1e-6)
    assert streamed["relative_norm"] == pytest.approx(float((x_hat.norm(dim=1) / x.norm(dim=1)).mean()), rel=1e-6)
    assert streamed["l0"] == pytest.approx(3.001) and streamed["n_tokens"] == 1000
    assert streamed["dead_features"] == 6 and streamed["dense_features"] == 3
    share = torch.tensor([1000, 1000, 1000, 1], dtype=torch.float64) / 3001
    assert streamed["usage_entropy_bits"] == pytest.approx(float(-(share * share.log2()).sum()))


def test_empty_heldout_split_is_an_error():
    with pytest.raises(ValueError, match="held-out split is empty"):
        evaluate([], Identity(2))


def test_leakage_guard_names_model_and_partitions():
    from gemma_assets.core.records import DictionaryRecord, Family

    def fitted_on(name: str, partitions: list[str]) -> DictionaryRecord:
        return DictionaryRecord(name, Family.KMEANS, 64, 1, {"fvu": 0.5}, facts={"train_partitions": partitions})

    with pytest.raises(LeakageError, match=r"kmeans-64 was fitted on held-out partitions \['0003'\]"):
        check_no_leakage([fitted_on("kmeans-64", ["0000", "0003"])], ["0003"])
    check_no_leakage([fitted_on("ok", ["0000"])], ["0003"])
