"""The readers of user input end in the project's own error or in success, never in a bare
exception: the corpus reader (any bytes, plain or compressed), the run-config loader (any YAML
run file, any --set) and the COMMIT.json reader (any bytes, any JSON). Each runs a few hundred
cases in the suite (over 2,000 in all); `python -m pytest -m fuzz` runs each 25 times longer."""

from __future__ import annotations

import gzip
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gemma_assets.core.config import ConfigError, load_run_config
from gemma_assets.core.corpus import CorpusError, iter_documents
from gemma_assets.core.storage import ACTIVATIONS, COMMIT_FILE, ActivationStore, StorageError

LONGER = 25  # how many times more cases the `fuzz` marker runs
SCALES = [pytest.param(1, id="suite"), pytest.param(LONGER, marks=pytest.mark.fuzz, id="long")]


def _fuzz(cases: int, check: Callable[..., None], *strategies: st.SearchStrategy) -> None:
    """`check` on `cases` inputs drawn from `strategies` (no example database: each run draws anew)."""
    limits = settings(max_examples=cases, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    limits(given(*strategies)(check))()


# --- the corpus reader --------------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
RECORDS = st.dictionaries(st.sampled_from(["text", "meta", "body"]), JSON_VALUES, max_size=3)
LINES = st.lists(
    st.one_of(
        st.binary(max_size=40),  # anything, UTF-8 or not
        RECORDS.map(lambda r: json.dumps(r).encode()),
        JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    ),
    max_size=6,
)
CODECS = {".jsonl": lambda b: b, ".jsonl.zst": zstandard.ZstdCompressor().compress, ".jsonl.gz": gzip.compress}


def _read_corpus(lines: list[bytes], suffix: str, damage: int, on_bad_record: str) -> None:
    content = CODECS[suffix](b"\n".join(lines))
    if damage == 1:  # a truncated file
        content = content[: len(content) // 2]
    elif damage == 2 and content:  # its first byte flipped (a compressed file's magic number)
        content = bytes([content[0] ^ 0xFF]) + content[1:]
    with tempfile.TemporaryDirectory() as folder:
        shard = Path(folder, "00" + suffix)
        shard.write_bytes(content)
        try:
            documents = iter_documents(str(shard), on_bad_record=on_bad_record)
            for document in documents:
                assert isinstance(document.text, str) and isinstance(document.stratum, str)
            assert documents.read.records >= sum(documents.read.skipped.values())
        except CorpusError as error:
            assert " -> " in str(error), error


@pytest.mark.parametrize("scale", SCALES)
def test_the_corpus_reader_ends_in_a_corpus_error_or_documents(scale):
    codecs, damage, policies = st.sampled_from(sorted(CODECS)), st.integers(0, 2), st.sampled_from(["fail", "skip"])
    _fuzz(900 * scale, _read_corpus, LINES, codecs, damage, policies)


# --- the run-config loader ----------------------------------------------------------------------

KEYS = st.sampled_from(
    ["base", "name", "model", "corpus", "sampling", "clustering", "saes", "seeds", "layer", "kind", "ks"]
)
YAML_TREES = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 300) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS | st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


def _load_run_file(tree: Any, text: str, as_tree: bool) -> None:
    with tempfile.TemporaryDirectory() as folder:
        run_file = Path(folder, "run.yaml")
        run_file.write_text(yaml.safe_dump(tree) if as_tree else text, encoding="utf-8")
        try:
            load_run_config(str(run_file))
        except ConfigError as error:
            assert str(error), "an empty message"


def _load_with_override(override: str) -> None:
    try:
        load_run_config("tiny", [override])
    except ConfigError as error:
        assert str(error), "an empty message"


@pytest.mark.parametrize("scale", SCALES)
def test_the_run_file_loader_ends_in_a_config_error_or_a_run(scale):
    _fuzz(500 * scale, _load_run_file, YAML_TREES, st.text(max_size=80), st.booleans())


OVERRIDES = st.one_of(
    st.text(max_size=40),
    st.tuples(st.sampled_from(["model.layer", "sampling.partitions", "clustering.ks", "corpus", "x.y"]), st.text()).map(
        lambda kv: f"{kv[0]}={kv[1]}"
    ),
)


def test_a_partition_count_past_the_keys_is_refused_not_listed():
    """Found by the override fuzz: sampling.partitions=100000000 listed a hundred million
    partition keys while validating (24 GB, then the OOM killer); keys have four digits."""
    with pytest.raises(ConfigError, match="sampling.partitions: Input should be less than or equal to 9999"):
        load_run_config("tiny", ["sampling.partitions=100000000"])


@pytest.mark.parametrize("scale", SCALES)
def test_overrides_end_in_a_config_error_or_a_run(scale):
    _fuzz(300 * scale, _load_with_override, OVERRIDES)


# --- the COMMIT.json reader ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def committed(tmp_path_factory) -> ActivationStore:
    """A store with one small committed partition, whose COMMIT.json each case replaces."""
    store = ActivationStore(str(tmp_path_factory.mktemp("store")))
    bits = np.arange(8 * 4, dtype=np.uint16).reshape(8, 4)
    store.write_partition("000", {"activations": bits, "token_ids": np.arange(8, dtype=np.int32)}, {"context_len": 4})
    return store


MANIFEST_VALUES = st.fixed_dictionaries(
    {},
    optional={
        "version": st.text(max_size=12) | st.integers(),
        "n_tokens": st.integers(-2, 20) | st.text(max_size=3),
        "d_model": st.integers(-1, 8) | st.none(),
        "checksums": st.dictionaries(st.text(max_size=20), st.integers() | st.text(max_size=3), max_size=3),
        "attrs": st.dictionaries(st.text(max_size=6), JSON_VALUES, max_size=2) | st.lists(st.integers()),
    },
)


def _read_commit(store: ActivationStore, content: bytes | None, manifest: dict, keep_real: bool) -> None:
    pointer = Path(store.root, ACTIVATIONS, "part-000", COMMIT_FILE)
    real = json.loads(pointer.read_bytes())
    try:
        pointer.write_bytes(
            content if content is not None else json.dumps(real | manifest if keep_real else manifest).encode()
        )
        try:
            store.manifest("000")
            store.verify("000")
            part = store.open("000")
            part.activations(0, 2)
        except StorageError as error:
            assert " -> " in str(error), error
    finally:
        pointer.write_bytes(json.dumps(real).encode())


@pytest.mark.parametrize("scale", SCALES)
def test_the_commit_reader_ends_in_a_storage_error_or_a_partition(committed, scale):
    contents = st.none() | st.binary(max_size=60)  # None: the manifest below, as JSON

    def read(content: bytes | None, manifest: dict, keep_real: bool) -> None:
        _read_commit(committed, content, manifest, keep_real)

    _fuzz(500 * scale, read, contents, MANIFEST_VALUES, st.booleans())
