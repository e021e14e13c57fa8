"""Feature interpretation shared by clusters and SAE latents: what fires where, and how two
dictionaries relate.

- `FeatureActivations`: the sparse activations of one dictionary on a set of tokens (COO);
- `summarise`: per feature, top examples, examples from activation-quantile bins, an
  activation histogram, token and source-stratum distributions, token entropy, stratum purity
  and example coherence (mean pairwise cosine of the top examples' centred activations);
- `alignment`: best cosine match of every direction of one dictionary in another;
- `activation_f1`: activation-set agreement as Exemplar Partitioning measures it: a cluster's
  members against the same number of top-activating tokens of a latent;
- `sparse_probe`: accuracy of logistic probes on raw activations vs dictionary codes;
- `probe_table`: those probes for every dictionary against raw activations and a baseline;
- `logit_effects`: tokens a direction promotes and suppresses through the unembedding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from gemma_assets.core import bootstrap, progress
from gemma_assets.core.codes import Codes
from gemma_assets.core.dictionaries import Member

MIN_STRATUM_TOKENS = 20  # per probe half: with fewer, a stratum's recall is noise
TWIN_COSINE = 0.7  # a direction with a match at least this close has a twin in the other dictionary
MATCH_F1 = 0.5  # Exemplar Partitioning's threshold for a cluster with a matching latent


@dataclass
class EvalTokens:
    """Tokens features are interpreted on, with what a person needs to read them."""

    x: torch.Tensor  # [n, d] raw activations
    token_ids: np.ndarray  # [n]
    strata: np.ndarray  # [n] index into stratum_names
    stratum_names: tuple[str, ...]
    contexts: np.ndarray  # [n, 2 * width + 1] token ids around each token (-1 outside its window)
    windows: np.ndarray  # [n] window id (probes split by window, never inside one)


def contexts_of(
    token_ids: np.ndarray, rows: np.ndarray, context_len: int, width: int, with_bos: bool = True
) -> np.ndarray:
    """Token ids [len(rows), 2 * width + 1] around each row of a window-major partition, -1
    where the window ends (windows are independent model inputs) and, unless `with_bos`, at BOS."""
    offsets = np.arange(-width, width + 1)
    around = rows[:, None] + offsets[None, :]
    inside = (around // context_len == rows[:, None] // context_len) & (around >= 0) & (around < len(token_ids))
    if not with_bos:
        inside &= around % context_len != 0
    return np.where(inside, token_ids[np.clip(around, 0, len(token_ids) - 1)], -1)


def context_text(context: np.ndarray, decode: Callable[[list[int]], str]) -> str:
    """One row of `contexts_of` as plain text, the centre token in [[double brackets]], on one line."""
    centre = len(context) // 2
    before, token, after = context[:centre], context[centre : centre + 1], context[centre + 1 :]
    parts = [decode([int(t) for t in ids if t >= 0]) for ids in (before, token, after)]
    return f"{parts[0]}[[{parts[1]}]]{parts[2]}".replace("\n", "\\n").replace("|", "/")


@dataclass
class FeatureActivations:
    """Active (token, feature, value) triples of one dictionary, sorted by feature then by
    decreasing activation."""

    token: np.ndarray
    feature: np.ndarray
    value: np.ndarray
    n_features: int
    n_tokens: int

    @classmethod
    def from_codes(cls, batches: Iterable[Codes], n_features: int) -> FeatureActivations:
        tokens, features, values, offset = [], [], [], 0
        for codes in batches:
            rows = torch.arange(len(codes.indices))[:, None].expand_as(codes.indices)
            tokens.append((rows[codes.active] + offset).numpy())
            features.append(codes.indices[codes.active].numpy())
            values.append(codes.values[codes.active].float().numpy())
            offset += len(codes.indices)
        token, feature, value = (np.concatenate(a) for a in (tokens, features, values))
        order = np.lexsort((-value, feature))
        return cls(token[order], feature[order], value[order], n_features, offset)

    @property
    def starts(self) -> np.ndarray:
        """Offsets [n_features + 1] of each feature's run in the sorted triples."""
        return np.searchsorted(self.feature, np.arange(self.n_features + 1))

    def counts(self) -> np.ndarray:
        return np.diff(self.starts)

    def ranks(self) -> np.ndarray:
        """Rank of each triple within its feature (0 = strongest activation)."""
        return np.arange(len(self.feature)) - self.starts[self.feature]

    def labels(self) -> np.ndarray:
        """The one active feature of each token [n_tokens] (a clustering's cluster labels)."""
        labels = np.empty(self.n_tokens, np.int64)
        labels[self.token] = self.feature
        return labels


def _entropy_bits(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def activation_histogram(values: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Counts [bins] and edges [bins + 1] of equal-width bins over the values' range, for any
    finite values: one value, identical values, values a few ULPs apart, zeros or magnitudes near
    float32's limit. The edges are float64: numpy places float32 edges for float32 input, and
    cannot place 20 distinct ones in a range of a few float32 ULPs. A range too narrow even for
    float64 edges is widened symmetrically, as numpy widens an empty range by 0.5."""
    wide = np.asarray(values, dtype=np.float64)
    low, high = float(wide.min()), float(wide.max())
    # edges at least 4 float64 ULPs apart stay distinct after linspace's rounding
    step = 4 * float(np.spacing(max(abs(low), abs(high))))
    if high - low < bins * step:
        half = max(bins * step, 0.5 if high == low else 0.0)
        middle = low / 2 + high / 2  # halves first: low + high overflows near float64's limit
        low, high = middle - half, middle + half
    return np.histogram(wide, bins=bins, range=(low, high))


def summarise(
    acts: FeatureActivations,
    tokens: EvalTokens,
    centred: torch.Tensor,
    n_top: int = 10,
    n_bins: int = 4,
    per_bin: int = 3,
    histogram_bins: int = 20,
) -> list[dict]:
    """One summary per feature (dead features included, with count 0); `centred` holds the
    tokens' centred unit directions [n, d], for coherence."""
    starts = acts.starts
    units = centred.numpy()  # numpy per feature: a torch call per feature costs more than its arithmetic
    summaries = []
    for feature in range(acts.n_features):
        run = slice(starts[feature], starts[feature + 1])
        members, values = acts.token[run], acts.value[run]
        summary: dict = {"feature": feature, "count": len(members), "density": len(members) / acts.n_tokens}
        if not len(members):
            summaries.append(summary)
            continue
        token_counts = np.unique(tokens.token_ids[members], return_counts=True)
        by_count = np.argsort(-token_counts[1], kind="stable")
        strata = np.bincount(tokens.strata[members], minlength=len(tokens.stratum_names))
        top = members[:n_top]
        total = units[top].sum(0)
        # the off-diagonal sum of the top examples' cosines: |sum u|^2 - sum |u|^2
        off_diagonal = float(total @ total - (units[top] ** 2).sum())
        # bins of equal width in rank: examples from the strongest quarter down to the weakest
        bins = [
            [int(t) for t in chunk[np.linspace(0, len(chunk) - 1, min(per_bin, len(chunk))).astype(int)]]
            for chunk in np.array_split(members, min(n_bins, len(members)))
        ]
        histogram, edges = activation_histogram(values, histogram_bins)
        summary.update(
            max_activation=float(values[0]),
            mean_activation=float(values.mean(dtype=np.float64)),
            top_examples=[(int(t), float(v)) for t, v in zip(top, values[:n_top], strict=True)],
            quantile_examples=bins,
            histogram={"counts": histogram.tolist(), "edges": edges.tolist()},
            top_tokens=[(int(token_counts[0][i]), int(token_counts[1][i])) for i in by_count[:10]],
            token_entropy_bits=_entropy_bits(token_counts[1]),
            strata={name: int(count) for name, count in zip(tokens.stratum_names, strata, strict=True)},
            stratum_purity=float(strata.max() / strata.sum()),
            coherence=off_diagonal / (len(top) * (len(top) - 1)) if len(top) > 1 else 1.0,
        )
        summaries.append(summary)
    return summaries


def alignment(
    a: torch.Tensor,
    b: torch.Tensor,
    block_cosines: int = 2**26,
    aligned: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For unit directions a [ka, d] and b [kb, d]: best cosine of each a in b and its index,
    and best cosine of each b in a and its index. Computed on b's device (the research run aligns
    21k x 115k: 11.1 TFLOP) in row blocks of a of at most `block_cosines` cosines (256 MB of
    float32: 16k x 65k would not fit at once, and one 65k-wide block of 4,096 rows is 20 s of a
    two-core CPU), calling `aligned(cosines)` after each with the block's count; returned on the CPU."""
    b = b.float()
    rows = max(1, block_cosines // max(1, len(b)))
    best_ab, index_ab = [], []
    best_ba = torch.full((len(b),), -torch.inf, device=b.device)
    index_ba = torch.zeros(len(b), dtype=torch.long, device=b.device)
    for start in range(0, len(a), rows):
        cosine = a[start : start + rows].to(b.device).float() @ b.T
        value, index = cosine.max(1)
        best_ab.append(value)
        index_ab.append(index)
        value, index = cosine.max(0)
        better = value > best_ba
        best_ba = torch.where(better, value, best_ba)
        index_ba = torch.where(better, index + start, index_ba)
        if aligned is not None:
            aligned(cosine.numel())
    return torch.cat(best_ab).cpu(), torch.cat(index_ab).cpu(), best_ba.cpu(), index_ba.cpu()


def activation_f1(labels: np.ndarray, k: int, latents: FeatureActivations) -> tuple[np.ndarray, np.ndarray]:
    """Best F1 [k] of each cluster's member set against a latent's top-|cluster| activating
    tokens, and that latent [k] (F1 0 and latent -1 where no latent overlaps the cluster).
    Only (cluster, latent) pairs that share a token are formed, never the dense k x F table."""
    n_features = latents.n_features
    sizes = np.bincount(labels, minlength=k)
    cluster = labels[latents.token]
    inside = latents.ranks() < sizes[cluster]  # the latent's token is within its top-|cluster|
    pairs, overlap = np.unique(
        cluster[inside].astype(np.int64) * n_features + latents.feature[inside], return_counts=True
    )
    c, j = pairs // n_features, pairs % n_features
    f1 = 2 * overlap / (sizes[c] + np.minimum(sizes[c], latents.counts()[j]))
    order = np.lexsort((-f1, c))  # by cluster, the best latent first
    first = order[np.unique(c[order], return_index=True)[1]]
    best, latent = np.zeros(k), np.full(k, -1)
    best[c[first]], latent[c[first]] = f1[first], j[first]
    return best, latent


def partition_f1(labels_a: np.ndarray, labels_b: np.ndarray, k_a: int, k_b: int) -> np.ndarray:
    """Best F1 [k_a] of each cluster of partition a against the clusters of partition b of the
    same tokens (two clusterings' member sets; 0 for an empty cluster)."""
    # only the (a, b) pairs that share a token, never the dense k_a x k_b table (16k x 16k at research k)
    pairs, overlap = np.unique(labels_a.astype(np.int64) * k_b + labels_b, return_counts=True)
    a, b = pairs // k_b, pairs % k_b
    f1 = 2 * overlap / (np.bincount(labels_a, minlength=k_a)[a] + np.bincount(labels_b, minlength=k_b)[b])
    best = np.zeros(k_a)
    np.maximum.at(best, a, f1)
    return best


def select_by_class_separation(features: np.ndarray, labels: np.ndarray, m: int) -> np.ndarray:
    """Indices of the m features whose class means differ most relative to their spread
    (a between-class / total variance ratio, as in sparse probing)."""
    classes = np.unique(labels)
    means = np.stack([features[labels == c].mean(0) for c in classes])
    weights = np.array([(labels == c).mean() for c in classes])
    between = (weights[:, None] * (means - features.mean(0)) ** 2).sum(0)
    return np.argsort(-(between / (features.var(0) + 1e-12)))[:m]


def sparse_probe(train: np.ndarray, train_labels: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Test predictions of a logistic-regression probe with features standardised on train and
    classes weighted to equal total weight."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(np.unique(train_labels)) < 2:
        return np.full(len(test), train_labels[0])
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500, class_weight="balanced"))
    probe.fit(train, train_labels)
    return probe.predict(test)


def stratum_balanced(
    strata: np.ndarray, train: np.ndarray, names: tuple[str, ...], minimum: int = MIN_STRATUM_TOKENS
) -> tuple[np.ndarray, dict[str, str]]:
    """A stratum-balanced subset (boolean mask) of the probe tokens: every stratum with at least
    `minimum` tokens in both the train and the test half keeps as many of each as the smallest
    such stratum (the first ones, in token order); and why each other stratum was left out."""
    counts = {s: (int((train & (strata == s)).sum()), int((~train & (strata == s)).sum())) for s in np.unique(strata)}
    kept = {s: c for s, c in counts.items() if min(c) >= minimum}
    left_out = {
        names[s] if s < len(names) else str(s): f"{c[0]} train and {c[1]} test tokens (fewer than {minimum})"
        for s, c in counts.items()
        if s not in kept
    }
    mask = np.zeros(len(strata), bool)
    if len(kept) < 2:
        return mask, left_out
    per_half = (min(c[0] for c in kept.values()), min(c[1] for c in kept.values()))
    for s in kept:
        for half, quota in ((train, per_half[0]), (~train, per_half[1])):
            mask[np.flatnonzero(half & (strata == s))[:quota]] = True
    return mask, left_out


def logit_effects(
    directions: torch.Tensor, unembedding: torch.Tensor, top: int = 10, rows: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [F, top] each direction promotes most and suppresses most: the direction read
    through the unembedding [V, d] (the final norm's per-dimension gain is left out)."""
    promoted, suppressed = [], []
    for start in range(0, len(directions), rows):
        logits = directions[start : start + rows].float() @ unembedding.float().T
        promoted.append(logits.topk(top, dim=1).indices)
        suppressed.append(logits.topk(top, dim=1, largest=False).indices)
    return torch.cat(promoted), torch.cat(suppressed)


def token_class(text: str) -> str:
    """A coarse class of a token's text: word, number, punctuation, whitespace or other."""
    stripped = text.strip()
    if not stripped:
        return "whitespace"
    if stripped.isalpha():
        return "word"
    if stripped.isdigit():
        return "number"
    if all(not c.isalnum() for c in stripped):
        return "punctuation"
    return "other"


def example_features(summaries: list[dict], decode: Callable[[int], str], n: int = 3) -> list[dict]:
    """The most coherent features among those active on at least the median number of tokens."""
    alive = [s for s in summaries if s["count"] > 1]
    if not alive:
        return []
    floor = float(np.median([s["count"] for s in alive]))
    chosen = sorted((s for s in alive if s["count"] >= floor), key=lambda s: -s["coherence"])[:n]
    return [
        {
            "feature": s["feature"],
            "count": s["count"],
            "coherence": s["coherence"],
            "stratum_purity": s["stratum_purity"],
            "top_tokens": [decode(t) for t, _ in s["top_tokens"][:5]],
        }
        for s in chosen
    ]


def probe_table(
    tokens: EvalTokens,
    members: list[Member],
    acts: dict[str, FeatureActivations],
    probe_tokens: int,
    max_features: int,
    decode: Callable[[int], str],
) -> tuple[list[dict], dict]:
    """Logistic probes of source stratum and token class on the first probe_tokens tokens,
    trained on even windows and tested on odd ones, from: raw activations; each clustering's
    one-hot code (L0 = 1); each SAE's latents, all of them and the 1 and k most class-separating
    ones (selected on train). Stratum probes see a stratum-balanced subset (strata too small to
    be balanced are left out, and the second value says why); token-class probes weight classes
    equally. Each balanced accuracy, and its ratio to raw activations' (`retained`), comes with a
    95% interval from a bootstrap over the test windows (paired with the raw probe). Dictionaries
    wider than max_features are left out (their dense codes would not fit). The first row is the
    majority-class baseline, the second raw activations."""
    n = min(probe_tokens, len(tokens.x))
    train = tokens.windows[:n] % 2 == 0
    balanced, left_out = stratum_balanced(tokens.strata[:n], train, tokens.stratum_names)
    classes = np.array([token_class(decode(int(t))) for t in tokens.token_ids[:n]])
    targets = {"stratum": (tokens.strata[:n], balanced), "token_class": (classes, np.ones(n, bool))}
    targets = {name: target for name, target in targets.items() if target[1].any()}
    baseline = {
        name: np.full((~train & subset).sum(), _most_common(y[train & subset])) for name, (y, subset) in targets.items()
    }
    inputs = [("majority class (baseline)", None, 0, None), *_probe_inputs(tokens, members, acts, n, max_features)]
    counts: list[dict[str, bootstrap.ClassCounts]] = []
    for _, features, _, select in progress.tracked(inputs, "sparse probes", unit="feature sets"):
        counts.append({})
        for target, (y, subset) in targets.items():
            fit, test = train & subset, ~train & subset
            if features is None:
                predicted = baseline[target]
            else:
                columns = slice(None) if select is None else select_by_class_separation(features[fit], y[fit], select)
                predicted = sparse_probe(features[fit][:, columns], y[fit], features[test][:, columns])
            counts[-1][target] = bootstrap.ClassCounts.of(y[test], predicted, tokens.windows[:n][test])
    rows = []
    for (label, _, l0, _), found in zip(inputs, counts, strict=True):
        row: dict = {"features": label, "l0": l0}
        for target, probe in found.items():
            accuracy, retained = bootstrap.probe_intervals(probe, counts[1][target])
            row |= {f"{target}_balanced_accuracy": accuracy.value, f"{target}_retained": retained.value}
            row |= {f"{target}_balanced_accuracy_interval": [accuracy.low, accuracy.high]}
            row |= {f"{target}_retained_interval": [retained.low, retained.high]}
        rows.append(row)
    return rows, {"stratum_tokens": int(balanced.sum()), "strata_left_out": left_out}


def _probe_inputs(
    tokens: EvalTokens, members: list[Member], acts: dict[str, FeatureActivations], n: int, max_features: int
) -> Iterator[tuple[str, np.ndarray, float | None, int | None]]:
    """(label, features [n, F], L0, features to select or None for all), one dictionary's
    dense codes alive at a time."""
    yield "raw activations", tokens.x[:n].numpy(), None, None
    for member in members:
        if member.dictionary.n_features > max_features:
            continue
        a = acts[member.name]
        kept = a.token < n
        dense = np.zeros((n, a.n_features), np.float32)
        if member.family.is_sae:
            dense[a.token[kept], a.feature[kept]] = a.value[kept]
            yield f"{member.name} (all latents)", dense, member.m, None
            for m in sorted({1, member.m or 1}):
                yield f"{member.name} (top {m} latents)", dense, m, m
        else:
            dense[a.token[kept], a.feature[kept]] = 1.0
            yield f"{member.name} (one-hot)", dense, 1, None


def _most_common(values: np.ndarray) -> object:
    options, counts = np.unique(values, return_counts=True)
    return options[counts.argmax()]
