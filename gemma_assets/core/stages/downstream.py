"""downstream_loss: next-token cross-entropy with block L's output replaced by each dictionary's
reconstruction."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from gemma_assets.core import splice
from gemma_assets.core.config import RunConfig
from gemma_assets.core.dictionaries import Member
from gemma_assets.core.files import write_json
from gemma_assets.core.layout import RunLayout
from gemma_assets.core.storage import ActivationStore

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def heldout_windows(store: ActivationStore, keys: list[str], context_len: int, limit: int) -> np.ndarray:
    """Token windows [w, context_len] of the held-out partitions, at most `limit`."""
    windows = np.concatenate([store.open(key).array("token_ids").reshape(-1, context_len) for key in keys])[:limit]
    if not len(windows):
        raise ValueError(
            f"no held-out windows to measure the spliced cross-entropy on (partitions {keys}, limit {limit}): "
            "raise evaluation.ce_windows or sample more windows"
        )
    return windows


def _round_trip(member: Member, device: str) -> splice.Replacement:
    def replace(x: torch.Tensor) -> torch.Tensor:
        dictionary = member.dictionary
        return dictionary.decode(dictionary.encode(x.to(device))).to(x.device)

    return replace


CE_BASELINES = ("clean_ce", "zero_ablation_ce", "mean_ablation_ce")  # the model's own, no dictionary


@dataclass(frozen=True)
class SplicedDictionary:
    """One dictionary's reconstruction spliced into the model (SAELens' definitions)."""

    name: str
    family: str
    ce: float
    delta_ce: float
    loss_recovered_vs_zero: float
    loss_recovered_vs_mean: float


@dataclass(frozen=True)
class SplicedLosses:
    """Mean next-token CE per prediction of the clean and ablated model, and of each dictionary."""

    windows: int
    predicted_tokens: int
    predictions_per_window: int
    clean_ce: float
    zero_ablation_ce: float
    mean_ablation_ce: float
    uniform_ce: float  # ln(vocabulary size): the CE of a uniform guess, what the ablations are read against
    # summed CE of each window by run name, for intervals by a bootstrap over windows
    ce_per_window: dict[str, list[float]]
    dictionaries: list[SplicedDictionary]


def spliced_losses(
    layout: RunLayout,
    run: RunConfig,
    lm: PreTrainedModel,
    members: list[Member],
    device: str,
) -> SplicedLosses:
    """Clean, zero- and mean-ablated CE, and per dictionary the spliced CE, delta CE and loss
    recovered (SAELens' definitions)."""
    windows = heldout_windows(
        layout.activation_store(), run.heldout_partition_keys, run.sampling.context_len, run.evaluation.ce_windows
    )
    train_mean = torch.from_numpy(layout.moments("train").mean).float()
    replacements: dict[str, splice.Replacement] = {
        "zero-ablation": torch.zeros_like,
        "mean-ablation": lambda x: train_mean.to(x.device).expand_as(x),
    }
    for member in members:  # clusterings run on the CPU: their encoders are cheap and exact there
        replacements[member.name] = _round_trip(member, device if member.family.is_sae else "cpu")
    batch = run.evaluation.ce_batch_windows
    per_window = splice.cross_entropies(lm, windows, run.model.layer, replacements, batch, device)
    predictions = windows.shape[1] - 1
    ce = {name: float(losses.sum() / (len(losses) * predictions)) for name, losses in per_window.items()}
    clean, zero, mean = ce["clean"], ce["zero-ablation"], ce["mean-ablation"]
    return SplicedLosses(
        windows=len(windows),
        predicted_tokens=int(windows[:, 1:].size),
        predictions_per_window=predictions,
        clean_ce=clean,
        zero_ablation_ce=zero,
        mean_ablation_ce=mean,
        uniform_ce=math.log(lm.get_output_embeddings().weight.shape[0]),
        ce_per_window={name: losses.tolist() for name, losses in per_window.items()},
        dictionaries=[
            SplicedDictionary(
                name=member.name,
                family=member.family.value,
                ce=ce[member.name],
                delta_ce=ce[member.name] - clean,
                loss_recovered_vs_zero=splice.loss_recovered(ce[member.name], clean, zero),
                loss_recovered_vs_mean=splice.loss_recovered(ce[member.name], clean, mean),
            )
            for member in members
        ],
    )


def save(layout: RunLayout, result: SplicedLosses, computed_on: dict[str, Any], environment: dict[str, Any]) -> None:
    """evaluation/downstream.json: the losses, and where and how they were computed (the report
    names the numeric environment of its most environment-sensitive figures)."""
    write_json(
        layout.downstream_file, asdict(result) | {"computed_on": computed_on, "numeric_environment": environment}
    )


def by_name(downstream: dict) -> dict[str, dict[str, float]]:
    """The spliced figures of each dictionary, keyed by its name (to join with its record)."""
    return {r["name"]: {k: v for k, v in r.items() if k not in ("name", "family")} for r in downstream["dictionaries"]}
