"""SAE dictionaries through SAELens: trained here on stored activations, or pretrained (Gemma Scope).

Raw residuals have norms in the thousands, so trained SAEs see activations multiplied by
one scalar `scale = sqrt(d_in) / mean ||x||` (SAELens' "expected average" convention);
`SaeDictionary.decode` undoes it, so every metric is computed in raw units.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from gemma_assets.core import progress
from gemma_assets.core.batches import Batches
from gemma_assets.core.codes import Codes, unit_rows
from gemma_assets.core.config import ConfigError, SaeSpec
from gemma_assets.core.model import ModelAccessError, offline_hint

if TYPE_CHECKING:
    from sae_lens import SAE, SAETrainer, TrainingSAE

SCALE_FILE = "activation_scale.json"
DEAD_AFTER_TOKENS = 16384


@dataclass
class SaeDictionary:
    """An SAELens SAE plus the input scale it was trained at."""

    sae: SAE
    scale: float

    @property
    def n_features(self) -> int:
        return self.sae.cfg.d_sae

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> Codes:
        """Latent activations (at the training scale) as sparse codes."""
        return Codes.from_dense(self.sae.encode(x.to(self.sae.W_enc) * self.scale))

    @torch.no_grad()
    def decode(self, codes: Codes) -> torch.Tensor:
        return self.sae.decode(codes.dense(self.n_features)) / self.scale

    def directions(self) -> torch.Tensor:
        return unit_rows(self.sae.W_dec.detach().float())

    @property
    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.sae.parameters())

    def save(self, path: Path) -> None:
        # training SAEs save as their inference class, so load_from_disk gives a plain SAE
        getattr(self.sae, "save_inference_model", self.sae.save_model)(str(path))
        (path / SCALE_FILE).write_text(json.dumps({"scale": self.scale}))


def load_dictionary(path: Path, device: str = "cpu") -> SaeDictionary:
    from sae_lens import SAE

    import gemma_assets.core.sae_architecture  # noqa: F401 - an imported SAE may be an exported project dictionary

    if not (path / SCALE_FILE).exists():
        raise FileNotFoundError(f"no SAE at {path}: materialise sae_dictionary first")
    sae = SAE.load_from_disk(str(path), device=device)
    return SaeDictionary(sae.eval(), json.loads((path / SCALE_FILE).read_text())["scale"])


def load_pretrained(spec: SaeSpec, device: str) -> SaeDictionary:
    """A pretrained SAE through SAELens: a release + id (Gemma Scope; needs the hub or a filled
    HF cache), or a folder on disk (what `gemma-assets export` writes, or SAELens' save_model)."""
    from sae_lens import SAE

    if spec.path:
        import gemma_assets.core.sae_architecture  # noqa: F401 - registers the exported dictionaries' architecture

        with progress.task(f"loading {spec.name} from {spec.path}", 1, "SAEs"):
            return SaeDictionary(SAE.load_from_disk(spec.path, device=device).eval(), 1.0)
    try:
        # one call: its start and wall time are what can be reported (the hub client draws its
        # own bar while it downloads)
        with progress.task(f"loading {spec.name} ({spec.release}/{spec.sae_id})", 1, "SAEs"):
            sae = SAE.from_pretrained(spec.release, spec.sae_id, device=device)
    except Exception as error:
        raise ModelAccessError(
            f"cannot load SAE {spec.release}/{spec.sae_id} ({type(error).__name__}: {error}): {offline_hint()}"
        ) from error
    return SaeDictionary(sae.eval(), 1.0)  # Gemma Scope is trained on raw activations


def activation_scale(mean_norm: float, d_in: int) -> float:
    return math.sqrt(d_in) / mean_norm


def train_topk(
    spec: SaeSpec,
    batches: Batches,
    d_in: int,
    n_tokens: int,
    scale: float,
    epochs: int,
    mean: torch.Tensor,
    device: str = "cpu",
    seed: int = 0,
    batch_size: int = 1024,
) -> tuple[SaeDictionary, dict]:
    """Train a TopK SAE with SAELens' SAETrainer on `epochs` passes over `batches()`.

    `batches` yields raw activation tensors [n, d_in]; they are scaled and re-cut into
    training batches of `batch_size`. Returns the dictionary and training facts.
    """
    from sae_lens import LoggingConfig, SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig

    torch.manual_seed(seed)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=spec.width, k=spec.k, device=device))
    with torch.no_grad():
        # b_dec starts at the data mean: latents then compete on the centred token, instead of
        # one latent learning the shared mean and winning every token (fatal at small k)
        sae.b_dec.copy_(mean.to(sae.b_dec) * scale)
    total = epochs * n_tokens
    config = SAETrainerConfig(
        n_checkpoints=0,
        checkpoint_path=None,
        save_final_checkpoint=False,
        total_training_samples=total,
        device=device,
        autocast=False,
        # small dictionaries on small data: a 10x larger rate, annealed to 3e-4 by a cosine, converges in few steps
        lr=3e-4 * 10,
        lr_end=3e-4,
        lr_scheduler_name="cosineannealing",
        lr_warm_up_steps=0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        lr_decay_steps=0,
        n_restart_cycles=1,
        train_batch_size_samples=batch_size,
        # steps without firing before a latent counts as dead and gets TopK's auxiliary loss:
        # ~16k tokens, so the aux loss acts within short runs (SAELens' default, 1000 steps,
        # exceeds a whole demo run and left most latents dead)
        dead_feature_window=max(1, DEAD_AFTER_TOKENS // batch_size),
        feature_sampling_window=2000,
        logger=LoggingConfig(log_to_wandb=False, eval_every_n_wandb_logs=2**31 - 1),
        n_batches_for_norm_estimate=100,
    )

    def provider() -> Iterator[torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        while True:  # SAETrainer stops by itself after total_training_samples
            pending = torch.cat([x for x in batches()]) * scale
            pending = pending[torch.randperm(len(pending), generator=generator)]
            for start in range(0, len(pending) - batch_size + 1, batch_size):
                yield pending[start : start + batch_size].to(device)

    started = time.perf_counter()
    logging.getLogger("sae_lens").setLevel(logging.WARNING)
    trainer = SAETrainer(cfg=config, sae=sae, data_provider=provider(), save_checkpoint_fn=lambda *_: None)
    trained = _fit(trainer, progress.task(f"training {spec.name}", total, "tokens"))
    seconds = time.perf_counter() - started
    return SaeDictionary(trained.eval(), scale), {"fit_seconds": seconds, "train_tokens": total}


def _fit(trainer: SAETrainer, training: progress.Task) -> TrainingSAE:
    """`trainer.fit()` step for step through its public per-step seam (as SAELens' MultiSAETrainer
    drives it), each step reported to `training` (loss and L0 only when a report is due) instead
    of SAELens' own tqdm bar. No activation normalisation, checkpoint or wandb log is configured,
    so fit's steps for those have nothing to do."""
    if trainer.sae.cfg.normalize_activations != "none":  # fit() would estimate and fold a scale first
        raise ValueError(f"normalize_activations={trainer.sae.cfg.normalize_activations!r} is not driven here")
    trainer.sae.to(trainer.cfg.device)
    with training:
        while trainer.n_training_samples < trainer.cfg.total_training_samples:
            trainer.maybe_reset_sparsity()
            batch = next(trainer.data_provider)
            output = trainer.step(batch)
            trainer.n_training_steps += 1
            if training.due:
                l0 = float(output.feature_acts.bool().float().sum(-1).mean())
                training.advance(len(batch), loss=float(output.loss), l0=l0)
            else:
                training.advance(len(batch))
    trainer.set_final_sae_metadata()
    return trainer.sae


def pretrained_problems(specs: Sequence[SaeSpec], d_model: int, hook_name: str) -> list[str]:
    """What is wrong with the pretrained SAEs a run names: unknown to SAELens' directory, or
    trained on another width or hook than the run's model and layer. Reads only configs (Gemma
    Scope's come from the id itself; others from the hub or the Hugging Face cache)."""
    from sae_lens.loading.pretrained_sae_loaders import load_sae_config_from_huggingface
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    directory = get_pretrained_saes_directory()
    problems = []
    for spec in specs:
        where = f"saes.pretrained {spec.name}"
        if spec.path:
            problems += _hook_problems(where, *saved_sae_facts(Path(spec.path)), d_model, hook_name)
            continue
        if spec.release not in directory:
            close = difflib.get_close_matches(spec.release, list(directory), n=3)
            problems.append(
                f"{where}: release {spec.release!r} is not in SAELens' directory"
                + (f"; close releases: {', '.join(close)}" if close else "")
                + " -> name a release from sae_lens' pretrained_saes.yaml"
            )
            continue
        ids = list(directory[spec.release].saes_map)
        if spec.sae_id not in ids:
            close = difflib.get_close_matches(spec.sae_id, ids, n=3, cutoff=0.6)
            problems.append(
                f"{where}: sae_id {spec.sae_id!r} is not in release {spec.release}"
                + (f"; close ids: {', '.join(close)}" if close else "")
                + " -> use an id the release lists"
            )
            continue
        try:
            config = load_sae_config_from_huggingface(spec.release, spec.sae_id)
        except Exception as error:
            problems.append(f"{where}: cannot read its config ({type(error).__name__}: {error}) -> {offline_hint()}")
            continue
        problems += _hook_problems(where, config.get("d_in"), _hook_of(config), d_model, hook_name)
    return problems


def _hook_of(config: dict) -> str | None:
    return (config.get("metadata") or {}).get("hook_name") or config.get("hook_name")


def saved_sae_facts(folder: Path) -> tuple[int | None, str | None]:
    """(d_in, hook name) an SAELens SAE folder was trained on, from its cfg.json alone."""
    try:
        config = json.loads((folder / "cfg.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(
            f"cannot read the SAE config {folder / 'cfg.json'} ({error}) -> point path at an SAE folder"
        ) from None
    return config.get("d_in"), _hook_of(config)


def _hook_problems(where: str, d_in: int | None, hook: str | None, d_model: int, hook_name: str) -> list[str]:
    problems = []
    if d_in != d_model:
        problems.append(
            f"{where}: the SAE reads d_in={d_in} but the run's model has d_model={d_model} "
            "-> choose an SAE trained on this model"
        )
    if hook and hook != hook_name:
        problems.append(
            f"{where}: the SAE reads hook {hook} but the run stores {hook_name} "
            "-> choose an SAE of this layer, or set model.layer to the SAE's"
        )
    return problems
