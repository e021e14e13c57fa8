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
- `matching_pursuit` (top-m over k-means directions, ITDA): greedy residual coding with m atoms;
- `topk` (TopK SAEs trained here): SAELens' TopK, rescaled so that W_dec's rows are unit. (Every
  SAE trained here already is a plain SAELens SAE folder, saes/<name>/; this form adds unit rows.)

They are one SAELens architecture, `gemma_assets` (`core.sae_architecture`, registered when
imported; this module and `core.sae` import it). In a fresh process,
`import gemma_assets.core.interop` before `SAE.load_from_disk`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from sae_lens.saes.sae import SAEMetadata

from gemma_assets.core.codes import unit_rows
from gemma_assets.core.config import ConfigError
from gemma_assets.core.dictionaries import GainShapeDictionary, MatchingPursuitDictionary
from gemma_assets.core.files import atomic_dir
from gemma_assets.core.kmeans import KMeansDictionary
from gemma_assets.core.sae import SaeDictionary
from gemma_assets.core.sae_architecture import DictionarySAE, DictionarySAEConfig


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
    ITDA, a TopK SAE trained here); `metadata` goes into cfg.json."""
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
        sae = dictionary.sae
        norms = sae.W_dec.detach().float().norm(dim=1)
        b_in = sae.b_dec.detach().float() if sae.cfg.apply_b_dec_to_input else torch.zeros(sae.cfg.d_in)
        # an SAE that ranks by decoder norm gets that norm folded into its encoder, its codes then are unit-row
        by_norm = norms if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False) else torch.ones_like(norms)
        return _build(
            "topk",
            unit_rows(sae.W_dec.detach().float()),
            sae.b_dec.detach().float(),
            metadata,
            m=sae.cfg.k,
            gain=norms / by_norm,
            W_enc=sae.W_enc.detach().float() * by_norm,
            b_enc=sae.b_enc.detach().float() * by_norm,
            b_in=b_in,
        )
    raise ConfigError(
        f"{type(dictionary).__name__} cannot be exported: k-means, gain-shape, top-m, leader clustering, ITDA and "
        "TopK SAEs trained here can; every other SAE already is an SAELens SAE (a pretrained one: use its release "
        "and id; one trained here: its folder saes/<name>/ under the run)"
    )


def export(dictionary: Any, folder: Path, metadata: dict) -> Path:
    """Write `dictionary` as an SAELens SAE folder (cfg.json + sae_weights.safetensors),
    atomically: `SAE.load_from_disk(folder)` loads it once this module is imported."""
    sae = to_saelens(dictionary, metadata)
    with atomic_dir(folder) as staging:
        sae.save_model(staging)
    return folder
