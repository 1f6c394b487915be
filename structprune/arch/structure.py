"""``ModelStructure``: where the prunable units of a model are, independent of Hugging Face names."""

from __future__ import annotations

from dataclasses import dataclass

UNIT_NAMES = ("attn_layer", "head", "ffn_layer", "neuron", "hidden")
"""The prunable units: whole attention / FFN sublayers, query heads, FFN neurons, hidden dimensions."""


@dataclass(frozen=True)
class LayerStructure:
    """Prunable units of one layer.

    ``heads`` query heads share ``kv_heads`` key/value heads; ``kv_map[i]`` is the key/value
    head of query head ``i`` (``None`` for plain multi-head attention). ``ffn`` neurons; a gated
    (SwiGLU) FFN has gate, up and down projections. A count of 0 means the sublayer is absent.
    """

    heads: int
    kv_heads: int
    kv_map: tuple[int, ...] | None
    ffn: int


@dataclass(frozen=True)
class ModelStructure:
    """Shapes of a model, read from its ``structprune`` spec (see :mod:`structprune.arch`).

    The weight tensors of each unit live in the model's modules under fixed names:
    ``layers[i].attn.{q,k,v,o}`` (head ``h`` owns rows ``h*head_dim:(h+1)*head_dim`` of q and
    columns of o; key/value head ``g`` owns the same rows of k and v), ``layers[i].ffn.{up,gate,down}``
    (neuron ``j`` owns row ``j`` of up/gate and column ``j`` of down), and the hidden dimension
    ``d`` is column ``d`` of every input projection and row ``d`` of every output projection,
    embedding and norm.
    """

    family: str
    arch: str
    hidden_size: int
    head_dim: int
    gated_ffn: bool
    layers: tuple[LayerStructure, ...]

    @classmethod
    def from_spec(cls, spec: dict) -> "ModelStructure":
        layers = tuple(
            LayerStructure(
                heads=int(layer["heads"]),
                kv_heads=int(layer["kv_heads"]),
                kv_map=tuple(layer["kv_map"]) if layer.get("kv_map") is not None else None,
                ffn=int(layer["ffn"]),
            )
            for layer in spec["layers"]
        )
        return cls(spec["family"], spec["arch"], int(spec["hidden_size"]), int(spec["head_dim"]),
                   bool(spec["gated_ffn"]), layers)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def max_heads(self) -> int:
        return max((layer.heads for layer in self.layers), default=0)

    @property
    def max_kv_heads(self) -> int:
        return max((layer.kv_heads for layer in self.layers), default=0)

    @property
    def max_ffn(self) -> int:
        return max((layer.ffn for layer in self.layers), default=0)

    @property
    def group_size(self) -> int:
        """Query heads per key/value head in the dense model (1 for multi-head attention)."""
        return self.max_heads // self.max_kv_heads if self.max_kv_heads else 1
