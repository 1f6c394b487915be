"""Architecture adapters: the only code that knows Hugging Face module names.

An adapter turns a Hugging Face sequence-classification model into structprune's own model
(:class:`structprune.modeling_structprune.StructpruneForSequenceClassification`) at full size: it
writes the ``structprune`` spec (per-layer shapes and the settings the forward needs) and maps
the weights. Everything downstream (masks, masked model, compaction, export) works on that.
"""

from structprune.arch.structure import UNIT_NAMES, LayerStructure, ModelStructure
from structprune.lazy import exports

_ADAPTERS = ("ADAPTERS", "adapter_for", "from_hf", "supported_model_types")

__all__ = ["UNIT_NAMES", "LayerStructure", "ModelStructure", *_ADAPTERS]


__getattr__, __dir__ = exports("structprune.arch", {name: "structprune.arch.adapters" for name in _ADAPTERS})
