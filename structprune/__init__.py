"""structprune: task-aware structured pruning of transformers, with compaction, ONNX export and measured speedups.

The pipeline, one public function per arrow::

    hf_model -> MaskedModel(hf_model, masks) -> compact(model, masks) -> save(model, dir) / from_pretrained(dir)
             -> structprune.export.export(compact_model, onnx_dir) -> structprune.bench

The names below load on first use, so ``import structprune`` (and ``structprune --help``) stays instant.
"""

from structprune.lazy import exports

__version__ = "0.1.0"

_EXPORTS = {
    "MaskSet": "structprune.maskset",
    "MaskedModel": "structprune.masked_model",
    "ModelStructure": "structprune.arch",
    "compact": "structprune.compaction",
    "from_hf": "structprune.arch",
    "from_pretrained": "structprune.compaction",
    "save": "structprune.compaction",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = exports("structprune", _EXPORTS)
