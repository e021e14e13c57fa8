"""gemma-assets preflight: slices of a config, the cost model, and the errors that name a fix
(the full offline rehearsal of gemma-2-2b is test_rehearsal.py)."""

from __future__ import annotations

import json
import math
import os

import dagster as dg
import pytest
from offline import offline_cache

from gemma_assets import preflight
from gemma_assets.cli import main
from gemma_assets.core import costs, fleet_costs, model, progress
from gemma_assets.core.config import ConfigError, load_run_config


def test_a_slice_keeps_every_shape_and_holds_the_largest_k():
    research = load_run_config("gemma-2-2b")
    plan = preflight.slice_of(research)
    sliced = plan.run
    assert plan.clipped == ()
    assert sliced.clustering.ks == research.clustering.ks
    assert sliced.sae_specs == research.sae_specs and sliced.model == research.model
    train_partitions = min(preflight.SLICE_TRAIN_PARTITIONS, len(research.train_partition_keys))
    assert sliced.sampling.holdout_partitions == 1 and sliced.sampling.partitions == train_partitions + 1
    smaller = train_partitions * (sliced.sampling.windows_per_partition - 1) * 127
    assert sliced.train_tokens >= max(research.clustering.ks) > smaller
    assert sliced.evaluation.ce_windows == 1  # the report shows one window's CE without an interval
    demo = preflight.slice_of(load_run_config("demo")).run
    assert demo.sampling.windows_per_partition == preflight.MIN_WINDOWS  # two odd windows to test probes on
    second = preflight.slice_of(research, point=2).run
    assert second.sampling.windows_per_partition == 2 * sliced.sampling.windows_per_partition
    assert second.evaluation.ce_windows == 2


def test_a_slice_too_small_for_a_k_says_which_and_how_to_fix_it():
    plan = preflight.slice_of(load_run_config("gemma-2-2b"), windows=5)
    assert plan.run.clustering.ks == (64, 128, 256, 4096)
    (message,) = plan.clipped
    train_partitions = min(preflight.SLICE_TRAIN_PARTITIONS, 15)
    assert message.startswith(f"k=16384 is not rehearsed: the slice holds {train_partitions * 5 * 127:,} train tokens")
    assert message.endswith(f"pass --windows {math.ceil(16384 / (train_partitions * 127))} or more")
    with pytest.raises(ConfigError, match="no k fits the slice: k=2048 .* pass --windows 42 or more"):
        preflight.slice_of(load_run_config("demo", ["clustering.ks=[2048]", "sampling.context_len=8"]), windows=4)


def test_the_estimate_separates_fixed_costs_from_per_token_ones():
    demo = load_run_config("demo")
    work = costs.asset_work(demo)
    tokens = work["activations"].units
    assert tokens == 8 * 48 * 128 and work["downstream_loss"].units == 32
    # 10 s of model load plus 1 ms per token, measured at 1/8 and 1/4 of the tokens
    slices = [
        [costs.Measured("activations", 10 + share * tokens / 1000, 2**30, 0, share * tokens, "tokens")]
        for share in (1 / 8, 1 / 4)
    ]
    (two_points,) = costs.estimate(slices, demo, 640)
    assert two_points.seconds == pytest.approx(10 + tokens / 1000)
    (one_point,) = costs.estimate(slices[:1], demo, 640)
    assert one_point.seconds == pytest.approx(8 * (10 + tokens / 8000))  # an upper bound: the load scaled too
    assert "linear in tokens" in one_point.assumption


def test_disk_grows_by_what_each_file_holds(tmp_path):
    """Centroids and SAE weights do not grow with tokens; the store and assignments do."""
    research = load_run_config("gemma-2-2b")
    files = {
        "activations/part-0000/x/c/0": 1000,
        "clusters/k-16384/model.npz": 500,
        "clusters/k-16384/assignments/part-0000/c/0": 40,
        "clusters/k-16384/windows.npz": 30,
        "stats/part-0000.moments.npz": 20,
        "saes/gemma-scope-65k-canonical/sae_weights.safetensors": 700,
    }
    for name, size in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"0" * size)
    use = costs.disk_use(tmp_path)
    assert use == {"store": 1000, "per_token": 40, "per_heldout_window": 30, "per_partition": 20, "fixed": 1200}
    sliced = preflight.slice_of(research).run
    full = costs.disk_estimate([(sliced, use)], research)
    tokens = costs.disk_units(research)["store"] / costs.disk_units(sliced)["store"]
    assert full["store"] == pytest.approx(1000 * tokens) and full["per_token"] == pytest.approx(40 * tokens)
    assert full["fixed"] == 1200 and full["per_partition"] == pytest.approx(20 * 17 / 16)
    windows = (2 * 2048) / sliced.sampling.windows_per_partition
    assert full["per_heldout_window"] == pytest.approx(30 * windows)


def test_offline_standins_stand_in_for_gemma_2_2b_only(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["preflight", "--config", "tiny", "--offline-standins", "--data-root", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "stands in for google/gemma-2-2b" in capsys.readouterr().err.strip().splitlines()[-1]
    assert "HF_HUB_OFFLINE" not in os.environ  # refused before the environment is touched


def test_missing_standins_name_the_preflight_command(monkeypatch, tmp_path):
    offline_cache(monkeypatch, tmp_path / "empty-cache")
    with pytest.raises(model.ModelAccessError) as error:
        model.load_tokenizer("google/gemma-2-2b")
    assert "HF_HUB_OFFLINE is set and the Hugging Face cache" in str(error.value)
    assert "gemma-assets preflight --config gemma-2-2b --offline-standins" in str(error.value)


def test_an_unreachable_hub_without_offline_mode_names_the_fixes(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    message = model.offline_hint()
    assert "set HF_HUB_OFFLINE=1" in message and "--offline-standins" in message


def test_too_few_windows_and_unknown_widths_are_named():
    from gemma_assets.core.standins import GemmaScopeFile

    with pytest.raises(ConfigError, match="--windows 2 is too few.* pass --windows 4 or more"):
        preflight.slice_of(load_run_config("demo"), windows=2)
    widths = [GemmaScopeFile(f"layer_12/width_{w}/average_l0_9").width for w in ("16k", "65k", "1m")]
    assert widths == [16384, 65536, 1048576]
    with pytest.raises(ConfigError, match="cannot read the width"):
        GemmaScopeFile("layer_12/canonical").width  # noqa: B018


def test_a_slope_lost_in_noise_keeps_the_upper_bound():
    assert costs.extrapolate([(10, 5.0), (20, 4.0)], 100) == pytest.approx(100 * 4.0 / 20)
    assert costs.extrapolate([(10, 3.0), (20, 5.0)], 100) == pytest.approx(1 + 0.2 * 100)


def test_memory_scales_what_the_asset_adds_not_what_earlier_slices_left():
    """The second slice starts in a process the first one grew; the estimate keeps the first
    slice's baseline and scales only the asset's own growth."""
    demo = load_run_config("demo")
    tokens = costs.asset_work(demo)["activations"].units
    gb = 2**30
    slices = [
        [costs.Measured("activations", 10.0, 2 * gb, 0, tokens / 8, "tokens", start_rss_bytes=1 * gb)],
        [costs.Measured("activations", 20.0, 5 * gb, 0, tokens / 4, "tokens", start_rss_bytes=3 * gb)],
    ]
    (estimate,) = costs.estimate(slices, demo, 640)
    # growth 1 GB at 1/8 and 2 GB at 1/4 of the tokens: 8 GB at all of them, on the 1 GB baseline
    assert estimate.peak_rss_bytes == pytest.approx(9 * gb, rel=1e-6)
    assert "RSS the asset adds" in estimate.assumption


def _fleet(run=None, gpus: int = 2, workers: int = 8, d_model: int = 2304) -> fleet_costs.FleetPlan:
    run = run or fleet_costs.at_tokens(load_run_config("gemma-2-2b"), 10**9)
    return fleet_costs.fleet_plan(run, d_model, gpus, workers, fleet_costs.FleetRates(worker_flops=50e9))


def _stage_seconds(plan: fleet_costs.FleetPlan) -> dict[str, float]:
    return {stage.stage: stage.seconds for stage in plan.stages}


STORE_PASSES = ("statistics", "k-means Lloyd", "assignments", "GMM EM", "held-out evaluation")


def test_the_store_passes_divide_over_workers_and_extraction_over_gpus():
    base = _stage_seconds(_fleet())
    twice_the_workers = _stage_seconds(_fleet(workers=16))
    twice_the_gpus = _stage_seconds(_fleet(gpus=4))
    for stage in STORE_PASSES:
        assert twice_the_workers[stage] == pytest.approx(base[stage] / 2) and twice_the_gpus[stage] == base[stage]
    assert twice_the_gpus["extraction"] == pytest.approx(base["extraction"] / 2)
    assert twice_the_workers["extraction"] == base["extraction"]
    # the seeding sample is drawn over the workers, the seeding itself runs in one process
    assert base["k-means seeding"] / 2 < twice_the_workers["k-means seeding"] < base["k-means seeding"]


def test_a_lloyd_pass_costs_what_the_issue_counts():
    """At k = 16,384 and d 2,304 a Lloyd iteration over the train split is 2 n k d FLOP."""
    run = fleet_costs.at_tokens(load_run_config("gemma-2-2b", ["clustering.ks=[16384]"]), 10**9)
    (lloyd,) = [stage for stage in _fleet(run).stages if stage.stage == "k-means Lloyd"]
    assert lloyd.store_passes == 2 * run.clustering.max_iter
    assert lloyd.flops / lloyd.store_passes == pytest.approx(2 * run.train_tokens * 16384 * 2304)
    assert lloyd.read_bytes / lloyd.store_passes == pytest.approx(run.train_tokens * 2304 * 2)


def test_lloyd_network_bytes_follow_k_and_d_not_the_fleet():
    plan = _fleet()
    assert plan.lloyd_bytes_to_each_worker == 16384 * 2304 * 4  # float32 centroids
    assert plan.lloyd_bytes_from_each_worker == 16384 * 2305 * 8  # float64 sums and counts
    other_fleet = _fleet(gpus=7, workers=3)
    assert (other_fleet.lloyd_bytes_to_each_worker, other_fleet.lloyd_bytes_from_each_worker) == (
        plan.lloyd_bytes_to_each_worker,
        plan.lloyd_bytes_from_each_worker,
    )
    assert other_fleet.lloyd_bytes_at_client == 3 * plan.lloyd_bytes_from_each_worker
    half_d = _fleet(d_model=1152)
    assert half_d.lloyd_bytes_to_each_worker == plan.lloyd_bytes_to_each_worker / 2
    half_k = _fleet(fleet_costs.at_tokens(load_run_config("gemma-2-2b", ["clustering.ks=[64,8192]"]), 10**9))
    assert half_k.lloyd_k == 8192 and half_k.lloyd_bytes_to_each_worker == plan.lloyd_bytes_to_each_worker / 2


def test_a_token_count_becomes_partitions_of_the_configs_size():
    research = load_run_config("gemma-2-2b")
    full = fleet_costs.at_tokens(research, 1_260_000_000)
    per_partition = research.sampling.tokens_per_partition
    assert full.sampling.partitions == math.ceil(1_260_000_000 / per_partition) == 4807
    assert full.sampling.holdout_partitions == round(4807 * 2 / 17)
    assert full.sampling.windows_per_partition == research.sampling.windows_per_partition
    with pytest.raises(ConfigError, match="more than 9,999 .* sampling.windows_per_partition"):
        fleet_costs.at_tokens(research, 10_000 * per_partition)
    with pytest.raises(ConfigError, match="each needs at least 1"):
        _fleet(workers=0)


def test_preflight_over_machines_prints_the_plan_without_running_a_slice(tmp_path, capsys):
    argv = ["preflight", "--config", "gemma-2-2b", "--tokens", "1.26e9", "--d-model", "2304"]
    argv += ["--workers", "64", "--gpus", "8", "--worker-gflops", "50", "--data-root", str(tmp_path)]
    main([*argv, "--json", str(tmp_path / "plan.json")])
    out = capsys.readouterr().out
    assert "extraction over 8 GPU(s) and the store passes over 64 Dask worker(s)" in out
    assert "| k-means Lloyd | 500 |" in out and "the client receives 18.0 GB from 64 workers" in out
    assert not (tmp_path / "preflight").exists()
    document = json.loads((tmp_path / "plan.json").read_text())
    assert document["workers"] == 64 and document["rates"]["worker_flops"] == 50e9
    assert document["seconds"] == pytest.approx(sum(stage["seconds"] for stage in document["stages"]))


def test_interpretation_keeps_its_width_set_work_out_of_the_token_line():
    """The alignments and feature pages do not grow with the interpreted tokens (a slice has the
    full run's widths): they are added as measured, scaled only by what the full run does more
    of them."""
    research = load_run_config("gemma-2-2b")
    tokens = costs.asset_work(research)["interpretation"].units
    vocab = 256_000
    full_width = costs.width_flops(research, 2304, vocab)
    # 100 s of tokens-linear work and 300 s of alignments and pages, at an 8th of the tokens
    measured = [
        costs.Measured(
            "interpretation", 400.0, 2**30, 0, tokens / 8, "tokens", width_seconds=300.0, width_flops=full_width
        )
    ]
    (estimate,) = costs.estimate([measured], research, 2304, vocab=vocab)
    assert estimate.seconds == pytest.approx(8 * 100 + 300)
    # a rehearsal's 64 logit effects per dictionary: the rest at the rate the slice did its share
    rehearsed = load_run_config("gemma-2-2b", ["evaluation.logit_effect_features=64"])
    share = costs.width_flops(rehearsed, 2304, vocab)
    assert share < full_width / 10  # logit effects of every feature through 256k tokens dominate
    measured = [
        costs.Measured("interpretation", 400.0, 2**30, 0, tokens / 8, "tokens", width_seconds=300.0, width_flops=share)
    ]
    (estimate,) = costs.estimate([measured], research, 2304, vocab=vocab)
    assert estimate.seconds == pytest.approx(8 * 100 + 300 * full_width / share)
    assert "dictionaries' widths" in estimate.assumption


def test_the_width_set_work_counts_cosines_refits_and_logit_effects():
    overrides = ["clustering.ks=[64, 256]", "seeds=3", "evaluation.logit_effect_features=10", "itda.l0s=[1, 8]"]
    run = load_run_config("demo", overrides)
    sae_widths = [costs.sae_width(s) for s in run.sae_specs]
    trained = [costs.sae_width(s) for s in run.sae_specs if s.is_trained]
    itda_widths = [width for width in sorted(set(trained)) for m in (1, 8) if m < width]  # ITDA beside the trained SAEs
    assert itda_widths
    latents = [*sae_widths, *itda_widths]  # aligned with each k's centroids, given pages beside them
    cosines = 320 * sum(latents) + 2 * (64**2 + 256**2 + sum(w * w for w in trained))
    directions = sum(min(10, w) for w in [64, 256, *latents])
    assert costs.width_flops(run, 640, 1000) == 2 * 640 * (cosines + directions * 1000)
    assert costs.width_flops(run, 640, None) == 2 * 640 * cosines


def test_the_width_count_is_what_the_tiny_runs_interpretation_aligned_and_paged(tiny_run):
    """The estimate's count of the dictionaries set beside the clusters, against what the stage
    itself counted in its progress (its metadata): cosines aligned, features given pages."""
    run = tiny_run.profile
    event = tiny_run.instance.get_latest_materialization_event(dg.AssetKey("interpretation"))
    tasks = event.asset_materialization.metadata["progress"].value
    latents = costs.interpreted_latent_widths(run)
    assert run.itda_widths and len(latents) > len(run.sae_specs)  # ITDA dictionaries among them
    assert tasks["alignment and activation F1"]["done"] == sum(k * w for k in run.clustering.ks for w in latents)
    assert tasks["feature pages"]["done"] == sum(run.clustering.ks) + sum(latents)


def test_the_meter_keeps_the_wall_time_of_a_steps_tasks_by_unit():
    now = [0.0]
    meter = preflight.Meter()
    with meter("run-1"), progress.reporting(lambda _: None, step="interpretation"):
        for name, unit, seconds in (("encoding", "tokens", 10), ("alignment", "cosines", 20), ("pages", "features", 5)):
            task = progress.Task(name, 1, unit, clock=lambda: now[0]).start()
            now[0] += seconds
            task.finish()
    with progress.reporting(lambda _: None, step="interpretation"):  # outside the meter: not kept
        late = progress.Task("late", 1, "cosines", clock=lambda: now[0]).start()
        now[0] += 100
        late.finish()
    assert meter.seconds_in("interpretation", ("cosines", "features")) == 25.0
    assert meter.seconds_in("interpretation", ("tokens",)) == 10.0
    assert meter.seconds_in("activations", ("cosines",)) == 0.0
