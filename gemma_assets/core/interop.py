"""Every dictionary of a run as an SAELens SAE, for SAELens, SAEBench and SAEDashboard.

SAEBench's custom-dictionary contract is `encode`, `decode`, `forward` and `W_dec`
[d_sae, d_in] with unit-norm rows. An exported dictionary decodes as every SAE does,
`x_hat = f @ W_dec + b_dec`, with W_dec's rows the unit directions and the code carrying the
gain; `encode` reproduces the project's choice of features:

- `nearest_centroid` (k-means): the nearest centroid in the space k-means was fitted in (the
  preprocessing is stored), coded with the centroid's distance from the mean, so the
  reconstruction is the centroid itself;
- `gain_shape` (spherical k-means) and `gain_shape_positive` (leader clustering: the nearest
  exemplar on the sphere): the best direction and the token's projection on it;
- `matching_pursuit` (top-m over k-means directions): greedy residual coding with m atoms;
- `topk` (TopK SAEs trained here): SAELens' TopK on the training scale's pre-activations,
  rescaled so that W_dec's rows are unit and everything is in raw units.

None of these is an affine map plus an activation, so SAELens' own architectures cannot hold
them: they are one architecture, `gemma_assets`, registered through SAELens' registry
(`sae_lens.registry.register_sae_class`) when this module is imported. In a fresh process,
`import gemma_assets.core.interop` before `SAE.load_from_disk`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE, SAEConfig
from sae_lens.registry import SAE_CLASS_REGISTRY, register_sae_class
from sae_lens.saes.sae import SAEMetadata
from sae_lens.saes.topk_sae import TopK
from torch import nn

from gemma_assets.core.codes import unit_rows
from gemma_assets.core.config import ConfigError
from gemma_assets.core.dictionaries import GainShapeDictionary, MatchingPursuitDictionary
from gemma_assets.core.files import atomic_dir
from gemma_assets.core.kmeans import KMeansDictionary, assign
from gemma_assets.core.sae import SaeDictionary

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


def _build(encoding: str, w_dec: torch.Tensor, b_dec: torch.Tensor, metadata: dict, **extra: Any) -> DictionarySAE:
    """An exported SAE from unit directions [F, d], the mean [d] and the encoding's parameters."""
    d_sae, d_in = w_dec.shape
    options = {key: extra.pop(key) for key in ("m", "d_space") if key in extra}
    cfg = DictionarySAEConfig(
        d_in=d_in,
        d_sae=d_sae,
        encoding=encoding,
        apply_b_dec_to_input=False,
        metadata=SAEMetadata(**metadata),
        **options,
    )
    sae = DictionarySAE(cfg)
    with torch.no_grad():
        sae.W_dec.copy_(w_dec)
        sae.W_enc.copy_(w_dec.T)  # projections onto the directions (what gain-shape scores are)
        sae.b_dec.copy_(b_dec)
        for name, value in extra.items():
            getattr(sae, name).copy_(value)
    return sae.eval()


def to_saelens(dictionary: Any, metadata: dict) -> DictionarySAE:
    """The SAELens form of a project dictionary (k-means and its readings, leader clustering,
    a TopK SAE trained here); `metadata` goes into cfg.json."""
    if isinstance(dictionary, KMeansDictionary):
        pre = dictionary.preprocessor
        offsets = pre.inverse(dictionary.centroids.float()) - pre.shift  # centroids relative to the mean
        to_space = pre.forward_matrix if pre.forward_matrix is not None else torch.eye(len(pre.shift))
        return _build(
            "nearest_centroid",
            unit_rows(offsets),
            pre.shift,
            metadata,
            gain=offsets.norm(dim=1),
            to_space=to_space,
            centroids=dictionary.centroids.float(),
            d_space=to_space.shape[1],
        )
    if isinstance(dictionary, MatchingPursuitDictionary):
        return _build("matching_pursuit", dictionary.atoms, dictionary.mean, metadata, m=dictionary.m)
    if isinstance(dictionary, GainShapeDictionary):
        encoding = "gain_shape" if dictionary.signed else "gain_shape_positive"
        return _build(encoding, dictionary.atoms, dictionary.mean, metadata)
    if isinstance(dictionary, SaeDictionary) and dictionary.sae.cfg.architecture() == "topk":
        sae, scale = dictionary.sae, dictionary.scale
        norms = sae.W_dec.detach().float().norm(dim=1)
        b_in = sae.b_dec.detach().float() / scale if sae.cfg.apply_b_dec_to_input else torch.zeros(sae.cfg.d_in)
        # pre-activations of x at the training scale: (x * s - b) @ W = (x - b / s) @ (s W); an SAE
        # that ranks by decoder norm gets that norm folded into its encoder, its codes then are unit-row
        by_norm = norms if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False) else torch.ones_like(norms)
        return _build(
            "topk",
            unit_rows(sae.W_dec.detach().float()),
            sae.b_dec.detach().float() / scale,
            metadata,
            m=sae.cfg.k,
            gain=norms / by_norm / scale,
            W_enc=sae.W_enc.detach().float() * scale * by_norm,
            b_enc=sae.b_enc.detach().float() * by_norm,
            b_in=b_in,
        )
    raise ConfigError(
        f"{type(dictionary).__name__} cannot be exported: k-means, gain-shape, top-m, leader clustering and "
        "TopK SAEs trained here can; a pretrained SAE already is an SAELens SAE (use its release and id)"
    )


def export(dictionary: Any, folder: Path, metadata: dict) -> Path:
    """Write `dictionary` as an SAELens SAE folder (cfg.json + sae_weights.safetensors),
    atomically: `SAE.load_from_disk(folder)` loads it once this module is imported."""
    sae = to_saelens(dictionary, metadata)
    with atomic_dir(folder) as staging:
        sae.save_model(staging)
    return folder
