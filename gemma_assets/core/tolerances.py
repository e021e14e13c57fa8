"""How closely a figure computed in one numeric environment agrees with the same figure computed in
another (another CPU's vector width, BLAS, thread count or a GPU), from the arithmetic behind it.

Used by `gemma-assets verify-report` and the reference tests; docs/reproducibility.md lists every
result with the tolerance that applies to it and what was measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8}


@dataclass(frozen=True)
class Tolerance:
    """|a - b| <= atol + rtol * |a|, and why that much."""

    rtol: float
    atol: float
    why: str

    def bound(self, reference: float) -> float:
        return self.atol + self.rtol * abs(reference)

    def allows(self, reference: float, value: float) -> bool:
        """Within the bound; two NaNs (a figure undefined in both) agree."""
        if math.isnan(reference) or math.isnan(value):
            return math.isnan(reference) and math.isnan(value)
        return abs(value - reference) <= self.bound(reference)


# A dictionary's reconstruction of stored activations (the same bits everywhere): each element of
# x_hat is a float32 sum of at most d_model products, whose rounding is ~sqrt(d) u relative
# (2.9e-6 at d 2304) and of varying sign across elements and kernels; the float64 sums of squared
# errors over thousands of tokens then move by less than that. A code decision (argmin, top-k,
# threshold) flips only where two scores lie within that rounding of each other: at k-means'
# argmin both choices give the same distance; a top-k or threshold flip changes one token's L0 by 1.
HELDOUT_FVU = Tolerance(1e-5, 0.0, "float32 reconstruction of the same stored activations, float64 sums")


def heldout_l0(heldout_tokens: int) -> Tolerance:
    """Mean active features per held-out token: CODE_FLIPS tokens whose code flips at a tie or a
    threshold move it by 1 / heldout_tokens each."""
    return Tolerance(1e-5, CODE_FLIPS / heldout_tokens, f"up to {CODE_FLIPS} codes flipped at a tie or threshold")


def cross_entropy(forward_dtype: torch.dtype) -> Tolerance:
    """The mean next-token CE over held-out windows from a forward pass in `forward_dtype`: logits
    from the same weights and tokens move by a few units of rounding relative across kernels; the
    log-softmax and the float64 sum over predictions add no more. 16 units of float32 rounding
    (1e-6 relative) for float32 and float64 passes; a bfloat16 pass rounds every block's output
    to 8 bits, 2 units of bfloat16 rounding (0.8%)."""
    if forward_dtype == torch.bfloat16:
        return Tolerance(2 * UNIT_ROUNDOFF[torch.bfloat16], 0.0, "bfloat16 forward pass")
    return Tolerance(
        16 * UNIT_ROUNDOFF[torch.float32], 0.0, f"{str(forward_dtype).removeprefix('torch.')} forward pass"
    )


# A code decision of a dictionary in the spliced pass reads the forward pass's own float32
# residual, which differs across kernels: where two codes tie within that rounding the other one
# may win, the reconstruction of that position changes, and with it the CE of the predictions
# after it (measured: 0.0136 nats on one of 1,488 predictions, a CPU report recomputed on an
# H200). Allowed: CODE_FLIPS such flips of up to FLIP_NATS each.
CODE_FLIPS = 3
FLIP_NATS = 0.1


def spliced_cross_entropy(forward_dtype: torch.dtype, predictions: int) -> Tolerance:
    """A dictionary's spliced CE: the forward pass's rounding plus CODE_FLIPS flipped codes."""
    forward = cross_entropy(forward_dtype)
    return Tolerance(
        forward.rtol, CODE_FLIPS * FLIP_NATS / predictions, f"{forward.why}, up to {CODE_FLIPS} code flips"
    )
