"""Bad input fails early with a message that names the problem and the fix."""

from __future__ import annotations

import json
import re

import pytest
import torch
import zstandard
from offline import offline_cache

from gemma_assets.cli import main
from gemma_assets.core import model
from gemma_assets.core.config import ConfigError, load_run_config
from gemma_assets.core.corpus import CorpusError, iter_documents
from gemma_assets.core.kmeans import fit_kmeans
from gemma_assets.core.sampling import sample_windows


def test_bad_profile_name_lists_valid_profiles(monkeypatch, capsys):
    with pytest.raises(ConfigError, match="unknown run config 'huge'.* one of tiny, demo, gemma-2-2b"):
        load_run_config("huge")
    monkeypatch.setenv("GEMMA_ASSETS_PROFILE", "tiyn")
    with pytest.raises(ConfigError, match="did you mean 'tiny'"):
        load_run_config()
    with pytest.raises(SystemExit) as exit_info:
        main(["materialize", "--profile", "huge"])
    assert exit_info.value.code == 2 and "one of tiny, demo, gemma-2-2b" in capsys.readouterr().err


def test_bad_layer_index_names_valid_range(tiny_run):
    source = str(tiny_run.layout.models_dir / "tiny-gemma2")
    with pytest.raises(ConfigError, match=r"layer 9 does not exist: .* has blocks 0\.\.3"):
        model.load_model(source, 9, "cpu", torch.float32)


def _write_shard(path, records) -> str:
    lines = "".join(json.dumps(r) + "\n" for r in records)
    path.write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    return str(path)


def test_empty_corpus(tmp_path, tiny_run):
    tokenizer = model.load_tokenizer(str(tiny_run.layout.models_dir / "tiny-gemma2"))
    spec = load_run_config("tiny").sampling
    empty = _write_shard(tmp_path / "00.jsonl.zst", [])
    with pytest.raises(CorpusError, match="the corpus has no documents"):
        sample_windows(iter_documents(empty), tokenizer, spec)
    with pytest.raises(CorpusError, match="no corpus files match"):
        list(iter_documents(str(tmp_path / "missing" / "*.jsonl.zst")))
    small = _write_shard(tmp_path / "01.jsonl.zst", [{"text": "a short text", "meta": {"pile_set_name": "x"}}])
    with pytest.raises(CorpusError, match=r"needs 192 .* raise sampling\.document_rate"):
        sample_windows(iter_documents(small), tokenizer, spec)


def test_unreachable_gated_model_names_hf_token(monkeypatch, tmp_path):
    offline_cache(monkeypatch, tmp_path / "empty-cache")
    with pytest.raises(model.ModelAccessError, match="HF_TOKEN"):
        model.load_tokenizer("google/gemma-2-2b")


def test_bad_k():
    x = torch.randn(10, 3)
    with pytest.raises(ConfigError, match="k must be at least 1"):
        fit_kmeans(x, 0)
    with pytest.raises(ConfigError, match="k=11 exceeds the 10 training tokens"):
        fit_kmeans(x, 11)
    with pytest.raises(
        ConfigError, match=re.escape("unknown k-means seeding 'forgy'; valid: k-means||, k-means++, random")
    ):
        fit_kmeans(x, 2, seeding="forgy")
