"""Extraction and storage benchmark on a profile's model and corpus (CPU or GPU).

    python benchmarks/extraction.py --profile demo --json benchmarks/results/extraction_demo.json

Every figure is a ratio against a baseline run in the same process on the same data:
- early_exit_speedup: tokens/s of the project's extractor / tokens/s of a plain forward
  with output_hidden_states=True (same model, inputs, batch, device);
- bit_exact: every stored value equals hidden_states[L+1] of that plain forward (bf16 bits);
- compression_ratio: raw bf16 bytes / bytes on disk of the stored activations;
- write_speedup_vs_npz: MB/s of ActivationStore.write_partition / MB/s of np.savez_compressed;
- overlapped_vs_extraction_only: tokens/s of extract_partitions (forward, host copy, compression,
  write and commit of --partitions partitions, the writes overlapped with the forward passes) /
  tokens/s of extract_windows alone (forward and host copy) on the same windows;
- sequential_vs_extraction_only: the same with each partition extracted, then written;
plus tokens_per_s, peak_rss_mb, the device, and a table of alternative codecs measured on
the same array with the order-0 entropy bound of its bytes.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gemma_assets.core import model, sampling  # noqa: E402
from gemma_assets.core.bf16 import bf16_to_bits  # noqa: E402
from gemma_assets.core.config import load_run_config  # noqa: E402
from gemma_assets.core.extraction import (  # noqa: E402
    extract_partitions,
    extract_windows,
    per_token_arrays,
)
from gemma_assets.core.layout import RunLayout  # noqa: E402
from gemma_assets.core.storage import CHUNK_BYTES, ActivationStore  # noqa: E402


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def median_seconds(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def order0_bound(bits: np.ndarray) -> float:
    """16 bits / (entropy of the high byte + entropy of the low byte): the best ratio of a
    coder that models each byte plane independently."""
    planes = bits.view(np.uint8).reshape(-1, 2)
    entropy = 0.0
    for plane in (planes[:, 0], planes[:, 1]):
        p = np.bincount(plane, minlength=256) / len(plane)
        p = p[p > 0]
        entropy += float(-(p * np.log2(p)).sum())
    return 16 / entropy


def codec_table(bits: np.ndarray, chunk_rows: int) -> list[dict]:
    """Ratio and MB/s of codec chains on the same chunks as the store uses, one thread each."""
    import numcodecs
    from numcodecs import blosc

    blosc.use_threads = False  # as in the store, where zarr's pool runs chunks in parallel instead

    chunks = [np.ascontiguousarray(bits[i : i + chunk_rows]) for i in range(0, len(bits), chunk_rows)]
    chains = {
        "blosc zstd-1 + shuffle, 1 MiB blocks (ours)": [
            numcodecs.Blosc(cname="zstd", clevel=1, shuffle=numcodecs.Blosc.SHUFFLE, blocksize=2**20)
        ],
        "shuffle(2) + zstd-1 (whole chunk)": [numcodecs.Shuffle(elementsize=2), numcodecs.Zstd(level=1)],
        "zstd-1": [numcodecs.Zstd(level=1)],
        "shuffle(2) + zstd-3": [numcodecs.Shuffle(elementsize=2), numcodecs.Zstd(level=3)],
        "blosc zstd-1 + shuffle, default blocks": [
            numcodecs.Blosc(cname="zstd", clevel=1, shuffle=numcodecs.Blosc.SHUFFLE)
        ],
        "shuffle(2) + lz4": [numcodecs.Shuffle(elementsize=2), numcodecs.LZ4()],
    }
    rows = []
    for name, chain in chains.items():
        started = time.perf_counter()
        size = 0
        for chunk in chunks:
            data = chunk
            for codec in chain:
                data = codec.encode(data)
            size += len(data)
        seconds = time.perf_counter() - started
        rows.append({"codec": name, "ratio": bits.nbytes / size, "mb_per_s": bits.nbytes / 1e6 / seconds})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="demo", choices=["tiny", "demo"])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--windows", type=int, default=256, help="windows extracted and stored")
    parser.add_argument("--compare-windows", type=int, default=64, help="windows also run through the full forward")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--partitions", type=int, default=4, help="the windows cut into this many partitions")
    parser.add_argument("--data-root", type=Path, default=Path("data"), help="reuses the cached model/corpus")
    args = parser.parse_args()
    profile = load_run_config(args.profile)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    layout = RunLayout.of(args.data_root, profile.name)
    source = layout.model_source(profile)
    tokenizer = model.load_tokenizer(source)
    spec = profile.sampling.model_copy(update={"partitions": 1, "windows_per_partition": args.windows})
    sample, _ = sampling.sample_windows(layout.corpus(profile), tokenizer, spec)
    lm = model.load_model(source, profile.model.layer, device, dtype)
    layer, tokens = profile.model.layer, sample.tokens
    n_tokens = tokens.size

    extract_windows(lm, tokens[: args.batch], layer, args.batch, device)  # warm-up
    started = time.perf_counter()
    bits = extract_windows(lm, tokens, layer, args.batch, device)
    tokens_per_s = n_tokens / (time.perf_counter() - started)

    compared = tokens[: args.compare_windows]
    started = time.perf_counter()
    compared_bits = extract_windows(lm, compared, layer, args.batch, device)
    early_seconds = time.perf_counter() - started
    started = time.perf_counter()
    reference = []
    for start in range(0, len(compared), args.batch):
        with torch.no_grad():
            out = lm(
                torch.from_numpy(compared[start : start + args.batch]).long().to(device), output_hidden_states=True
            )
        reference.append(bf16_to_bits(out.hidden_states[layer + 1].reshape(-1, lm.config.hidden_size)))
    full_seconds = time.perf_counter() - started
    bit_exact = bool(np.array_equal(compared_bits, np.concatenate(reference)))
    bit_exact &= bool(np.array_equal(compared_bits, bits[: compared.size]))  # batching changes nothing

    scratch = Path(tempfile.mkdtemp())
    try:
        # the same windows as partitions of a run, through the pipeline the activations asset runs
        per_partition = len(tokens) // args.partitions
        run = load_run_config(
            args.profile,
            [f"sampling.partitions={args.partitions}", f"sampling.windows_per_partition={per_partition}"],
        )
        overlapped_store = ActivationStore(str(scratch / "overlapped"))
        started = time.perf_counter()
        extract_partitions(
            lm, sample, run.partition_keys, run, overlapped_store, {}, args.batch, device, lambda _: None
        )
        overlapped_seconds = time.perf_counter() - started
        stored = np.concatenate([overlapped_store.open(key).array("activations") for key in run.partition_keys])
        bit_exact &= bool(np.array_equal(stored, bits[: len(stored)]))  # the pipeline stores what it computed
        sequential_store = ActivationStore(str(scratch / "sequential"))
        started = time.perf_counter()
        for index, key in enumerate(run.partition_keys):
            part = sample.partition(index, per_partition)
            part_bits = extract_windows(lm, part.tokens, layer, args.batch, device)
            sequential_store.write_partition(key, {"activations": part_bits} | per_token_arrays(part), {})
        sequential_seconds = time.perf_counter() - started
        pipeline_tokens = len(stored)

        store = ActivationStore(str(scratch / "store"))
        arrays = {"activations": bits} | per_token_arrays(sample)
        keys = iter(range(3))  # a fresh partition per write: no old version to delete
        store_seconds = median_seconds(lambda: store.write_partition(f"{next(keys):04d}", arrays, {}))
        manifest = store.manifest("0000")
        on_disk = folder_bytes(scratch / "store" / "activations" / "part-0000" / manifest["version"] / "activations")
        npz_seconds = median_seconds(lambda: np.savez_compressed(scratch / "acts.npz", activations=bits))
        npz_ratio = bits.nbytes / (scratch / "acts.npz").stat().st_size
    finally:
        shutil.rmtree(scratch)
    mb = bits.nbytes / 1e6
    chunk_rows = max(1, CHUNK_BYTES // (2 * bits.shape[1]))
    figures = {
        "profile": profile.name,
        "model": profile.model.name,
        "layer": layer,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(),
        "tokens": n_tokens,
        "batch_windows": args.batch,
        "tokens_per_s": tokens_per_s,
        "compared_tokens": compared.size,
        "full_forward_tokens_per_s": compared.size / full_seconds,
        "early_exit_speedup": full_seconds / early_seconds,
        "bit_exact": bit_exact,
        "compression_ratio": bits.nbytes / on_disk,
        "order0_entropy_bound": order0_bound(bits),
        "store_write_mb_per_s": mb / store_seconds,
        "npz_write_mb_per_s": mb / npz_seconds,
        "npz_compression_ratio": npz_ratio,
        "write_speedup_vs_npz": npz_seconds / store_seconds,
        "partitions": args.partitions,
        "overlapped_tokens_per_s": pipeline_tokens / overlapped_seconds,
        "sequential_tokens_per_s": pipeline_tokens / sequential_seconds,
        "overlapped_vs_extraction_only": pipeline_tokens / overlapped_seconds / tokens_per_s,
        "sequential_vs_extraction_only": pipeline_tokens / sequential_seconds / tokens_per_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "codecs": codec_table(bits, chunk_rows),
    }
    print(f"\nextraction benchmark — {profile.model.name}, block {layer}, {n_tokens:,} tokens on {figures['device']}")
    for key in (
        "tokens_per_s",
        "full_forward_tokens_per_s",
        "early_exit_speedup",
        "bit_exact",
        "compression_ratio",
        "order0_entropy_bound",
        "npz_compression_ratio",
        "store_write_mb_per_s",
        "npz_write_mb_per_s",
        "write_speedup_vs_npz",
        "overlapped_tokens_per_s",
        "sequential_tokens_per_s",
        "overlapped_vs_extraction_only",
        "sequential_vs_extraction_only",
        "peak_rss_mb",
    ):
        value = figures[key]
        print(f"  {key:28s} {value:12.3f}" if isinstance(value, float) else f"  {key:28s} {value!s:>12}")
    print(f"\n  codec chain (same {CHUNK_BYTES >> 20} MiB chunks, one thread)       ratio     MB/s")
    for row in figures["codecs"]:
        print(f"  {row['codec']:46s} {row['ratio']:6.3f} {row['mb_per_s']:8.0f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
