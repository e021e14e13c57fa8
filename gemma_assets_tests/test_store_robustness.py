"""Atomicity under a real kill, concurrent writers, and an fsspec (object-store style) root."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from gemma_assets.core.corpus import CorpusError, iter_documents
from gemma_assets.core.storage import ActivationStore

WRITER = textwrap.dedent(
    """
    import sys, numpy as np
    from gemma_assets.core.storage import ActivationStore
    n, d = 400_000, 64   # ~50 MB of activations: long enough to be killed mid-write
    rng = np.random.default_rng(int(sys.argv[3]))
    arrays = {
        "activations": rng.integers(0, 2**16, (n, d), dtype=np.uint16),
        "token_ids": np.full(n, 5, np.int32), "positions": np.arange(n, dtype=np.int32) % 100,
        "doc_ids": np.zeros(n, np.int64), "strata": np.zeros(n, np.int16),
    }
    print("writing", flush=True)
    ActivationStore(sys.argv[1]).write_partition(sys.argv[2], arrays, {"bos_token_id": 2})
    print("done", flush=True)
    """
)


def _run_writer(root: Path, key: str, seed: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(root), key, str(seed)], stdout=subprocess.PIPE, text=True
    )


def _small(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = 300
    return {
        "activations": rng.integers(0, 2**16, (n, 16), dtype=np.uint16),
        "token_ids": np.full(n, 5, np.int32),
        "positions": np.arange(n, dtype=np.int32) % 30,
        "doc_ids": np.zeros(n, np.int64),
        "strata": np.zeros(n, np.int16),
    }


def test_killed_writer_leaves_previous_version_visible_and_rerun_replaces_it(tmp_path):
    store = ActivationStore(str(tmp_path))
    previous = _small(0)
    store.write_partition("0005", previous, {})
    writer = _run_writer(tmp_path, "0005", seed=1)
    assert writer.stdout.readline().strip() == "writing"
    part_dir = tmp_path / "activations" / "part-0005"
    deadline = time.monotonic() + 60
    while len([p for p in part_dir.iterdir() if p.name.startswith("v-")]) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)  # wait until the new version's folder exists, then kill mid-write
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    assert writer.returncode == -signal.SIGKILL
    # readers still see the previous, intact version
    assert store.verify("0005") == []
    assert np.array_equal(store.open("0005").array("activations"), previous["activations"])
    # a rerun commits the new data and clears the half-written folder
    rerun = _run_writer(tmp_path, "0005", seed=1)
    assert rerun.wait(timeout=300) == 0
    assert store.verify("0005") == []
    assert store.open("0005").n_tokens == 400_000
    assert len([p for p in part_dir.iterdir() if p.name.startswith("v-")]) == 1


SMALL_WRITER = textwrap.dedent(
    """
    import sys, numpy as np
    from gemma_assets.core.storage import ActivationStore
    rng = np.random.default_rng(int(sys.argv[3]))
    n = 300
    arrays = {
        "activations": rng.integers(0, 2**16, (n, 16), dtype=np.uint16),
        "token_ids": np.full(n, 5, np.int32), "positions": np.arange(n, dtype=np.int32) % 30,
        "doc_ids": np.zeros(n, np.int64), "strata": np.zeros(n, np.int16),
    }
    store = ActivationStore(sys.argv[1])
    store.write_partition(sys.argv[2], arrays, {})
    assert store.verify(sys.argv[2]) == []
    """
)


def test_concurrent_writers_of_different_partitions_do_not_interfere(tmp_path):
    # separate processes started together (not a multiprocessing pool, whose map can hang for
    # ever if a worker dies): each writes and verifies its own partition
    writers = [
        subprocess.Popen([sys.executable, "-c", SMALL_WRITER, str(tmp_path), f"{i:04d}", str(i)]) for i in range(6)
    ]
    assert [writer.wait(timeout=300) for writer in writers] == [0] * 6
    store = ActivationStore(str(tmp_path))
    assert store.committed_keys() == [f"{i:04d}" for i in range(6)]
    for i in range(6):
        assert np.array_equal(store.open(f"{i:04d}").array("activations"), _small(i)["activations"])


def test_fsspec_url_root_uses_the_same_code_path():
    store = ActivationStore("memory://bucket/gemma_assets/tiny")
    arrays = _small(3)
    store.write_partition("0000", arrays, {"bos_token_id": 2})
    store.write_partition("0000", arrays, {"bos_token_id": 2})  # rerun replaces
    assert store.committed_keys() == ["0000"] and store.verify("0000") == []
    acts, info = store.load_tokens(["0000"])
    assert len(acts) == 300 - 10 and (info["positions"] != 0).all()


def test_unreachable_dataset_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CorpusError, match="cannot stream .* Hugging Face hub.*HF_TOKEN"):
        next(iter_documents("hf://datasets/monology/pile-uncopyrighted/train/*.jsonl.zst"))
