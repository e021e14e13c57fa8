"""Bad input fails early with a message that names the problem and the fix."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import zstandard
from offline import offline_cache

from benchmarks.hub_unreachable import DroppingHub
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


def test_an_unreachable_hub_is_asked_once_then_the_cache_alone_is_read(tiny_run, tmp_path):
    """HF_HUB_OFFLINE unset and the hub unreachable: the hub client would retry every file with
    backoff (140 s for the tokenizer here) before reading the cache, and as long before an
    optional SAE the cache lacks is skipped. The loaders probe the hub once per process and then
    read the cache alone. The 'hub' is a loopback port that reads each request's first line and
    closes the connection unanswered (the benchmark's DroppingHub)."""
    revision = "0" * 40
    repo = tmp_path / "hub" / "models--google--gemma-2-2b"
    shutil.copytree(tiny_run.layout.models_dir / "tiny-gemma2", repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    hub = DroppingHub()
    env = {name: value for name, value in os.environ.items() if not name.startswith("HF_")}
    env |= {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_ENDPOINT": hub.endpoint}
    script = (
        "import torch\n"
        "from gemma_assets.core import model, sae\n"
        "from gemma_assets.core.config import load_run_config\n"
        "from gemma_assets.core.config.schema import ModelSpec\n"
        "source = 'google/gemma-2-2b'\n"
        "print(len(model.load_tokenizer(source)), model.load_model(source, 1, 'cpu', torch.float32).config.hidden_size)\n"
        "print(model.architecture(ModelSpec(kind='hub', name=source, layer=1), None).d_model)\n"
        "optional = [s for s in load_run_config('demo').sae_specs if s.optional]\n"
        "print(sae.pretrained_problems(optional[:1], 640, 'blocks.6.hook_resid_post', print))\n"
        "try:\n"
        "    sae.load_pretrained(optional[0], 'cpu')\n"
        "except sae.SaeUnavailable as error:\n"
        "    print(error.reason)\n"
    )
    try:
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    finally:
        hub.close()
    requests = hub.requests
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() + lines[1].split() == [str(model.TINY_VOCAB), "64", "64"]
    assert "(optional) is not in the Hugging Face cache and the hub is unreachable: the run will skip it" in lines[2]
    assert lines[3:] == ["[]", "not in the Hugging Face cache and the hub is unreachable"]
    assert requests.count("HEAD / HTTP/1.1") == 1  # the probe, once per process
    # no request for a file, let alone its retries (the hub client's own registry fetch names no repo)
    assert not [request for request in requests if "gemma" in request], requests
    warning = "the Hugging Face hub cannot be reached: this process reads the Hugging Face cache alone"
    assert done.stderr.count(warning) == 1
