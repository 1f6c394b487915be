"""Architecture adapters: the only code that knows Hugging Face module names.

An adapter turns a Hugging Face sequence-classification model into structprune's own model
(:class:`structprune.modeling_structprune.StructpruneForSequenceClassification`) at full size: it
writes the ``structprune`` spec (per-layer shapes and the settings the forward needs) and maps
the weights. Everything downstream (masks, masked model, compaction, export) works on that.
"""

from importlib import import_module

from structprune.arch.structure import UNIT_NAMES, LayerStructure, ModelStructure

_ADAPTERS = ("ADAPTERS", "adapter_for", "from_hf", "supported_model_types")

__all__ = ["UNIT_NAMES", "LayerStructure", "ModelStructure", *_ADAPTERS]


def __getattr__(name: str):
    if name in _ADAPTERS:  # loaded on first use: they import transformers
        return getattr(import_module("structprune.arch.adapters"), name)
    raise AttributeError(f"module 'structprune.arch' has no attribute {name!r}")
