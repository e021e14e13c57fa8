"""The one interface every dictionary (k-means variants, leader clustering, SAEs) is evaluated through.

A dictionary encodes raw activations into sparse `Codes` and decodes codes back into raw
units; metrics, the spliced cross-entropy and feature interpretation see nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class Codes:
    """At most m features per token: which, with what activation, and whether active.

    For clusters the activation is the cosine between the centred token and its centroid's
    centred direction (how typical the member is); for gain-shape codes and SAEs it is the
    coefficient the decoder multiplies its direction by."""

    indices: torch.Tensor  # [n, m] long
    values: torch.Tensor  # [n, m] float
    active: torch.Tensor  # [n, m] bool

    @classmethod
    def one_hot(cls, labels: torch.Tensor, values: torch.Tensor) -> Codes:
        return cls(labels[:, None], values[:, None], torch.ones(len(labels), 1, dtype=torch.bool))

    @classmethod
    def from_dense(cls, dense: torch.Tensor) -> Codes:
        """Codes of a dense activation matrix [n, F]; m is the largest L0 in the batch."""
        m = max(1, int((dense != 0).sum(1).max())) if len(dense) else 1
        _, indices = dense.abs().topk(m, dim=1)
        values = dense.gather(1, indices)
        return cls(indices, values, values != 0)

    def l0(self) -> torch.Tensor:
        return self.active.sum(1)

    def dense(self, n_features: int) -> torch.Tensor:
        out = torch.zeros(len(self.indices), n_features, dtype=self.values.dtype, device=self.values.device)
        return out.scatter_add_(1, self.indices, self.values * self.active)

    def to(self, device: str | torch.device) -> Codes:
        return Codes(self.indices.to(device), self.values.to(device), self.active.to(device))


class Dictionary(Protocol):
    @property
    def n_features(self) -> int:
        """How many features (clusters, atoms, latents) the dictionary has."""

    def encode(self, x: torch.Tensor) -> Codes:
        """Codes of raw activations x [n, d]."""

    def decode(self, codes: Codes) -> torch.Tensor:
        """The reconstruction [n, d] in raw units."""

    def directions(self) -> torch.Tensor:
        """[n_features, d] unit directions in raw space, relative to the data mean (for
        alignment between dictionaries and logit effects)."""


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def centred_units(x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Centred unit directions [n, d] of raw activations x [n, d]."""
    return unit_rows(x.float() - mean)


def cosine_to(x: torch.Tensor, directions: torch.Tensor, mean: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cosine [n] between each centred token and the unit direction of its label."""
    return (centred_units(x, mean) * directions[labels]).sum(1)
