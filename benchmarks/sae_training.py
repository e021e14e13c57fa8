"""The demo's SAE grid trained in one streamed pass against the same grid one SAE at a time at the
same steps, in one process; and the trainer's peak memory as the train split grows.

    python benchmarks/sae_training.py --store data/demo --json benchmarks/results/sae_training_cpu.json

`--store` is a finished demo run's folder (its activations and stats; default: data/demo under
$GEMMA_ASSETS_DATA_ROOT or ./data). The one-at-a-time arm fits every SAE of the grid with seeds
0..seeds-1, each fit reading the store again; the speed ratio compares its seed-0 fits with the
one pass (seed 0 of every SAE, the same steps). Each SAE's held-out FVU from the pass is set
beside the spread over seeds of its one-at-a-time fits. The time split of the pass (the trainers'
steps vs reading, decoding and shuffling the store) says where the time goes. The memory probe
trains one SAE on synthetic chunks of N and 4N tokens (d 640) in a fresh process each and
records the RSS high-water mark of the pass. Targets: >= 4x speed, <= 1.25x memory from N to 4N.
`--profile-steps N` instead profiles N SAELens steps of each architecture at the demo's shape.
Needs only the package.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from gemma_assets.core import metrics, sae  # noqa: E402
from gemma_assets.core.config import SaeSpec, TrainerSpec, load_run_config  # noqa: E402
from gemma_assets.core.memory import RssTrace  # noqa: E402
from gemma_assets.core.stats import ActivationMoments  # noqa: E402
from gemma_assets.core.storage import ActivationStore  # noqa: E402

MEMORY_D = 640  # the demo's d_model
MEMORY_CHUNK = 2048  # tokens per synthetic chunk, about one of the store's


def heldout_fvu(trained: sae.TrainedSae, x: torch.Tensor) -> float:
    """FVU of the SAE as saved (its inference form), on held-out tokens."""
    with tempfile.TemporaryDirectory() as folder:
        trained.dictionary.save(Path(folder))
        return metrics.evaluate([x], sae.load_dictionary(Path(folder)))["fvu"]


def train(store: ActivationStore, keys: list[str], moments: ActivationMoments, specs, trainer) -> sae.TrainingPass:
    return sae.train_saes(
        specs,
        store.batches(keys),
        moments.d_model,
        moments.count,
        torch.from_numpy(moments.mean).float(),
        moments.norm_sum / moments.count,
        trainer,
    )


def memory_probe(tokens: int, trainer: TrainerSpec) -> dict:
    """Train topk-256-k16 on `tokens` synthetic tokens (one epoch); the pass's RSS peak."""

    def batches():
        generator = torch.Generator().manual_seed(0)
        for start in range(0, tokens, MEMORY_CHUNK):
            yield torch.randn(min(MEMORY_CHUNK, tokens - start), MEMORY_D, generator=generator).bfloat16()

    spec, trainer = SaeSpec.trained("topk", 256, 16), trainer.model_copy(update={"epochs": 1.0})
    sae.train_saes([spec], batches, MEMORY_D, MEMORY_CHUNK, torch.zeros(MEMORY_D), 25.0, trainer)  # warm-up
    with RssTrace() as peak:
        done = sae.train_saes([spec], batches, MEMORY_D, tokens, torch.zeros(MEMORY_D), 25.0, trainer)
    return {"train_tokens": tokens, "peak_rss_mb": peak.mb, "buffer_peak_rows": done.buffer_peak_rows}


def profile_steps(steps: int, trainer: TrainerSpec) -> None:
    """Where one SAELens step's time goes: cProfile over `steps` steps of each architecture at the
    demo's shape (d 640, width 256, k or target L0 16), the functions by own time."""
    import cProfile
    import pstats

    from sae_lens import SAETrainer

    x = torch.randn(trainer.batch_size, MEMORY_D, generator=torch.Generator().manual_seed(0))
    for architecture in ("topk", "batchtopk", "matryoshka", "jumprelu", "standard"):
        levels = (32, 128) if architecture == "matryoshka" else ()
        spec = SaeSpec.trained(architecture, 256, 1.0 if architecture == "standard" else 16, levels)
        fitted = SAETrainer(
            cfg=sae.trainer_config(trainer, 10**9, "cpu"),
            sae=sae.training_sae(spec, MEMORY_D, trainer, "cpu"),
            data_provider=iter(()),
        )
        with sae.torch_threads(trainer.threads):
            for _ in range(3):  # warm-up
                fitted.step(x)
            profiler = cProfile.Profile()
            started = time.perf_counter()
            profiler.enable()
            for _ in range(steps):
                fitted.maybe_reset_sparsity()
                fitted.step(x)
                fitted.n_training_steps += 1
            profiler.disable()
        print(
            f"\n{spec.name}: {(time.perf_counter() - started) / steps * 1000:.1f} ms per step (profiled), top 8 by own time"
        )
        pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    data_root = Path(os.environ.get("GEMMA_ASSETS_DATA_ROOT") or "data")  # the package's default data root
    parser.add_argument("--store", type=Path, default=data_root / "demo")
    parser.add_argument("--epochs", type=float, default=2.0, help="passes over the train split (the demo: 16)")
    parser.add_argument("--seeds", type=int, default=3, help="one-at-a-time fits per SAE, for the spread")
    parser.add_argument("--threads", type=int, default=1, help="torch threads while training")
    parser.add_argument("--memory-tokens", type=int, default=131_072, help="N of the memory probe")
    parser.add_argument("--memory-probe", type=int, help=argparse.SUPPRESS)  # the probe's own process
    parser.add_argument("--profile-steps", type=int, help="only profile this many steps of each architecture")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    run = load_run_config("demo")
    trainer = run.saes.trainer.model_copy(update={"epochs": args.epochs, "threads": args.threads})
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe, trainer)))
        return
    if args.profile_steps:
        profile_steps(args.profile_steps, trainer)
        return

    store = ActivationStore(str(args.store))
    moments = ActivationMoments.load(args.store / "stats" / "train_moments.npz")
    heldout, _ = store.load_tokens(run.heldout_partition_keys)
    specs = [spec for spec in run.sae_specs if spec.is_trained]
    keys = run.train_partition_keys

    started = time.perf_counter()
    one_pass = train(store, keys, moments, specs, trainer)
    pass_seconds = time.perf_counter() - started
    pass_fvu = {one.spec.name: heldout_fvu(one, heldout) for one in one_pass.saes}
    steps_seconds = sum(one.step_seconds for one in one_pass.saes)

    single_seconds: dict[str, float] = {}
    spread: dict[str, list[float]] = {}
    for spec in specs:
        for seed in range(args.seeds):
            started = time.perf_counter()
            alone = train(store, keys, moments, [spec.with_seed(seed)], trainer)
            if seed == 0:
                single_seconds[spec.name] = time.perf_counter() - started
            spread.setdefault(spec.name, []).append(heldout_fvu(alone.saes[0], heldout))
    one_at_a_time = sum(single_seconds.values())

    probes = []
    for tokens in (args.memory_tokens, 4 * args.memory_tokens):
        command = [sys.executable, __file__, "--memory-probe", str(tokens), "--threads", str(args.threads)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        probes.append(json.loads(done.stdout.strip().splitlines()[-1]))

    rows = []
    for spec in specs:
        fits = spread[spec.name]
        mean, sd = statistics.mean(fits), statistics.stdev(fits) if len(fits) > 1 else 0.0
        rows.append(
            {
                "name": spec.name,
                "one_pass_fvu": pass_fvu[spec.name],
                "alone_fvu_mean": mean,
                "alone_fvu_sd": sd,
                "alone_fvu_min": min(fits),
                "alone_fvu_max": max(fits),
                "one_pass_in_sds": (pass_fvu[spec.name] - mean) / sd if sd else None,
                "alone_seconds": single_seconds[spec.name],
                "own_step_seconds_in_pass": next(o.step_seconds for o in one_pass.saes if o.spec.name == spec.name),
            }
        )
    result = {
        "store": str(args.store),
        "threads": args.threads,
        "trainer": trainer.model_dump(),
        "saes": len(specs),
        "steps": one_pass.steps,
        "train_tokens": one_pass.train_tokens,
        "one_pass_seconds": pass_seconds,
        "one_pass_step_seconds": steps_seconds,
        "one_pass_stream_seconds": one_pass.seconds - steps_seconds,
        "one_at_a_time_seconds": one_at_a_time,
        "speed_ratio": one_at_a_time / pass_seconds,
        "target_speed_ratio": 4.0,
        "memory": probes,
        "memory_ratio": probes[1]["peak_rss_mb"] / probes[0]["peak_rss_mb"],
        "target_memory_ratio": 1.25,
        "per_sae": rows,
    }
    print(
        f"SAE grid of the demo ({len(specs)} SAEs), {one_pass.steps} steps of {trainer.batch_size} tokens "
        f"({args.epochs:g} epochs), {args.threads} torch thread(s), store {args.store}"
    )
    print("| arm | seconds | ratio |\n|---|---|---|")
    print(f"| one SAE at a time, seed 0 of each (baseline) | {one_at_a_time:.1f} | 1.00 |")
    print(f"| one streamed pass | {pass_seconds:.1f} | {result['speed_ratio']:.2f} |")
    print(
        f"the pass: {steps_seconds:.1f} s in the SAEs' own steps, {result['one_pass_stream_seconds']:.1f} s reading, "
        "decoding and shuffling the store"
    )
    print(
        f"\n| SAE | FVU one pass | FVU alone, mean ± sd over {args.seeds} seeds | min | max | pass in sds |\n"
        "|---|---|---|---|---|---|"
    )
    for row in rows:
        in_sds = f"{row['one_pass_in_sds']:+.1f}" if row["one_pass_in_sds"] is not None else "-"
        print(
            f"| {row['name']} | {row['one_pass_fvu']:.4f} | {row['alone_fvu_mean']:.4f} ± {row['alone_fvu_sd']:.4f} | "
            f"{row['alone_fvu_min']:.4f} | {row['alone_fvu_max']:.4f} | {in_sds} |"
        )
    print("\n| train tokens | trainer peak RSS (MB) | shuffle buffer peak (rows) |\n|---|---|---|")
    for probe in probes:
        print(f"| {probe['train_tokens']:,} | {probe['peak_rss_mb']:.1f} | {probe['buffer_peak_rows']:,} |")
    print(f"memory N -> 4N: {result['memory_ratio']:.2f}x (target <= 1.25x)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
