"""SAEs of every architecture trained in one streamed pass: the shuffle buffer's bounded memory,
the same batches for every SAE, the scale folded into SAELens-native weights that load in a
process that never imports gemma_assets, the tiny run's SAEs, and the `saes` config grid."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gemma_assets.core import progress, sae
from gemma_assets.core.config import ConfigError, SaeSpec, TrainerSpec, load_run_config
from gemma_assets.core.records import Family

ARCHITECTURES = ("topk", "batchtopk", "matryoshka", "jumprelu", "standard", "random_decoder")


def _chunks(n_chunks: int, rows: int, d: int = 8):
    """A re-iterable stream of chunks whose rows are numbered (column 0), counting the passes."""
    passes = []

    def batches():
        passes.append(1)
        for chunk in range(n_chunks):
            x = torch.randn(rows, d)
            x[:, 0] = torch.arange(chunk * rows, (chunk + 1) * rows)
            yield x

    return batches, passes


def test_shuffle_buffer_holds_at_most_its_size_and_one_chunk_and_serves_each_row_once_per_pass():
    batches, passes = _chunks(n_chunks=50, rows=100)
    stream = sae.ShuffledStream(batches, batch_size=64, buffer_tokens=400, seed=3)
    served = torch.cat([batch for batch, _ in zip(stream, range(150), strict=False)])[:, 0].long()
    assert stream.peak_rows <= 400 + 100  # the split is 5,000 rows: memory does not follow it
    first_pass = served[: (5000 - 200) // 64 * 64]  # before the second pass: the buffer keeps half
    assert len(first_pass.unique()) == len(first_pass)  # no row twice within a pass
    assert not torch.equal(first_pass[:64], torch.arange(64))  # mixed, not in stored order
    assert len(passes) == 2  # 150 batches of 64 = 9,600 rows: a second pass, read as a stream


def test_the_stream_order_is_fixed_by_its_seed():
    batches, _ = _chunks(n_chunks=10, rows=100)
    first = [b for b, _ in zip(sae.ShuffledStream(batches, 32, 256, seed=1), range(5), strict=False)]
    again = [b for b, _ in zip(sae.ShuffledStream(batches, 32, 256, seed=1), range(5), strict=False)]
    other = [b for b, _ in zip(sae.ShuffledStream(batches, 32, 256, seed=2), range(5), strict=False)]
    assert all(torch.equal(a[:, 0], b[:, 0]) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a[:, 0], b[:, 0]) for a, b in zip(first, other, strict=True))


def test_every_sae_of_a_pass_steps_on_the_same_batches_each_read_once(monkeypatch):
    from sae_lens import SAETrainer

    seen: dict[int, list[torch.Tensor]] = {}
    step = SAETrainer.step

    def recording(self, batch):
        seen.setdefault(id(self), []).append(batch[:, 0].clone())
        return step(self, batch)

    monkeypatch.setattr(SAETrainer, "step", recording)
    batches, passes = _chunks(n_chunks=8, rows=128, d=16)
    specs = [
        SaeSpec.trained(architecture, 32, 4, (8,) if architecture == "matryoshka" else ())
        for architecture in ARCHITECTURES
    ]
    specs.append(specs[0].with_seed(1))
    trained = sae.train_saes(
        specs, batches, 16, 1024, torch.zeros(16), 4.0, TrainerSpec(epochs=2, batch_size=64, shuffle_buffer_tokens=256)
    )
    orders = list(seen.values())
    assert len(orders) == len(specs) and trained.steps == len(orders[0]) == 2 * 1024 // 64
    assert all(len(order) == len(orders[0]) for order in orders)
    assert all(torch.equal(a, b) for order in orders[1:] for a, b in zip(order, orders[0], strict=True))
    assert len(passes) <= 3  # two epochs read as a stream (the buffer's kept half may start a third)
    assert [one.spec.name for one in trained.saes] == [spec.name for spec in specs]


def test_a_slow_batch_reports_between_its_saes_and_each_batch_end_carries_the_figures(monkeypatch):
    """Wide SAEs on a CPU take half a minute a step: a batch that has run SLOW_BATCH_S reports
    after each SAE's step, not only once all of them have stepped."""
    from sae_lens import SAETrainer

    step = SAETrainer.step

    def slowed(self, batch):
        time.sleep(0.25)  # longer than a task's 0.2 s between updates: each one is sent
        return step(self, batch)

    monkeypatch.setattr(SAETrainer, "step", slowed)
    monkeypatch.setattr(sae, "SLOW_BATCH_S", 0.1)
    batches, _ = _chunks(n_chunks=4, rows=64, d=16)
    specs = [SaeSpec.trained("topk", 32, 4, ()), SaeSpec.trained("topk", 32, 4, ()).with_seed(1)]
    updates: list[progress.Update] = []
    with progress.reporting(updates.append):
        sae.train_saes(
            specs,
            batches,
            16,
            256,
            torch.zeros(16),
            4.0,
            TrainerSpec(epochs=1, batch_size=64, shuffle_buffer_tokens=128),
        )
    assert [update.position for update in updates] == [0, 32, 64, 96, 128, 160, 192, 224, 256, 256]
    for update in updates[2:-1:2]:  # each batch's end, once both SAEs have stepped
        assert {"loss", "loss_max", "l0_min", "l0_max"} <= update.figures.keys(), update
    assert updates[-1].final


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_the_scale_is_folded_into_native_weights_thresholds_unchanged(architecture, tmp_path):
    """What the SAE computed on x * s during training, the saved folder computes on raw x: the same
    active latents and the reconstruction divided by s; the fold is W_enc * s, W_dec / s, b_dec / s
    with every threshold unchanged."""
    from sae_lens import SAE

    torch.manual_seed(0)
    spec = SaeSpec.trained(architecture, 48, 6, (12,) if architecture == "matryoshka" else ())
    training = sae.training_sae(spec, 16, TrainerSpec(), "cpu")
    with torch.no_grad():
        for name, parameter in training.named_parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.3 if name != "threshold" else torch.rand_like(parameter))
    scale, x = 0.05, torch.randn(200, 16) * 20 + 3
    training.save_inference_model(tmp_path / "unfolded")  # the same SAE before folding, on x * s
    unfolded = SAE.load_from_disk(str(tmp_path / "unfolded"))
    before = {name: value.detach().clone() for name, value in training.named_parameters()}
    training.fold_activation_norm_scaling_factor(scale)
    after = dict(training.named_parameters())
    assert torch.allclose(after["W_enc"], before["W_enc"] * scale)
    assert torch.allclose(after["W_dec"], before["W_dec"] / scale)
    assert torch.allclose(after["b_dec"], before["b_dec"] / scale)
    if "threshold" in before:
        assert torch.equal(after["threshold"], before["threshold"])
    sae.SaeDictionary(training).save(tmp_path / "folded")
    folded = SAE.load_from_disk(str(tmp_path / "folded"))
    with torch.no_grad():
        assert torch.equal(folded.encode(x) != 0, unfolded.encode(x * scale) != 0)
        assert torch.allclose(folded(x), unfolded(x * scale) / scale, rtol=1e-4, atol=1e-3)


def test_every_architecture_trains_on_tiny_to_finite_figures(tiny_run):
    records = tiny_run.records()
    trained = [spec for spec in tiny_run.profile.sae_specs if spec.is_trained]
    assert {spec.architecture for spec in trained} == set(ARCHITECTURES)
    assert any(spec.whitened for spec in trained)
    for spec in trained:
        row = records[spec.name]
        assert math.isfinite(row["heldout_fvu"]) and 0 < row["heldout_fvu"] < 1, (spec.name, row["heldout_fvu"])
        assert math.isfinite(row["heldout_l0"]) and 0 < row["heldout_l0"] <= spec.width, spec.name
        title = spec.architecture.replace("_", " ") + (", whitened inputs" if spec.whitened else "")
        assert row["family"] == Family.of_sae(spec.architecture, spec.whitened).label(spec.width) == f"SAE ({title})"
        training = json.loads((tiny_run.layout.sae_dir(spec.name) / "training.json").read_text())
        assert training["train_tokens"] > 0 and training["fit_seconds"] <= training["pass_seconds"]
        if spec.architecture == "jumprelu":  # SAELens' quadratic penalty pulls L0 to its target
            assert abs(row["heldout_l0"] - spec.target_l0) <= 0.25 * spec.target_l0, row["heldout_l0"]
        if spec.architecture in ("topk", "random_decoder"):
            assert row["heldout_l0"] == spec.k
    passes = {
        json.loads((tiny_run.layout.sae_dir(s.name) / "training.json").read_text())["pass_seconds"] for s in trained
    }
    assert len(passes) == 1  # one pass trained them all


FRESH_PROCESS_LOAD = """
import json, sys
import numpy as np, torch
from sae_lens import SAE

x = torch.from_numpy(np.load(sys.argv[1])).double()
out = {}
for folder in sys.argv[2:]:
    model = SAE.load_from_disk(folder)
    with torch.no_grad():
        x_hat = model.decode(model.encode(x.float())).double()
    out[folder] = {
        "architecture": model.cfg.architecture(),
        "fvu": float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()),
    }
assert "gemma_assets" not in sys.modules, "SAELens alone loaded these SAEs"
print(json.dumps(out))
"""


def test_trained_saes_load_with_plain_saelens_in_a_fresh_process_at_the_projects_fvu(tiny_run, tmp_path):
    x, _ = tiny_run.layout.activation_store().load_tokens(tiny_run.profile.heldout_partition_keys)
    np.save(tmp_path / "heldout.npy", x.float().numpy())
    trained = [spec for spec in tiny_run.profile.sae_specs if spec.is_trained]
    folders = [str(tiny_run.layout.sae_dir(spec.name)) for spec in trained]
    clean = {key: os.environ[key] for key in ("PATH", "HOME") if key in os.environ}  # no PYTHONPATH
    done = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS_LOAD, str(tmp_path / "heldout.npy"), *folders],
        capture_output=True,
        text=True,
        timeout=600,
        env=clean,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    records = tiny_run.records()
    native = {"random_decoder": "topk", "batchtopk": "jumprelu", "matryoshka": "jumprelu"}
    for spec, folder in zip(trained, folders, strict=True):
        assert measured[folder]["architecture"] == native.get(spec.architecture, spec.architecture)
        assert measured[folder]["fvu"] == pytest.approx(records[spec.name]["heldout_fvu"], rel=1e-6), spec.name
    assert not any((Path(folder) / "activation_scale.json").exists() for folder in folders)


def _correlated_stream(d: int = 12, chunks: int = 6, rows: int = 256):
    """Raw-like activations: an offset and directions whose variances span 1.5 decades."""
    torch.manual_seed(0)
    mixing = torch.randn(d, d) * torch.logspace(0, 1.5, d)
    data = [torch.randn(rows, d) @ mixing + 5 for _ in range(chunks)]
    x = torch.cat(data).double().numpy()
    return (lambda: iter(data)), x


def test_a_random_decoder_stays_the_random_unit_dictionary_it_started_as_while_its_encoder_learns():
    from gemma_assets.core.codes import unit_rows

    batches, x = _correlated_stream()
    spec = SaeSpec.trained("random_decoder", 32, 4)
    torch.manual_seed(spec.seed)
    initial = sae.training_sae(spec, 12, TrainerSpec(), "cpu")
    trained = sae.train_saes(
        [spec, SaeSpec.trained("topk", 32, 4)],
        batches,
        12,
        len(x),
        torch.from_numpy(x.mean(0)).float(),
        float(np.linalg.norm(x, axis=1).mean()),
        TrainerSpec(epochs=3, batch_size=64, shuffle_buffer_tokens=256),
    )
    floor, learnt = (one.dictionary.sae for one in trained.saes)
    assert torch.allclose(unit_rows(floor.W_dec.detach()), unit_rows(initial.W_dec.detach()), atol=1e-5)
    assert not torch.allclose(unit_rows(floor.W_enc.detach().T), unit_rows(initial.W_enc.detach().T), atol=1e-2)
    assert not torch.allclose(unit_rows(learnt.W_dec.detach()), unit_rows(initial.W_dec.detach()), atol=1e-2)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_the_whitening_is_folded_into_native_weights(architecture, tmp_path):
    """What the SAE computed on whitened z = (x - mean) @ M, the saved folder computes on raw x,
    with the reconstruction mapped back through M^-1 (SAELens' fold_activation_whitening)."""
    from sae_lens import SAE

    from gemma_assets.core.whitening import Whitening

    _, x = _correlated_stream()
    whitening = Whitening.fit(x.mean(0), np.cov(x.T))
    zca, unzca = whitening.zca_matrix(), whitening.zca_inverse_matrix()
    torch.manual_seed(0)
    spec = SaeSpec.trained(architecture, 48, 6, (12,) if architecture == "matryoshka" else (), whitened=True)
    training = sae.training_sae(spec, 12, TrainerSpec(), "cpu")
    with torch.no_grad():
        for name, parameter in training.named_parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.3 if name != "threshold" else torch.rand_like(parameter))
    training.save_inference_model(tmp_path / "whitened")
    in_whitened_space = SAE.load_from_disk(str(tmp_path / "whitened"))
    training.fold_activation_whitening(*(torch.from_numpy(a) for a in (whitening.mean, zca, unzca)))
    sae.SaeDictionary(training).save(tmp_path / "folded")
    folded = SAE.load_from_disk(str(tmp_path / "folded"))
    raw = torch.from_numpy(x[:300]).float()
    z = torch.from_numpy((x[:300] - whitening.mean) @ zca).float()
    with torch.no_grad():
        assert torch.equal(folded.encode(raw) != 0, in_whitened_space.encode(z) != 0)
        mapped_back = in_whitened_space(z).double().numpy() @ unzca + whitening.mean
        assert np.allclose(folded(raw).double().numpy(), mapped_back, rtol=1e-4, atol=1e-3)


def test_a_whitened_input_sae_reports_its_fvu_in_raw_units_as_numpy_computes_it(tiny_run):
    """The tiny run's whitened TopK SAE, recomputed from its saved weights in float64 numpy on the
    raw held-out tokens, gives the report's FVU; in the whitened space its FVU is another number."""
    from safetensors.numpy import load_file

    [spec] = [s for s in tiny_run.profile.sae_specs if s.whitened]
    folder = tiny_run.layout.sae_dir(spec.name)
    weights = {k: v.astype(np.float64) for k, v in load_file(folder / "sae_weights.safetensors").items()}
    config = json.loads((folder / "cfg.json").read_text())
    x, _ = tiny_run.layout.activation_store().load_tokens(tiny_run.profile.heldout_partition_keys)
    x = x.double().numpy()
    pre = (x - weights["b_dec"] * config.get("apply_b_dec_to_input", False)) @ weights["W_enc"] + weights["b_enc"]
    top = np.argsort(-pre, axis=1)[:, : spec.k]
    codes = np.zeros_like(pre)
    np.put_along_axis(codes, top, np.maximum(np.take_along_axis(pre, top, 1), 0), 1)
    x_hat = codes @ weights["W_dec"] + weights["b_dec"]
    fvu = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert tiny_run.records()[spec.name]["heldout_fvu"] == pytest.approx(fvu, rel=1e-5)
    whitening = tiny_run.layout.whitening()
    z, z_hat = ((a - whitening.mean) @ whitening.zca_matrix() for a in (x, x_hat))
    assert abs(((z - z_hat) ** 2).sum() / ((z - z.mean(0)) ** 2).sum() - fvu) > 1e-3


# -- config ----------------------------------------------------------------------------------------


def test_the_grid_names_every_architecture_and_seed_replicas_cover_them_all():
    run = load_run_config(
        "tiny",
        [
            "saes.train=[{architecture: jumprelu, widths: [64, 128], target_l0s: [4, 16]}, "
            "{architecture: topk, widths: [64], ks: [1, 4]}, "
            "{architecture: matryoshka, widths: [128], ks: [8], levels: [16, 64]}, "
            "{architecture: batchtopk, widths: [128], ks: [8]}, "
            "{architecture: standard, widths: [128], l1_coefficients: [0.5]}]",
            "seeds=2",
        ],
    )
    names = [spec.name for spec in run.sae_specs]
    assert names == [
        "jumprelu-64-l0-4",
        "jumprelu-64-l0-16",
        "jumprelu-128-l0-4",
        "jumprelu-128-l0-16",
        "topk-64-k1",
        "topk-64-k4",
        "matryoshka-128-k8",
        "batchtopk-128-k8",
        "standard-128-l1-0.5",
    ]
    assert set(run.sae_seed_replicas) == set(names)
    matryoshka = run.sae_specs[6]
    assert matryoshka.levels == (16, 64) and matryoshka.active_per_token is None
    assert run.sae_specs[4].active_per_token == 1


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["saes.topk=[{widths: [64], ks: [1]}]"],
            ["`topk` -> `train`", "train: [{architecture: topk, widths: [64, 128], ks: [1, 4]}]"],
        ),
        (["saes.train_epochs=3"], ["`train_epochs` -> `trainer.epochs`"]),
        (["saes.train=[{architecture: jumprelu, widths: [64]}]"], ["jumprelu needs target_l0s", "target_l0s: [16]"]),
        (
            ["saes.train=[{architecture: topk, widths: [64], target_l0s: [4]}]"],
            ["topk needs ks", "add e.g. ks: [16]"],
        ),
        (
            ["saes.train=[{architecture: standard, widths: [64], l1_coefficients: [1], ks: [4]}]"],
            ["ks belongs to topk/batchtopk/matryoshka/random_decoder, not standard", "l1_coefficients"],
        ),
        (["saes.train=[{architecture: topk, widths: [64], ks: [100]}]"], ["ks 100 exceeds width 64", "lower it"]),
        (["saes.train=[{architecture: matryoshka, widths: [64], ks: [4]}]"], ["matryoshka needs levels"]),
        (
            ["saes.train=[{architecture: matryoshka, widths: [64], ks: [4], levels: [32, 16]}]"],
            ["levels [32, 16] must increase strictly", "below the smallest width 64"],
        ),
        (["saes.train=[{architecture: gated, widths: [64], ks: [4]}]"], ["saes.train[0].architecture", "'jumprelu'"]),
        (["saes.trainer.shuffle_buffer_tokens=100"], ["below 2 x batch_size (512)", "raise shuffle_buffer_tokens"]),
    ],
    ids=[
        "old-topk",
        "old-epochs",
        "no-sparsity",
        "wrong-sparsity",
        "foreign-key",
        "k-above-width",
        "no-levels",
        "bad-levels",
        "unknown-arch",
        "buffer",
    ],
)
def test_bad_sae_config_names_the_problem_and_the_fix(overrides, expected):
    with pytest.raises(ConfigError) as error:
        load_run_config("tiny", overrides)
    for text in expected:
        assert text in str(error.value), (text, str(error.value))


def test_a_process_that_only_reads_records_knows_every_sae_family():
    """Records name their family on disk; a fresh process (a report step in its own process)
    reads SAE families it never built a spec for."""
    code = (
        "from gemma_assets.core.records import Family\n"
        "family = Family.of('sae-random_decoder-whitened')\n"
        "print(family.title, family.is_floor, Family.of('sae-topk').is_floor)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "SAE (random decoder, whitened inputs) True False", done.stderr
