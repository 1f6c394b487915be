"""``MaskedModel``: a dense model whose units are gated, running attention and FFN on ``structprune.ops``.

Gates (named as in :mod:`structprune.maskset`) multiply head outputs, FFN neurons, whole sublayers and
hidden dimensions. Frozen masks come from a :class:`~structprune.maskset.MaskSet`; learned methods pass
differentiable gate tensors to :meth:`MaskedModel.forward` instead. Either way the gate rule of
docs/architecture.md holds: a sublayer whose layer gate is 0, or whose heads / neurons are all 0, adds nothing to
the residual stream, and with a hidden mask norms take statistics over the kept dimensions only.
So a masked model and its :func:`structprune.compaction.compact` form give the same outputs.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from structprune import ops
from structprune.arch import from_hf
from structprune.arch.structure import ModelStructure
from structprune.maskset import MaskSet
from structprune.modeling_structprune import (
    Attention,
    AttentionContext,
    FeedForward,
    Layer,
    StructprunePreTrainedModel,
    eager_ffn,
)


def _alive_rows(units: torch.Tensor, width: int) -> torch.Tensor:
    """Weight rows of ``units`` (head indices) in a projection with ``width`` rows per unit."""
    return (units[:, None] * width + torch.arange(width, device=units.device)).flatten()


def _cpu_autocast(x: torch.Tensor) -> bool:
    """Whether ``x`` is on the CPU under autocast: the C++ kernels are fp32-only, so the plain torch
    sublayers run instead and keep autocast's bf16 speed."""
    return x.device.type == "cpu" and torch.is_autocast_enabled("cpu")


def _attention(x: torch.Tensor, attn: Attention, ctx: AttentionContext, rope, head_gate) -> torch.Tensor:
    """The attention sublayer on ``ops.masked_attention``.

    With a head gate on the CPU, only the alive heads are computed at all: their rows of the q/k/v
    weights and columns of the o weights are gathered (differentiably, so dead heads' weights get
    exact zero gradients), as :func:`structprune.compaction.compact` would keep them. A key/value head
    is kept when any query head of its group is (the GQA rule of :mod:`structprune.maskset`).
    """
    if _cpu_autocast(x):
        return attn.eager(x, ctx, rope, head_gate)
    B, S, D = x.shape[0], x.shape[1], attn.head_dim
    scale = D**-0.5
    # On a GPU the kernels skip dead heads without a host sync; gathering would add syncs (nonzero,
    # unique) per layer, which made a batch-16 x 128 training step slower on an H100 (BENCHMARKS.md).
    gather = head_gate is not None and not x.is_cuda
    alive = torch.nonzero(head_gate != 0).flatten() if gather else None
    if alive is None or alive.numel() == attn.heads:
        # q, k, v go with the call and the kernel's layout with the reshape: neither outlives its use
        out = ops.masked_attention(*attn.project(x, rope), head_gate, ctx.key_padding, ctx.causal, scale)
        out = out.transpose(1, 2).reshape(B, S, attn.heads * D)  # (B, H, S, D) -> (B, S, H * D)
        return attn.o(out)
    if alive.numel() == 0:  # the layer's removal rule zeroes this sublayer; nothing to compute
        return x.new_zeros(B, S, attn.o.out_features)
    kv_of = alive if attn.kv_map is None else torch.tensor(attn.kv_map, device=x.device)[alive]
    kv_alive, kv_pos = torch.unique(kv_of, sorted=True, return_inverse=True)
    q_rows, kv_rows = _alive_rows(alive, D), _alive_rows(kv_alive, D)

    def project(linear: torch.nn.Linear, rows: torch.Tensor) -> torch.Tensor:
        bias = linear.bias.index_select(0, rows) if linear.bias is not None else None
        return F.linear(x, linear.weight.index_select(0, rows), bias).view(B, S, -1, D).transpose(1, 2)

    q, k = attn.position(project(attn.q, q_rows), project(attn.k, kv_rows), rope)
    v = project(attn.v, kv_rows)
    heads, kv_heads = alive.numel(), kv_alive.numel()
    regular = heads % kv_heads == 0 and bool(
        (kv_pos == torch.arange(heads, device=x.device) // (heads // kv_heads)).all())
    if not regular:  # unequal groups: one key/value head per query head
        k, v = k.index_select(1, kv_pos), v.index_select(1, kv_pos)
    out = ops.masked_attention(q, k, v, head_gate.index_select(0, alive), ctx.key_padding, ctx.causal, scale)
    return F.linear(out.transpose(1, 2).reshape(B, S, heads * D), attn.o.weight.index_select(1, q_rows), attn.o.bias)


def _ffn(x: torch.Tensor, ffn: FeedForward, neuron_gate) -> torch.Tensor:
    if _cpu_autocast(x):
        return eager_ffn(x, ffn.up, ffn.down, ffn.gate, neuron_gate, ffn.act)
    w_gate = ffn.gate.weight if ffn.gate is not None else None
    return ops.gated_ffn(x, ffn.up.weight, ffn.up.bias, ffn.down.weight, ffn.down.bias, neuron_gate, ffn.act, w_gate)


def effective_gates(gates: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Gates with the removal rule applied: a layer gate is 0 where all its heads / neurons are 0."""
    out = dict(gates)
    for layer_name, unit_name in (("attn_layer", "head"), ("ffn_layer", "neuron")):
        if unit_name not in gates:
            continue
        alive = (gates[unit_name] != 0).any(dim=-1).to(gates[unit_name].dtype)
        out[layer_name] = gates[layer_name] * alive if layer_name in gates else alive
    return out


@contextmanager
def kernel_attention(layer: Layer) -> Iterator[None]:
    """``layer``'s attention on ``ops.masked_attention`` for the block (unless it has a route already): the kernels
    never hold a whole ``[B, H, S, K]`` score tensor, an eager forward's largest transient (twice over)."""
    attn = layer.attn
    if attn is None or attn.attention_fn is not None:
        yield
        return
    attn.attention_fn = _attention
    try:
        yield
    finally:
        attn.attention_fn = None


class MaskedModel(nn.Module):
    """A full-size model with gates on layers, heads, FFN neurons and hidden dims.

    Args:
        model: a Hugging Face classifier or causal LM of a supported architecture, or a structprune model at
            full size (copied: the caller's model is left as it was).
        masks: frozen masks to apply by default; ``None`` keeps everything.
    """

    def __init__(self, model: PreTrainedModel, masks: MaskSet | None = None):
        super().__init__()
        # A structprune model is copied: installing the kernels below must not change the caller's model.
        owned = copy.deepcopy(model) if isinstance(model, StructprunePreTrainedModel) else model
        self.model: StructprunePreTrainedModel = from_hf(owned)
        self.structure = ModelStructure.from_spec(self.model.spec)
        for layer in self.model.layers:
            if layer.attn is not None:
                layer.attn.attention_fn = _attention
            if layer.ffn is not None:
                layer.ffn.ffn_fn = _ffn
        self.masks: MaskSet | None = None
        self._gates: dict[str, torch.Tensor] = {}
        self.set_masks(masks)

    @property
    def spec(self) -> dict:
        return self.model.spec

    @property
    def config(self):
        return self.model.config

    def set_masks(self, masks: MaskSet | None) -> None:
        """Apply frozen masks (validated against the model); ``None`` removes them."""
        if masks is not None and not isinstance(masks, MaskSet):
            raise TypeError(f"masks must be a MaskSet (structprune.maskset.MaskSet, or MaskSet.load(folder)), not a "
                            f"{type(masks).__name__}")
        self.masks = masks
        self._gates = {} if masks is None else masks.gates(self.structure)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        gates: dict[str, torch.Tensor] | None = None,
        output_hidden_states: bool = False,
    ):
        """Forward with ``gates`` if given (e.g. differentiable hard-concrete samples), else the masks."""
        if gates is None:
            dtype = self.model.embeddings.word.weight.dtype
            gates = {name: g.to(device=input_ids.device, dtype=dtype) for name, g in self._gates.items()}
        return self.model(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                          labels=labels, gates=effective_gates(gates) if gates else None,
                          output_hidden_states=output_hidden_states)
