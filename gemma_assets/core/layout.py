"""Where every artefact of a run lives, which asset writes it, and how it is read back.

Files on disk are the contract between the stages: this module writes that contract down. Each
artefact has an owner (the asset that writes it). A layout bound to a reader (an asset, or the
asset a check checks) refuses an artefact whose owner the reader does not declare as a
dependency, so a missing edge in the asset graph fails loudly instead of ordering runs wrongly.

    <root>/sample/windows.npz, strata.parquet          pile_sample
    <root>/activations/part-<key>/                     activations (ActivationStore)
    <root>/stats/part-<key>.npz, <split>_moments.npz,
                 <table>.parquet, bos.json, *.png      activation_stats
    <root>/whitening/whitening.npz, *.png              whitening
    <root>/clusters/k-<k>/ (model, assignments,
                 records, per-window sums, seed
                 replicas and their centroids)         cluster_models
    <root>/density/k-<k>.json                          cluster_density
    <root>/clusters/leader/                            leader_clusters
    <root>/itda/                                       itda_dictionaries
    <root>/saes/<name>/, <name>-seed<s>/,
                 skipped.json                          sae_dictionary
    <root>/saes/evaluation.json, seeds.json            sae_evaluation
    <root>/evaluation/downstream.json                  downstream_loss
    <root>/evaluation/quantisation_shift.json          quantisation_shift (model.unquantised set)
    <root>/evaluation/interpretation.json,
    <root>/report/features/, alignment_histogram.png   interpretation
    <root>/report/report.md, .html, plots,
    <root>/run_config.yaml                             comparison_report
    <root>/exports/<name>/                             gemma-assets export (outside the graph)

A method declared outside the package (core/methods.py) keeps its files under a folder of its
own through `artefact(<its asset>, ...)`. The corpus (`<root>/corpus`) and models
(`<data_root>/models`) are sources, not assets.

A data root may be an fsspec URL (s3://bucket/prefix): `root` and `models_dir` are then a local
working copy (see `working_copy`) and `remote` the run's URL, where the activation store lives
and where core.remote commits every other asset's artefacts. What a step commits is what it
claimed: every path `artefact` handed out for its asset while `claims_of` was open.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gemma_assets.core import corpus, itda, leader, model
from gemma_assets.core.codes import Dictionary
from gemma_assets.core.config import RESOLVED_CONFIG_FILE, RunConfig, SaeSpec
from gemma_assets.core.dictionaries import MatchingPursuitDictionary, Member, clustering_family
from gemma_assets.core.files import load_arrays
from gemma_assets.core.records import DictionaryRecord, Family
from gemma_assets.core.sampling import TokenSample, load_sample
from gemma_assets.core.stats import ActivationMoments, PartitionStats, moments_path
from gemma_assets.core.storage import ActivationStore
from gemma_assets.core.whitening import Preprocessor, Whitening

TOKENIZER_CORPUS_DOCUMENTS = 400
WINDOWS_FILE = "windows.npz"  # per-window metric sums of a folder's dictionaries (core.bootstrap)
SEEDS_FILE = "seeds.json"  # records of a folder's dictionaries refitted with seeds 1, 2, ...
SEED_MODELS_FILE = "seed_models.npz"  # their centroids (cross-seed agreement)
WORKING_COPY_ENV_VAR = "GEMMA_ASSETS_CACHE"  # where runs whose data root is a URL keep their working copies

# owner -> the artefact paths `artefact` handed out for it while `claims_of(owner)` is open:
# what its step wrote (or kept from an earlier pass), so what it commits on a remote data root
_CLAIMS: dict[str, set[Path]] = {}


def is_url(data_root: str | Path) -> bool:
    """Whether a data root is an fsspec URL (s3://bucket/prefix, ...) rather than a folder."""
    return "://" in str(data_root)


def working_copy(url: str) -> Path:
    """The local folder mirroring data root `url`: under $GEMMA_ASSETS_CACHE (default
    ~/.cache/gemma_assets), named after the URL and unique to it."""
    base = Path(os.environ.get(WORKING_COPY_ENV_VAR) or Path.home() / ".cache" / "gemma_assets").expanduser()
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", url)[-60:]
    return base / f"{readable}-{hashlib.sha256(url.encode()).hexdigest()[:12]}"


@contextmanager
def claims_of(owner: str) -> Iterator[set[Path]]:
    """The artefact paths of `owner` that layouts hand out within the block."""
    claimed = _CLAIMS.setdefault(owner, set())
    try:
        yield claimed
    finally:
        del _CLAIMS[owner]


class UndeclaredDependency(RuntimeError):
    """An asset read an artefact of an asset it does not depend on."""


class MissingArtefact(FileNotFoundError):
    """An artefact is not on disk: its owner has not been materialised (the message says which)."""


@dataclass(frozen=True)
class RunLayout:
    """The artefacts of one run under `root` (= data_root/<run name>)."""

    root: Path
    models_dir: Path
    activations_url: str = ""  # an fsspec URL for the activation store; default: under root (or remote)
    reader: str | None = None  # the asset whose reads are checked (None: unchecked)
    declared: frozenset[str] = field(default_factory=frozenset)  # the reader and its dependencies
    remote: str = ""  # the run's fsspec URL when the data root is one ("": a local data root)

    @classmethod
    def of(cls, data_root: str | Path, run_name: str, activations_url: str = "") -> RunLayout:
        """The layout of run `run_name` under `data_root` (models are shared by every run there);
        a URL data root is worked on in its local working copy."""
        if not is_url(data_root):
            return cls(Path(data_root, run_name), Path(data_root, "models"), activations_url)
        remote = f"{str(data_root).rstrip('/')}/{run_name}"
        local = working_copy(str(data_root).rstrip("/"))
        return cls(local / run_name, local / "models", activations_url or remote, remote=remote)

    @property
    def location(self) -> str:
        """Where the run's outputs live: its URL, or its folder."""
        return self.remote or str(self.root)

    def bound(self, reader: str, declared: Iterable[str]) -> RunLayout:
        """This layout as `reader` sees it: artefacts of `declared` assets only."""
        return RunLayout(
            self.root, self.models_dir, self.activations_url, reader, frozenset(declared) | {reader}, self.remote
        )

    def artefact(self, owner: str | None, *parts: str) -> Path:
        """The path of an artefact asset `owner` writes (None: a source), its folder created; while
        `claims_of(owner)` is open, claimed for owner."""
        if owner is not None and self.reader is not None and owner not in self.declared:
            raise UndeclaredDependency(
                f"asset {self.reader} reads {'/'.join(parts)}, an artefact of {owner}, without depending on it "
                f"-> add {owner} to the deps of {self.reader}"
            )
        path = self.root.joinpath(*parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        if owner in _CLAIMS:
            _CLAIMS[owner].add(path)
        return path

    def existing(self, owner: str, path: Path, what: str) -> Path:
        """`path`, or MissingArtefact naming `what` and the asset that writes it."""
        if not path.exists():
            raise MissingArtefact(f"no {what} at {path}: materialise {owner} first")
        return path

    def _json(self, owner: str, path: Path, what: str) -> Any:
        return json.loads(self.existing(owner, path, what).read_text())

    def _seed_records(self, owner: str, path: Path, what: str) -> dict[str, list[DictionaryRecord]]:
        """A seeds.json: per seed-0 name, the records of its refits."""
        replicas = self._json(owner, path, what)
        return {name: [DictionaryRecord.from_json(r) for r in records] for name, records in replicas.items()}

    # sources
    @property
    def corpus_dir(self) -> Path:
        return self.artefact(None, "corpus")

    def corpus(self, run: RunConfig) -> corpus.DocumentStream:
        """The run's corpus, building the offline corpus on first use."""
        return corpus.open_corpus(run.corpus, self.corpus_dir)

    def model_source(self, run: RunConfig) -> str:
        """`from_pretrained` source of the run's model (the tiny model is built once, here, with a
        tokenizer trained on the first documents of the corpus)."""

        def texts() -> Iterator[str]:  # a generator: the corpus is read only if the model must be built
            yield from (doc.text for doc in itertools.islice(self.corpus(run), TOKENIZER_CORPUS_DOCUMENTS))

        return model.model_source(run.model, self.models_dir, texts())

    # pile_sample
    @property
    def sample_file(self) -> Path:
        return self.artefact("pile_sample", "sample", "windows.npz")

    @property
    def strata_file(self) -> Path:
        return self.artefact("pile_sample", "sample", "strata.parquet")

    @property
    def corpus_read_file(self) -> Path:
        """What reading the corpus met: records read, bad ones skipped (corpus.CorpusRead)."""
        return self.artefact("pile_sample", "sample", "corpus_read.json")

    def sample(self) -> TokenSample:
        return load_sample(self.existing("pile_sample", self.sample_file, "token sample"))

    # activations
    def activation_store(self) -> ActivationStore:
        self.artefact("activations", "activations")
        return ActivationStore(self.activations_url or str(self.root))

    # activation_stats
    def partition_stats_file(self, key: str) -> Path:
        path = self.artefact("activation_stats", "stats", f"part-{key}.npz")
        self.partition_moments_file(key)  # claimed with it: PartitionStats.save writes both
        return path

    def partition_stats(self, key: str) -> PartitionStats:
        return PartitionStats.load(self.existing("activation_stats", self.partition_stats_file(key), "statistics"))

    def partition_moments_file(self, key: str) -> Path:
        return self.artefact("activation_stats", "stats", moments_path(Path(f"part-{key}.npz")).name)

    def partition_moments(self, key: str) -> ActivationMoments:
        path = self.existing("activation_stats", self.partition_moments_file(key), "moments")
        return ActivationMoments.load(path)

    def moments_file(self, split: str) -> Path:
        return self.artefact("activation_stats", "stats", f"{split}_moments.npz")

    def moments(self, split: str = "train") -> ActivationMoments:
        return ActivationMoments.load(self.existing("activation_stats", self.moments_file(split), "moments"))

    def stats_file(self, name: str) -> Path:
        """A table (`per_dim.parquet`, ...), `bos.json` or a plot of the statistics."""
        return self.artefact("activation_stats", "stats", name)

    def bos_ratio(self) -> float:
        return json.loads(self.stats_file("bos.json").read_text())["bos_to_token_norm_ratio"]

    # whitening
    def whitening_file(self, name: str = "whitening.npz") -> Path:
        return self.artefact("whitening", "whitening", name)

    def whitening(self) -> Whitening:
        return Whitening.load(self.existing("whitening", self.whitening_file(), "whitening"))

    def preprocessor(self, kind: str, n_components: int = 0) -> Preprocessor:
        """The map into the space a clustering is fitted in, from the fitted whitening."""
        return Preprocessor.from_whitening(kind, self.whitening(), n_components)

    # cluster_models
    def kmeans_dir(self, k: int) -> Path:
        return self.artefact("cluster_models", "clusters", f"k-{k:05d}")

    def kmeans_model(self, k: int) -> dict[str, np.ndarray]:
        """centroids, sizes, inertia_curve and gain_shape_atoms of k-means-k."""
        path = self.kmeans_dir(k) / "model.npz"
        return load_arrays(self.existing(f"cluster_models[{k}]", path, f"k-means model for k={k}"))

    def kmeans_records(self, k: int) -> list[DictionaryRecord]:
        """k-means-k's record, then those of its other readings."""
        records = self._json(f"cluster_models[{k}]", self.kmeans_dir(k) / "records.json", f"records of k={k}")
        return [DictionaryRecord.from_json(r) for r in records]

    def kmeans_seed_records(self, k: int) -> dict[str, list[DictionaryRecord]]:
        """Per reading of k-means-k (by its seed-0 name), the records of its refits with seeds 1..."""
        return self._seed_records(f"cluster_models[{k}]", self.kmeans_dir(k) / SEEDS_FILE, f"seed replicas of k={k}")

    def kmeans_seed_centroids(self, k: int) -> list[torch.Tensor]:
        """Centroids of k-means-k refitted with seeds 1, 2, ... (empty for a one-seed run)."""
        path = self.existing(f"cluster_models[{k}]", self.kmeans_dir(k) / SEED_MODELS_FILE, f"seed models of k={k}")
        arrays = load_arrays(path)
        return [torch.from_numpy(arrays[f"seed{seed}"]) for seed in range(1, len(arrays) + 1)]

    def kmeans_members(self, run: RunConfig) -> list[Member]:
        """k-means-k and its readings for every k of the run."""
        preprocessor = self.preprocessor(run.clustering.preprocessing, run.clustering.n_components)
        members = []
        for k in run.clustering.ks:
            model = self.kmeans_model(k)
            centroids, atoms = torch.from_numpy(model["centroids"]), torch.from_numpy(model["gain_shape_atoms"])
            members += clustering_family(k, centroids, atoms, preprocessor)
        return members

    # cluster_density
    def density_file(self, k: int) -> Path:
        return self.artefact("cluster_density", "density", f"k-{k:05d}.json")

    # leader_clusters
    @property
    def leader_dir(self) -> Path:
        return self.artefact("leader_clusters", "clusters", "leader")

    def leader_records(self) -> list[DictionaryRecord]:
        """The leader regions' records: the gain-shape reading, then the member-mean one."""
        records = self._json("leader_clusters", self.leader_dir / "records.json", "leader clustering")
        return [DictionaryRecord.from_json(r) for r in records]

    def leader_members(self) -> list[Member]:
        regions = load_arrays(self.existing("leader_clusters", self.leader_dir / "model.npz", "leader clustering"))
        exemplars, mean = torch.from_numpy(regions["exemplars"]), torch.from_numpy(regions["mean"])
        readings: dict[Family, Dictionary] = {
            Family.LEADER: leader.leader_dictionary(exemplars, mean),
            Family.LEADER_MEAN: leader.RegionMeanDictionary(exemplars, mean, torch.from_numpy(regions["region_means"])),
        }
        return [Member(r.name, r.family, readings[r.family]) for r in self.leader_records()]

    # itda_dictionaries
    @property
    def itda_dir(self) -> Path:
        return self.artefact("itda_dictionaries", "itda")

    def itda_records(self, run: RunConfig) -> list[DictionaryRecord]:
        """The records of the run's ITDA dictionaries (as k-means' and the SAEs', those its config
        names: a folder from another config does not add its own), width by width."""
        names = [itda.itda_name(width, m) for width, m in itda.itda_shapes(run)]
        if not names:
            return []
        records = self._json("itda_dictionaries", self.itda_dir / "records.json", "ITDA dictionaries")
        stored = {record["name"]: record for record in records}
        if missing := [name for name in names if name not in stored]:
            raise MissingArtefact(
                f"no ITDA dictionary {', '.join(missing)} in {self.itda_dir}: rematerialise itda_dictionaries"
            )
        return [DictionaryRecord.from_json(stored[name]) for name in names]

    def itda_members(self, run: RunConfig) -> list[Member]:
        """The run's ITDA dictionaries: their atoms (by name) around the train mean, coded with m of them."""
        records = self.itda_records(run)
        if not records:
            return []
        arrays = load_arrays(self.existing("itda_dictionaries", self.itda_dir / "model.npz", "ITDA dictionaries"))
        mean = torch.from_numpy(arrays["mean"])
        shapes = itda.itda_shapes(run)  # the records' order
        return [
            Member(
                record.name, itda.FAMILY, MatchingPursuitDictionary(torch.from_numpy(arrays[record.name]), mean, m), m
            )
            for (_, m), record in zip(shapes, records, strict=True)
        ]

    # sae_dictionary
    def sae_dir(self, name: str) -> Path:
        return self.artefact("sae_dictionary", "saes", name)

    @property
    def sae_skipped_file(self) -> Path:
        return self.artefact("sae_dictionary", "saes", "skipped.json")

    def sae_skipped(self) -> dict[str, str]:
        """Optional pretrained SAEs sae_dictionary could not load: name -> why (no file: a run made
        before optional SAEs existed, which skipped none)."""
        path = self.sae_skipped_file
        return json.loads(path.read_text()) if path.exists() else {}

    def made_saes(self, specs: Sequence[SaeSpec]) -> list[SaeSpec]:
        """`specs` less the SAEs sae_dictionary skipped: those that have a folder to read."""
        skipped = self.sae_skipped()
        return [spec for spec in specs if spec.name not in skipped]

    def sae_members(self, specs: Sequence[SaeSpec], device: str = "cpu") -> list[Member]:
        from gemma_assets.core import sae  # SAELens is imported only where SAEs are used

        return [
            Member(spec.name, spec.family, sae.load_dictionary(self.sae_dir(spec.name), device), spec.active_per_token)
            for spec in specs
        ]

    # sae_evaluation
    @property
    def sae_evaluation_file(self) -> Path:
        return self.artefact("sae_evaluation", "saes", "evaluation.json")

    @property
    def sae_windows_file(self) -> Path:
        return self.artefact("sae_evaluation", "saes", "evaluation_windows.npz")

    def sae_records(self) -> list[DictionaryRecord]:
        records = self._json("sae_evaluation", self.sae_evaluation_file, "SAE evaluation")
        return [DictionaryRecord.from_json(r) for r in records]

    @property
    def sae_seeds_file(self) -> Path:
        return self.artefact("sae_evaluation", "saes", SEEDS_FILE)

    def sae_seed_records(self) -> dict[str, list[DictionaryRecord]]:
        """Per trained SAE (by its seed-0 name), the records of its refits with seeds 1..."""
        return self._seed_records("sae_evaluation", self.sae_seeds_file, "SAE seed replicas")

    # downstream_loss
    @property
    def downstream_file(self) -> Path:
        return self.artefact("downstream_loss", "evaluation", "downstream.json")

    def downstream(self) -> dict:
        return self._json("downstream_loss", self.downstream_file, "spliced cross-entropy")

    # quantisation_shift
    @property
    def quantisation_shift_file(self) -> Path:
        return self.artefact("quantisation_shift", "evaluation", "quantisation_shift.json")

    def quantisation_shift(self) -> dict:
        return self._json("quantisation_shift", self.quantisation_shift_file, "quantisation comparison")

    # interpretation
    @property
    def interpretation_file(self) -> Path:
        return self.artefact("interpretation", "evaluation", "interpretation.json")

    def interpretation(self) -> dict:
        return self._json("interpretation", self.interpretation_file, "interpretation")

    @property
    def features_site(self) -> Path:
        return self.artefact("interpretation", "report", "features")

    @property
    def alignment_plot(self) -> Path:
        return self.artefact("interpretation", "report", "alignment_histogram.png")

    # comparison_report
    def report_file(self, name: str) -> Path:
        """`report.md`, `report.html` or one of the report's plots."""
        return self.artefact("comparison_report", "report", name)

    @property
    def resolved_config_file(self) -> Path:
        return self.artefact("comparison_report", RESOLVED_CONFIG_FILE)

    # outside the graph: what `gemma-assets export` writes
    def export_dir(self, name: str) -> Path:
        return self.artefact(None, "exports", name)
