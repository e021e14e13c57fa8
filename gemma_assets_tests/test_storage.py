"""The activation store: exact bf16, atomic commits, checksums, clean reruns."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gemma_assets.core.bf16 import bf16_to_bits, bits_to_float
from gemma_assets.core.storage import ActivationStore, StorageError


def _arrays(n: int = 600, d: int = 32, seed: int = 0) -> dict[str, np.ndarray]:
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * 1000
    return {
        "activations": bf16_to_bits(x),
        "token_ids": 3 + np.arange(n, dtype=np.int32) % 50,  # 3+: never the BOS id 2
        "positions": np.tile(np.arange(30, dtype=np.int32), n // 30),
        "doc_ids": np.repeat(np.arange(n // 30), 30),
        "strata": np.zeros(n, np.int16),
    }


def test_bf16_bits_round_trip_exactly():
    x = torch.randn(100, 7) * 3000
    assert torch.equal(bits_to_float(bf16_to_bits(x)), x.to(torch.bfloat16).float())


def test_write_read_verify(tmp_path):
    store = ActivationStore(str(tmp_path))
    arrays = _arrays()
    manifest = store.write_partition("0000", arrays, {"bos_token_id": 2})
    assert store.committed_keys() == ["0000"]
    assert store.verify("0000") == []
    part = store.open("0000")
    assert np.array_equal(part.array("activations"), arrays["activations"])
    assert part.group["activations"].attrs["dtype"] == "bfloat16"
    assert manifest["n_tokens"] == 600 and manifest["checksums"]
    # streaming reader drops position-0 tokens and returns float32
    acts, info = store.load_tokens(["0000"])
    assert len(acts) == 600 - 20 and acts.dtype == torch.float32 and (info["positions"] != 0).all()


def test_corrupted_or_missing_chunk_is_named(tmp_path):
    store = ActivationStore(str(tmp_path))
    store.write_partition("0007", _arrays(), {})
    version = store.manifest("0007")["version"]
    chunk = next((tmp_path / "activations" / "part-0007" / version / "activations" / "c").rglob("*"))
    while chunk.is_dir():
        chunk = next(chunk.iterdir())
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    problems = store.verify("0007")
    assert len(problems) == 1 and "CRC32" in problems[0]
    chunk.unlink()
    assert "is missing" in store.verify("0007")[0]


def test_uncommitted_write_is_invisible_and_rerun_replaces_cleanly(tmp_path):
    store = ActivationStore(str(tmp_path))
    store.write_partition("0001", _arrays(seed=1), {})
    # a crashed writer leaves a version folder without a commit pointer
    orphan = tmp_path / "activations" / "part-0002" / "v-crashed"
    orphan.mkdir(parents=True)
    (orphan / "zarr.json").write_text("{}")
    assert store.committed_keys() == ["0001"]
    with pytest.raises(StorageError, match="partition 0002 is not committed.*materialise"):
        store.open("0002")
    old_version = store.manifest("0001")["version"]
    fresh = _arrays(seed=2)
    store.write_partition("0001", fresh, {})
    store.write_partition("0002", _arrays(seed=3), {})
    assert np.array_equal(store.open("0001").array("activations"), fresh["activations"])
    leftovers = sorted(p.name for p in (tmp_path / "activations" / "part-0001").iterdir())
    assert old_version not in leftovers and len(leftovers) == 2  # COMMIT.json + one version
    assert not orphan.exists()


def test_compression_is_lossless_and_effective_on_structured_data(tmp_path):
    # residual streams have few distinct exponents per dimension: byte-shuffle + zstd exploits it
    store = ActivationStore(str(tmp_path))
    scales = torch.logspace(0, 3, 64)
    x = torch.randn(8192, 64, generator=torch.Generator().manual_seed(0)) * scales
    arrays = _arrays(8190, 64)
    arrays["activations"] = bf16_to_bits(x[:8190])
    store.write_partition("0000", arrays, {})
    version_dir = tmp_path / "activations" / "part-0000" / store.manifest("0000")["version"] / "activations"
    stored = sum(p.stat().st_size for p in version_dir.rglob("*") if p.is_file())
    assert arrays["activations"].nbytes / stored > 1.2


def test_reader_streams_bounded_batches_and_applies_a_transform(tmp_path):
    store = ActivationStore(str(tmp_path))
    store.write_partition("0000", _arrays(), {"bos_token_id": 2})
    store.write_partition("0001", _arrays(seed=1), {"bos_token_id": 2})
    batches = list(store.iter_tokens(["0000", "0001"], batch_tokens=128))
    assert max(len(x) for x, _ in batches) <= 128 and sum(len(x) for x, _ in batches) == 2 * (600 - 20)
    plain, _ = store.load_tokens(["0001"])
    shifted, info = store.load_tokens(["0001"], transform=lambda x: 2 * x - 1)
    assert torch.equal(shifted, 2 * plain - 1) and set(info["partition"]) == {1}


@pytest.mark.parametrize("exclude_bos", [True, False])
def test_batches_read_as_stored_are_the_bf16_of_the_float32_ones(tmp_path, exclude_bos):
    store = ActivationStore(str(tmp_path))
    store.write_partition("0000", _arrays(), {"bos_token_id": 2})
    read = store.iter_tokens(["0000"], batch_tokens=128, exclude_bos=exclude_bos)
    stored = store.iter_tokens(["0000"], batch_tokens=128, exclude_bos=exclude_bos, as_stored=True)
    pairs = list(zip(read, stored, strict=True))
    assert len(pairs) == 5
    for (float32, info), (bf16, stored_info) in pairs:
        assert bf16.dtype == torch.bfloat16 and torch.equal(bf16.float(), float32)
        assert all(np.array_equal(info[name], stored_info[name]) for name in info)


def _wide_partition(store: ActivationStore, key: str, n: int = 1300, d: int = 2048) -> np.ndarray:
    """A partition of several activation chunks (512 rows each at d 2048), the last one cut short."""
    # `_arrays` lays out whole 30-token documents only (1,290 of 1,300 tokens): here the last is cut short
    arrays = _arrays(n, d)
    arrays["positions"], arrays["doc_ids"] = np.arange(n, dtype=np.int32) % 30, np.arange(n) // 30
    store.write_partition(key, arrays, {})
    return arrays["activations"]


@pytest.mark.parametrize("damage", ["deleted", "flipped"])
def test_a_chunk_damaged_after_the_partition_was_opened_is_named(tmp_path, damage):
    """The checks hold for every read, not only when the partition is opened (which lists its
    files): a chunk deleted or changed afterwards is named when a read reaches it."""
    store = ActivationStore(str(tmp_path))
    written = _wide_partition(store, "0005")
    part = store.open("0005")
    chunk = tmp_path / "activations" / "part-0005" / part.manifest["version"] / "activations" / "c" / "1" / "0"
    if damage == "deleted":
        chunk.unlink()
    else:
        data = bytearray(chunk.read_bytes())
        data[len(data) // 2] ^= 0xFF
        chunk.write_bytes(bytes(data))
    assert np.array_equal(part.array("activations", 0, 512), written[:512])  # chunk 0 is intact
    problem = "is missing" if damage == "deleted" else "fails its CRC32 checksum"
    with pytest.raises(
        StorageError, match=f"activation partition 0005: file activations/c/1/0 {problem}.*--partition 0005"
    ):
        part.array("activations", 500, 600)


def test_a_chunk_never_written_reads_as_zeros_and_one_deleted_on_object_storage_is_named():
    """Partitions written before every chunk was (297a331) leave a chunk equal to the fill value
    unwritten and out of the manifest: it reads as zeros, as zarr reads it. A listed chunk gone
    from an fsspec store after the partition was opened is named."""
    import uuid

    import fsspec

    bucket = f"chunks-{uuid.uuid4().hex}"
    store = ActivationStore(f"memory://{bucket}")
    written = _wide_partition(store, "0003")
    part = store.open("0003")
    fsspec.filesystem("memory").rm(f"/{bucket}/activations/part-0003/{part.manifest['version']}/activations/c/1/0")
    with pytest.raises(StorageError, match="activation partition 0003: file activations/c/1/0 is missing"):
        part.array("activations", 600, 700)
    del part.manifest["checksums"]["activations/c/1/0"]  # as if zarr had skipped writing it
    rows = part.array("activations", 500, 1100)
    assert not rows[12:524].any()
    assert np.array_equal(rows[:12], written[500:512]) and np.array_equal(rows[524:], written[1024:1100])
