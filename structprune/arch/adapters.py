"""The adapter registry and :func:`from_hf`: a Hugging Face model into structprune's own, at full size."""

from __future__ import annotations

import copy

from transformers import PretrainedConfig, PreTrainedModel

from structprune.arch import bert, llama
from structprune.modeling_structprune import (
    SECTION,
    StructprunePreTrainedModel,
    model_class,
)

ADAPTERS = {model_type: module for module in (bert, llama) for model_type in module.MODEL_TYPES}


def supported_model_types() -> list[str]:
    return sorted(ADAPTERS)


def adapter_for(config: PretrainedConfig):
    """The adapter module for a config, or a clear error naming the supported architectures."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"unsupported architecture {model_type!r}; structprune supports {supported_model_types()}. "
            "Write an adapter in structprune/arch/ to add one."
        )
    return ADAPTERS[model_type]


def from_hf(hf_model: PreTrainedModel) -> StructprunePreTrainedModel:
    """structprune's full-size model with the weights of a Hugging Face classifier or causal LM."""
    if isinstance(hf_model, StructprunePreTrainedModel):
        return hf_model
    adapter = adapter_for(hf_model.config)
    spec = adapter.spec(hf_model)
    config = copy.deepcopy(hf_model.config)
    setattr(config, SECTION, spec)
    config._attn_implementation = "eager"  # attention is structprune's own, not a transformers backend
    model = model_class(config)(config)
    state = adapter.state_dict(hf_model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"adapter {adapter.__name__} mapped weights badly: missing {missing}, unexpected {unexpected}")
    reference = next(hf_model.parameters())
    model.to(device=reference.device, dtype=reference.dtype)
    model.train(hf_model.training)
    return model

