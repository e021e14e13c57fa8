"""SAE dictionaries through SAELens: trained here on stored activations, every SAE of a run in
one streamed pass, or pretrained (Gemma Scope).

Raw residuals have norms in the thousands, so trained SAEs see activations multiplied by one
scalar `scale = sqrt(d_in) / mean ||x||` (SAELens' "expected average" convention). After training
the scale is folded into the weights (SAELens' `fold_activation_norm_scaling_factor`: W_enc * s,
W_dec / s, b_dec / s), so every SAE saved here is a plain SAELens SAE on raw activations.

An SAE on whitened inputs sees z = (x - mean) @ M instead, with M the run's ZCA whitening (already
at norm ~sqrt(d_in)); SAELens' `fold_activation_whitening` folds M and its inverse into the weights
the same way. A random-decoder SAE (the floor of Korznikov et al. 2026) is a TopK SAE whose decoder
is a frozen random unit dictionary: only its encoder and biases learn.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gemma_assets.core import progress
from gemma_assets.core.batches import Batches
from gemma_assets.core.codes import Codes, unit_rows
from gemma_assets.core.config import ConfigError, SaeSpec, TrainerSpec
from gemma_assets.core.model import ModelAccessError, hub_offline_set, offline_hint, offline_if_hub_unreachable
from gemma_assets.core.whitening import Whitening

if TYPE_CHECKING:
    from sae_lens import SAE, SAETrainer, TrainingSAE
    from sae_lens.config import SAETrainerConfig


@dataclass
class SaeDictionary:
    """An SAELens SAE on raw activations."""

    sae: SAE

    @property
    def n_features(self) -> int:
        return self.sae.cfg.d_sae

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> Codes:
        return Codes.from_dense(self.sae.encode(x.to(self.sae.W_enc)))

    @torch.no_grad()
    def decode(self, codes: Codes) -> torch.Tensor:
        return self.sae.decode(codes.dense(self.n_features))

    def directions(self) -> torch.Tensor:
        return unit_rows(self.sae.W_dec.detach().float())

    @property
    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.sae.parameters())

    def save(self, path: Path) -> None:
        # training SAEs save as their inference class (BatchTopK and Matryoshka as JumpReLU), so
        # plain SAE.load_from_disk loads them
        getattr(self.sae, "save_inference_model", self.sae.save_model)(str(path))


def load_dictionary(path: Path, device: str = "cpu") -> SaeDictionary:
    from sae_lens import SAE

    import gemma_assets.core.sae_architecture  # noqa: F401 - an imported SAE may be an exported project dictionary

    if not (path / "cfg.json").exists():
        raise FileNotFoundError(f"no SAE at {path}: materialise sae_dictionary first")
    return SaeDictionary(SAE.load_from_disk(str(path), device=device).eval())


class SaeUnavailable(ModelAccessError):
    """A pretrained SAE that neither the Hugging Face cache nor the hub can give; `reason` says so
    in a few words (an optional SAE is skipped with it)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def load_pretrained(spec: SaeSpec, device: str) -> SaeDictionary:
    """A pretrained SAE through SAELens: a release + id (Gemma Scope; needs the hub or a filled
    HF cache), or a folder on disk (what `gemma-assets export` writes, or SAELens' save_model).
    Raises SaeUnavailable when the cache has no copy and the hub cannot be reached."""
    from sae_lens import SAE

    from gemma_assets.core.sae_lens_offline import hub_cache_shapes

    if spec.path:
        import gemma_assets.core.sae_architecture  # noqa: F401 - registers the exported dictionaries' architecture

        with progress.task(f"loading {spec.name} from {spec.path}", 1, "SAEs"):
            return SaeDictionary(SAE.load_from_disk(spec.path, device=device).eval())
    offline_if_hub_unreachable()
    try:
        # one call: its start and wall time are what can be reported (the hub client draws its
        # own bar while it downloads)
        with progress.task(f"loading {spec.name} ({spec.release}/{spec.sae_id})", 1, "SAEs"), hub_cache_shapes():
            sae = SAE.from_pretrained(spec.release, spec.sae_id, device=device)
    except Exception as error:
        message = f"cannot load SAE {spec.release}/{spec.sae_id} ({type(error).__name__}: {error}): {offline_hint()}"
        if hub_unreachable(error):
            raise SaeUnavailable(message, unavailable_reason()) from error
        raise ModelAccessError(message) from error
    return SaeDictionary(sae.eval())  # Gemma Scope is trained on raw activations


def unavailable_reason() -> str:
    """Why a hub file that the cache lacks cannot be had, in a few words."""
    if hub_offline_set():
        return "not in the Hugging Face cache and the hub is unreachable (HF_HUB_OFFLINE is set)"
    return "not in the Hugging Face cache and the hub is unreachable"


def hub_unreachable(error: BaseException) -> bool:
    """Whether `error` (or what caused it) is the hub client finding neither a cached copy nor the
    hub: offline mode, a missing cache entry, a failed connection or a timeout."""
    import httpx
    import requests
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    unreachable = (
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        httpx.TransportError,
        requests.ConnectionError,
        requests.Timeout,
    )
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, unreachable):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def activation_scale(mean_norm: float, d_in: int) -> float:
    return math.sqrt(d_in) / mean_norm


class ShuffledStream:
    """Training batches drawn from a re-iterable stream of raw chunks, pass after pass, mixed in a
    bounded shuffle buffer (the idea of SAELens' `mixing_buffer`): once the buffer holds
    `buffer_tokens` rows it is permuted, all but half of it is served, and the kept half mixes
    with the chunks that come next. At most `buffer_tokens` plus one chunk are held (twice that
    while they are permuted), however large the split; the order is fixed by `seed`."""

    def __init__(
        self,
        batches: Batches,
        batch_size: int,
        buffer_tokens: int,
        scale: float = 1.0,
        seed: int = 0,
        device: str = "cpu",
    ) -> None:
        if buffer_tokens < 2 * batch_size:
            raise ValueError(f"a shuffle buffer of {buffer_tokens} tokens cannot serve batches of {batch_size}")
        self.batches, self.batch_size, self.buffer_tokens = batches, batch_size, buffer_tokens
        self.scale, self.seed, self.device = scale, seed, device
        self.peak_rows = 0  # the most rows the buffer held at once (what bounds its memory)

    def __iter__(self) -> Iterator[torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed)
        held: list[torch.Tensor] = []
        rows = 0
        while True:  # the trainer stops after its training tokens
            chunks = 0
            for chunk in self.batches():
                chunks += 1
                held.append(chunk)
                rows += len(chunk)
                self.peak_rows = max(self.peak_rows, rows)
                if rows < self.buffer_tokens:
                    continue
                buffer = torch.cat(held)
                held.clear()  # the chunks live on in the buffer: at most two copies while it is permuted
                buffer = buffer[torch.randperm(rows, generator=generator)]
                served = (rows - self.buffer_tokens // 2) // self.batch_size * self.batch_size
                for start in range(0, served, self.batch_size):
                    yield (buffer[start : start + self.batch_size].float() * self.scale).to(self.device)
                held, rows = [buffer[served:]], rows - served
            if not chunks:
                raise ValueError("the training stream yielded no activations")


@dataclass
class TrainedSae:
    """One SAE of a training pass: its dictionary (on raw activations) and its own step time."""

    spec: SaeSpec
    dictionary: SaeDictionary
    step_seconds: float


@dataclass
class TrainingPass:
    """What one streamed pass trained, and what the pass cost as a whole."""

    saes: list[TrainedSae]
    train_tokens: int
    steps: int
    seconds: float
    buffer_peak_rows: int
    facts: dict[str, Any] = field(default_factory=dict)


def training_sae(spec: SaeSpec, d_in: int, trainer: TrainerSpec, device: str) -> TrainingSAE:
    """The SAELens training SAE of a spec (initialised from torch's current seed)."""
    import sae_lens

    common: dict[str, Any] = {"d_in": d_in, "d_sae": spec.width, "device": device}
    topk = {"k": spec.k, "aux_loss_coefficient": trainer.aux_loss_coefficient}
    if spec.architecture == "topk":
        return sae_lens.TopKTrainingSAE(sae_lens.TopKTrainingSAEConfig(**common, **topk))
    if spec.architecture == "random_decoder":
        return with_frozen_random_decoder(sae_lens.TopKTrainingSAE(sae_lens.TopKTrainingSAEConfig(**common, **topk)))
    if spec.architecture == "batchtopk":
        return sae_lens.BatchTopKTrainingSAE(sae_lens.BatchTopKTrainingSAEConfig(**common, **topk))
    if spec.architecture == "matryoshka":
        config = sae_lens.MatryoshkaBatchTopKTrainingSAEConfig(
            **common, **topk, matryoshka_widths=[*spec.levels, spec.width]
        )
        return sae_lens.MatryoshkaBatchTopKTrainingSAE(config)
    if spec.architecture == "jumprelu":
        config = sae_lens.JumpReLUTrainingSAEConfig(
            **common,
            jumprelu_sparsity_loss_mode="quadratic",  # Gemma Scope 2: a penalty around the target L0
            target_l0=spec.target_l0,
            l0_coefficient=trainer.l0_coefficient,
            jumprelu_bandwidth=trainer.jumprelu_bandwidth,
        )
        return sae_lens.JumpReLUTrainingSAE(config)
    if spec.architecture == "standard":
        return sae_lens.StandardTrainingSAE(
            sae_lens.StandardTrainingSAEConfig(**common, l1_coefficient=spec.l1_coefficient)
        )
    raise ValueError(f"{spec.name}: architecture {spec.architecture!r} is not trained here")


def with_frozen_random_decoder(sae: TrainingSAE) -> TrainingSAE:
    """The SAE with a decoder of random unit rows (Gaussian directions, from torch's current seed)
    that training leaves alone, and its encoder initialised as the decoder's transpose (SAELens'
    own tied initialisation)."""
    with torch.no_grad():
        sae.W_dec.copy_(unit_rows(torch.randn(sae.W_dec.shape, device=sae.W_dec.device)))
        sae.W_enc.copy_(sae.W_dec.T)
    sae.W_dec.requires_grad_(False)  # Adam skips a parameter that gets no gradient
    return sae


def trainer_config(trainer: TrainerSpec, total_tokens: int, device: str) -> SAETrainerConfig:
    """SAELens' SAETrainerConfig from the run's trainer settings: no checkpoint, no wandb, no
    activation normalisation (the stream is scaled once for all SAEs)."""
    from sae_lens import LoggingConfig
    from sae_lens.config import SAETrainerConfig

    dead_window = max(1, trainer.dead_after_tokens // trainer.batch_size)
    return SAETrainerConfig(
        total_training_samples=total_tokens,
        train_batch_size_samples=trainer.batch_size,
        lr=trainer.lr,
        lr_end=trainer.lr_end,
        lr_scheduler_name=trainer.lr_scheduler,
        lr_warm_up_steps=trainer.lr_warm_up_steps,
        adam_beta1=trainer.adam_beta1,
        adam_beta2=trainer.adam_beta2,
        device=device,
        dead_feature_window=dead_window,
        # the window of SAELens' sparsity log, which ends up as the saved SAE's metadata L0: the same
        # tokens as the dead-latent window
        feature_sampling_window=dead_window,
        logger=LoggingConfig(log_to_wandb=False),
    )


def train_saes(
    specs: Sequence[SaeSpec],
    batches: Batches,
    d_in: int,
    n_tokens: int,
    mean: torch.Tensor,
    mean_norm: float,
    trainer: TrainerSpec,
    device: str = "cpu",
    whitening: Whitening | None = None,
) -> TrainingPass:
    """Train every spec in lockstep with one SAELens SAETrainer each, on the same batches: each
    batch is read once from `batches` (raw activation chunks [n, d_in], re-iterated once per epoch)
    and mixed in a bounded shuffle buffer, so memory does not grow with the split. Training tokens
    are `trainer.epochs` x `n_tokens`. Seed replicas differ in their initialisation only: every SAE
    sees one order of the tokens. Specs with `whitened` see the batch ZCA-whitened by `whitening`.
    The returned dictionaries read and write raw activations."""
    from sae_lens import SAETrainer

    if whitening is None and any(spec.whitened for spec in specs):
        raise ValueError("SAEs on whitened inputs need the run's whitening")
    scale = activation_scale(mean_norm, d_in)
    total = int(trainer.epochs * n_tokens) // trainer.batch_size * trainer.batch_size
    if total < trainer.batch_size:
        raise ConfigError(
            f"saes.trainer.epochs {trainer.epochs:g} of {n_tokens} train tokens is less than one batch of "
            f"{trainer.batch_size} -> raise saes.trainer.epochs or lower saes.trainer.batch_size"
        )
    config = trainer_config(trainer, total, device)
    logging.getLogger("sae_lens").setLevel(logging.WARNING)
    trainers = []
    for spec in specs:
        torch.manual_seed(spec.seed)
        sae = training_sae(spec, d_in, trainer, device)
        if not spec.whitened:  # whitened inputs are centred already: b_dec starts at their mean, 0
            with torch.no_grad():
                # b_dec starts at the data mean: latents then compete on the centred token, instead
                # of one latent learning the shared mean and winning every token (fatal at small k)
                sae.b_dec.copy_(mean.to(sae.b_dec) * scale)
        trainers.append(SAETrainer(cfg=config, sae=sae, data_provider=iter(()), save_checkpoint_fn=None))
    # a buffer larger than the split would read it several times over before the first step
    buffer_tokens = max(2 * trainer.batch_size, min(trainer.shuffle_buffer_tokens, n_tokens))
    stream = ShuffledStream(batches, trainer.batch_size, buffer_tokens, scale, device=device)
    started = time.perf_counter()
    whiten: Callable[[torch.Tensor], torch.Tensor] | None = None
    if whitening is not None and any(spec.whitened for spec in specs):
        shift = torch.from_numpy(whitening.mean).float().to(device)
        zca = torch.from_numpy(whitening.zca_matrix()).float().to(device)

        def whiten_scaled(batch: torch.Tensor) -> torch.Tensor:  # the stream holds scaled raw activations
            return (batch / scale - shift) @ zca

        whiten = whiten_scaled

    with torch_threads(trainer.threads):
        step_seconds = _fit_together(
            trainers,
            [spec.whitened for spec in specs],
            iter(stream),
            whiten,
            progress.task(_pass_name(specs), total, "tokens"),
        )
    seconds = time.perf_counter() - started
    trained = []
    for spec, fitted, own_seconds in zip(specs, trainers, step_seconds, strict=True):
        if spec.whitened:
            assert whitening is not None
            fitted.sae.fold_activation_whitening(
                torch.from_numpy(whitening.mean),
                torch.from_numpy(whitening.zca_matrix()),
                torch.from_numpy(whitening.zca_inverse_matrix()),
            )
        else:
            fitted.sae.fold_activation_norm_scaling_factor(scale)
        trained.append(TrainedSae(spec, SaeDictionary(fitted.sae.eval()), own_seconds))
    return TrainingPass(trained, total, total // trainer.batch_size, seconds, stream.peak_rows, {"scale": scale})


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's CPU thread count set to `threads` (0: left as is) for the block, then restored."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _pass_name(specs: Sequence[SaeSpec]) -> str:
    return f"training {specs[0].name}" if len(specs) == 1 else f"training {len(specs)} SAEs in one pass"


# A batch that has run this long reports after each SAE's step, not only at its end: a step of a
# 16k-wide SAE at d 2304 is half a minute of a two-core CPU. Faster batches report once, with
# the loss and L0 figures, so a line never lacks them for an update between two SAEs.
SLOW_BATCH_S = 5.0


def _fit_together(
    trainers: list[SAETrainer],
    whitened: list[bool],
    batches: Iterator[torch.Tensor],
    whiten: Callable[[torch.Tensor], torch.Tensor] | None,
    training: progress.Task,
) -> list[float]:
    """Each trainer's `fit()` step for step through its public per-step seam (as SAELens'
    MultiSAETrainer drives them), all on each batch in turn (whitened once per step by `whiten`
    for the trainers flagged in `whitened`); the pass reported to `training` (loss
    and L0 summarised over the SAEs when a report is due) instead of SAELens' tqdm bars. No
    activation normalisation, checkpoint or wandb log is configured, so fit's steps for those have
    nothing to do. Returns each trainer's own seconds in its steps."""
    for trainer in trainers:
        if trainer.sae.cfg.normalize_activations != "none":  # fit() would estimate and fold a scale first
            raise ValueError(f"normalize_activations={trainer.sae.cfg.normalize_activations!r} is not driven here")
        trainer.sae.to(trainer.cfg.device)
    seconds = [0.0] * len(trainers)
    clock = time.perf_counter
    total = trainers[0].cfg.total_training_samples
    with training:
        while trainers[0].n_training_samples < total:
            batch = next(batches)
            batch_started, done = clock(), training.position
            inputs = {False: batch, True: whiten(batch) if whiten is not None else batch}
            outputs = []
            for index, trainer in enumerate(trainers):
                started = clock()
                trainer.maybe_reset_sparsity()
                outputs.append(trainer.step(inputs[whitened[index]]))
                trainer.n_training_steps += 1
                seconds[index] += clock() - started
                if index + 1 < len(trainers) and clock() - batch_started >= SLOW_BATCH_S:
                    training.update(done + len(batch) * (index + 1) / len(trainers))
            if training.due:
                losses = [float(output.loss.detach()) for output in outputs]
                l0s = [float(output.feature_acts.bool().float().sum(-1).mean()) for output in outputs]
                training.update(
                    done + len(batch),
                    loss=statistics.median(losses),
                    loss_max=max(losses),
                    l0_min=min(l0s),
                    l0_max=max(l0s),
                )
            else:
                training.update(done + len(batch))
    for trainer in trainers:
        trainer.set_final_sae_metadata()
    return seconds


def pretrained_problems(
    specs: Sequence[SaeSpec], d_model: int, hook_name: str, warn: Callable[[str], None] = lambda _: None
) -> list[str]:
    """What is wrong with the pretrained SAEs a run names: unknown to SAELens' directory, or
    trained on another width or hook than the run's model and layer. Reads only configs (Gemma
    Scope's come from the id itself; others from the hub or the Hugging Face cache). An optional
    SAE whose config neither the cache nor the hub gives is no problem: `warn` is told instead."""
    from sae_lens.loading.pretrained_sae_loaders import load_sae_config_from_huggingface
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    from gemma_assets.core.sae_lens_offline import hub_cache_shapes

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
        offline_if_hub_unreachable()
        try:
            with hub_cache_shapes():
                config = load_sae_config_from_huggingface(spec.release, spec.sae_id)
        except Exception as error:
            if spec.optional and hub_unreachable(error):
                warn(f"{where} (optional) is {unavailable_reason()}: the run will skip it unless it can load it then")
                continue
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
