"""``MaskedModel``: a dense model whose units are gated, running attention and FFN on ``structprune.ops``.

Gates (named as in :mod:`structprune.masks`) multiply head outputs, FFN neurons, whole sublayers and
hidden dimensions. Frozen masks come from a :class:`~structprune.masks.MaskSet`; learned methods pass
differentiable gate tensors to :meth:`MaskedModel.forward` instead. Either way the removal rules of
DESIGN.md hold: a sublayer whose layer gate is 0, or whose heads / neurons are all 0, adds nothing to
the residual stream, and with a hidden mask norms take statistics over the kept dimensions only.
So a masked model and its :func:`structprune.compact.compact` form give the same outputs.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import PreTrainedModel

from structprune import ops
from structprune.arch import from_hf
from structprune.arch.structure import ModelStructure
from structprune.masks import MaskSet
from structprune.modeling_compact import AttentionContext, FeedForward, StructpruneForSequenceClassification


def _attention(q, k, v, head_gate, ctx: AttentionContext, scale: float) -> torch.Tensor:
    return ops.masked_attention(q, k, v, head_gate, ctx.key_padding, ctx.causal, scale)


def _ffn(x: torch.Tensor, ffn: FeedForward, neuron_gate) -> torch.Tensor:
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


class MaskedModel(nn.Module):
    """A full-size model with gates on layers, heads, FFN neurons and hidden dims.

    Args:
        model: a Hugging Face sequence-classification model of a supported architecture, or a
            structprune model at full size.
        masks: frozen masks to apply by default; ``None`` keeps everything.
    """

    def __init__(self, model: PreTrainedModel, masks: MaskSet | None = None):
        super().__init__()
        # A structprune model is copied: installing the kernels below must not change the caller's model.
        owned = copy.deepcopy(model) if isinstance(model, StructpruneForSequenceClassification) else model
        self.model: StructpruneForSequenceClassification = from_hf(owned)
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
