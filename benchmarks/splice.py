"""Spliced cross-entropy benchmark: shared prefix against the old per-dictionary forward.

    python benchmarks/splice.py --json benchmarks/results/splice_demo_cpu.json [--model /path/to/model]

The default model is the demo's Gemma 3 270M (converted once from the gguf package into
`--cache`), spliced at block 6 like the demo. Both methods score the same windows under the
same replacements (the clean model, zero- and mean-ablation, and `--dictionaries` synthetic
reconstructions: a rank-64 projection of each token plus a shrunk copy of it, the cost class of the real
dictionaries' round trips):
- baseline, the old per-dictionary forward: one full forward per replacement with a hook on
  block L, and a log-softmax over the whole batch's logits;
- ours (`gemma_assets.core.splice.cross_entropies`): blocks 0..L once per batch, then only
  blocks L+1..end and a chunked log-softmax per replacement.
Figures: seconds of each, `speedup_vs_per_dictionary_forward`, seconds per window per
replacement, and the largest difference of the summed CE between the two (they compute the
same thing).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gemma_assets.core import splice  # noqa: E402
from gemma_assets.core.config import load_run_config  # noqa: E402
from gemma_assets.core.extraction import decoder_layers  # noqa: E402
from gemma_assets.core.model import load_model, model_source  # noqa: E402


@torch.no_grad()
def per_dictionary_forward(model, windows: np.ndarray, layer: int, replacements: dict, batch_size: int) -> dict:
    """The old method: a full forward per replacement, splicing with a forward hook."""
    per_window = {name: [] for name in ["clean", *replacements]}
    current = [None]

    def hook(_module, _inputs, output):
        if current[0] is None:
            return None
        rest = output[:, 1:]
        replaced = current[0](rest.reshape(-1, rest.shape[-1]).float()).to(output).reshape(rest.shape)
        return torch.cat([output[:, :1], replaced], 1)

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        for start in range(0, len(windows), batch_size):
            ids = torch.from_numpy(windows[start : start + batch_size].astype(np.int64))
            for name in per_window:
                current[0] = replacements.get(name)
                logits = model(input_ids=ids, use_cache=False).logits.float()
                loss = torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
                )
                per_window[name].append(loss.reshape(len(ids), -1).sum(1).double().numpy())
    finally:
        handle.remove()
    return {name: np.concatenate(v) for name, v in per_window.items()}


def synthetic_replacements(d_model: int, n: int, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    replacements = {"zero-ablation": torch.zeros_like}
    for index in range(n):
        basis = torch.linalg.qr(torch.randn(d_model, 64, generator=generator))[0]
        residual = 0.1 * index  # deterministic, so both methods see the same reconstruction

        def reconstruct(x, basis=basis, residual=residual):
            projected = (x @ basis) @ basis.T
            return projected + residual * (x - projected)

        replacements[f"dictionary-{index}"] = reconstruct
    return replacements


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--model", help="a from_pretrained folder (default: the demo's Gemma 3 270M)")
    parser.add_argument("--layer", type=int, default=6)
    parser.add_argument("--cache", type=Path, default=Path("data/models"), help="where the demo model is converted")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--dictionaries", type=int, default=6)
    parser.add_argument("--batch-windows", type=int, default=4)
    args = parser.parse_args()
    source = args.model or model_source(load_run_config("demo").model, args.cache)
    model = load_model(source, args.layer, "cpu", torch.float32)
    vocab, d_model = model.config.vocab_size, model.config.hidden_size
    rng = np.random.default_rng(0)
    windows = rng.integers(4, min(vocab, 32000), size=(args.windows, args.context), dtype=np.int32)
    windows[:, 0] = model.config.bos_token_id
    replacements = synthetic_replacements(d_model, args.dictionaries)
    runs = len(replacements) + 1

    started = time.perf_counter()
    baseline = per_dictionary_forward(model, windows, args.layer, replacements, args.batch_windows)
    baseline_seconds = time.perf_counter() - started
    started = time.perf_counter()
    ours = splice.cross_entropies(model, windows, args.layer, replacements, args.batch_windows, "cpu")
    ours_seconds = time.perf_counter() - started
    difference = max(float(np.abs(ours[name] - baseline[name]).max() / (args.context - 1)) for name in baseline)
    result = {
        "model": str(source),
        "layer": args.layer,
        "n_layers": model.config.num_hidden_layers,
        "d_model": d_model,
        "vocab": vocab,
        "windows": args.windows,
        "context_len": args.context,
        "replacements_incl_clean": runs,
        "threads": torch.get_num_threads(),
        "per_dictionary_forward_seconds": baseline_seconds,
        "shared_prefix_seconds": ours_seconds,
        "speedup_vs_per_dictionary_forward": baseline_seconds / ours_seconds,
        "per_dictionary_forward_seconds_per_window_run": baseline_seconds / (args.windows * runs),
        "shared_prefix_seconds_per_window_run": ours_seconds / (args.windows * runs),
        "max_abs_ce_difference_per_prediction": difference,
    }
    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:<{width}}  {value:.4g}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
