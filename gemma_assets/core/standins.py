"""Offline stand-ins for the research run's sources, in the layouts of the real ones, so the
gemma-2-2b code path runs end to end with HF_HUB_OFFLINE=1 and no network:

- google/gemma-2-2b: a random-init `Gemma2ForCausalLM` with the real architecture where the
  hook and the splice see it (d_model 2304, 26 blocks, 8 query / 4 key-value heads of 256,
  attention and final-logit softcapping, sliding/global layers alternating, window 4096, the
  256,000-token vocabulary and tied embeddings). Only the MLP is narrower (REDUCED), which
  changes no shape the pipeline sees. The tokenizer is a byte-level BPE trained on the corpus,
  padded to 256,000 ids with Gemma's special-token ids.
- google/gemma-scope-2b-pt-res: `params.npz` at the real path of every SAE the run names, with
  Gemma Scope's keys and shapes (W_enc [2304, d_sae], W_dec, b_enc, b_dec, threshold). The
  thresholds are per-latent quantiles of the stand-in's own block activations, so L0 lands near
  the id's published value (average_l0_82 -> ~82); SAELens loads them through its own
  `SAE.from_pretrained(release, sae_id)`.
- google/gemma-scope-2-270m-pt (Gemma Scope 2, the demo's Gemma 3 270M): `params.safetensors`
  at `resid_post_all/<id>/` of each SAE a run names, with its keys and shapes (w_enc [d_in,
  d_sae], w_dec, b_enc, b_dec, threshold) and no config.json (SAELens' Gemma 3 loader then infers
  the config from the repo and the id), at the d_in the caller gives: 640 for the demo's model,
  the tiny model's 64 for tests that run them end to end.
- the corpus: Pile-format jsonl.zst shards (text + meta.pile_set_name), read by the same reader
  as monology/pile-uncopyrighted.

Both repos live in a Hugging Face hub cache (models--org--name/snapshots/<rev>/..., refs/main),
which `hub_environment` points the hub client at.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gemma_assets.core.config import ConfigError, RunConfig, SaeSpec
from gemma_assets.core.corpus import build_offline_corpus, iter_documents
from gemma_assets.core.files import atomic_dir, atomic_file, save_arrays, write_text

MODEL_REPO = "google/gemma-2-2b"
SAE_REPO = "google/gemma-scope-2b-pt-res"
SCOPE_2_REPO = "google/gemma-scope-2-270m-pt"
SCOPE_2_CALIBRATION_TOKENS = 2048  # standard normal tokens where the caller has no activations
REVISION = hashlib.sha1(b"gemma-assets stand-in 1").hexdigest()  # the snapshot folder and refs/main
REDUCED: dict[str, Any] = {"intermediate_size": 512}  # the real MLP is 9216 wide; nothing downstream sees its width
REAL_VOCAB = 256_000
TRAINED_VOCAB = 8192  # merges learnt on the corpus; the rest of the 256k ids are <unused{i}>
CORPUS_DOCUMENTS = 4000
STANDIN_DOCUMENT_RATE = 0.25
CALIBRATION_WINDOWS = 16  # windows whose block activations set the SAE thresholds (half fit, half check)
CALIBRATION_SEED = 1  # the runs' own samples use seed 0: other documents, drawn the same way


@dataclass(frozen=True)
class StandIns:
    root: Path

    @property
    def hub_cache(self) -> Path:
        return self.root / "hub"

    @property
    def corpus_dir(self) -> Path:
        return self.root / "pile-uncopyrighted"

    @property
    def corpus_files(self) -> str:
        return str(self.corpus_dir / "train" / "*.jsonl.zst")

    def snapshot(self, repo_id: str) -> Path:
        return self.hub_cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / REVISION

    def environment(self) -> dict[str, str]:
        """The variables that make the hub client read this cache and never the network."""
        return {"HF_HUB_CACHE": str(self.hub_cache), "HF_HUB_OFFLINE": "1"}


def _publish(stand_ins: StandIns, repo_id: str) -> None:
    """Point refs/main at the stand-in snapshot, as the hub client does after a download."""
    write_text(stand_ins.snapshot(repo_id).parent.parent / "refs" / "main", REVISION)


@dataclass(frozen=True)
class GemmaScopeFile:
    """One Gemma Scope SAE as stored on the hub: its folder, width and published L0."""

    path: str  # e.g. layer_12/width_16k/average_l0_82

    @property
    def width(self) -> int:
        """Latents: Gemma Scope names powers of two by their rounded size (width_16k, width_65k, width_1m)."""
        match = re.search(r"width_(\d+)([km])", self.path)
        if match is None:
            raise ConfigError(f"cannot read the width of Gemma Scope SAE {self.path!r} (no width_<N>k or width_<N>m)")
        rounded = int(match.group(1)) * (1000 if match.group(2) == "k" else 1_000_000)
        return 2 ** round(math.log2(rounded))

    @property
    def average_l0(self) -> int:
        match = re.search(r"average_l0_(\d+)", self.path)
        if match is None:
            raise ConfigError(f"cannot read the average L0 of Gemma Scope SAE {self.path!r} (no average_l0_<N>)")
        return int(match.group(1))


def gemma_scope_files(specs: Iterable[SaeSpec]) -> list[GemmaScopeFile]:
    """The hub folders of the run's Gemma Scope SAEs (canonical ids resolved through SAELens'
    own directory, so a canonical id and its average_l0 twin share one file)."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    directory = get_pretrained_saes_directory()
    paths = []
    for spec in specs:
        if spec.architecture != "pretrained" or spec.path:
            continue
        release = directory.get(spec.release)
        if release is None or release.repo_id != SAE_REPO or spec.sae_id not in release.saes_map:
            raise ConfigError(
                f"saes.pretrained {spec.name}: {spec.release}/{spec.sae_id} is not a Gemma Scope 2B residual SAE "
                f"({SAE_REPO}); --offline-standins builds those only -> name ids of gemma-scope-2b-pt-res(-canonical)"
            )
        paths.append(release.saes_map[spec.sae_id])
    return [GemmaScopeFile(path) for path in dict.fromkeys(paths)]


def build_model(stand_ins: StandIns, texts: Iterable[str], seed: int = 0, log: Callable[[str], None] = print) -> None:
    """The google/gemma-2-2b snapshot: random weights (bfloat16, sharded with an index as the hub
    stores it), the real config but for REDUCED, and a 256k-id tokenizer."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from gemma_assets.core.model import train_tokenizer

    target = stand_ins.snapshot(MODEL_REPO)
    if (target / "config.json").exists():
        return
    # each step is one silent call: together most of a minute on two cores
    log(f"{MODEL_REPO}: training the stand-in's tokenizer, then drawing and saving its random weights")
    with atomic_dir(target) as staging:
        tokenizer = train_tokenizer(texts, TRAINED_VOCAB, padded_to=REAL_VOCAB)
        tokenizer.save_pretrained(staging)
        config = Gemma2Config(  # the defaults are gemma-2-2b's own
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
            **REDUCED,
        )
        torch.manual_seed(seed)
        model = Gemma2ForCausalLM(config).bfloat16()
        model.save_pretrained(staging, max_shard_size="1GB")
    _publish(stand_ins, MODEL_REPO)


def calibration_activations(stand_ins: StandIns, run: RunConfig) -> np.ndarray:
    """Block activations of the stand-in model on CALIBRATION_WINDOWS windows drawn the way the
    run draws its sample, from other documents (BOS rows dropped): what SAE thresholds are set on."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gemma_assets.core.config import SampleSpec
    from gemma_assets.core.extraction import residual_stream
    from gemma_assets.core.sampling import sample_windows

    source = stand_ins.snapshot(MODEL_REPO)
    tokenizer = AutoTokenizer.from_pretrained(source)
    spec = SampleSpec(
        context_len=run.sampling.context_len,
        document_rate=STANDIN_DOCUMENT_RATE,
        partitions=2,
        windows_per_partition=CALIBRATION_WINDOWS // 2,
        seed=CALIBRATION_SEED,
    )
    sample, _ = sample_windows(iter_documents(stand_ins.corpus_files), tokenizer, spec)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, attn_implementation="eager").eval()
    acts = torch.cat(
        [
            residual_stream(model, torch.from_numpy(batch).long(), run.model.layer)[:, 1:]
            for batch in np.array_split(sample.tokens, 6)
        ]
    )
    return acts.reshape(-1, acts.shape[-1]).float().numpy()


def gemma_scope_params(acts: np.ndarray, width: int, average_l0: int, seed: int) -> dict[str, np.ndarray]:
    """JumpReLU parameters in Gemma Scope's layout whose L0 is ~average_l0 on tokens like
    `acts`: unit random decoder directions, the encoder tied to them on centred input, each
    latent's threshold at the quantile that makes it fire on average_l0 / width of the first
    half of the tokens, all thresholds then scaled together until the second half's mean L0 is
    average_l0 (per-latent quantiles of few tokens overfit them), and the decoder scaled by the
    least-squares factor (so FVU < 1)."""
    rng = np.random.default_rng(seed)
    d_model = acts.shape[1]
    w_dec = rng.standard_normal((width, d_model), dtype=np.float32)
    w_dec /= np.linalg.norm(w_dec, axis=1, keepdims=True)
    w_enc = np.ascontiguousarray(w_dec.T)
    b_dec = acts.mean(axis=0).astype(np.float32)
    b_enc = -(b_dec @ w_enc)
    pre = acts @ w_enc + b_enc
    fit, check = pre[: len(pre) // 2], pre[len(pre) // 2 :]
    threshold = np.quantile(fit, 1 - average_l0 / width, axis=0).astype(np.float32)
    threshold = np.maximum(threshold, 1e-3 * fit.std())  # JumpReLU thresholds are positive
    low, high = 0.25, 4.0
    for _ in range(30):  # mean L0 falls as the thresholds rise: bisect their common factor
        middle = (low * high) ** 0.5
        low, high = (middle, high) if (check > middle * threshold).sum(axis=1).mean() > average_l0 else (low, middle)
    threshold *= np.float32((low * high) ** 0.5)
    codes = np.where(check > threshold, check, 0.0).astype(np.float32)
    del pre, fit, check
    reconstruction = codes @ w_dec
    centred = acts[len(acts) // 2 :] - b_dec
    w_dec *= float((centred * reconstruction).sum() / max((reconstruction**2).sum(), 1e-30))
    return {"W_enc": w_enc, "W_dec": w_dec, "b_enc": b_enc, "b_dec": b_dec, "threshold": threshold}


def build_saes(
    stand_ins: StandIns,
    files: list[GemmaScopeFile],
    acts: Callable[[], np.ndarray],
    log: Callable[[str], None] = print,
) -> None:
    """params.npz for each missing Gemma Scope file (calibration activations computed once)."""
    missing = [f for f in files if not (stand_ins.snapshot(SAE_REPO) / f.path / "params.npz").exists()]
    if missing:
        log(f"Gemma Scope: the stand-in model's activations on {CALIBRATION_WINDOWS} windows, to set the thresholds")
        calibration = acts()
        for number, sae_file in enumerate(missing, start=1):
            log(f"Gemma Scope {number}/{len(missing)}: {sae_file.path} ({sae_file.width:,} latents)")
            seed = int(hashlib.sha1(sae_file.path.encode()).hexdigest()[:8], 16)
            params = gemma_scope_params(calibration, sae_file.width, sae_file.average_l0, seed)
            save_arrays(stand_ins.snapshot(SAE_REPO) / sae_file.path / "params.npz", params)
    _publish(stand_ins, SAE_REPO)


def build_gemma_scope_2_saes(
    stand_ins: StandIns, specs: Iterable[SaeSpec], d_in: int, calibration: np.ndarray | None = None
) -> list[Path]:
    """params.safetensors, in Gemma Scope 2's layout, for each Gemma Scope 2 SAE among `specs`
    that the cache lacks: JumpReLU parameters at `d_in` whose L0 on `calibration` (activations
    [n, d_in]; default: standard normal tokens) is the directory's published L0. Only the SAEs
    named are built: a 262k-wide one at d_in 640 is 1.3 GB. Returns every file's path."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory
    from safetensors.numpy import save_file

    directory = get_pretrained_saes_directory()
    wanted: dict[str, int] = {}
    for spec in specs:
        release = directory.get(spec.release)
        if spec.architecture != "pretrained" or spec.path or release is None or release.repo_id != SCOPE_2_REPO:
            continue
        if spec.sae_id not in release.saes_map:
            raise ConfigError(
                f"saes.pretrained {spec.name}: {spec.sae_id!r} is not in release {spec.release} -> use an id it lists"
            )
        wanted[release.saes_map[spec.sae_id]] = int(release.expected_l0.get(spec.sae_id) or 1)
    if calibration is None:
        calibration = np.random.default_rng(CALIBRATION_SEED).standard_normal(
            (SCOPE_2_CALIBRATION_TOKENS, d_in), dtype=np.float32
        )
    if calibration.shape[1] != d_in:
        raise ValueError(f"calibration activations of width {calibration.shape[1]} for SAEs of d_in {d_in}")
    paths = []
    for folder, l0 in wanted.items():
        target = stand_ins.snapshot(SCOPE_2_REPO) / folder / "params.safetensors"
        paths.append(target)
        if target.exists():
            continue
        seed = int(hashlib.sha1(folder.encode()).hexdigest()[:8], 16)
        params = gemma_scope_params(calibration, GemmaScopeFile(folder).width, l0, seed)
        with atomic_file(target) as staging:  # the loader's names: lower-case w_enc, w_dec
            save_file({name.lower(): np.ascontiguousarray(value) for name, value in params.items()}, str(staging))
    _publish(stand_ins, SCOPE_2_REPO)
    return paths


def location(data_root: Path, run: RunConfig) -> StandIns:
    """Where the run's stand-ins live (data_root/standins); refuses a run they cannot stand in for."""
    if run.model.kind != "hub" or run.model.name != MODEL_REPO:
        raise ConfigError(
            f"--offline-standins stands in for {MODEL_REPO} (and Gemma Scope), not {run.model.name!r} -> use it "
            "with --config gemma-2-2b, or a config whose model is google/gemma-2-2b"
        )
    return StandIns(Path(data_root) / "standins")


def build(stand_ins: StandIns, run: RunConfig, log: Callable[[str], None] = print) -> StandIns:
    """Build (once; idempotent) every stand-in the run's sources need."""
    files = gemma_scope_files(run.sae_specs)
    log(f"stand-ins under {stand_ins.root}: Pile-format corpus, {MODEL_REPO}, {len(files)} Gemma Scope files")
    build_offline_corpus(stand_ins.corpus_dir, max_documents=CORPUS_DOCUMENTS)

    def texts() -> Iterable[str]:
        return (document.text for document in iter_documents(stand_ins.corpus_files))

    build_model(stand_ins, texts(), log=log)
    build_saes(stand_ins, files, lambda: calibration_activations(stand_ins, run), log)
    return stand_ins


def rehearsal_config(run: RunConfig, stand_ins: StandIns) -> RunConfig:
    """The run with its corpus pointed at the stand-in Pile shards (model and SAEs keep their
    hub ids: the stand-in cache answers them). The shards hold CORPUS_DOCUMENTS documents, so
    the sample takes a quarter of them: the Pile's rate (0.34%) would leave a dozen."""
    data = run.model_dump(mode="json")
    data["corpus"] |= {"kind": "files", "data_files": [stand_ins.corpus_files], "dataset": ""}
    data["sampling"]["document_rate"] = max(run.sampling.document_rate, STANDIN_DOCUMENT_RATE)
    return RunConfig.model_validate(data)
