"""The SAELens architecture `gemma_assets`: every dictionary of a run (k-means, its gain-shape
and top-m readings, leader clustering, a TopK SAE trained here) as one SAELens SAE class,
registered in SAELens' registry (`sae_lens.registry.register_sae_class`) when this module is
imported. None of these encodings is an affine map plus an activation, so SAELens' own
architectures cannot hold them. `core.interop` writes such SAEs; `core.sae` imports this module
so that `SAE.load_from_disk` can load them.

Encodings: `nearest_centroid` (k-means: the nearest centroid in the space k-means was fitted in,
coded with the centroid's distance from the mean), `gain_shape` and `gain_shape_positive`
(spherical k-means, leader clustering: the best direction and the token's projection on it),
`matching_pursuit` (top-m: greedy residual coding with m atoms), `topk` (SAELens' TopK,
rescaled to unit decoder rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from sae_lens import SAE, SAEConfig
from sae_lens.registry import SAE_CLASS_REGISTRY, register_sae_class
from sae_lens.saes.topk_sae import TopK
from torch import nn

from gemma_assets.core.dictionaries import GainShapeDictionary, MatchingPursuitDictionary
from gemma_assets.core.kmeans import assign

ARCHITECTURE = "gemma_assets"
ENCODINGS = ("nearest_centroid", "gain_shape", "gain_shape_positive", "matching_pursuit", "topk")


@dataclass
class DictionarySAEConfig(SAEConfig):
    encoding: str = "gain_shape"  # one of ENCODINGS
    m: int = 1  # matching_pursuit: atoms per token; topk: k
    d_space: int = 0  # nearest_centroid: dimension of the space the centroids live in

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.encoding not in ENCODINGS:
            raise ValueError(f"unknown encoding {self.encoding!r}; valid: {', '.join(ENCODINGS)}")

    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE


class DictionarySAE(SAE[DictionarySAEConfig]):
    """A project dictionary in SAELens form: unit decoder rows, gains in the codes, raw units."""

    def initialize_weights(self) -> None:
        super().initialize_weights()  # W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_dec [d_in]
        cfg, dtype, device = self.cfg, self.dtype, self.device
        self.gain = nn.Parameter(torch.ones(cfg.d_sae, dtype=dtype, device=device))
        if cfg.encoding == "nearest_centroid":
            self.to_space = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_space, dtype=dtype, device=device))
            self.centroids = nn.Parameter(torch.zeros(cfg.d_sae, cfg.d_space, dtype=dtype, device=device))
        if cfg.encoding == "topk":
            self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype, device=device))
            self.b_in = nn.Parameter(torch.zeros(cfg.d_in, dtype=dtype, device=device))

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations [..., d_sae] of raw activations [..., d_in]."""
        shape = x.shape
        x = self.hook_sae_input(x.reshape(-1, shape[-1]).to(self.W_dec))
        encoding, mean = self.cfg.encoding, self.b_dec
        if encoding == "topk":
            hidden = self.hook_sae_acts_pre((x - self.b_in) @ self.W_enc + self.b_enc)
            acts = TopK(self.cfg.m)(hidden) * self.gain
        elif encoding == "nearest_centroid":
            labels, _ = assign((x - mean) @ self.to_space, self.centroids)
            acts = torch.zeros(len(x), self.cfg.d_sae, dtype=x.dtype, device=x.device)
            acts[torch.arange(len(x)), labels] = self.gain[labels]
        elif encoding == "matching_pursuit":
            acts = MatchingPursuitDictionary(self.W_dec, mean, self.cfg.m).encode(x).dense(self.cfg.d_sae)
        else:
            signed = encoding == "gain_shape"
            acts = GainShapeDictionary(self.W_dec, mean, signed).encode(x).dense(self.cfg.d_sae)
        return self.hook_sae_acts_post(acts).reshape(*shape[:-1], self.cfg.d_sae)

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        return self.hook_sae_recons(feature_acts @ self.W_dec + self.b_dec)


if ARCHITECTURE not in SAE_CLASS_REGISTRY:
    register_sae_class(ARCHITECTURE, DictionarySAE, DictionarySAEConfig)
