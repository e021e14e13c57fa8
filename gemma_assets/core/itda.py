"""ITDA: Inference-Time Decomposition of Activations (Leask, Nanda et al., arXiv 2505.17769).

A dictionary built greedily from real activations, at a small share of an SAE's cost. Tokens
of the train split are streamed in store order, a small group at a time; each is coded with
the dictionary so far by matching pursuit with m atoms (fewer while the dictionary holds fewer
than m). A token whose relative residual ||r||^2 / ||x - mean||^2 exceeds the threshold joins
the dictionary as an atom: the token itself, centred and unit-normalised. Codes are the same
matching pursuit (`MatchingPursuitDictionary`, L0 = m), so ITDA reads like the top-m codes
over k-means directions, with atoms that are observed tokens instead of centroids.

This project's choices, not the paper's: atoms are centred by the train mean (as leader
clustering's exemplars, so both are directions around the data's centre), and every ITDA has
exactly the width it is asked for, to sit beside an SAE of that width: when the stream ends
before the dictionary is full, further passes follow with the threshold halved each pass
(`ItdaResult` records the final threshold and the passes); the fit fails only when the split
holds fewer distinct tokens than the width.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from gemma_assets.core import progress
from gemma_assets.core.batches import Batches, as_batches
from gemma_assets.core.codes import unit_rows
from gemma_assets.core.config import ConfigError, RunConfig
from gemma_assets.core.dictionaries import TOP_M, MatchingPursuitDictionary
from gemma_assets.core.records import Family

FAMILY = Family.define("itda", "ITDA (real activations, matching pursuit)", is_floor=True)

GROUP_TOKENS = 64  # tokens coded with the same dictionary before the worst explained of them join it
# two candidates of one group this parallel are one token twice: only the first joins
DUPLICATE_COSINE = 1 - 1e-6
# a pass below this threshold that adds no atom means every token left is an atom up to rounding
LOWEST_THRESHOLD = 1e-6


@dataclass(frozen=True)
class ItdaResult:
    atoms: torch.Tensor  # [width, d] unit rows: centred train tokens, in the order they joined
    mean: torch.Tensor  # [d] subtracted before normalising
    m: int  # atoms per token in the codes
    token_indices: torch.Tensor  # [width] each atom's position in one pass over the stream
    threshold: float  # the relative residual threshold of the last pass
    passes: int  # over the stream (more than 1: the threshold was halved passes - 1 times)
    n_tokens_seen: int  # over every pass

    def dictionary(self) -> MatchingPursuitDictionary:
        return MatchingPursuitDictionary(self.atoms, self.mean, self.m)


def itda_name(width: int, m: int) -> str:
    return f"itda-{width}-m{m}"


def itda_shapes(run: RunConfig) -> list[tuple[int, int]]:
    """(width, m) of every ITDA dictionary of the run: each width (default: the trained SAEs'
    widths) with each L0 below it (default: 1 and the top-m readings' m)."""
    l0s = run.itda.l0s or (1, *TOP_M)  # the L0 of every k-means reading: nearest centroid, top-m
    return [(width, m) for width in run.itda_widths for m in l0s if m < width]


def fit_itda(
    batches: torch.Tensor | Batches,
    mean: torch.Tensor,
    width: int,
    m: int,
    threshold: float,
    tokens: int | None = None,
) -> ItdaResult:
    """An ITDA dictionary of exactly `width` atoms from raw activation batches [n, d] (a tensor
    or a re-iterable stream), coded with `m` atoms per token; each pass halves the threshold of
    the one before. Progress counts the tokens of each pass against `tokens` (a pass stops
    once the dictionary is full)."""
    if width < 1 or m < 1:
        raise ConfigError(f"ITDA needs a width and an m of at least 1, got width {width}, m {m}")
    if not 0 < threshold < 1:
        raise ConfigError(f"ITDA threshold must be in (0, 1), got {threshold} -> set itda.threshold to e.g. 0.1")
    stream = as_batches(batches)
    mean = mean.float()
    # filled in place: appending would copy the dictionary once per group
    atoms = torch.zeros(width, len(mean))
    token_indices = torch.zeros(width, dtype=torch.long)
    size = passes = n_tokens = 0
    while True:
        passes += 1
        before = size
        label = f"ITDA {itda_name(width, m)}: pass {passes} (threshold {threshold:.3g})"
        with progress.task(label, tokens, "tokens", total_is_bound=True) as streamed:
            for start, x in _groups(stream()):
                n_tokens += len(x)
                new = _worst_explained(x, atoms[:size], mean, m, threshold, width - size)
                atoms[size : size + len(new)] = unit_rows(x[new] - mean)
                token_indices[size : size + len(new)] = start + new
                size += len(new)
                streamed.update(start + len(x), atoms=size)
                if size == width:
                    return ItdaResult(atoms, mean, m, token_indices, threshold, passes, n_tokens)
        if size == before and threshold < LOWEST_THRESHOLD:
            raise ConfigError(
                f"the train split holds only {size} distinct tokens (every other one is reconstructed by "
                f"them to {threshold:.1g} of its variance), fewer than ITDA width {width} -> lower itda.widths "
                "below that, or sample more tokens (sampling.windows_per_partition or sampling.partitions)"
            )
        threshold /= 2


def _groups(batches: Iterable[torch.Tensor]) -> Iterator[tuple[int, torch.Tensor]]:
    """Groups of at most GROUP_TOKENS float32 tokens, each with its position in the stream."""
    position = 0
    for batch in batches:
        for start in range(0, len(batch), GROUP_TOKENS):
            group = batch[start : start + GROUP_TOKENS].float()
            yield position, group
            position += len(group)


def _worst_explained(
    x: torch.Tensor, atoms: torch.Tensor, mean: torch.Tensor, m: int, threshold: float, room: int
) -> torch.Tensor:
    """Positions in x [n, d] of the tokens that join the dictionary: relative residual above
    the threshold, worst explained first, at most `room`, none parallel to one taken before it."""
    centred = x - mean
    energy = centred.pow(2).sum(1)
    if len(atoms):
        coder = MatchingPursuitDictionary(atoms, mean, min(m, len(atoms)))
        residual = x - coder.decode(coder.encode(x))
        error = residual.pow(2).sum(1) / energy.clamp_min(torch.finfo(energy.dtype).tiny)
    else:
        error = torch.ones(len(x))
    error[energy == 0] = 0  # a token at the mean has no direction to add
    candidates = [int(i) for i in error.argsort(descending=True) if error[i] > threshold]
    units = unit_rows(centred)
    taken: list[int] = []
    for i in candidates:
        if len(taken) == room:
            break
        if not taken or (units[taken] @ units[i]).abs().max() < DUPLICATE_COSINE:
            taken.append(i)
    return torch.tensor(taken, dtype=torch.long)
