"""Run profiles: one code path, three sizes (see docs/experimental_setup.md).

A profile fixes everything that decides *what* is computed: model and layer, corpus,
sample size and partitioning, the k values, the SAE dictionaries. Where things run
(data root, device, batch size) is decided by resources, not here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

PROFILE_ENV_VAR = "GEMMA_ASSETS_PROFILE"
DEFAULT_PROFILE = "demo"
PILE_DATA_FILES = "hf://datasets/monology/pile-uncopyrighted/train/*.jsonl.zst"


class ConfigError(ValueError):
    """A configuration value is invalid; the message says which and how to fix it."""


@dataclass(frozen=True)
class ModelSpec:
    kind: str  # "tiny" (random Gemma-2, saved locally) | "gguf_demo" | "hub"
    name: str  # what the report calls it, e.g. "google/gemma-2-2b"
    layer: int  # block index counted from 0; we store the output of this block
    hook_name: str = ""  # the same point in SAELens/TransformerLens terms

    def __post_init__(self) -> None:
        if not self.hook_name:
            object.__setattr__(self, "hook_name", f"blocks.{self.layer}.hook_resid_post")


@dataclass(frozen=True)
class CorpusSpec:
    kind: str  # "offline" (built locally in the Pile's format) | "hub"
    data_files: str = ""  # glob or URL of jsonl.zst shards; empty = the built offline corpus
    max_documents: int = 0  # offline corpus size; 0 = everything available


@dataclass(frozen=True)
class SampleSpec:
    context_len: int  # tokens per window, BOS included
    document_rate: float  # share of documents taken into the sample
    n_partitions: int
    windows_per_partition: int
    holdout_partitions: int  # the last partitions, never used for fitting
    seed: int = 0

    @property
    def n_windows(self) -> int:
        return self.n_partitions * self.windows_per_partition

    @property
    def tokens_per_partition(self) -> int:
        return self.windows_per_partition * self.context_len


@dataclass(frozen=True)
class SaeSpec:
    name: str
    architecture: str  # "topk" (trained here) | "pretrained" (loaded through SAELens)
    width: int = 0
    k: int = 0  # active latents per token for topk
    release: str = ""  # pretrained only
    sae_id: str = ""

    @property
    def family(self) -> str:
        return f"SAE ({self.architecture})"

    @property
    def active_per_token(self) -> int | None:
        """L0 by construction (TopK); None where it varies per token."""
        return self.k or None


def topk_grid(widths: tuple[int, ...], ks: tuple[int, ...]) -> tuple[SaeSpec, ...]:
    """TopK SAEs at every width x sparsity: widths matching the k-means k values give a
    frontier to set beside clustering, and k = 1 is the SAE closest to a clustering."""
    return tuple(SaeSpec(f"topk-{width}-k{k}", "topk", width, k) for width in widths for k in ks)


@dataclass(frozen=True)
class KMeansSpec:
    ks: tuple[int, ...] = (64, 128, 256)
    preprocessing: str = "center"  # none | center | standardize | pca | zca: space k-means is fitted in
    n_components: int = 0  # > 0: keep only the leading principal components (center or pca)
    backend: str = "torch"  # torch | minibatch | cuml
    seeding: str = "k-means||"  # k-means|| | k-means++ (greedy, as scikit-learn; k passes over the sample)
    # train split (float32) up to this size is loaded, larger is streamed; also caps Elkan's bounds
    in_memory_mb: int = 8192
    max_iter: int = 50
    tol: float = 1e-4
    seed: int = 0


@dataclass(frozen=True)
class DensitySpec:
    components: int = 32  # whitened principal components the Gaussian mixture is fitted in
    max_iter: int = 50
    tol: float = 1e-5
    anomalies: int = 20  # lowest-density held-out tokens surfaced with their context
    leader_percentile: float = 5.0  # Exemplar Partitioning: threshold percentile of pairwise distances


@dataclass(frozen=True)
class QualitySpec:
    outlier_z: float = 8.0  # robust z-score of log token norm beyond which a token is an outlier
    max_outlier_share: float = 0.005  # WARN when more tokens than this are outliers
    absurd_z: float = 30.0  # WARN on any single token this far out, whatever the share
    max_drift_sd: float = 0.5  # WARN when a partition's mean moves this many SDs on any dimension
    quantile_sample_per_partition: int = 2048  # tokens kept per partition for approximate quantiles


@dataclass(frozen=True)
class EvaluationSpec:
    ce_windows: int = 256  # held-out windows the spliced cross-entropy is measured on
    ce_batch_windows: int = 8
    interpret_tokens: int = 65536  # held-out tokens features are interpreted on
    probe_tokens: int = 16384  # of those, the ones sparse probes are trained and tested on
    context_width: int = 5  # tokens either side of an example on the feature pages
    probe_max_features: int = 16384  # larger dictionaries are not probed (dense codes would not fit)


@dataclass(frozen=True)
class Profile:
    name: str
    model: ModelSpec
    corpus: CorpusSpec
    sample: SampleSpec
    kmeans: KMeansSpec = field(default_factory=KMeansSpec)
    quality: QualitySpec = field(default_factory=QualitySpec)
    density: DensitySpec = field(default_factory=DensitySpec)
    evaluation: EvaluationSpec = field(default_factory=EvaluationSpec)
    saes: tuple[SaeSpec, ...] = ()
    sae_train_epochs: int = 1
    sae_batch_size: int = 1024

    @property
    def partition_keys(self) -> list[str]:
        return [f"{i:04d}" for i in range(self.sample.n_partitions)]

    @property
    def heldout_partition_keys(self) -> list[str]:
        return self.partition_keys[-self.sample.holdout_partitions :]

    @property
    def train_partition_keys(self) -> list[str]:
        return self.partition_keys[: -self.sample.holdout_partitions]


PROFILES: dict[str, Profile] = {
    "tiny": Profile(
        name="tiny",
        model=ModelSpec(kind="tiny", name="tiny random Gemma-2 (4 blocks, d_model 64)", layer=2),
        corpus=CorpusSpec(kind="offline", max_documents=600),
        sample=SampleSpec(
            context_len=32,
            document_rate=0.5,
            n_partitions=4,
            windows_per_partition=48,
            holdout_partitions=1,
        ),
        kmeans=KMeansSpec(max_iter=30),
        evaluation=EvaluationSpec(ce_windows=48, ce_batch_windows=16, interpret_tokens=4096),
        saes=topk_grid(widths=(64, 128, 256), ks=(1, 4)),
        sae_train_epochs=40,
        sae_batch_size=256,
    ),
    "demo": Profile(
        name="demo",
        model=ModelSpec(kind="gguf_demo", name="Gemma 3 270M (Q4_K_M GGUF)", layer=6),
        corpus=CorpusSpec(kind="offline", max_documents=4000),
        sample=SampleSpec(
            context_len=128,
            document_rate=0.25,
            n_partitions=8,
            windows_per_partition=48,
            holdout_partitions=1,
        ),
        # the 262k-token vocabulary makes each spliced forward cost ~1 s per window on 2 cores
        evaluation=EvaluationSpec(ce_windows=4, ce_batch_windows=2, interpret_tokens=8192),
        saes=(*topk_grid(widths=(64, 128, 256), ks=(1, 4, 16)), SaeSpec("topk-1024-k32", "topk", 1024, 32)),
        sae_train_epochs=16,
    ),
    "gemma-2-2b": Profile(
        name="gemma-2-2b",
        model=ModelSpec(kind="hub", name="google/gemma-2-2b", layer=12),
        corpus=CorpusSpec(kind="hub", data_files=PILE_DATA_FILES),
        # dev sample: 0.34% of documents, 17 partitions of 2^18 tokens (~4.5M tokens)
        sample=SampleSpec(
            context_len=128,
            document_rate=0.0034,
            n_partitions=17,
            windows_per_partition=2048,
            holdout_partitions=2,
        ),
        kmeans=KMeansSpec(ks=(64, 128, 256, 4096, 16384)),
        saes=(
            SaeSpec(
                name="gemma-scope-16k-canonical",
                architecture="pretrained",
                release="gemma-scope-2b-pt-res-canonical",
                sae_id="layer_12/width_16k/canonical",
            ),
            SaeSpec(
                name="gemma-scope-65k-canonical",
                architecture="pretrained",
                release="gemma-scope-2b-pt-res-canonical",
                sae_id="layer_12/width_65k/canonical",
            ),
            # one width at several sparsities (the non-canonical release): an SAE frontier
            *(
                SaeSpec(
                    name=f"gemma-scope-16k-l0-{l0}",
                    architecture="pretrained",
                    release="gemma-scope-2b-pt-res",
                    sae_id=f"layer_12/width_16k/average_l0_{l0}",
                )
                for l0 in (22, 41, 82, 176)
            ),
        ),
    ),
}


def get_profile(name: str | None = None) -> Profile:
    """The profile called `name`, or the one named by $GEMMA_ASSETS_PROFILE (default demo)."""
    chosen = name or os.environ.get(PROFILE_ENV_VAR) or DEFAULT_PROFILE
    if chosen not in PROFILES:
        raise ConfigError(
            f"unknown profile {chosen!r}; valid profiles are {', '.join(PROFILES)} "
            f"(set {PROFILE_ENV_VAR} or pass --profile)"
        )
    return PROFILES[chosen]
