"""Run configuration: run files, overrides, validation before any compute, the generated reference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from reference import written_under

from gemma_assets.cli import main
from gemma_assets.core.config import (
    SHIPPED_CONFIGS,
    ConfigError,
    load_run_config,
    parse_resolved,
    reference_markdown,
    shipped_config_path,
)

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_FIGURES = Path(__file__).parent / "data" / "tiny_reference_figures.json"


def _fails(argv: list[str], capsys) -> str:
    """Run the CLI expecting exit code 2; returns the last line of stderr."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        (["model.layer=99"], ["model.layer=99 does not exist", "blocks 0..3", "--set model.layer="]),
        (["clustering.kss=[16]"], ["unknown key 'clustering.kss'", "did you mean 'clustering.ks'"]),
        (["clustering.ks=[64,5000]"], ["clustering.ks", "k=5000 exceeds the 4,464 train tokens", "lower k"]),
        (
            ["corpus.kind=files", "corpus.data_files=/nowhere/*.jsonl.zst"],
            ["corpus.data_files", "no file matches '/nowhere/*.jsonl.zst'", "fix the path"],
        ),
        (
            ["saes.pretrained=[{release: gemma-scope-2b-pt-res-canonical, sae_id: layer_2/width_99k/canonical}]"],
            ["sae_id 'layer_2/width_99k/canonical' is not in release", "layer_2/width_16k/canonical", "use an id"],
        ),
        (
            ["saes.pretrained=[{release: gemma-scope-2b-pt-res-canonical, sae_id: layer_2/width_16k/canonical}]"],
            ["d_in=2304", "d_model=64", "choose an SAE trained on this model"],
        ),
        (["sampling.holdout_partitions=4"], ["leaves no partition to train on", "lower holdout_partitions"]),
        (["model.dtype=fp16"], ["model.dtype", "'auto', 'float32' or 'bfloat16'", '"fp16"']),
    ],
    ids=["layer", "unknown-key", "k-above-tokens", "missing-corpus", "unknown-sae-id", "sae-width", "holdout", "dtype"],
)
def test_bad_config_exits_2_naming_key_and_fix_before_any_model_load(tmp_path, capsys, overrides, names):
    data_root = tmp_path / "data"
    argv = ["materialize", "--config", "tiny", "--data-root", str(data_root)]
    for override in overrides:
        argv += ["--set", override]
    last_line = _fails(argv, capsys)
    for name in names:
        assert name in last_line, last_line
    assert not (data_root / "models").exists()  # no model was built or loaded
    assert not (data_root / "tiny").exists()  # and nothing was computed


def test_bad_run_files(tmp_path, capsys):
    typo = tmp_path / "typo.yaml"
    typo.write_text("base: tiny\nmodle:\n  layer: 1\n")
    assert "unknown key 'modle': did you mean 'model'?" in _fails(["config", "validate", "--config", str(typo)], capsys)
    broken = tmp_path / "broken.yaml"
    broken.write_text("base: tiny\nmodel: [1, 2\n")
    assert "is not valid YAML at line 3" in _fails(["config", "show", "--config", str(broken)], capsys)
    missing = tmp_path / "no-such.yaml"
    assert "unknown run config" in _fails(["config", "show", "--config", str(missing)], capsys)
    assert "key.path=value" in _fails(["config", "show", "--config", "tiny", "--set", "model.layer"], capsys)


def test_run_file_with_base_and_overrides(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text(json.dumps({"body": "x", "source": {"name": "s"}}) + "\n")
    run_file = tmp_path / "configs" / "sweep.yaml"
    run_file.parent.mkdir()
    run_file.write_text(
        "base: tiny\nmodel: {layer: 1}\nclustering: {ks: [16, 32]}\n"
        "corpus: {kind: files, data_files: ../corpus/*.jsonl, text_field: body, stratum_field: source.name}\n"
    )
    run = load_run_config(str(run_file), ["clustering.max_iter=7"])
    assert run.name == "sweep" and run.model.layer == 1 and run.clustering.ks == (16, 32)
    assert run.clustering.max_iter == 7 and run.sampling.partitions == 4  # the rest comes from tiny
    assert run.corpus.data_files == (str(tmp_path / "configs" / ".." / "corpus" / "*.jsonl"),)
    assert parse_resolved(run.to_yaml()) == run  # the saved config reads back as the same run
    assert run.digest() != load_run_config("tiny").digest()
    assert run.digest("sampling") == load_run_config("tiny").digest("sampling")


def test_environment_chooses_the_config(monkeypatch):
    monkeypatch.setenv("GEMMA_ASSETS_CONFIG", "tiny")
    assert load_run_config().name == "tiny"
    monkeypatch.delenv("GEMMA_ASSETS_CONFIG")
    monkeypatch.setenv("GEMMA_ASSETS_PROFILE", "gemma-2-2b")
    assert load_run_config().model.layer == 12


def test_shipped_profiles_are_run_files():
    for name in SHIPPED_CONFIGS:
        assert shipped_config_path(name).is_file()
        assert load_run_config(name).name == name
    research = load_run_config("gemma-2-2b")
    assert research.model.name == "google/gemma-2-2b" and research.model.layer == 12
    assert research.clustering.ks == (64, 128, 256, 4096, 16384)
    pretrained = [s for s in research.sae_specs if not s.is_trained]
    assert [s.sae_id for s in pretrained][:2] == ["layer_12/width_16k/canonical", "layer_12/width_65k/canonical"]
    assert [s.name for s in research.sae_specs if s.is_trained] == ["topk-16384-k64", "jumprelu-16384-l0-64"]


def test_shipped_research_config_validates_against_saelens(monkeypatch):
    """Gemma Scope's ids, widths and hooks agree with google/gemma-2-2b block 12 (SAELens derives
    their configs from the ids, offline)."""
    from gemma_assets.core import sae

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = load_run_config("gemma-2-2b")
    pretrained = [spec for spec in run.sae_specs if not spec.is_trained]
    assert sae.pretrained_problems(pretrained, 2304, run.model.hook_name) == []
    wrong_layer = sae.pretrained_problems(pretrained[:1], 2304, "blocks.6.hook_resid_post")
    assert "reads hook blocks.12.hook_resid_post but the run stores blocks.6.hook_resid_post" in wrong_layer[0]


def test_config_show_prints_the_resolved_yaml(capsys):
    main(["config", "show", "--config", "tiny", "--set", "model.layer=1"])
    out = capsys.readouterr().out
    assert out.startswith("# run config tiny, digest ")
    assert "  layer: 1\n" in out and "ks:\n  - 64\n" in out


def test_configuration_reference_is_generated_from_the_schema():
    documented = (ROOT / "docs" / "configuration.md").read_text()
    assert documented == reference_markdown(), "regenerate: gemma-assets config reference > docs/configuration.md"
    for key in ("model.layer", "corpus.data_files", "clustering.ks", "saes.pretrained[].sae_id", "leader.percentile"):
        assert f"`{key}`" in documented


@pytest.mark.reference
@written_under(REFERENCE_FIGURES)
def test_tiny_figures_hold_against_the_reference(tiny_run):
    """The tiny run's figures (CE baselines, every dictionary's held-out figures with their
    intervals, spliced delta CE, spread over seeds) agree with the reference at the tolerance the
    arithmetic behind each allows (reference.py says why), on any CPU, from the same token
    windows. Regenerate after a deliberate change: reference.reference_figures of the new run."""
    from reference import (
        TINY_PREDICTIONS,
        compare_figures,
        fitting_noise,
        reference_figures,
        require_the_reference_sample,
    )

    reference = json.loads(REFERENCE_FIGURES.read_text())
    require_the_reference_sample(reference, tiny_run.layout.sample())
    assert tiny_run.layout.downstream()["predicted_tokens"] == TINY_PREDICTIONS  # the spliced CE's tolerance
    found = reference_figures(
        json.loads(tiny_run.layout.report_file("report.json").read_text()),
        tiny_run.layout.downstream(),
        tiny_run.layout.sample(),
    )
    mismatches = compare_figures(reference, found, saes=fitting_noise(tiny_run.profile))
    assert not mismatches, "\n".join(map(str, mismatches))


def test_corpus_files_in_every_format_with_named_fields(tmp_path):
    """Local jsonl, jsonl.zst and parquet corpora go through one reader, with the text and
    stratum fields the run config names (dotted for nested fields)."""
    import polars as pl
    import zstandard

    from gemma_assets.core.corpus import open_corpus

    records = [{"body": f"document {i}", "source": {"name": f"s{i % 2}"}} for i in range(3)]
    lines = "".join(json.dumps(r) + "\n" for r in records)
    (tmp_path / "a.jsonl").write_text(lines)
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    pl.DataFrame({"body": [r["body"] for r in records], "src": ["x", "y", "x"]}).write_parquet(tmp_path / "a.parquet")
    for pattern, stratum_field, strata in [
        ("a.jsonl", "source.name", ["s0", "s1", "s0"]),
        ("a.jsonl.zst", "source.name", ["s0", "s1", "s0"]),
        ("*.parquet", "src", ["x", "y", "x"]),
        ("a.jsonl", "meta.pile_set_name", ["unknown"] * 3),  # a missing stratum field is a stratum of its own
    ]:
        run_file = tmp_path / "run.yaml"
        run_file.write_text(
            f"base: tiny\ncorpus: {{kind: files, data_files: '{pattern}', text_field: body, stratum_field: {stratum_field}}}\n"
        )
        docs = list(open_corpus(load_run_config(str(run_file)).corpus, tmp_path / "unused"))
        assert [d.text for d in docs] == [r["body"] for r in records] and [d.stratum for d in docs] == strata
    run_file.write_text("base: tiny\ncorpus: {kind: files, data_files: a.jsonl, text_field: content}\n")
    from gemma_assets.core.corpus import CorpusError

    with pytest.raises(CorpusError, match="has no text field 'content' .*set corpus.text_field"):
        list(open_corpus(load_run_config(str(run_file)).corpus, tmp_path / "unused"))


def test_a_local_model_folder_is_validated_from_its_config(tiny_run):
    """kind `hub` takes any from_pretrained source; its blocks come from the folder's config.json."""
    from gemma_assets.core.validation import validate_run

    folder = str(tiny_run.layout.models_dir / "tiny-gemma2")
    run = load_run_config("tiny", ["model.kind=hub", f"model.name={folder}"])
    architecture = validate_run(run, tiny_run.layout.models_dir)
    assert (architecture.n_layers, architecture.d_model) == (4, 64)
    with pytest.raises(ConfigError, match=r"model.layer=7 does not exist: .* has blocks 0\.\.3"):
        validate_run(
            run.model_copy(update={"model": run.model.model_copy(update={"layer": 7})}), tiny_run.layout.models_dir
        )
