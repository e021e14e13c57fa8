"""A bad corpus record (not UTF-8, not JSON, without text) is named by file and line with its
fix and exit 5; with `corpus.on_bad_record: skip` it is skipped and counted in the census."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import zstandard
from quick import quick_flags

from gemma_assets.core.corpus import CorpusError, build_offline_corpus, iter_documents
from gemma_assets.runner.errors import EXIT_CORPUS

ROOT = Path(__file__).resolve().parents[1]
BAD_LINES = {  # reason -> a line that has it
    "not JSON": b'{"text": "cut off\n',
    "no text": b'{"body": "a record whose text sits elsewhere"}\n',
    "not UTF-8 text": b'{"text": "caf\xe9"}\n',
}


def _good(i: int) -> bytes:
    return json.dumps({"text": f"document {i}", "meta": {"pile_set_name": "s"}}).encode() + b"\n"


@pytest.mark.parametrize("reason", BAD_LINES)
def test_a_bad_record_is_named_by_file_and_line_with_its_fix(tmp_path, reason):
    shard = tmp_path / "00.jsonl"
    shard.write_bytes(_good(0) + b"\n" + BAD_LINES[reason] + _good(1))  # a blank line is no record
    with pytest.raises(CorpusError) as raised:
        list(iter_documents(str(shard)))
    message = str(raised.value)
    assert message.startswith(f"{shard}, line 3: ")
    assert "on_bad_record: skip" in message.split(" -> ")[1]
    if reason == "no text":
        assert "no text field 'text' (its fields: body) -> set corpus.text_field" in message


def test_skipped_records_are_counted_and_later_documents_keep_their_ids(tmp_path):
    shard = tmp_path / "00.jsonl.zst"
    lines = _good(0) + b"".join(BAD_LINES.values()) + _good(1) + b"[1, 2]\n"
    shard.write_bytes(zstandard.ZstdCompressor().compress(lines))
    documents = iter_documents(str(shard), on_bad_record="skip")
    assert [(d.doc_id, d.text) for d in documents] == [(0, "document 0"), (4, "document 1")]
    read = documents.read
    assert read.records == 6
    assert dict(read.skipped) == {"not JSON": 1, "no text": 1, "not UTF-8 text": 1, "not a JSON object": 1}
    assert read.first_skipped[0].startswith(f"{shard}, line 2: not JSON")
    assert "byte 0xe9 at column 14" in read.first_skipped[2]


def test_a_clean_corpus_reads_as_the_datasets_builder_reads_it(tmp_path):
    """The line reader gives the documents, ids and strata `datasets`' json builder gave before."""
    import datasets

    shards = [str(p) for p in build_offline_corpus(tmp_path / "corpus", max_documents=300)]
    ours = [(d.doc_id, d.text, d.stratum) for d in iter_documents(shards)]
    streamed = datasets.load_dataset("json", data_files=shards, split="train", streaming=True)
    theirs = [(i, r["text"], r["meta"]["pile_set_name"]) for i, r in enumerate(streamed)]
    assert ours == theirs and len(ours) == 300


def _corpus_with(tmp_path: Path, bad: list[bytes]) -> Path:
    """The offline corpus's first shard as plain jsonl, with `bad` lines after its second line."""
    shard = build_offline_corpus(tmp_path / "offline", max_documents=600)[0]
    lines = zstandard.ZstdDecompressor().stream_reader(shard.open("rb")).read().splitlines(keepends=True)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes(b"".join(lines[:2] + bad + lines[2:]))
    return corpus


def _command(tmp_path: Path, corpus: Path, on_bad_record: str, *command: str) -> subprocess.CompletedProcess:
    """A command on the tiny run reading `corpus`, in its own instance and data root."""
    run_file = tmp_path / "run.yaml"
    run_file.write_text(
        f"base: tiny\nname: bad-corpus\ncorpus: {{kind: files, data_files: '{corpus}', on_bad_record: {on_bad_record}}}\n"
    )
    home = tmp_path / "dagster_home"
    home.mkdir(exist_ok=True)
    shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "GEMMA_ASSETS_DATA_ROOT": str(tmp_path / "data"),
        "GEMMA_ASSETS_CONFIG": str(run_file),
    }
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("reason", BAD_LINES)
def test_materialize_stops_at_a_bad_record_with_exit_5(tmp_path, reason):
    corpus = _corpus_with(tmp_path, [BAD_LINES[reason]])
    materialize = [sys.executable, "-m", "gemma_assets.cli", "materialize", "--log-level", "WARNING"]
    done = _command(tmp_path, corpus, "fail", *materialize, "--config", str(tmp_path / "run.yaml"))
    assert done.returncode == EXIT_CORPUS, done.stdout + done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"gemma-assets: error: {corpus}, line 3: "), last
    assert "on_bad_record: skip" in last and "Traceback" not in done.stderr


def test_with_skip_the_run_completes_and_its_census_counts_the_skipped(tmp_path):
    corpus = _corpus_with(tmp_path, list(BAD_LINES.values()))
    materialize = [sys.executable, "-m", "gemma_assets.cli", "materialize", "--log-level", "WARNING"]
    done = _command(tmp_path, corpus, "skip", *materialize, "--config", str(tmp_path / "run.yaml"), *quick_flags())
    assert done.returncode == 0, done.stdout + done.stderr
    run = tmp_path / "data" / "bad-corpus"
    read = json.loads((run / "sample" / "corpus_read.json").read_text())
    assert read["skipped"] == {"not JSON": 1, "no text": 1, "not UTF-8 text": 1}
    assert [line.split(": ")[0] for line in read["first_skipped"]] == [f"{corpus}, line {n}" for n in (3, 4, 5)]
    assert (run / "report" / "report.md").exists()
