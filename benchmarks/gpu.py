"""GPU benchmark: early-exit extraction at the real Gemma-2-2b width, and torch k-means at scale.

Run on a CUDA machine (weights are random when google/gemma-2-2b is not available there:
speed does not depend on the values). Prints a table and writes JSON:

    python benchmarks/gpu.py --json benchmarks/results/gpu_h100.json
    python benchmarks/gpu.py --smoke          # tiny sizes, any device: checks the script runs

Figures:
- extraction tokens/s of the project's early-exit extractor vs a full forward with
  output_hidden_states=True (same model, inputs, batch, device), and against the FLOP bound
  (FLOPs of blocks 0..L per token / measured bf16 matmul throughput);
- bit-exactness of early exit vs hidden_states[L+1] on the GPU;
- where a partition's time goes on the way to a committed store, each stage alone and then the
  whole path: forward only, forward + host copy (extract_windows), compression + write + commit
  of the same bits (write_partition, the CPU's threads), and extract_partitions, which overlaps
  the writes with the forward passes (its tokens/s next to extract_windows'); then the
  statistics pass over that store on the device (float64 co-moment) and on the CPU (mixed), each
  next to a plain read-and-decode pass;
- k-means (torch backend) seconds per Lloyd iteration at N>=1M, D=2304, k=256 and 16384, and,
  where cuML is installed, cuML's fit on the same data and init (speedup and inertia difference).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gemma_assets.core.config import load_run_config  # noqa: E402
from gemma_assets.core.extraction import extract_partitions, extract_windows, residual_stream  # noqa: E402
from gemma_assets.core.kmeans import fit_kmeans  # noqa: E402
from gemma_assets.core.sampling import TokenSample  # noqa: E402
from gemma_assets.core.stats import PartitionStats  # noqa: E402
from gemma_assets.core.storage import ActivationStore  # noqa: E402

GEMMA2_2B = dict(
    vocab_size=256000,
    hidden_size=2304,
    intermediate_size=9216,
    num_hidden_layers=26,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=256,
    query_pre_attn_scalar=256,
    sliding_window=4096,
    attn_logit_softcapping=50.0,
    final_logit_softcapping=30.0,
)
SMOKE = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    query_pre_attn_scalar=16,
    sliding_window=64,
    attn_logit_softcapping=50.0,
    final_logit_softcapping=30.0,
)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> float:
    """Median seconds of fn() after one warm-up."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def matmul_tflops(device: str, dtype: torch.dtype, n: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = timed(lambda: a @ b, device, 5)
    return 2 * n**3 / seconds / 1e12


def flops_per_token(config, layers: int, context_len: int) -> float:
    """Forward FLOPs per token through `layers` blocks: 2 x weights + attention (eager: full ctx)."""
    d, hd = config.hidden_size, config.head_dim
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    weights = d * (q + 2 * kv) + q * d + 3 * d * config.intermediate_size
    attention = 2 * 2 * context_len * q  # QK^T and AV
    return layers * (2 * weights + attention)


def bench_extraction(args, device: str) -> dict:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(**(SMOKE if args.smoke else GEMMA2_2B))
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    with torch.device(device):
        model = Gemma2ForCausalLM._from_config(config, attn_implementation="eager", dtype=dtype).eval()
    layer = args.layer if not args.smoke else 2
    peak = matmul_tflops(device, torch.bfloat16, 8192 if not args.smoke else 256)
    rows = []
    for context_len, batch in args.shapes:
        tokens = torch.randint(3, config.vocab_size, (batch, context_len), device=device)
        tokens[:, 0] = 2

        def early():
            return residual_stream(model, tokens, layer)

        def full():
            with torch.no_grad():
                return model(tokens, output_hidden_states=True, use_cache=False).hidden_states[layer + 1]

        exact = bool(torch.equal(early().to(torch.bfloat16), full().to(torch.bfloat16)))
        t_early, t_full = timed(early, device, args.repeats), timed(full, device, args.repeats)
        n = batch * context_len
        bound = peak * 1e12 / flops_per_token(config, layer + 1, context_len)
        rows.append(
            {
                "context_len": context_len,
                "batch": batch,
                "early_exit_tokens_per_s": n / t_early,
                "full_forward_tokens_per_s": n / t_full,
                "early_exit_speedup": t_full / t_early,
                "bit_exact": exact,
                "flop_bound_tokens_per_s": bound,
                "fraction_of_flop_bound": n / t_early / bound,
            }
        )
        print(
            f"ctx {context_len:4d} batch {batch:4d}: early exit {n / t_early:12,.0f} tok/s, full "
            f"{n / t_full:12,.0f} tok/s, speedup {t_full / t_early:5.2f}x, {100 * n / t_early / bound:5.1f}% "
            f"of FLOP bound, bit-exact {exact}",
            flush=True,
        )
    store_path = bench_store_path(model, layer, args, device)
    return {"layer": layer, "bf16_matmul_tflops": peak, "shapes": rows, "store_path": store_path}


def bench_store_path(model: torch.nn.Module, layer: int, args, device: str) -> dict:
    """Tokens/s of each stage from token windows to a committed store, alone and together."""
    context_len, batch, parts = 128, args.partition_batch, args.partitions
    generator = np.random.default_rng(0)
    windows = generator.integers(3, model.config.vocab_size, (args.partition_windows, context_len), dtype=np.int32)
    windows[:, 0] = 2
    n = windows.size
    sample = TokenSample(
        windows,
        np.arange(len(windows), dtype=np.int64),
        np.ones(len(windows), np.int64),
        np.zeros(len(windows), np.int16),
        ("synthetic",),
    )
    run = load_run_config(
        "tiny",
        [
            f"model.layer={layer}",
            f"sampling.context_len={context_len}",
            f"sampling.partitions={parts}",
            f"sampling.windows_per_partition={len(windows) // parts}",
        ],
    )
    stages = {}

    def forward_only():
        for start in range(0, len(windows), batch):
            residual_stream(model, torch.from_numpy(windows[start : start + batch]).long().to(device), layer)

    stages["forward only"] = n / timed(forward_only, device, 1)
    extract_windows(model, windows[:batch], layer, batch, device)  # warm-up
    started = time.perf_counter()
    bits = extract_windows(model, windows, layer, batch, device)
    stages["forward + host copy (extract_windows)"] = n / (time.perf_counter() - started)
    with tempfile.TemporaryDirectory() as scratch:
        written = ActivationStore(f"{scratch}/written")
        per_part = n // parts
        started = time.perf_counter()
        for index, key in enumerate(run.partition_keys):
            rows = slice(index * per_part, (index + 1) * per_part)
            per_token = {"positions": np.tile(np.arange(context_len, dtype=np.int32), per_part // context_len)}
            written.write_partition(key, {"activations": bits[rows]} | per_token, {})
        stages["compress + write + commit (write_partition)"] = n / (time.perf_counter() - started)
        store = ActivationStore(f"{scratch}/store")
        started = time.perf_counter()
        extract_partitions(
            model, sample, run.partition_keys, run, store, {"context_len": context_len}, batch, device, print
        )
        stages["whole path, overlapped (extract_partitions)"] = n / (time.perf_counter() - started)
        keys = run.partition_keys
        started = time.perf_counter()
        for _ in store.iter_tokens(keys, exclude_bos=False):
            pass
        stages["read + decode of the store"] = n / (time.perf_counter() - started)
        for precision, where in (("float64", device), ("mixed", "cpu")):
            started = time.perf_counter()
            for key in keys:
                PartitionStats.compute(store, key, 2048, precision=precision, device=where)
            sync(device)
            stages[f"statistics pass, {precision} on {where}"] = n / (time.perf_counter() - started)
    extraction = stages["forward + host copy (extract_windows)"]
    print(f"store path, {n:,} tokens in {parts} partitions, batch {batch}:", flush=True)
    for stage, rate in stages.items():
        print(f"  {stage:48s} {rate:12,.0f} tok/s  {rate / extraction:6.2f}x extract_windows", flush=True)
    return {
        "tokens": n,
        "partitions": parts,
        "batch": batch,
        "tokens_per_s": stages,
        "overlapped_vs_extraction_only": stages["whole path, overlapped (extract_partitions)"] / extraction,
    }


def bench_kmeans(args, device: str) -> list[dict]:
    n, d = (args.kmeans_n, 2304) if not args.smoke else (4096, 64)
    generator = torch.Generator(device=device).manual_seed(0)
    rows = []
    for k in args.ks if not args.smoke else (16, 64):
        centres = torch.randn(k, d, device=device, generator=generator) * 4
        labels = torch.randint(k, (n,), device=device, generator=generator)
        x = centres[labels] + torch.randn(n, d, device=device, generator=generator)
        init = x[torch.randperm(n, device=device, generator=generator)[:k]].clone()
        sync(device)
        result = fit_kmeans(x, k, max_iter=args.kmeans_iters, tol=0.0, init=init, device=device)
        sync(device)
        per_iter = result.fit_seconds / result.n_iter
        rows.append(
            {
                "n": n,
                "d": d,
                "k": k,
                "iterations": result.n_iter,
                "fit_seconds": result.fit_seconds,
                "seconds_per_iteration": per_iter,
                "distance_tflops": 2 * n * k * d / per_iter / 1e12,
                "final_inertia": result.inertia_curve[-1],
            }
        )
        print(
            f"k-means torch N={n:,} D={d} k={k:6d}: {per_iter:7.3f} s/iteration "
            f"({2 * n * k * d / per_iter / 1e12:6.1f} TFLOP/s in the distance GEMM)",
            flush=True,
        )
        if device.startswith("cuda") and importlib.util.find_spec("cuml") is not None:
            # same data, init and iteration count; the cuML fit includes one exact pass of ours
            # that puts its inertia on the same definition
            reference = fit_kmeans(x, k, max_iter=args.kmeans_iters, tol=0.0, init=init, backend="cuml", device=device)
            rows[-1] |= {
                "cuml_fit_seconds": reference.fit_seconds,
                "speedup_vs_cuml": reference.fit_seconds / result.fit_seconds,
                "inertia_rel_diff_vs_cuml": abs(result.inertia_curve[-1] - reference.inertia_curve[-1])
                / reference.inertia_curve[-1],
            }
            print(f"  cuML: {reference.fit_seconds:.2f}s, ours {rows[-1]['speedup_vs_cuml']:.2f}x", flush=True)
        del x, labels, centres, init
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check the script on any machine")
    parser.add_argument("--layer", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--shapes",
        type=lambda s: [tuple(map(int, p.split("x"))) for p in s.split(",")],
        default=[(128, 64), (128, 128), (512, 16)],
        help="CTXxBATCH,...",
    )
    parser.add_argument("--partition-windows", type=int, default=2048)
    parser.add_argument("--partition-batch", type=int, default=128)
    parser.add_argument("--partitions", type=int, default=4, help="the partition windows cut into this many")
    parser.add_argument("--kmeans-n", type=int, default=1 << 20)
    parser.add_argument("--kmeans-iters", type=int, default=5)
    parser.add_argument("--ks", type=lambda s: [int(k) for k in s.split(",")], default=[256, 16384])
    args = parser.parse_args()
    if args.smoke:
        args.shapes, args.partition_windows, args.partition_batch = [(32, 4)], 8, 4
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    print(f"device: {name}; torch {torch.__version__}", flush=True)
    figures = {
        "device": name,
        "torch": torch.__version__,
        "extraction": bench_extraction(args, device),
        "kmeans": bench_kmeans(args, device),
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
