"""Typed results that stages hand to each other: one record per dictionary, one finding per problem."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np


@dataclass(frozen=True)
class Family:
    """How a dictionary was made, as the report groups its rows; `value` is its name on disk.

    Families are open: the module that declares a method (core.methods) defines its own with
    `Family.define`, and records name them by value."""

    value: str
    title: str  # the report's name for it; "{k}" stands for the dictionary's k
    is_sae: bool = False
    # a baseline that learns no directions (random decoder, real activations): the findings state
    # every other family's margin over it
    is_floor: bool = False

    _defined: ClassVar[dict[str, Family]] = {}
    KMEANS: ClassVar[Family]
    GAIN_SHAPE: ClassVar[Family]
    TOP_M: ClassVar[Family]
    LEADER: ClassVar[Family]
    LEADER_MEAN: ClassVar[Family]

    @classmethod
    def define(cls, value: str, title: str = "", is_sae: bool = False, is_floor: bool = False) -> Family:
        """The family named `value`, defined on first use; a second, different definition is a bug."""
        family = cls._defined.setdefault(value, cls(value, title or value, is_sae, is_floor))
        if family != cls(value, title or value, is_sae, is_floor):
            raise ValueError(f"dictionary family {value!r} is defined twice, differently: {family} and {title!r}")
        return family

    @classmethod
    def of(cls, value: str) -> Family:
        """A defined family by its name on disk (an SAE family, named by `of_sae`, is defined on
        first read: a process that reads records need not have built the run's SAE specs)."""
        if value not in cls._defined and value.startswith("sae-"):
            architecture = value.removeprefix("sae-")
            return cls.of_sae(architecture.removesuffix("-whitened"), architecture.endswith("-whitened"))
        if value not in cls._defined:
            raise ValueError(
                f"unknown dictionary family {value!r} (known: {', '.join(cls._defined)}) "
                "-> name the module that declares it under `methods` in the run config"
            )
        return cls._defined[value]

    @classmethod
    def of_sae(cls, architecture: str, whitened: bool = False) -> Family:
        """The family of SAEs of one architecture (`pretrained`: loaded, whatever their architecture),
        trained on raw or on whitened inputs. Random-decoder SAEs are a floor."""
        suffix = "-whitened" if whitened else ""
        title = architecture.replace("_", " ") + (", whitened inputs" if whitened else "")
        return cls.define(
            f"sae-{architecture}{suffix}", f"SAE ({title})", is_sae=True, is_floor=architecture == "random_decoder"
        )

    def label(self, k: int) -> str:
        """The family as the report's tables and plots name it."""
        return self.title.format(k=k)

    @property
    def heading(self) -> str:
        """The family's name over its rows, whatever their k."""
        return self.title.format(k="k")


Family.KMEANS = Family.define("k-means")
Family.GAIN_SHAPE = Family.define("gain-shape")
Family.TOP_M = Family.define("top-m", "top-m over k-means-{k}")
Family.LEADER = Family.define("leader", "leader (Exemplar Partitioning)")
Family.LEADER_MEAN = Family.define("leader-mean", "leader, member mean")


# the costs of a fit, shown in the report's cost table; every other fit fact goes to `facts`
COST_KEYS = ("parameters", "fit_seconds", "fit_peak_rss_mb")


@dataclass(frozen=True)
class DictionaryRecord:
    """One dictionary of the comparison: what it is, how it scores on held-out tokens, what it cost.

    `k` is the number of features (clusters, regions or latents); `m` the features active per
    token by construction (None where it varies per token)."""

    name: str
    family: Family
    k: int
    m: int | None
    heldout: Mapping[str, float]  # metric name (fvu, mse, l0, ...) -> value on held-out tokens
    cost: Mapping[str, float] = field(default_factory=dict)
    facts: Mapping[str, Any] = field(default_factory=dict)  # iterations, converged, train_partitions, ...
    downstream: Mapping[str, float] = field(default_factory=dict)  # spliced CE, joined by name

    @property
    def fvu(self) -> float:
        return self.heldout["fvu"]

    @property
    def l0(self) -> float:
        return self.heldout["l0"]

    @property
    def train_partitions(self) -> list[str]:
        return list(self.facts.get("train_partitions", []))

    def row(self) -> dict[str, Any]:
        """Flat columns for tables and plots: held-out metrics prefixed `heldout_`."""
        return {
            "name": self.name,
            "family": self.family.label(self.k),
            "k": self.k,
            "m": self.m,
            **self.facts,
            **self.cost,
            **{f"heldout_{name}": value for name, value in self.heldout.items()},
            **self.downstream,
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "family": self.family.value,
            "k": self.k,
            "m": self.m,
            "heldout": dict(self.heldout),
            "cost": dict(self.cost),
            "facts": dict(self.facts),
        }

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> DictionaryRecord:
        return cls(
            value["name"],
            Family.of(value["family"]),
            int(value["k"]),
            value["m"],
            value["heldout"],
            value.get("cost", {}),
            value.get("facts", {}),
        )

    @classmethod
    def of_fit(
        cls, name: str, family: Family, k: int, m: int | None, heldout: Mapping[str, float], facts: Mapping[str, Any]
    ) -> DictionaryRecord:
        """A record whose fit facts hold its costs among the rest (split here by COST_KEYS)."""
        cost = {key: facts[key] for key in COST_KEYS if key in facts}
        return cls(name, family, k, m, heldout, cost, {key: v for key, v in facts.items() if key not in cost})


SEED_METRICS = ("fvu", "mse", "cosine", "l0")


@dataclass(frozen=True)
class SeedSpread:
    """A dictionary's held-out metrics over the seeds it was fitted with (seed 0 first)."""

    name: str
    values: Mapping[str, Sequence[float]]  # metric -> one value per seed

    @classmethod
    def of(cls, record: DictionaryRecord, replicas: Sequence[DictionaryRecord]) -> SeedSpread:
        runs = [record, *replicas]
        return cls(record.name, {metric: [r.heldout[metric] for r in runs] for metric in SEED_METRICS})

    @property
    def seeds(self) -> int:
        return len(self.values["fvu"])

    def mean(self, metric: str) -> float:
        return float(np.mean(self.values[metric]))

    def sd(self, metric: str) -> float:
        """Sample standard deviation over the seeds (a spread has two or more)."""
        return float(np.std(self.values[metric], ddof=1))

    def row(self) -> dict[str, Any]:
        row: dict[str, Any] = {"name": self.name, "seeds": self.seeds}
        for metric in SEED_METRICS:
            row |= {
                f"{metric}_mean": self.mean(metric),
                f"{metric}_sd": self.sd(metric),
                f"{metric}_min": min(self.values[metric]),
                f"{metric}_max": max(self.values[metric]),
            }
        return row


def join_downstream(
    records: Iterable[DictionaryRecord], downstream: Mapping[str, Mapping[str, float]]
) -> list[DictionaryRecord]:
    """Each record with the spliced cross-entropy measured for its name (none: left as is)."""
    return [replace(r, downstream=downstream[r.name]) if r.name in downstream else r for r in records]


@dataclass(frozen=True)
class Finding:
    """One problem a data-quality check found: what and where, and what fixes it."""

    message: str
    fix: str
    partition: str | None = None
    row: int | None = None
    position: int | None = None
    dim: int | None = None

    def __str__(self) -> str:
        return f"partition {self.partition}: {self.message}" if self.partition is not None else self.message


class Markdown(str):
    """Text to be shown rendered as markdown (a table, a list)."""


@dataclass(frozen=True)
class CheckReport:
    """The verdict of one data-quality check, its description (naming the fix when it fails)
    and the figures behind it."""

    passed: bool
    description: str
    metadata: Mapping[str, Any] = field(default_factory=dict)
    findings: tuple[Finding, ...] = ()

    @classmethod
    def of(cls, findings: Iterable[Finding], passed_text: str, metadata: Mapping[str, Any]) -> CheckReport:
        """Passed when nothing was found; otherwise the findings, described."""
        findings = tuple(findings)
        return cls(not findings, describe(findings) if findings else passed_text, metadata, findings)


def describe(findings: Iterable[Finding], shown: int = 10) -> str:
    """The first `shown` findings, then each fix once with the partitions it applies to."""
    findings = list(findings)
    fixes: dict[str, list[str]] = {}
    for finding in findings:
        partitions = fixes.setdefault(finding.fix, [])
        if finding.partition is not None and finding.partition not in partitions:
            partitions.append(finding.partition)
    text = "; ".join(str(f) for f in findings[:shown])
    if len(findings) > shown:
        text += f"; ... {len(findings) - shown} more"
    remedies = [fix.format(partitions=", ".join(sorted(keys))) for fix, keys in fixes.items()]
    return text + " -> " + "; ".join(remedies)
