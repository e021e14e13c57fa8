"""Progress of long steps: the reporter's lines, their rate limit, the Dagster run log, the
command line (never silent while a slowed k-means fit runs; a bar on a terminal), and the
preflight's warning before a long wait."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import dagster as dg
import pytest
from quick import quick_flags

from gemma_assets.core import progress
from gemma_assets.core.config import ConfigError, load_run_config
from gemma_assets.preflight import long_stage_warning, slice_of
from gemma_assets.runner import terminal

ROOT = Path(__file__).resolve().parents[1]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_line_names_the_step_the_position_the_rate_and_the_eta():
    clock, seen = Clock(), []
    with progress.reporting(seen.append, step="cluster_models"), progress.within("k-means k=256 seed 0"):
        lloyd = progress.Task("Lloyd", 51, "iterations", total_is_bound=True, clock=clock).start()
        clock.now = 10.0
        lloyd.update(5, inertia=1234.5)
        clock.now = 12.0
        lloyd.finish()
    start, middle, end = (update.line() for update in seen)
    assert start == "cluster_models: k-means k=256 seed 0: Lloyd: 0/51 iterations, started"
    # 5 iterations in 10 s: 46 left at 0.5/s, at most (Lloyd may converge sooner)
    assert middle == (
        "cluster_models: k-means k=256 seed 0: Lloyd: 5/51 iterations, 0.5 iterations/s, ETA <= 1:32 (inertia 1234)"
    )
    assert end.endswith("done in 0:12")
    assert seen[1].line(with_step=False).startswith("k-means k=256 seed 0: Lloyd: 5/51")


def test_the_run_log_gets_the_first_line_one_per_interval_and_the_end_of_tasks_it_showed():
    clock, shown = Clock(), []
    throttled = progress.Throttled(shown.append, every_s=10, clock=clock)
    with progress.reporting(throttled):
        fit = progress.Task("fit", 100, "steps", clock=clock).start()  # the step's first line: shown
        for step in range(1, 101):
            clock.now = step * 1.0  # one step a second, reported every step
            fit.update(step)
        fit.finish()
        quick = progress.Task("quick", 3, clock=clock).start()  # ends within the interval: no line
        quick.finish()
    positions = [(u.task, u.position) for u in shown]
    assert positions[0] == ("fit", 0)
    assert len(shown) == 1 + 10 + 1  # first, one per 10 s of 100 s, the end of "fit"
    assert positions[-1] == ("fit", 100) and shown[-1].final
    assert all(task != "quick" for task, _ in positions)


def test_a_loop_that_reports_every_iteration_sends_five_a_second_at_most():
    clock, seen = Clock(), []
    with progress.reporting(seen.append):
        loop = progress.Task("loop", 10_000, clock=clock).start()
        for i in range(10_000):
            clock.now = i * 1e-4  # 10k iterations in 1 s
            loop.update(i + 1)
    assert len(seen) <= 1 + 1 / progress.Task.EVERY_S + 1


def _on_a_terminal(monkeypatch, body: Callable[[], None]) -> str:
    """What `body`, run under the command line's progress, writes on a 160-column terminal."""
    controller, terminal_end = pty.openpty()
    fcntl.ioctl(terminal_end, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 160, 0, 0))
    with os.fdopen(terminal_end, "w", buffering=1) as tty:
        monkeypatch.setattr(sys, "stderr", tty)
        monkeypatch.setattr(sys, "stdout", tty)
        with terminal.command_line_progress(lines=False):
            body()
        tty.flush()
        chunks = []
        while select.select([controller], [], [], 0.5)[0]:  # everything written, in as many reads as it takes
            chunks.append(os.read(controller, 1 << 16))
    os.close(controller)
    return b"".join(chunks).decode(errors="replace")


def test_a_terminal_gets_a_bar_with_other_output_printed_above_it(monkeypatch):
    def body() -> None:
        with progress.reporting(lambda _: None, step="cluster_models"):
            task = progress.task("k-means k=64 seed 0: Lloyd", 10, "iterations").start()
            for i in range(1, 4):
                time.sleep(progress.Task.EVERY_S)
                task.update(i, inertia=42.0)
            print("a log line above the bar")
            task.finish()

    written = _on_a_terminal(monkeypatch, body)
    assert "cluster_models: k-means k=64 seed 0: Lloyd" in written
    assert "3/10" in written and "inertia=42" in written
    assert "a log line above the bar\n" in written.replace("\r\n", "\n")


def test_the_bars_clock_keeps_time_through_a_long_silent_call(monkeypatch):
    def body() -> None:
        with progress.task("converting the demo model from GGUF", 4, "steps"):
            time.sleep(2.5)  # one call, no report after the task's start

    written = _on_a_terminal(monkeypatch, body)
    assert "0/4 [00:02<" in written, written[-400:]


def test_without_a_terminal_a_command_prints_plain_lines(monkeypatch):
    captured = io.StringIO()
    monkeypatch.setattr(sys, "stderr", captured)
    with terminal.command_line_progress(lines=True, every_s=0):
        with progress.task("spliced CE", 4, "windows") as task:
            task.advance(4)
    lines = captured.getvalue().splitlines()
    assert lines[0] == "spliced CE: 0/4 windows, started"
    assert lines[-1].startswith("spliced CE: 4/4 windows, ") and "done in" in lines[-1]


def test_a_heartbeat_repeats_the_running_tasks_line_through_one_long_call_and_stops_when_closed():
    said: list[tuple[float, str]] = []
    started = time.monotonic()
    with progress.Heartbeat(lambda line: said.append((time.monotonic() - started, line)), every_s=0.3) as heartbeat:
        time.sleep(0.45)  # before any task: the step is working
        with progress.reporting(heartbeat, step="interpretation"):
            task = progress.task("alignment", 100, "cosines").start()
            time.sleep(progress.Task.EVERY_S)
            task.update(40)  # the last report before one long call
            time.sleep(1.5)
            task.finish()
        time.sleep(0.45)  # after the task: how long without one
    closed = len(said)
    time.sleep(0.45)
    assert len(said) == closed  # the thread ended with the context
    lines = [line for _, line in said]
    assert lines[0].startswith("working, ") and lines[0].endswith(" in, no progress reported yet"), lines
    during = [line for line in lines if line.startswith("alignment: ")]
    assert len(during) >= 2, lines  # 1.5 s of silence, a line per 0.3 s of it
    # the running task's latest position, its elapsed time brought up to now (the rate falls with it)
    assert all(line.startswith("alignment: 40/100 cosines, ") for line in during), during
    assert all("still running, no report for " in line for line in during)
    assert lines[-1].startswith("working, no task reported for "), lines
    beats = [at for at, _ in said]
    assert all(later - earlier >= 0.25 for earlier, later in zip(beats, beats[1:], strict=False))


def test_a_silent_step_logs_heartbeats_to_its_run_log(monkeypatch):
    """One 3.5 s call inside a task of a real Dagster step, progress every 1 s: the run log gets
    the task's line again while the call runs."""
    from gemma_assets.defs.common import reports_progress

    monkeypatch.setenv("GEMMA_ASSETS_PROGRESS_EVERY_S", "1")

    @dg.asset
    @reports_progress
    def slow(context):  # unannotated: Dagster reads the annotation, a string in this module
        with progress.task("one long call", 1, "calls"):
            time.sleep(3.5)
        return dg.MaterializeResult()

    with dg.instance_for_test() as instance:
        result = dg.materialize([slow], instance=instance)
        assert result.success
        messages = [entry.user_message for entry in instance.all_logs(result.run_id)]
    beats = [m for m in messages if m.startswith("one long call: 0/1 calls, ") and "still running" in m]
    assert len(beats) >= 2, messages


@pytest.mark.parametrize("value", ["ten", "-1", "nan", "inf"])
def test_a_progress_interval_that_is_not_a_number_of_seconds_names_the_fix(monkeypatch, value):
    from gemma_assets.defs.common import progress_every_s

    monkeypatch.setenv("GEMMA_ASSETS_PROGRESS_EVERY_S", value)
    with pytest.raises(ConfigError) as error:
        progress_every_s()
    assert (
        str(error.value) == f"GEMMA_ASSETS_PROGRESS_EVERY_S={value!r} is not a number of seconds -> set it to e.g. 10"
    )


SLOW_FIT = textwrap.dedent(
    """
    import os, time
    import gemma_assets.core.kmeans as kmeans
    original, calls = kmeans.elkan_pass, []
    pause = float(os.environ["TEST_SLOW_LLOYD_S"])

    def slowed(x, x_sq, centroids, *args):
        # the first k=64 fit's iterations only: a loop long enough that silence would show
        if len(centroids) == 64 and len(calls) < 20:
            calls.append(1)
            time.sleep(pause)
        return original(x, x_sq, centroids, *args)

    kmeans.elkan_pass = slowed
    """
)


def test_a_slowed_kmeans_fit_is_never_silent_and_its_run_log_has_eta_lines(tmp_path):
    """The quick tiny run (k = 64) with its first k-means fit slowed to 20 x 1.5 s, progress every 1 s (the
    default is 10 s): no gap in the command line's output of more than 20 s (a silent fit would
    leave 30 s; the margin is for a loaded machine, where one unreported call such as saving the
    tiny model took 14 s), and cluster_models' run log holds Lloyd lines with an ETA."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(SLOW_FIT)
    home = tmp_path / "dagster_home"
    home.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": f"{shim}{os.pathsep}{ROOT}",
        "TEST_SLOW_LLOYD_S": "1.5",
        "GEMMA_ASSETS_PROGRESS_EVERY_S": "1",
        "DAGSTER_HOME": str(home),
    }
    command = [sys.executable, "-m", "gemma_assets.cli", "materialize", "--config", "tiny"]
    command += [*quick_flags("clustering.ks=[64]"), "--data-root", str(tmp_path / "data")]
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    stamped: list[tuple[float, str]] = []

    def read() -> None:
        assert process.stdout is not None
        for raw in process.stdout:
            stamped.append((time.monotonic(), raw.decode(errors="replace").rstrip()))

    reader = threading.Thread(target=read)
    reader.start()
    assert process.wait(timeout=600) == 0, "\n".join(line for _, line in stamped[-30:])
    reader.join()
    gaps = [(later - earlier, line) for (earlier, _), (later, line) in zip(stamped, stamped[1:], strict=False)]
    longest, after = max(gaps)
    assert longest <= 20, f"{longest:.1f} s of silence before: {after}"
    lloyd = [line for _, line in stamped if "cluster_models" in line and "k=64 seed 0: Lloyd" in line]
    assert any("ETA <= " in line for line in lloyd), lloyd

    with dg.DagsterInstance.from_config(str(home)) as instance:
        records = instance.fetch_materializations(dg.AssetKey("cluster_models"), limit=1).records
        run_id = records[0].run_id
        messages = [entry.user_message for entry in instance.all_logs(run_id)]
        metadata = records[0].asset_materialization.metadata
    assert any("k-means k=64 seed 0: Lloyd" in m and "ETA" in m for m in messages)
    fits = metadata["progress"].value
    assert fits["k-means k=64 seed 0: Lloyd"]["seconds"] >= 20 * 0.6
    assert fits["k-means k=64 seed 0: Lloyd"]["unit"] == "passes"
    assert fits["k-means k=64 seed 0: Lloyd"]["iterations"] == fits["k-means k=64 seed 0: Lloyd"]["done"] - 1


def test_the_preflight_names_a_long_stage_and_the_rehearsal_that_shortens_it(tmp_path):
    typed = ["preflight", "--config", "tiny", "--set", "clustering.max_iter=10000000"]
    run = load_run_config("tiny", ["clustering.max_iter=10000000"])
    lines = long_stage_warning(run, [slice_of(run, None, 1).run], tmp_path, typed)
    assert "take long" in lines[0]
    assert lines[1].startswith("  cluster_models: up to ") and "10000000 Lloyd iterations" in lines[1]
    assert lines[-1].endswith(
        "gemma-assets preflight --config tiny --set clustering.max_iter=10000000 "
        "--set clustering.max_iter=1 --set clustering.seeding=random"
    )
    plain = load_run_config("tiny", [])
    assert long_stage_warning(plain, [slice_of(plain, None, 1).run], tmp_path, typed) == []
