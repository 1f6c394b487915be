"""``magnitude``: a data-free baseline scoring units by the size of their weights.

The importance of a unit is the squared L2 norm of the weights it owns: a head's query rows and
output-projection columns (plus its key and value rows under multi-head attention; with
grouped-query attention key/value heads are shared, so they are left out), a neuron's up (and
gate) rows and its down-projection column. :func:`structprune.methods.selection.select_units` divides it
by the unit's cost, so a unit is ranked by its mean squared weight, and removes the smallest.
No data is needed: ``task_data`` is ignored.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from structprune.arch.structure import ModelStructure
from structprune.budget import Budget
from structprune.masked_model import MaskedModel
from structprune.methods.result import PruneResult, prune_by_importance
from structprune.methods.selection import DEFAULT_TOLERANCE
from structprune.methods.setup import PruningInputs
from structprune.modeling_structprune import StructpruneForSequenceClassification


def _row_groups(weight: torch.Tensor, size: int) -> torch.Tensor:
    """Sum of squares of each block of ``size`` consecutive rows."""
    return weight.detach().double().pow(2).reshape(-1, size, weight.shape[1]).sum(dim=(1, 2))


def magnitude_scores(model: StructpruneForSequenceClassification) -> dict[str, torch.Tensor]:
    """``head [L, H]`` and ``neuron [L, F]`` squared weight norms of a full-size structprune model."""
    structure = ModelStructure.from_spec(model.spec)
    hd = structure.head_dim
    head = torch.zeros(structure.num_layers, structure.max_heads, dtype=torch.float64)
    neuron = torch.zeros(structure.num_layers, structure.max_ffn, dtype=torch.float64)
    for i, (layer, shape) in enumerate(zip(model.layers, structure.layers)):
        attn, ffn = layer.attn, layer.ffn
        head[i] = _row_groups(attn.q.weight, hd) + _row_groups(attn.o.weight.t(), hd)
        if shape.kv_map is None:
            head[i] += _row_groups(attn.k.weight, hd) + _row_groups(attn.v.weight, hd)
        neuron[i] = _row_groups(ffn.up.weight, 1) + _row_groups(ffn.down.weight.t(), 1)
        if ffn.gate is not None:
            neuron[i] += _row_groups(ffn.gate.weight, 1)
    return {"head": head, "neuron": neuron}


def prune(model: PreTrainedModel | MaskedModel, task_data: object, budget: Budget | float, *,
          min_heads: int = 1, min_neurons: int = 1, tolerance: float = DEFAULT_TOLERANCE, multiple_of: int = 1,
          progress: bool = False) -> PruneResult:
    """Masks removing the heads and neurons with the smallest mean squared weight (see the module doc).
    ``multiple_of``: kept FFN widths are multiples of it (:func:`structprune.methods.selection.select_units`).

    ``progress`` is the methods' common keyword; scoring weights is instant, so there is no progress to show.
    """
    def importance(inputs: PruningInputs) -> tuple[dict[str, torch.Tensor], dict]:
        scores = magnitude_scores(inputs.full)
        return scores, {"scores": scores}

    options = {"min_heads": min_heads, "min_neurons": min_neurons, "tolerance": tolerance, "multiple_of": multiple_of}
    return prune_by_importance("magnitude", model, budget, importance, options)
