"""`gemma-assets verify-report`: a report's held-out FVU, L0 and spliced CE recomputed from the
stored activations and dictionaries agree with the report within their tolerances, also under
another kernel path (ATEN_CPU_CAPABILITY=default, one thread) than the one that wrote it; a
figure moved past its tolerance fails with its own exit code and names the figure."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from gemma_assets.cli import main
from gemma_assets.defs.resources import DATA_ROOT_ENV_VAR
from gemma_assets.runner import EXIT_CONFIG, EXIT_DISAGREES

pytestmark = pytest.mark.reference


def _verify(report_dir, data_root, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "gemma_assets.cli",
        "verify-report",
        str(report_dir),
        "--data-root",
        str(data_root),
    ]
    return subprocess.run(command, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=600)


def test_the_tiny_report_reproduces_under_another_kernel_path(tiny_run):
    report_dir = tiny_run.layout.report_file("report.md").parent
    written_in = json.loads((report_dir / "report.json").read_text())["numeric_environment"]
    # the portable kernels, or where the report was written with them (CI's second pass), the native ones
    native = written_in["cpu_capability"] == "DEFAULT"
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"} | {"OMP_NUM_THREADS": "1"}
    other = _verify(report_dir, tiny_run.data_root, env if native else env | {"ATEN_CPU_CAPABILITY": "default"})
    assert other.returncode == 0, other.stdout[-3000:] + other.stderr[-3000:]
    recomputing = next(line for line in other.stdout.splitlines() if line.startswith("recomputing in:"))
    assert "torch threads 1" in recomputing
    if not native:  # (a CPU without vector extensions has only the portable kernels)
        assert "cpu capability DEFAULT" in recomputing
    rows = [line for line in other.stdout.splitlines() if line.endswith(("agrees", "DIFFERS"))]
    figures = {(row.split()[0], row.split()[1]) for row in rows}
    for spec in tiny_run.profile.sae_specs:
        assert {(spec.name, "heldout_fvu"), (spec.name, "heldout_l0"), (spec.name, "spliced_ce")} <= figures
    assert ("(model)", "clean_ce") in figures and ("kmeans-64", "spliced_ce") in figures
    assert other.stdout.strip().splitlines()[-1].startswith(f"all {len(rows)} figures agree")


@pytest.fixture
def data_root_env(monkeypatch):
    """verify-report exports --data-root to the environment: keep it from the rest of the session."""
    monkeypatch.setenv(DATA_ROOT_ENV_VAR, "")
    monkeypatch.delenv(DATA_ROOT_ENV_VAR)


def test_a_figure_past_its_tolerance_fails_and_is_named(tiny_run, tmp_path, capsys, data_root_env):
    report_dir = tmp_path / "report"
    shutil.copytree(tiny_run.layout.report_file("report.md").parent, report_dir)
    figures = json.loads((report_dir / "report.json").read_text())
    row = next(r for r in figures["dictionaries"] if r["name"] == "kmeans-64")
    row["heldout_fvu"]["value"] *= 1 + 3e-5  # the FVU tolerance is 1e-5 relative
    (report_dir / "report.json").write_text(json.dumps(figures))
    with pytest.raises(SystemExit) as exit_:
        main(["verify-report", str(report_dir), "--data-root", str(tiny_run.data_root)])
    assert exit_.value.code == EXIT_DISAGREES
    out, err = capsys.readouterr()
    assert "DIFFERS" in out and "1 of" in err and "heldout_fvu of kmeans-64" in err.strip().splitlines()[-1]


def test_a_report_of_another_run_or_no_report_is_refused_with_the_fix(tiny_run, tmp_path, capsys, data_root_env):
    with pytest.raises(SystemExit) as exit_:
        main(["verify-report", str(tmp_path), "--data-root", str(tiny_run.data_root)])
    assert exit_.value.code == EXIT_CONFIG
    assert "report.json" in capsys.readouterr().err
    report_dir = tmp_path / "report"
    shutil.copytree(tiny_run.layout.report_file("report.md").parent, report_dir)
    with pytest.raises(SystemExit) as exit_:
        main(["verify-report", str(report_dir), "--data-root", str(tmp_path / "elsewhere")])
    assert exit_.value.code == EXIT_CONFIG
    assert "pass --data-root with the folder the report's run was computed in" in capsys.readouterr().err
