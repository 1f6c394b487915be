"""Budget scope: removing units across all layers together, or the same fraction in every layer.

:func:`structprune.methods.select_units` ranks all units of the model together (a *global* budget).
:func:`select_per_layer` applies the budget to each layer on its own: every layer loses the same
fraction of its own cost, by the same rule, so the whole model meets the budget too (the cost of
the model outside its layers, e.g. ELECTRA's embedding projection, is left out of each layer's
count, which is why the per-layer target is rescaled to the layers' share of the total).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch

from structprune.arch.structure import ModelStructure
from structprune.masks import MaskSet
from structprune.methods import DEFAULT_TOLERANCE, Budget, _Costs, _Layer, select_units


def select_per_layer(structure: ModelStructure, spec: dict, scores: Mapping[str, torch.Tensor], budget: Budget,
                     min_heads: int = 1, min_neurons: int = 1, tolerance: float = DEFAULT_TOLERANCE) -> MaskSet:
    """Masks removing ``budget``'s fraction from every layer, lowest importance per cost first."""
    costs = _Costs(structure, spec, budget)
    layer_costs = [costs.layer(_Layer(layer.heads, layer.kv_heads, layer.ffn)) for layer in structure.layers]
    share = sum(layer_costs) / costs.total  # layers' share of the whole model's cost
    target = budget.target / share
    if target >= 1.0:
        raise ValueError(f"a {budget.kind} reduction of {budget.target:.3f} would need to remove every layer "
                         "entirely; lower the target or use scope='global'")
    layer_budget = dataclasses.replace(budget, target=target)
    layer_spec = {**spec, "embedding_project": False}
    head, neuron = [], []
    for i, layer in enumerate(structure.layers):
        one = dataclasses.replace(structure, layers=(layer,))
        masks = select_units(one, layer_spec, {name: scores[name][i:i + 1] for name in ("head", "neuron")},
                             layer_budget, min_heads, min_neurons, tolerance)
        head.append(masks.masks["head"][0])
        neuron.append(masks.masks["neuron"][0])
    return MaskSet({"head": torch.stack(head), "neuron": torch.stack(neuron)})

