"""Sampling documents into fixed-length token windows, BOS first, and splitting them into partitions.

Each document is taken with probability `document_rate`, decided by a hash of (seed,
doc_id) so the choice is independent of stream order and of the other documents: every
stratum is sampled at the same rate, so the sample keeps the corpus' source mix. A
document is cut into windows of `context_len - 1` tokens, each prefixed with BOS; the
partial tail is dropped, so a window never spans two documents. The collected windows
are shuffled with the seed and dealt to partitions: partition i always holds the same
windows, whatever order partitions are later extracted in.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np

from gemma_assets.core import progress
from gemma_assets.core.config import SampleSpec
from gemma_assets.core.corpus import CorpusError, Document
from gemma_assets.core.files import load_arrays, save_arrays

_TOKENIZE_BATCH = 64


@dataclass(frozen=True)
class TokenSample:
    tokens: np.ndarray  # [n_windows, context_len] int32, column 0 is BOS
    doc_ids: np.ndarray  # [n_windows] int64
    starts: np.ndarray  # [n_windows] int64, offset of column 1 within its document's tokens
    strata: np.ndarray  # [n_windows] int16, index into stratum_names
    stratum_names: tuple[str, ...]

    def partition(self, index: int, windows_per_partition: int) -> TokenSample:
        rows = slice(index * windows_per_partition, (index + 1) * windows_per_partition)
        return TokenSample(
            self.tokens[rows], self.doc_ids[rows], self.starts[rows], self.strata[rows], self.stratum_names
        )


def _keep(seed: int, doc_id: int, rate: float) -> bool:
    digest = hashlib.blake2b(f"{seed}:{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < rate


def _batched(items: Iterable[Document], size: int) -> Iterator[list[Document]]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def sample_windows(documents: Iterable[Document], tokenizer, spec: SampleSpec) -> tuple[TokenSample, dict]:
    """Draw spec.n_windows windows from the document stream; returns the sample and a census."""
    if not 0 < spec.document_rate <= 1:
        raise CorpusError(f"document_rate must be in (0, 1], got {spec.document_rate}")
    if spec.context_len < 2:
        raise CorpusError(f"context_len must be at least 2 (BOS + one token), got {spec.context_len}")
    body = spec.context_len - 1
    bos = tokenizer.bos_token_id
    scanned: Counter[str] = Counter()  # characters per stratum: population
    taken: Counter[str] = Counter()  # and sample
    windows: list[tuple[np.ndarray, int, int, str]] = []
    filled = progress.task("sampling windows from the corpus", spec.n_windows, "windows").start()
    read = 0  # documents
    for batch in _batched(documents, _TOKENIZE_BATCH):
        read += len(batch)
        for doc in batch:
            scanned[doc.stratum] += len(doc.text)
        chosen = [doc for doc in batch if _keep(spec.seed, doc.doc_id, spec.document_rate)]
        if not chosen:
            continue
        for doc in chosen:
            taken[doc.stratum] += len(doc.text)
        encoded = tokenizer([doc.text for doc in chosen], add_special_tokens=False)["input_ids"]
        for doc, ids in zip(chosen, encoded, strict=True):
            for start in range(0, len(ids) - body + 1, body):
                windows.append((np.asarray(ids[start : start + body], np.int32), doc.doc_id, start, doc.stratum))
        filled.update(min(len(windows), spec.n_windows), documents=read)
        if len(windows) >= spec.n_windows:
            break
    if not scanned:
        raise CorpusError("the corpus has no documents -> check corpus.data_files and that the shards are not empty")
    if len(windows) < spec.n_windows:
        raise CorpusError(
            f"the corpus gave {len(windows)} windows of {spec.context_len} tokens from "
            f"{sum(scanned.values()):,} characters of text, but the run config needs {spec.n_windows} "
            f"(sampling.partitions={spec.partitions} x sampling.windows_per_partition={spec.windows_per_partition}) "
            "-> raise sampling.document_rate, use a larger corpus (corpus.max_documents=0 reads all of the "
            "offline one), or lower sampling.partitions, sampling.windows_per_partition or sampling.context_len"
        )
    filled.finish(documents=read)
    windows = windows[: spec.n_windows]
    order = np.random.default_rng(spec.seed).permutation(spec.n_windows)
    names = tuple(sorted(scanned))
    tokens = np.empty((spec.n_windows, spec.context_len), np.int32)
    tokens[:, 0] = bos
    tokens[:, 1:] = np.stack([windows[i][0] for i in order])
    sample = TokenSample(
        tokens=tokens,
        doc_ids=np.array([windows[i][1] for i in order], np.int64),
        starts=np.array([windows[i][2] for i in order], np.int64),
        strata=np.array([names.index(windows[i][3]) for i in order], np.int16),
        stratum_names=names,
    )
    return sample, stratum_census(sample, scanned, taken)


def stratum_census(sample: TokenSample, scanned: Counter, taken: Counter) -> dict:
    """Per stratum: its share of the corpus read (requested), of the documents taken, and of
    the sample's windows (achieved); shares of text are counted in characters."""
    window_counts = np.bincount(sample.strata, minlength=len(sample.stratum_names))
    total_scanned, total_taken = sum(scanned.values()), sum(taken.values())
    return {
        name: {
            "corpus_text_share": scanned[name] / total_scanned,
            "sampled_text_share": taken[name] / total_taken,
            "window_share": float(window_counts[i] / len(sample.strata)),
        }
        for i, name in enumerate(sample.stratum_names)
    }


def save_sample(path: Path, sample: TokenSample) -> None:
    """Write atomically: a reader sees the old file or the new one, never half of one."""
    save_arrays(path, vars(sample) | {"stratum_names": np.array(sample.stratum_names)})


def load_sample(path: Path) -> TokenSample:
    if not path.exists():
        raise FileNotFoundError(f"no token sample at {path}: materialise pile_sample first")
    arrays = load_arrays(path)
    names = tuple(arrays.pop("stratum_names").tolist())
    return TokenSample(stratum_names=names, **arrays)
