"""quantisation_shift: how far the run's (quantised) checkpoint moves block L's output away from
the unquantised model it was made from, and what that does to the pretrained SAEs, which were
trained on the unquantised model.

Both models see the same held-out windows (the first `evaluation.ce_windows` of them, the
spliced cross-entropy's). The quantised activations are the stored ones; the unquantised model's
are taken by the extraction's own hook and rounded to bf16 the same way, so the two differ by the
weights alone. BOS is excluded as everywhere else. Figures are float64 ratios of sums, with 95%
intervals from the bootstrap over windows; the SAEs' two FVUs are compared paired, on the same
resampled windows.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from gemma_assets.core import bootstrap, metrics, model, progress, sae
from gemma_assets.core.bf16 import bits_to_float
from gemma_assets.core.bootstrap import Interval, WindowSums
from gemma_assets.core.codes import Dictionary
from gemma_assets.core.config import ConfigError, RunConfig
from gemma_assets.core.extraction import extract_windows
from gemma_assets.core.files import write_json
from gemma_assets.core.layout import RunLayout
from gemma_assets.core.methods import skipped_line
from gemma_assets.core.stages.downstream import heldout_windows
from gemma_assets.core.storage import ActivationStore, window_ids

# windows whose ids both tokenizers must read as the same tokens
TOKENIZER_CHECK_WINDOWS = 4
# tokens per SAE encode: a 262k-wide SAE's dense codes of this many tokens take 2 GiB
ENCODE_TOKENS = 2048


@dataclass(frozen=True)
class SaeShift:
    """One pretrained SAE on both models' activations of the same tokens."""

    name: str
    fvu_unquantised: Interval
    fvu_quantised: Interval
    # quantised minus unquantised, paired on the same resampled windows
    fvu_difference: Interval


@dataclass(frozen=True)
class QuantisationShift:
    """The quantised checkpoint's block-L output read as a reconstruction of the unquantised
    model's: its FVU, per-token cosine and norm ratio (quantised / unquantised), and each
    pretrained SAE's FVU on either."""

    unquantised: str
    layer: int
    windows: int
    tokens: int
    fvu: Interval
    cosine: Interval
    relative_norm: Interval
    saes: list[SaeShift]


@dataclass(frozen=True)
class HeldoutActivations:
    """The stored (quantised) activations of the compared windows, BOS excluded."""

    x: torch.Tensor  # [n, d] float32
    rows: np.ndarray  # [n] each token's row in windows.reshape(-1)
    window_ids: np.ndarray  # [n] the ids every other reader gives these windows


def stored_activations(store: ActivationStore, keys: list[str], context_len: int, limit: int) -> HeldoutActivations:
    """The stored non-BOS activations of the first `limit` windows of `keys`, in the order
    `downstream.heldout_windows` lists those windows."""
    xs, rows, ids = [], [], []
    first_window = 0  # of the current partition, among all windows of `keys`
    for key in keys:
        if first_window >= limit:
            break
        for x, info in store.iter_tokens([key]):
            window = first_window + info["row"] // context_len
            kept = window < limit
            xs.append(x[torch.from_numpy(kept)])
            rows.append(window[kept] * context_len + info["row"][kept] % context_len)
            ids.append(window_ids(key, info["row"][kept], context_len))
        first_window += store.manifest(key)["n_tokens"] // context_len
    return HeldoutActivations(torch.cat(xs), np.concatenate(rows), np.concatenate(ids))


def tokenizer_mismatch(run_tokenizer: Any, other: Any, windows: np.ndarray) -> str | None:
    """Where `other` reads an id of `windows` as another token than the run's tokenizer does, or
    gives BOS another id; None where they agree. The unquantised model is fed the run's ids, so
    what must agree is what each id means, not how text is split (a GGUF-converted tokenizer may
    split differently and still number its vocabulary the same)."""
    if other.bos_token_id != run_tokenizer.bos_token_id:
        return f"its BOS id is {other.bos_token_id}, the run's {run_tokenizer.bos_token_id}"
    for number, window in enumerate(windows.tolist()):
        ours, theirs = run_tokenizer.convert_ids_to_tokens(window), other.convert_ids_to_tokens(window)
        if ours != theirs:
            at = next(i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b)
            return f"held-out window {number}: id {window[at]} is {ours[at]!r} to the run's tokenizer, {theirs[at]!r} to its"
    return None


def _chunks(x: torch.Tensor, ids: np.ndarray) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
    for start in range(0, len(x), ENCODE_TOKENS):
        yield x[start : start + ENCODE_TOKENS], ids[start : start + ENCODE_TOKENS]


def _sae_shift(
    name: str, dictionary: Dictionary, unquantised: torch.Tensor, held: HeldoutActivations, device: str
) -> SaeShift:
    sums: dict[str, WindowSums] = {}
    for which, x in (("unquantised", unquantised), ("quantised", held.x)):
        _, sums[which] = metrics.evaluate_windows(
            _chunks(x, held.window_ids), dictionary, device, f"{name} on the {which} activations", len(x)
        )
    fvu = {which: bootstrap.interval(one.fvu, one.n_windows) for which, one in sums.items()}
    difference = bootstrap.paired(("quantised", sums["quantised"]), ("unquantised", sums["unquantised"]), "fvu")
    return SaeShift(name, fvu["unquantised"], fvu["quantised"], difference.difference)


def measure_shift(
    layout: RunLayout, run: RunConfig, device: str, dtype: torch.dtype, batch_size: int
) -> QuantisationShift | str:
    """The quantisation's shift of block L's output and each pretrained SAE's FVU on both
    models' activations; or, when neither the Hugging Face cache nor the hub gives the
    unquantised model, the one line that says the comparison was skipped and why."""
    source, layer = run.model.unquantised, run.model.layer
    try:
        tokenizer = model.load_tokenizer(source)
        lm = model.load_model(source, layer, device, dtype)
    except model.ModelAccessError as error:
        if not sae.hub_unreachable(error):
            raise
        return skipped_line(f"the quantisation comparison with {source}", sae.unavailable_reason())
    store, keys, context_len = layout.activation_store(), run.heldout_partition_keys, run.sampling.context_len
    windows = heldout_windows(store, keys, context_len, run.evaluation.ce_windows)
    problem = tokenizer_mismatch(
        model.load_tokenizer(layout.model_source(run)), tokenizer, windows[:TOKENIZER_CHECK_WINDOWS]
    )
    if problem:
        raise ConfigError(
            f"model.unquantised {source} does not share the run's tokenizer: {problem} -> name the model the "
            "run's checkpoint was quantised from (it shares its tokenizer), or leave model.unquantised empty"
        )
    held = stored_activations(store, keys, context_len, len(windows))
    if lm.config.hidden_size != held.x.shape[1]:
        raise ConfigError(
            f"model.unquantised {source} has d_model {lm.config.hidden_size}, the run's model {held.x.shape[1]}: "
            "it is not the model the checkpoint was quantised from -> name that one, or leave model.unquantised empty"
        )
    with progress.task(f"block {layer} of {source}", windows.size, "tokens") as extracted:
        bits = extract_windows(lm, windows, layer, batch_size, device, on_progress=extracted.update)
    unquantised = bits_to_float(bits[held.rows])
    shift = metrics.paired_window_sums(unquantised, held.x, held.window_ids)
    n = shift.n_windows
    pretrained = [spec for spec in layout.made_saes(run.sae_specs) if not spec.is_trained]
    # one SAE in memory at a time: Gemma Scope's 262k-wide ones take 1.3 GB each
    members = (member for spec in pretrained for member in layout.sae_members([spec], device))
    return QuantisationShift(
        unquantised=source,
        layer=layer,
        windows=len(windows),
        tokens=len(held.x),
        fvu=bootstrap.interval(shift.fvu, n),
        cosine=bootstrap.interval(shift.mean_of("cosine"), n),
        relative_norm=bootstrap.interval(shift.mean_of("relative_norm"), n),
        saes=[_sae_shift(member.name, member.dictionary, unquantised, held, device) for member in members],
    )


def save(layout: RunLayout, result: QuantisationShift | str) -> None:
    """evaluation/quantisation_shift.json: the figures, or {"skipped": why}."""
    write_json(layout.quantisation_shift_file, {"skipped": result} if isinstance(result, str) else asdict(result))
