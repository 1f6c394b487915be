"""Loading a user's model and tokenizer safely: the one place structprune reads model folders it did not write.

* No code from a model folder ever runs: configs, models and tokenizers load with ``trust_remote_code=False``,
  and a folder that asks for its own code (an ``auto_map`` with an architecture structprune does not know) is
  refused with a message that says so.
* No pickle: weights load from safetensors only (``use_safetensors=True``); a folder that has only pickle
  weight files (``pytorch_model.bin``, ``*.pt``...) is refused in one line, with how to convert it.
* No silent garbage: a folder without tokenizer files, a degenerate tokenizer (a handful of tokens) or one
  whose ids overflow the model's embeddings is refused; a classification head that had to be initialised at
  random is an error where a trained model is expected, and a notice where training follows.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from structprune.modeling_structprune import CONFIGS, DECODERS, SECTION

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                   "tokenizer.model", "sentencepiece.bpe.model")
MIN_TOKENS = 16
"""Fewer tokens than this is not a real tokenizer (transformers builds a 5-token one from nothing)."""


class ModelLoadError(ValueError):
    """A model or tokenizer that cannot be used safely or correctly, with what to do instead."""


def _config_json(path: Path) -> dict | None:
    config = path / "config.json"
    if not config.is_file():
        return None
    try:
        raw = json.loads(config.read_text())
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"{config} is not valid JSON ({err}); the model folder is corrupt") from None
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{config} holds a {type(raw).__name__}, not a config object; the folder is corrupt")
    return raw


def _check_folder(path: Path, raw: dict) -> None:
    """Refuse a local folder that asks for remote code or holds only pickle weights."""
    from structprune.arch import supported_model_types

    if "auto_map" in raw and raw.get("model_type") not in supported_model_types():
        raise ModelLoadError(
            f"{path} asks to run its own Python code (config.json has an auto_map for model_type "
            f"{raw.get('model_type')!r}); structprune never runs code from a model folder. Use a model of a "
            f"supported architecture: {', '.join(supported_model_types())}")
    files = [p for p in path.iterdir() if p.is_file()]
    if not any(p.suffix == ".safetensors" for p in files):
        pickles = [p.name for p in files if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise ModelLoadError(
                f"{path} holds its weights only as a pickle file ({', '.join(sorted(pickles))}), which structprune "
                "does not load because unpickling can run code; convert it to safetensors with transformers "
                "(model.save_pretrained(folder, safe_serialization=True)) where you trust the file")


def check_outputs(name: str, outputs: int, num_labels: int | None) -> None:
    if num_labels is not None and outputs != num_labels:
        raise ModelLoadError(f"{name} has a classification head with {outputs} outputs but the task has {num_labels} "
                             "labels; use a model trained for this task")


def is_causal_lm(name: str) -> bool:
    """Whether ``name`` holds a causal LM: a ``.gguf`` file, a structprune folder of that task, or a Hugging Face
    folder whose architectures are all ``*ForCausalLM``. Hub names read as classifiers."""
    path = Path(name)
    if path.suffix == ".gguf":
        return True
    raw = _config_json(path) if path.is_dir() else None
    if raw is None:
        return False
    if SECTION in raw:
        return isinstance(raw[SECTION], dict) and raw[SECTION].get("task") == "causal_lm"
    architectures = raw.get("architectures") or []
    return bool(architectures) and all(str(a).endswith("ForCausalLM") for a in architectures)


def load_model(name: str, num_labels: int | None = None, trained: bool = True, causal: bool | None = None):
    """A full-size or compact structprune model from a structprune folder, or a Hugging Face folder / hub name.

    ``causal``: a causal LM is wanted (a ``.gguf`` file is accepted too, converted once and cached by
    :func:`structprune.gguf.gguf_folder`), or a sequence classifier; ``None``: what ``name`` holds
    (:func:`is_causal_lm`). A Hugging Face checkpoint without a
    classification head gets a new one (``num_labels`` outputs, seed 0). Where a trained model is expected
    (``trained``), that is an error; otherwise a notice on stderr.
    """
    import torch
    from safetensors import SafetensorError
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
    )

    from structprune.arch import from_hf
    from structprune.compaction import from_pretrained

    if causal is None:
        causal = is_causal_lm(name)
    path = Path(name)
    if causal and path.suffix == ".gguf":
        from structprune.gguf import gguf_folder

        path = gguf_folder(path)
        name = str(path)
    raw = _config_json(path) if path.is_dir() else None
    wanted = "causal language" if causal else "sequence-classification"
    if raw is not None and SECTION in raw:
        model = from_pretrained(path)
        if (model.spec.get("task") == "causal_lm") != causal:
            raise ModelLoadError(f"{name} is not a {wanted} model (its structprune task is "
                                 f"{model.spec.get('task', 'sequence_classification')!r}); use a model made for the task")
        if not causal:
            check_outputs(name, model.spec["num_labels"], num_labels)
        return model.eval()
    if raw is not None:
        _check_folder(path, raw)
    where = "the folder" if path.exists() else "a local folder (none exists there) or the Hugging Face hub"
    failure = f"cannot load a {wanted} model from {name!r} as {where}"
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{failure}: {err}") from None
    if config.model_type not in CONFIGS or (causal and config.model_type not in DECODERS):
        from structprune.arch import supported_model_types

        supported = DECODERS if causal else supported_model_types()
        raise ModelLoadError(f"{name} is a {config.model_type!r} model; structprune supports {wanted} models of "
                             f"type {', '.join(supported)}")
    _check_declared_size(name, config)
    if causal:
        auto, extra = AutoModelForCausalLM, {"dtype": torch.float32, "attn_implementation": "eager"}
    else:
        auto, extra = AutoModelForSequenceClassification, {}
        if any(a.endswith("ForSequenceClassification") for a in config.architectures or []):
            check_outputs(name, config.num_labels, num_labels)
        elif num_labels is not None:
            config.num_labels = num_labels
    torch.manual_seed(0)
    try:
        hf, info = auto.from_pretrained(name, config=config, trust_remote_code=False, use_safetensors=True,
                                        output_loading_info=True, **extra)
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        raise ModelLoadError(f"{failure}: {err}") from None
    _check_head(name, info.get("missing_keys", []), trained)
    return from_hf(hf).eval()


def _check_declared_size(name: str, config) -> None:
    """Refuse a Hugging Face config whose sizes would not fit in memory (before transformers allocates them)."""
    from structprune.costs import check_memory

    hidden, layers = int(getattr(config, "hidden_size", 0)), int(getattr(config, "num_hidden_layers", 0))
    ffn = int(getattr(config, "intermediate_size", 4 * hidden))
    vocab = int(getattr(config, "vocab_size", 0))
    check_memory(name, layers * (4 * hidden * hidden + 3 * hidden * ffn) + vocab * hidden)


def _check_head(name: str, missing: list[str], trained: bool) -> None:
    new = [key for key in missing if "classifier" in key or key.startswith(("score", "lm_head"))]
    if not new:
        return
    message = (f"{name} has no trained classification head ({', '.join(sorted(new))} initialised at random)")
    if trained:
        raise ModelLoadError(f"{message}: use the model fine-tuned on the task (structprune finetune --model "
                             f"{name} ...), or the folder it was saved to")
    print(f"notice: {message}; it is trained here", file=sys.stderr, flush=True)


def load_tokenizer(name: str | Path, vocab_size: int | None = None, required: bool = True):
    """The tokenizer saved with a model, checked (``None`` when absent and not ``required``).

    ``vocab_size``: the model's; token ids beyond it would index past the embeddings.
    """
    from transformers import AutoTokenizer

    path = Path(name)
    if path.suffix == ".gguf":
        from structprune.gguf import gguf_folder

        path = name = gguf_folder(path)
    if path.is_dir() and not any((path / f).is_file() for f in TOKENIZER_FILES):
        if not required:
            return None
        raise ModelLoadError(f"{path} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...): save the "
                             "tokenizer with the model (structprune.save(model, folder, tokenizer))")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(name), trust_remote_code=False)
    except (OSError, ValueError) as err:
        if not required:
            return None
        raise ModelLoadError(f"cannot load the tokenizer of {name} ({err}); the model folder needs its tokenizer "
                             "files (save them with the model)") from None
    if len(tokenizer) < MIN_TOKENS:
        raise ModelLoadError(f"the tokenizer of {name} has only {len(tokenizer)} tokens: its files are missing or "
                             "broken; save the model's own tokenizer with it")
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise ModelLoadError(f"the tokenizer of {name} has {len(tokenizer)} tokens but the model only {vocab_size} "
                             "embeddings: they do not belong together")
    return tokenizer
