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
import lzma
import os
import random
import sys
import sysconfig
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import zstandard

from gemma_assets.core.config.schema import CorpusSpec
from gemma_assets.core.files import atomic_dir, write_json

OFFLINE_STRATA = ("python-docs", "python-source", "python-docstrings", "licenses")
_SHARD_DOCUMENTS = 500


class CorpusError(RuntimeError):
    """The corpus cannot be read or is empty; the message says what to do."""


@dataclass(frozen=True)
class Document:
    doc_id: int  # position in the stream (bad records skipped count too), stable for a given corpus
    text: str
    stratum: str


SKIP_HINT = "or set corpus.on_bad_record: skip to skip and count such records"
EXAMPLES_KEPT = 5  # skipped records named in the census, beyond their counts


@dataclass
class CorpusRead:
    """What reading the corpus met: every record read, and those skipped by reason
    (`corpus.on_bad_record: skip`), the first few named by file and line."""

    records: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    first_skipped: list[str] = field(default_factory=list)

    def skip(self, reason: str, where: str, detail: str) -> None:
        self.skipped[reason] += 1
        if len(self.first_skipped) < EXAMPLES_KEPT:
            self.first_skipped.append(f"{where}: {detail}")

    def to_json(self) -> dict[str, Any]:
        return {"records": self.records, "skipped": dict(self.skipped), "first_skipped": self.first_skipped}


@dataclass(frozen=True)
class _Record:
    """One record of a corpus file: its fields, or why it has none."""

    where: str  # file and line, or the record's position in a stream
    fields: dict[str, Any] | None
    reason: str = ""  # not UTF-8 text | not JSON | not a JSON object
    detail: str = ""


class DocumentStream(Iterator[Document]):
    """The documents of a corpus in order; `read` counts what the stream has met so far."""

    def __init__(self, documents: Iterator[Document], read: CorpusRead) -> None:
        self._documents, self.read = documents, read

    def __next__(self) -> Document:
        return next(self._documents)


def _field(record: dict, path: str) -> Any:
    value: Any = record
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _documents(
    records: Iterator[_Record], text_field: str, stratum_field: str, on_bad_record: str, read: CorpusRead
) -> Iterator[Document]:
    """Documents of `records`; a bad record (unreadable, or without text) stops the stream with a
    CorpusError naming it, or is skipped and counted in `read` (on_bad_record `skip`)."""
    for doc_id, record in enumerate(records):
        read.records += 1
        reason, detail, fix = record.reason, record.detail, "fix or remove that record"
        text = None if record.fields is None else _field(record.fields, text_field)
        if record.fields is not None and not isinstance(text, str):
            reason = "no text"
            detail = f"the record has no text field {text_field!r} (its fields: {', '.join(record.fields) or 'none'})"
            fix = "set corpus.text_field to the field that holds the text"
        if reason:
            if on_bad_record == "fail":
                raise CorpusError(f"{record.where}: {detail} -> {fix}, {SKIP_HINT}")
            read.skip(reason, record.where, detail)
            continue
        assert record.fields is not None and isinstance(text, str)
        stratum = _field(record.fields, stratum_field)
        yield Document(doc_id, text, "unknown" if stratum is None else str(stratum))


def _json_lines(paths: list[str]) -> Iterator[_Record]:
    """The records of local jsonl files (compressed by their suffix: .zst, .gz, .bz2, .xz), one per
    non-blank line, in order; a line that is not UTF-8, not JSON or not an object comes with why."""
    for path in paths:
        try:
            yield from _lines_of(path)
        except (OSError, EOFError, lzma.LZMAError, zstandard.ZstdError) as error:  # the codecs' own errors
            raise CorpusError(
                f"{path} cannot be read ({type(error).__name__}: {error}) -> replace it with an intact copy, "
                "or leave it out of corpus.data_files"
            ) from error


def _lines_of(path: str) -> Iterator[_Record]:
    # fsspec picks the codec by suffix; its zstd reader has no lines of its own, a buffer gives them
    with fsspec.open(path, "rb", compression="infer") as stream, io.BufferedReader(stream) as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            try:
                value = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as error:
                byte = f"byte {line[error.start]:#04x} at column {error.start + 1}"
                yield _Record(where, None, "not UTF-8 text", f"not UTF-8 text ({byte})")
            except json.JSONDecodeError as error:
                problem = error.msg.removesuffix(" at")  # some of json's messages end in "at"
                yield _Record(where, None, "not JSON", f"not JSON ({problem} at column {error.colno})")
            else:
                if isinstance(value, dict):
                    yield _Record(where, value)
                else:
                    yield _Record(where, None, "not a JSON object", f"a JSON {type(value).__name__}, not an object")


def _streamed(open_stream: Callable[[], Iterator[dict]], source: str) -> Iterator[_Record]:
    """The records of a streamed `datasets` split (parquet files, the hub)."""
    try:
        stream = open_stream()
    except StopIteration:  # the json builder finds no first record to infer features from
        raise CorpusError(
            f"the corpus has no documents: {source} holds no records -> name one that has records in "
            "corpus.data_files or corpus.dataset"
        ) from None
    for number, fields in enumerate(stream):
        yield _Record(f"record {number} of {source}", fields)


def _from_hub(records: Iterator[Document], source: str) -> Iterator[Document]:
    """`records` with the hub client's own transport errors turned into CorpusErrors."""
    try:
        yield from records
    except CorpusError:
        raise
    except Exception as error:
        raise CorpusError(
            f"cannot stream {source} from the Hugging Face hub ({error}). Check the network, set "
            "HF_TOKEN if the dataset needs it, or use an offline profile (--config demo)"
        ) from error


def iter_documents(
    data_files: str | Sequence[str],
    text_field: str = "text",
    stratum_field: str = "meta.pile_set_name",
    file_format: str = "json",
    on_bad_record: str = "fail",
) -> DocumentStream:
    """Stream documents of jsonl / jsonl.zst (`file_format` json) or parquet files (local
    globs/paths or hf:// URLs), in order. Local jsonl is read line by line, so a bad record is
    named by file and line; parquet and hf:// files go through `datasets`' streaming builders."""
    import datasets

    patterns = [data_files] if isinstance(data_files, str) else list(data_files)
    source = repr(data_files)
    read = CorpusRead()
    if any("://" in pattern for pattern in patterns):
        records = _streamed(
            lambda: iter(datasets.load_dataset(file_format, data_files=patterns, split="train", streaming=True)),
            source,
        )
        documents = _from_hub(_documents(records, text_field, stratum_field, on_bad_record, read), source)
        return DocumentStream(documents, read)
    paths = [path for pattern in patterns for path in sorted(glob.glob(pattern, recursive=True))]
    if not paths:
        raise CorpusError(
            f"no corpus files match {data_files!r}: build the offline corpus (materialise "
            "pile_sample) or point corpus.data_files at existing jsonl / jsonl.zst / parquet files"
        )
    if file_format == "parquet":
        records = _streamed(
            lambda: iter(datasets.load_dataset("parquet", data_files=paths, split="train", streaming=True)), source
        )
    else:
        records = _json_lines(paths)
    documents = _documents(records, text_field, stratum_field, on_bad_record, read)
    return DocumentStream(_non_empty(documents, read, source), read)


def _non_empty(documents: Iterator[Document], read: CorpusRead, source: str) -> Iterator[Document]:
    yield from documents
    if not read.records:
        raise CorpusError(
            f"the corpus has no documents: {source} holds no records -> point corpus.data_files at shards with records"
        )


def iter_dataset(
    name: str,
    subset: str,
    split: str,
    text_field: str = "text",
    stratum_field: str = "meta.pile_set_name",
    on_bad_record: str = "fail",
) -> DocumentStream:
    """Stream documents of a Hugging Face dataset by name, in order."""
    import datasets

    source = f"dataset {name!r}" + (f" ({subset})" if subset else "") + f" split {split!r}"
    read = CorpusRead()
    records = _streamed(lambda: iter(datasets.load_dataset(name, subset or None, split=split, streaming=True)), source)
    return DocumentStream(_from_hub(_documents(records, text_field, stratum_field, on_bad_record, read), source), read)


def open_corpus(spec: CorpusSpec, offline_dir: Path) -> DocumentStream:
    """The documents a run's corpus section names (the offline corpus is built on first use)."""
    if spec.kind == "offline":
        return iter_documents([str(p) for p in build_offline_corpus(offline_dir, max_documents=spec.max_documents)])
    if spec.kind == "files":
        return iter_documents(
            list(spec.data_files), spec.text_field, spec.stratum_field, spec.data_format, spec.on_bad_record
        )
    return iter_dataset(spec.dataset, spec.subset, spec.split, spec.text_field, spec.stratum_field, spec.on_bad_record)


def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_modules() -> list[Path]:
    skip = {"site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
    modules = []
    # skipped folders pruned, not walked: site-packages can hold GBs (0.7 s against 0.01 s)
    for folder, subfolders, files in os.walk(_stdlib_dir()):
        subfolders[:] = [name for name in subfolders if name not in skip]
        modules += [Path(folder, name) for name in files if name.endswith(".py")]
    return sorted(modules)


def _installation_key(max_documents: int, seed: int) -> str:
    """What the offline corpus is read from, by file size and modification time alone: a corpus
    built under the same key is the same corpus, known without parsing 600 modules again (6 s)."""
    license_path = _stdlib_dir() / "LICENSE.txt"
    sources = [*_stdlib_modules(), *([license_path] if license_path.exists() else [])]
    stats = [(str(path), (stat := path.stat()).st_size, stat.st_mtime_ns) for path in sources]
    return hashlib.sha256(json.dumps([sys.version, max_documents, seed, stats]).encode()).hexdigest()


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
    corpus built with the same parameters is reused, found by the installation's file metadata
    (or, when that changed, by the documents' digest). The shards are written to a temporary
    folder and renamed into place, so a crash never leaves half a corpus.
    """
    manifest_path = out_dir / "manifest.json"
    installation = _installation_key(max_documents, seed)
    built = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    if built.get("installation") == installation:
        return sorted((out_dir / "train").glob("*.jsonl.zst"))
    documents = [doc for doc in _offline_documents() if doc[1].strip()]
    random.Random(seed).shuffle(documents)  # mix strata across shards, as the Pile does
    if max_documents:
        documents = documents[:max_documents]
    if not documents:
        raise CorpusError("the offline corpus is empty: no standard-library text was found")
    fingerprint = hashlib.sha256(
        json.dumps([len(documents), seed, [hashlib.sha1(t.encode()).hexdigest() for _, t in documents]]).encode()
    ).hexdigest()
    if built.get("fingerprint") == fingerprint:
        write_json(manifest_path, {**built, "installation": installation})  # the same corpus: known by metadata now
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
        write_json(
            staging / "manifest.json",
            {"fingerprint": fingerprint, "installation": installation, "documents": len(documents), "strata": counts},
        )
    return sorted((out_dir / "train").glob("*.jsonl.zst"))
