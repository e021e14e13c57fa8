"""Corpora in the Pile's file format: jsonl.zst shards of {"text", "meta": {"pile_set_name"}}.

`iter_documents` streams any such corpus (the real Pile on the Hugging Face hub, or a
local one) through the same `datasets` json builder; parquet files and hub datasets by name
go through the same record reader, with the text and stratum fields the run config names. `build_offline_corpus` assembles a
real-text corpus in that format from what every Python installation carries: the
language reference (pydoc topics), the standard library's source code and docstrings,
and Python's license text.
"""

from __future__ import annotations

import ast
import glob
import hashlib
import io
import json
import random
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import zstandard

from gemma_assets.core.config.schema import CorpusSpec
from gemma_assets.core.files import atomic_dir

OFFLINE_STRATA = ("python-docs", "python-source", "python-docstrings", "licenses")
_SHARD_DOCUMENTS = 500


class CorpusError(RuntimeError):
    """The corpus cannot be read or is empty; the message says what to do."""


@dataclass(frozen=True)
class Document:
    doc_id: int  # position in the stream, stable for a given corpus
    text: str
    stratum: str


def _field(record: dict, path: str):
    value = record
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _documents(open_stream, source: str, remote: bool, text_field: str, stratum_field: str) -> Iterator[Document]:
    """Documents of a streamed `datasets` split; transport errors of the hub become CorpusErrors."""
    try:
        try:
            stream = open_stream()
        except StopIteration:  # the json builder finds no first record to infer features from
            raise CorpusError(f"the corpus has no documents: {source} holds no records") from None
        for doc_id, record in enumerate(stream):
            text = _field(record, text_field)
            if not isinstance(text, str):
                raise CorpusError(
                    f"record {doc_id} of {source} has no text field {text_field!r} (its fields: "
                    f"{', '.join(record)}): set corpus.text_field to the field that holds the text"
                )
            stratum = _field(record, stratum_field)
            yield Document(doc_id, text, "unknown" if stratum is None else str(stratum))
    except Exception as error:  # the hub client raises its own transport errors
        if not remote or isinstance(error, CorpusError):
            raise
        raise CorpusError(
            f"cannot stream {source} from the Hugging Face hub ({error}). Check the network, set "
            "HF_TOKEN if the dataset needs it, or use an offline profile (--config demo)"
        ) from error


def iter_documents(
    data_files: str | Sequence[str],
    text_field: str = "text",
    stratum_field: str = "meta.pile_set_name",
    file_format: str = "json",
) -> Iterator[Document]:
    """Stream documents of jsonl / jsonl.zst (`file_format` json) or parquet files (local
    globs/paths or hf:// URLs), in order."""
    import datasets

    patterns = [data_files] if isinstance(data_files, str) else list(data_files)
    remote = any("://" in pattern for pattern in patterns)
    if not remote and not any(glob.glob(pattern) for pattern in patterns):
        raise CorpusError(
            f"no corpus files match {data_files!r}: build the offline corpus (materialise "
            "pile_sample) or point corpus.data_files at existing jsonl / jsonl.zst / parquet files"
        )
    return _documents(
        lambda: datasets.load_dataset(file_format, data_files=patterns, split="train", streaming=True),
        repr(data_files),
        remote,
        text_field,
        stratum_field,
    )


def iter_dataset(
    name: str, subset: str, split: str, text_field: str = "text", stratum_field: str = "meta.pile_set_name"
) -> Iterator[Document]:
    """Stream documents of a Hugging Face dataset by name, in order."""
    import datasets

    return _documents(
        lambda: datasets.load_dataset(name, subset or None, split=split, streaming=True),
        f"dataset {name!r}" + (f" ({subset})" if subset else "") + f" split {split!r}",
        True,
        text_field,
        stratum_field,
    )


def open_corpus(spec: CorpusSpec, offline_dir: Path) -> Iterator[Document]:
    """The documents a run's corpus section names (the offline corpus is built on first use)."""
    if spec.kind == "offline":
        return iter_documents([str(p) for p in build_offline_corpus(offline_dir, max_documents=spec.max_documents)])
    if spec.kind == "files":
        return iter_documents(list(spec.data_files), spec.text_field, spec.stratum_field, spec.data_format)
    return iter_dataset(spec.dataset, spec.subset, spec.split, spec.text_field, spec.stratum_field)


def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_modules() -> list[Path]:
    skip = {"site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
    return sorted(path for path in _stdlib_dir().rglob("*.py") if not skip.intersection(path.parts))


def _docstrings(source: str) -> str:
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return ""
    nodes = [tree] + [
        node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
    ]
    return "\n\n".join(doc for node in nodes if (doc := ast.get_docstring(node)))


def _offline_documents() -> Iterator[tuple[str, str]]:
    """(stratum, text) pairs of real text found in the running Python installation."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield "python-docs", topics[name]
    for path in _stdlib_modules():
        source = path.read_text(encoding="utf-8", errors="replace")
        yield "python-source", source
        if docs := _docstrings(source):
            yield "python-docstrings", docs
    license_path = _stdlib_dir() / "LICENSE.txt"
    if license_path.exists():
        # one document per section, the way the Pile stores one legal text per record
        for section in license_path.read_text(encoding="utf-8").split("\n\n\n"):
            if section.strip():
                yield "licenses", section.strip()


def build_offline_corpus(out_dir: Path, max_documents: int = 0, seed: int = 0) -> list[Path]:
    """Write the offline corpus as shuffled jsonl.zst shards under out_dir/train.

    Deterministic for a given Python installation, seed and size. Idempotent: an existing
    corpus built with the same parameters is reused. The shards are written to a
    temporary folder and renamed into place, so a crash never leaves half a corpus.
    """
    documents = [doc for doc in _offline_documents() if doc[1].strip()]
    random.Random(seed).shuffle(documents)  # mix strata across shards, as the Pile does
    if max_documents:
        documents = documents[:max_documents]
    if not documents:
        raise CorpusError("the offline corpus is empty: no standard-library text was found")
    fingerprint = hashlib.sha256(
        json.dumps([len(documents), seed, [hashlib.sha1(t.encode()).hexdigest() for _, t in documents]]).encode()
    ).hexdigest()
    manifest_path = out_dir / "manifest.json"
    if manifest_path.exists() and json.loads(manifest_path.read_text())["fingerprint"] == fingerprint:
        return sorted((out_dir / "train").glob("*.jsonl.zst"))

    with atomic_dir(out_dir) as staging:
        (staging / "train").mkdir()
        compressor = zstandard.ZstdCompressor(level=3)
        for shard, start in enumerate(range(0, len(documents), _SHARD_DOCUMENTS)):
            lines = io.StringIO()
            for stratum, text in documents[start : start + _SHARD_DOCUMENTS]:
                lines.write(json.dumps({"text": text, "meta": {"pile_set_name": stratum}}) + "\n")
            (staging / "train" / f"{shard:02d}.jsonl.zst").write_bytes(
                compressor.compress(lines.getvalue().encode("utf-8"))
            )
        counts = {s: sum(1 for d in documents if d[0] == s) for s in OFFLINE_STRATA}
        (staging / "manifest.json").write_text(
            json.dumps({"fingerprint": fingerprint, "documents": len(documents), "strata": counts}, indent=2)
        )
    return sorted((out_dir / "train").glob("*.jsonl.zst"))
