"""structprune: task-aware structured pruning of transformers, with compaction, ONNX export and measured speedups.

The pipeline, one public function per arrow::

    hf_model -> MaskedModel(hf_model, masks) -> compact(model, masks) -> save(model, dir) / from_pretrained(dir)
             -> structprune.export.export(compact_model, onnx_dir) -> structprune.bench

The names below load on first use, so ``import structprune`` (and ``structprune --help``) stays instant.
"""

from importlib import import_module

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


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'structprune' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
