"""The layers hold: `core` is pure compute, `defs` is thin, files are read through one layout, and
every artefact an asset reads belongs to an asset it declares."""

import ast
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
import yaml

from gemma_assets.core.config import load_run_config
from gemma_assets.core.layout import RunLayout, UndeclaredDependency
from gemma_assets.defs.graph import build_definitions
from gemma_assets.defs.resources import RunResource, StorageResource

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gemma_assets"
MAX_DEFS_FUNCTION_LINES = 40


def _python_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.py"))


def _imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
    return modules


def test_core_imports_no_dagster_even_indirectly():
    code = "import sys, gemma_assets.core.layout, gemma_assets.core.stages.report; print('dagster' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert done.stdout.strip() == "False"
    for path in _python_files(PACKAGE / "core"):
        assert not any(
            m == "dagster" or m.startswith(("dagster.", "gemma_assets.defs")) for m in _imported_modules(path)
        ), path


def test_benchmarks_import_nothing_from_defs():
    for path in _python_files(ROOT / "benchmarks"):
        assert not any(module.startswith("gemma_assets.defs") for module in _imported_modules(path)), path


def test_defs_functions_are_short():
    long = []
    for path in _python_files(PACKAGE / "defs"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_DEFS_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "move the stage logic into core: " + ", ".join(long)


def test_no_path_is_built_in_defs():
    for path in _python_files(PACKAGE / "defs"):
        text = path.read_text()
        assert "storage.path(" not in text and ".joinpath(" not in text, path


def test_warning_filters_are_set_in_one_place():
    setting = [
        path.relative_to(ROOT).as_posix()
        for folder in (PACKAGE, ROOT / "benchmarks")
        for path in _python_files(folder)
        if any(call in path.read_text() for call in ("filterwarnings(", "simplefilter(", "catch_warnings("))
    ]
    assert setting == ["gemma_assets/__init__.py"]


def test_project_instance_shows_no_first_visit_dialog():
    assert yaml.safe_load((ROOT / "dagster.yaml").read_text())["nux"] == {"enabled": False}


def test_a_bound_layout_refuses_artefacts_of_undeclared_assets(tmp_path):
    layout = RunLayout(tmp_path, tmp_path / "models").bound("interpretation", {"cluster_models"})
    assert layout.kmeans_dir(64).name == "k-00064"  # declared
    assert layout.features_site.name == "features"  # its own
    assert layout.corpus_dir.name == "corpus"  # a source, no asset's
    with pytest.raises(UndeclaredDependency, match="add whitening to the deps of interpretation"):
        layout.whitening_file()
    assert RunLayout(tmp_path, tmp_path / "models").whitening_file().name == "whitening.npz"  # unbound


def test_an_asset_reading_an_undeclared_artefact_fails_its_run(tmp_path):
    run = load_run_config("tiny")
    storage = StorageResource(data_root=str(tmp_path), run=RunResource.of(run))

    @dg.asset
    def reads_moments_without_declaring_them(context: dg.AssetExecutionContext, storage: StorageResource) -> None:
        storage.layout(context).moments_file("train")

    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [reads_moments_without_declaring_them],
            resources={"storage": storage},
            instance=instance,
            raise_on_error=False,
        )
    assert not result.success
    [failure] = [event for event in result.all_events if event.is_step_failure]
    assert "add activation_stats to the deps of reads_moments_without_declaring_them" in str(
        failure.event_specific_data
    )


def test_every_stage_declares_what_it_reads():
    """The graph's edges; the tiny pipeline run (conftest) reads every artefact through a bound
    layout, so an edge missing here fails that run too."""
    defs = build_definitions(load_run_config("tiny"), data_root="/nonexistent")
    graph = defs.resolve_asset_graph()

    def parents(name: str) -> set[str]:
        return {key.to_user_string() for key in graph.get(dg.AssetKey(name)).parent_keys}

    dictionaries = {"cluster_models", "leader_clusters", "itda_dictionaries", "sae_dictionary"}
    shared = {"activations", "activation_stats", "whitening"}
    assert parents("interpretation") == dictionaries | shared
    assert parents("downstream_loss") == dictionaries | shared
    assert parents("cluster_density") == {"cluster_models", "whitening", "activations"}
    assert parents("comparison_report") >= {"sae_evaluation", "downstream_loss", "interpretation", "activation_stats"}
