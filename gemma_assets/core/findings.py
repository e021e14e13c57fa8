"""The report's findings: statements that follow from the numbers, one function per kind of
claim. A difference is claimed only where its paired interval over held-out windows excludes
zero and, for FVU, the two dictionaries' ranges over seeds (where both have refits) do not
overlap."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gemma_assets.core.bootstrap import Comparison, Evidence, Interval
from gemma_assets.core.interpret import MATCH_F1, TWIN_COSINE
from gemma_assets.core.records import DictionaryRecord, Family, SeedSpread

# an SAE stands at "equal L0" to a k-means reading when its held-out L0 is within 25% of the
# reading's: TopK matches exactly, BatchTopK on average, JumpReLU and L1 SAEs only near their targets
EQUAL_L0 = 0.25
PEER_MATCHED_SHARE = 0.20  # Exemplar Partitioning: ~20% of its regions match a Gemma Scope 16k latent at F1 > 0.5


def verdict(comparison: Comparison, lower: str = "lower", higher: str = "higher") -> str:
    """How A stands against B: a direction only when the paired interval excludes no difference."""
    if comparison.resolved:
        return lower if comparison.difference.value < 0 else higher
    return "indistinguishable"


def spread(comparison: Comparison) -> str:
    """The paired interval behind a verdict, and when unresolved, the windows that would resolve it."""
    d = comparison.difference
    if not d.bounded:
        return f"difference {d.value:+.3f} on {comparison.windows} window: no interval (a bootstrap needs two or more)"
    text = f"paired difference {d.value:+.3f} [{d.low:+.3f}, {d.high:+.3f}] over {comparison.windows} windows"
    needed = None if comparison.resolved else comparison.windows_to_resolve()
    return text + (f"; about {needed:,} windows would resolve it" if needed else "")


def with_row_intervals(row: dict[str, Any]) -> dict[str, Any]:
    """A stored row (a probe, an alignment pair) with each figure that has an `<name>_interval`
    beside it as an Interval."""
    shown = {key: value for key, value in row.items() if not key.endswith("_interval")}
    for key in shown:
        if f"{key}_interval" in row:
            shown[key] = Interval(row[key], *row[f"{key}_interval"])
    return shown


@dataclass(frozen=True)
class Judge:
    """Paired FVU comparisons, held back where the refits' ranges over seeds overlap."""

    evidence: Evidence
    spreads: Mapping[str, SeedSpread]

    def fvu(self, a: str, b: str) -> tuple[str, str]:
        """(verdict, the interval behind it) for held-out FVU of a against b."""
        comparison = self.evidence.compare(a, b, "fvu")
        if comparison.resolved and not self._seed_ranges_apart(a, b):
            return "indistinguishable", f"{spread(comparison)}, but their ranges over seeds overlap"
        return verdict(comparison), spread(comparison)

    def delta_ce(self, a: str, b: str) -> tuple[str, str] | None:
        """(verdict, the interval behind it) for spliced delta CE of a against b; None where either
        was not spliced."""
        if a not in self.evidence.ce or b not in self.evidence.ce:
            return None
        comparison = self.evidence.compare_delta_ce(a, b)
        return verdict(comparison), spread(comparison)

    def _seed_ranges_apart(self, a: str, b: str) -> bool:
        """Whether the refits of a and b keep their order in held-out FVU (their ranges over seeds
        do not overlap); True where either was fitted once."""
        if a not in self.spreads or b not in self.spreads:
            return True
        fvu_a, fvu_b = self.spreads[a].values["fvu"], self.spreads[b].values["fvu"]
        return max(fvu_a) < min(fvu_b) or max(fvu_b) < min(fvu_a)


def raising_k(kmeans: list[DictionaryRecord], judge: Judge) -> list[str]:
    """What raising k from the smallest to the largest does to k-means' FVU and spliced CE."""
    if len(kmeans) < 2:
        return []
    first, last = kmeans[0], kmeans[-1]
    fvu_verdict, fvu_spread = judge.fvu(last.name, first.name)
    change = {"lower": "lowers", "higher": "raises"}.get(fvu_verdict, "leaves indistinguishable")
    line = (
        f"Raising k from {first.k} to {last.k} {change} the held-out FVU of k-means at L0 = 1 "
        f"({first.fvu:.3f} to {last.fvu:.3f}; {fvu_spread})"
    )
    if ce := judge.delta_ce(last.name, first.name):
        line += (
            f"; its spliced delta CE goes from {first.downstream['delta_ce']:.3f} to "
            f"{last.downstream['delta_ce']:.3f} nats, {ce[0]} ({ce[1]})"
        )
    return [line + "."]


def best_sae_against_kmeans(readings: list[DictionaryRecord], saes: list[DictionaryRecord], judge: Judge) -> list[str]:
    """Each k-means reading (k-means itself at L0 = 1, top-m at L0 = m) against the best SAE of the
    same width at an equal L0: the SAE of lowest held-out FVU among every SAE family whose
    held-out L0 is within EQUAL_L0 of the reading's, compared paired on the same windows."""
    lines = []
    for km in readings:
        peers = [s for s in saes if s.k == km.k and abs(s.l0 - km.l0) <= EQUAL_L0 * km.l0]
        if not peers:
            continue
        best = min(peers, key=lambda r: r.fvu)
        families = sorted({peer.family.label(peer.k) for peer in peers})
        among = (
            f"the best of {len(peers)} SAEs ({', '.join(families)})" if len(peers) > 1 else best.family.label(best.k)
        )
        fvu_verdict, fvu_spread = judge.fvu(best.name, km.name)
        stands = {"lower": "a lower held-out FVU than", "higher": "a higher held-out FVU than"}
        line = (
            f"At L0 = {km.m} and {km.k} features, {best.name} ({among}, held-out L0 {best.l0:.1f}) has "
            f"{stands.get(fvu_verdict, 'a held-out FVU indistinguishable from that of')} {km.name} "
            f"({best.fvu:.3f} vs {km.fvu:.3f}; {fvu_spread})"
        )
        if ce := judge.delta_ce(best.name, km.name):
            line += (
                f"; its spliced delta CE is {ce[0]} ({best.downstream['delta_ce']:.3f} vs "
                f"{km.downstream['delta_ce']:.3f} nats; {ce[1]})"
            )
        lines.append(line + ".")
    return lines


def margins_over_floor(records: list[DictionaryRecord], judge: Judge) -> list[str]:
    """Each family's margin over the floor (random-decoder SAEs, ITDA: dictionaries whose
    directions are not learnt): at the family's largest width that has a floor dictionary at an
    equal held-out L0 (within EQUAL_L0), its best dictionary there against the best such floor,
    paired on the same windows."""
    floors = [r for r in records if r.family.is_floor]
    if not floors:
        return []
    lines, unmatched = [], []
    for family in dict.fromkeys(r.family for r in records if not r.family.is_floor):
        pairs = [
            (r, f)
            for r in records
            if r.family is family
            for f in floors
            if f.k == r.k and abs(f.l0 - r.l0) <= EQUAL_L0 * r.l0
        ]
        if not pairs:
            unmatched.append(family.heading)
            continue
        widest = max(r.k for r, _ in pairs)
        mine = min((r for r, _ in pairs if r.k == widest), key=lambda r: r.fvu)
        floor = min((f for r, f in pairs if r is mine), key=lambda f: f.fvu)
        fvu_verdict, fvu_spread = judge.fvu(mine.name, floor.name)
        stands = {"lower": "below", "higher": "above"}.get(fvu_verdict, "indistinguishable from")
        line = (
            f"Over the floor, {family.heading}: {mine.name} (L0 {mine.l0:.1f}) has a held-out FVU {stands} "
            f"that of {floor.name} (L0 {floor.l0:.1f}), {mine.fvu:.3f} vs {floor.fvu:.3f} ({fvu_spread})"
        )
        if ce := judge.delta_ce(mine.name, floor.name):
            line += (
                f"; spliced delta CE {mine.downstream['delta_ce']:.3f} vs {floor.downstream['delta_ce']:.3f} nats, "
                f"{ce[0]} ({ce[1]})"
            )
        lines.append(line + ".")
    if unmatched:
        lines.append(
            f"No floor stands at the width and held-out L0 (within {EQUAL_L0:.0%}) of any dictionary of: "
            f"{', '.join(unmatched)}; their margins over the floor are not stated."
        )
    return lines


def sparsest_sae_beating_kmeans(
    kmeans: list[DictionaryRecord], saes: list[DictionaryRecord], judge: Judge
) -> list[str]:
    """The sparsest SAE whose FVU is lower than the best k-means beyond its interval, if any."""
    if not kmeans or not saes:
        return []
    best_km = min(kmeans, key=lambda r: r.fvu)
    beating = [s for s in saes if judge.fvu(s.name, best_km.name)[0] == "lower"]
    if not beating:
        return [f"No SAE has a held-out FVU lower than {best_km.name} ({best_km.fvu:.3f}) beyond its interval."]
    sparsest = min(beating, key=lambda r: r.l0)
    return [
        f"The sparsest SAE whose held-out FVU is lower than the best k-means ({best_km.name}, "
        f"{best_km.fvu:.3f}) beyond its interval is {sparsest.name}: FVU {sparsest.fvu:.3f} at L0 "
        f"{sparsest.l0:.1f} ({judge.fvu(sparsest.name, best_km.name)[1]})."
    ]


def loss_recovered_range(records: list[DictionaryRecord], evidence: Evidence, uniform_ce: float | None) -> list[str]:
    """The range of loss recovered vs mean-ablation over the dictionaries, with intervals, and why
    zero-ablation is not the yardstick: with BOS kept clean, a zeroed residual stream can cost more
    than a uniform guess over the vocabulary (`uniform_ce`, ln V nats)."""
    recovered = [r for r in records if r.name in evidence.ce]
    if not recovered:
        return []
    best = max(recovered, key=lambda r: r.downstream["loss_recovered_vs_mean"])
    worst = min(recovered, key=lambda r: r.downstream["loss_recovered_vs_mean"])
    windows = len(evidence.ce[best.name])
    zero_per_window = evidence.ce["zero-ablation"]
    zero = float(zero_per_window.sum() / (len(zero_per_window) * evidence.predictions_per_window))
    low = min(r.downstream["loss_recovered_vs_zero"] for r in recovered)
    high = max(r.downstream["loss_recovered_vs_zero"] for r in recovered)
    than_uniform = ""
    if uniform_ce is not None:
        side = "more" if zero > uniform_ce else "less"
        than_uniform = f", {side} than a uniform guess over the vocabulary ({uniform_ce:.2f})"
    return [
        f"Loss recovered vs mean-ablation ranges from {evidence.loss_recovered(worst.name, 'mean-ablation')} "
        f"({worst.name}) to {evidence.loss_recovered(best.name, 'mean-ablation')} ({best.name}), "
        + (f"with 95% intervals over {windows} windows." if windows > 1 else "on one window (no interval).")
        + f" Zero-ablation is a weak yardstick here: it costs {zero:.2f} nats per prediction{than_uniform}, "
        f"so loss recovered against it spans only {low:.3f} to {high:.3f}."
    ]


def cluster_latent_agreement(interpretation: dict) -> list[str]:
    """The best-matching clustering's share of clusters with a matching latent, read against
    the peer's figure and against the same clustering refitted with another seed."""
    pairs = interpretation.get("alignment", [])
    if not pairs:
        return []
    top = with_row_intervals(max(pairs, key=lambda p: p["clusters_matched_f1"]))
    share = top["clusters_matched_f1"]
    share = share if isinstance(share, Interval) else Interval(share, share, share)
    relation = (
        "above"
        if share.low > PEER_MATCHED_SHARE
        else "below"
        if share.high < PEER_MATCHED_SHARE
        else "not distinguishable from"
    )
    lines = [
        f"{share.value:.0%} [{share.low:.0%}, {share.high:.0%}] of {top['clustering']} clusters (interval resampling "
        f"the clusters) have a {top['sae']} latent with "
        f"activation-set F1 > {MATCH_F1} ({relation} the ~{PEER_MATCHED_SHARE:.0%} Exemplar Partitioning "
        f"reports against Gemma Scope 16k); {top['clusters_with_twin']:.0%} have a decoder direction within "
        f"cosine {TWIN_COSINE}."
    ]
    own = [a for a in interpretation.get("seed_agreement", []) if a["dictionary"] == top["clustering"]]
    if own:
        refit = with_row_intervals(own[0])["clusters_matched_f1"]
        lines.append(
            f"Refitted with another seed ({own[0]['other_seed']}), {top['clustering']} finds {refit.value:.0%} "
            f"[{refit.low:.0%}, {refit.high:.0%}] of its own clusters again at F1 > {MATCH_F1}: cluster-latent "
            "agreement is read against this seed-to-seed level, not against 100%."
        )
    return lines


def probing(interpretation: dict) -> list[str]:
    """Per probe target, what raw activations reach and the code that retains most of it."""
    probes = [with_row_intervals(p) for p in interpretation.get("probes", [])]
    if len(probes) <= 2:
        return []
    lines = []
    baseline, raw = probes[0], probes[1]
    for target, label in (("stratum", "the source stratum"), ("token_class", "the token class")):
        if f"{target}_retained" not in raw:
            left_out = interpretation.get("probe_subset", {}).get("strata_left_out", {})
            why = "; ".join(f"{name}: {reason}" for name, reason in left_out.items())
            lines.append(f"No probe of {label}: fewer than two strata can be balanced ({why}).")
            continue
        best = max(probes[2:], key=lambda p: p[f"{target}_retained"].value)
        retained = best[f"{target}_retained"]
        lines.append(
            f"Probing {label}, raw activations reach {raw[f'{target}_balanced_accuracy']} balanced accuracy "
            f"(majority class {baseline[f'{target}_balanced_accuracy'].value:.3f}); the best code, "
            f"{best['features']}, reaches {best[f'{target}_balanced_accuracy']} and retains {retained.value:.0%} "
            f"[{retained.low:.0%}, {retained.high:.0%}] of it (paired over the test windows)."
        )
    return lines


def findings(
    records: list[DictionaryRecord],
    interpretation: dict,
    evidence: Evidence,
    spreads: Sequence[SeedSpread] = (),
    uniform_ce: float | None = None,
) -> list[str]:
    """Every finding of a report, in the report's order (`uniform_ce`: ln of the vocabulary size,
    what zero-ablation's cost is read against)."""
    kmeans = sorted((r for r in records if r.family is Family.KMEANS), key=lambda r: r.k)
    readings = sorted((r for r in records if r.family in (Family.KMEANS, Family.TOP_M)), key=lambda r: (r.k, r.l0))
    saes = [r for r in records if r.family.is_sae and not r.family.is_floor]
    judge = Judge(evidence, {spread.name: spread for spread in spreads})
    return [
        *loss_recovered_range(records, evidence, uniform_ce),
        *raising_k(kmeans, judge),
        *best_sae_against_kmeans(readings, saes, judge),
        *sparsest_sae_beating_kmeans(kmeans, saes, judge),
        *margins_over_floor(records, judge),
        *cluster_latent_agreement(interpretation),
        *probing(interpretation),
    ]
