"""The tiny run made quick, for end-to-end tests of what is around the fits (locks, reruns,
faults, progress, storage), not of their figures: one k, and one small TopK SAE trained for two
epochs. The shipped tiny profile's 14 SAEs are half of a whole tiny run's time."""

from __future__ import annotations

QUICK_OVERRIDES = (
    "clustering.ks=[16]",
    "saes.train=[{architecture: topk, widths: [16], ks: [1]}]",
    "saes.trainer.epochs=2",
)


def quick_flags(*overrides: str) -> list[str]:
    """`--set` flags of the quick overrides, then of `overrides` (the last value of a key wins)."""
    return [flag for override in (*QUICK_OVERRIDES, *overrides) for flag in ("--set", override)]
