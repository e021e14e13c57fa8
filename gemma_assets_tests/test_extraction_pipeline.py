"""Overlapped extraction: batches written while the next is computed, committed bit-exact; a
partition with NaN/Inf or a failed write commits nothing and the error reaches the caller."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM

from gemma_assets.core.batches import prefetched
from gemma_assets.core.config import load_run_config
from gemma_assets.core.extraction import NonFiniteActivationsError, WriteQueue, extract_partitions, extract_windows
from gemma_assets.core.sampling import TokenSample
from gemma_assets.core.storage import ActivationStore

CONTEXT, WINDOWS, PARTITIONS, LAYER = 32, 24, 3, 1
POISONED_TOKEN = 99  # its embedding row is NaN in the poisoned model


@pytest.fixture(scope="module")
def model() -> Gemma2ForCausalLM:
    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=128,
        hidden_size=96,  # chunks of 2 MiB hold 10,922 rows: a partition here is 256 rows, so
        intermediate_size=64,  # the test below also shrinks the chunks to cross batch boundaries
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=16,
    )
    return Gemma2ForCausalLM._from_config(config, attn_implementation="eager").eval()


def _sample() -> TokenSample:
    tokens = np.random.default_rng(0).integers(3, 90, (WINDOWS, CONTEXT), dtype=np.int32)
    tokens[:, 0] = 2
    ids = np.arange(WINDOWS, dtype=np.int64)
    return TokenSample(tokens, ids, ids * 0 + 1, np.zeros(WINDOWS, np.int16), ("synthetic",))


def _run():
    overrides = [f"model.layer={LAYER}", f"sampling.context_len={CONTEXT}", f"sampling.partitions={PARTITIONS}"]
    return load_run_config("tiny", [*overrides, f"sampling.windows_per_partition={WINDOWS // PARTITIONS}"])


def test_overlapped_partitions_equal_extraction_alone(model, tmp_path, monkeypatch):
    # 100-row chunks: batches of 3 windows (96 rows) end mid-chunk, so chunks are completed
    # across batches and the partition's last chunk is partial
    monkeypatch.setattr("gemma_assets.core.storage.CHUNK_BYTES", 100 * 2 * 96)
    store, run, sample = ActivationStore(str(tmp_path)), _run(), _sample()
    lines: list[str] = []
    record = extract_partitions(
        model, sample, run.partition_keys, run, store, {"context_len": CONTEXT}, 3, "cpu", lines.append
    )
    assert record.partitions == PARTITIONS and store.committed_keys() == run.partition_keys
    assert [line.split(" (")[0] for line in lines] == [f"committed partition {key}" for key in run.partition_keys]
    alone = extract_windows(model, sample.tokens, LAYER, 5, "cpu")
    stored = np.concatenate([store.open(key).array("activations") for key in run.partition_keys])
    assert np.array_equal(stored, alone)
    assert all(store.verify(key) == [] for key in run.partition_keys)  # checksums taken while writing
    positions = store.open("0001").array("positions")
    assert np.array_equal(positions, np.tile(np.arange(CONTEXT), WINDOWS // PARTITIONS))


def test_nonfinite_partition_is_not_committed(model, tmp_path):
    poisoned_tokens = _sample().tokens.copy()
    poisoned_tokens[9, 5] = POISONED_TOKEN  # window 1 of partition 0001
    sample = dataclasses.replace(_sample(), tokens=poisoned_tokens)
    embedding = model.model.embed_tokens.weight
    saved = embedding[POISONED_TOKEN].clone()
    store, run = ActivationStore(str(tmp_path)), _run()
    try:
        with torch.no_grad():
            embedding[POISONED_TOKEN] = float("nan")
        with pytest.raises(NonFiniteActivationsError, match=r"windows \[1\]"):
            extract_partitions(model, sample, run.partition_keys, run, store, {}, 3, "cpu", lambda _: None)
    finally:
        with torch.no_grad():
            embedding[POISONED_TOKEN] = saved
    assert store.committed_keys() == ["0000"]
    # the poisoned partition's uncommitted version was removed, not left behind
    assert [path.name for path in (tmp_path / "activations" / "part-0001").iterdir()] == []


def test_write_queue_surfaces_a_failed_write_in_order():
    done: list[int] = []

    def fail() -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"), WriteQueue(depth=2) as queue:
        queue.submit(lambda: 1, done.append)
        queue.submit(fail)
        for number in range(2, 6):
            queue.submit(lambda number=number: number, done.append)
    assert done == [1]  # the failure stops the producer at the next collection; later jobs are cancelled


def test_prefetched_keeps_order_raises_and_stops_early():
    assert list(prefetched(iter(range(100)), depth=3)) == list(range(100))

    def broken():
        yield 1
        raise ValueError("bad chunk")

    with pytest.raises(ValueError, match="bad chunk"):
        list(prefetched(broken()))
    produced: list[int] = []

    def counting():
        for number in range(1000):
            produced.append(number)
            yield number

    for number in prefetched(counting(), depth=2):
        if number == 3:
            break
    assert len(produced) < 10  # the producer stopped soon after the consumer did
