"""Helpers shared by adapters to copy Hugging Face weights under structprune's names."""

from __future__ import annotations

import torch
from torch import nn

ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu",
               "silu": "silu", "swish": "silu"}


def module_state(prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
    """``weight`` (and ``bias`` when present) of a linear, embedding or norm under ``prefix``: the parameters
    themselves, so that a mapping can be read off a ``meta`` model by identity (:mod:`structprune.streaming`)."""
    out = {f"{prefix}.weight": module.weight}
    if getattr(module, "bias", None) is not None:
        out[f"{prefix}.bias"] = module.bias
    return out


def activation_name(hf_name: str, model_type: str) -> str:
    if hf_name not in ACTIVATIONS:
        raise ValueError(f"{model_type}: activation {hf_name!r} is not supported; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[hf_name]
