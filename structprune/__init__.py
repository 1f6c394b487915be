"""structprune: task-aware structured pruning of transformers, with compaction, ONNX export and measured speedups.

The pipeline, one public function per arrow::

    hf_model -> MaskedModel(hf_model, masks) -> compact(model, masks) -> save(model, dir) / from_pretrained(dir)
             -> structprune.export.export(compact_model, onnx_dir) -> structprune.bench
"""

from structprune.arch import ModelStructure, from_hf
from structprune.compact import compact, from_pretrained, save
from structprune.masked import MaskedModel
from structprune.masks import MaskSet

__version__ = "0.1.0"

__all__ = ["MaskSet", "MaskedModel", "ModelStructure", "compact", "from_hf", "from_pretrained", "save"]
