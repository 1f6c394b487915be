"""Budgeted selection: from unit importances to masks that meet a budget.

:func:`select_units` ranks all units of the model together (a *global* budget). Its rule:

1. Rank units by importance per unit of cost (cost = the parameters, FLOPs or predicted latency that
   removing the unit alone from the dense layer saves, from :class:`~structprune.costs.CostModel`), lowest
   first; ties go to the earlier layer and index.
2. Walk the ranking and remove each unit unless its layer would keep fewer than ``min_heads`` heads /
   ``min_neurons`` neurons, or removing it would overshoot the target by more than ``tolerance``; stop
   once the target is met. If the walk ends short of the target, the skipped unit that overshoots least
   is removed (any one of them closes the gap), so the budget is always reached, overshooting by more
   than ``tolerance`` only when no unit is small enough.
3. Costs are exact and include what goes with a unit's removal: with grouped-query attention a key/value
   head goes when the last query head of its group goes, and a sublayer's output bias with its last unit.

With the defaults (``min_heads=1``, ``min_neurons=1``) every layer keeps an attention and an FFN sublayer;
pass 0 to allow removing whole sublayers.

``multiple_of=N`` keeps every FFN width a multiple of N (hardware-aligned shapes: matrix kernels run full
tiles): a layer's neurons are ranked by importance and removed in chunks of N, least important first (the
first chunk takes the remainder of a width that is not a multiple), each chunk ranked by its mean importance
per cost and never before the chunks below it. Heads need no rounding.

:func:`select_per_layer` applies the budget to each layer on its own: every layer loses the same fraction
of its own cost, by the same rule, so the whole model meets the budget too (the cost of the model outside
its layers, e.g. ELECTRA's embedding projection, is left out of each layer's count, which is why the
per-layer target is rescaled to the layers' share of the total).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from structprune.arch.structure import LayerStructure, ModelStructure
from structprune.budget import Budget
from structprune.costs import CostModel
from structprune.maskset import MaskSet

DEFAULT_TOLERANCE = 0.005


@dataclass(frozen=True)
class _Layer:
    """Live counts of one layer during selection."""

    heads: int
    kv_heads: int
    ffn: int


def _layer_cost(costs: CostModel, layer: _Layer) -> float:
    return costs.layer(layer.heads, layer.kv_heads, layer.ffn)


def _groups(layer: LayerStructure) -> tuple[int, ...]:
    """The key/value head of each query head (each head its own under multi-head attention)."""
    return layer.kv_map if layer.kv_map is not None else tuple(range(layer.heads))


class _Selection:
    """Which heads and neurons are still alive, and what removing one more would save."""

    def __init__(self, structure: ModelStructure, costs: CostModel, min_heads: int, min_neurons: int):
        self.structure, self.costs = structure, costs
        self.min_heads, self.min_neurons = min_heads, min_neurons
        self.head = torch.ones(structure.num_layers, structure.max_heads)
        self.neuron = torch.ones(structure.num_layers, structure.max_ffn)
        self.group_alive = [{g: _groups(layer).count(g) for g in set(_groups(layer))} for layer in structure.layers]
        self.layers = [_Layer(layer.heads, layer.kv_heads, layer.ffn) for layer in structure.layers]
        self.saved = 0

    def _after(self, kind: str, i: int, js: tuple[int, ...]) -> _Layer:
        layer = self.layers[i]
        if kind == "neuron":
            return dataclasses.replace(layer, ffn=layer.ffn - len(js))
        last_of_group = self.group_alive[i][_groups(self.structure.layers[i])[js[0]]] == 1
        return dataclasses.replace(layer, heads=layer.heads - 1, kv_heads=layer.kv_heads - last_of_group)

    def allowed(self, kind: str, i: int, js: tuple[int, ...]) -> bool:
        layer = self.layers[i]
        kept, minimum = (layer.heads, self.min_heads) if kind == "head" else (layer.ffn, self.min_neurons)
        return kept - len(js) >= minimum

    def saving(self, kind: str, i: int, js: tuple[int, ...]) -> int:
        """Cost saved by removing units ``js`` (one head, or a chunk of neurons) of layer ``i`` now."""
        return _layer_cost(self.costs, self.layers[i]) - _layer_cost(self.costs, self._after(kind, i, js))

    def remove(self, kind: str, i: int, js: tuple[int, ...]) -> None:
        self.saved += self.saving(kind, i, js)
        self.layers[i] = self._after(kind, i, js)
        if kind == "head":
            self.group_alive[i][_groups(self.structure.layers[i])[js[0]]] -= 1
            self.head[i, js[0]] = 0
        else:
            self.neuron[i, list(js)] = 0


def aligned_chunks(order: Sequence[int], multiple_of: int) -> list[tuple[int, ...]]:
    """``order`` cut into consecutive chunks of ``multiple_of``, the first taking the remainder: removing chunks
    from the front leaves a multiple of ``multiple_of`` after each."""
    first = len(order) % multiple_of or multiple_of
    bounds = [0, *range(first, len(order) + 1, multiple_of)]
    return [tuple(order[start:end]) for start, end in itertools.pairwise(bounds)]


def _neuron_chunks(score: torch.Tensor, width: int, multiple_of: int) -> list[tuple[int, ...]]:
    """A layer's neurons, least important first, in chunks of ``multiple_of`` (the first takes the remainder)."""
    return aligned_chunks(torch.argsort(score[:width], stable=True).tolist(), multiple_of)


def max_reduction(structure: ModelStructure, spec: dict, budget: Budget, min_heads: int = 1,
                  min_neurons: int = 1) -> float:
    """The largest fraction :func:`select_units` can remove while keeping the per-layer minimums."""
    costs = budget.cost_model(structure, spec)
    saved = 0
    for layer in structure.layers:
        kept_heads = min(min_heads, layer.heads)
        kept_groups = len(set(_groups(layer)[:kept_heads]))
        floor = _Layer(kept_heads, kept_groups, min(min_neurons, layer.ffn))
        saved += costs.layer(layer.heads, layer.kv_heads, layer.ffn) - _layer_cost(costs, floor)
    return saved / costs.total


def check_reachable(structure: ModelStructure, spec: dict, budget: Budget, min_heads: int = 1,
                    min_neurons: int = 1) -> None:
    """Raise ``ValueError`` before any scoring work when the budget cannot be met."""
    if min_heads < 0 or min_neurons < 0:
        raise ValueError(f"min_heads and min_neurons must be >= 0, got {min_heads} and {min_neurons}")
    limit = max_reduction(structure, spec, budget, min_heads, min_neurons)
    if budget.target > limit:
        raise ValueError(
            f"a {budget.kind} reduction of {budget.target:.3f} cannot be reached: keeping at least "
            f"{min_heads} head(s) and {min_neurons} neuron(s) per layer allows at most {limit:.3f}. "
            "Lower the target or the per-layer minimums."
        )


def select_units(structure: ModelStructure, spec: dict, scores: Mapping[str, torch.Tensor], budget: Budget,
                 min_heads: int = 1, min_neurons: int = 1, tolerance: float = DEFAULT_TOLERANCE,
                 multiple_of: int = 1, per_cost: bool = True) -> MaskSet:
    """Masks removing the least important heads and neurons per unit of cost until ``budget`` is met.

    Args:
        scores: non-negative importances ``head [L, H]`` and ``neuron [L, F]`` (higher = keep).
        min_heads, min_neurons: units every layer keeps (0 allows removing a whole sublayer).
        tolerance: a unit that would overshoot the target by more than this is skipped at first
            (see the module docstring), so the result lands within ``tolerance`` when it can.
        multiple_of: kept FFN widths are multiples of this (see the module docstring).
        per_cost: rank by importance per unit of cost (rule 1); ``False`` ranks by importance alone, for scores
            already comparable across kinds (FLAP's standardised scores).
    """
    check_reachable(structure, spec, budget, min_heads, min_neurons)
    widest = max(layer.ffn for layer in structure.layers)
    if not 1 <= multiple_of <= widest:
        raise ValueError(f"multiple_of must be between 1 and the widest FFN ({widest} neurons), got {multiple_of}")
    costs = budget.cost_model(structure, spec)
    selection = _Selection(structure, costs, min_heads, min_neurons)
    ranked = []
    for kind in ("head", "neuron"):
        score = scores[kind].detach().double().cpu()
        if tuple(score.shape) != tuple(getattr(selection, kind).shape):
            raise ValueError(f"{kind} scores have shape {list(score.shape)}, the model needs "
                             f"{list(getattr(selection, kind).shape)}")
        if not torch.isfinite(score).all() or (score < 0).any():
            raise ValueError(f"{kind} scores must be finite and non-negative")
        for i, layer in enumerate(structure.layers):
            chunked = kind == "neuron" and multiple_of > 1
            units = _neuron_chunks(score[i], layer.ffn, multiple_of) if chunked else [(j,) for j in range(score.shape[1])]
            floor = 0.0  # a chunk never ranks before the chunks below it in its layer
            for k, js in enumerate(units):
                ratio = float(score[i, list(js)].sum()) / (selection.saving(kind, i, js) if per_cost else len(js))
                floor = max(floor, ratio) if chunked else ratio
                ranked.append((floor, kind == "neuron", i, k if chunked else js[0], kind, js))
    ranked.sort(key=lambda unit: unit[:4])
    next_chunk = [0] * structure.num_layers  # chunked neurons go in order, so every kept width stays aligned

    def reached() -> bool:
        return selection.saved / costs.total >= budget.target

    skipped = []
    for _, _, i, k, kind, js in ranked:
        if reached():
            break
        in_order = kind == "head" or multiple_of == 1 or next_chunk[i] == k
        if not in_order or not selection.allowed(kind, i, js):
            continue
        if (selection.saved + selection.saving(kind, i, js)) / costs.total > budget.target + tolerance:
            skipped.append((kind, i, js))
            continue
        selection.remove(kind, i, js)
        next_chunk[i] += kind == "neuron"
    # Every skipped unit overshoots the remaining gap, so one of them closes it: the one overshooting least.
    candidates = [unit for unit in skipped if selection.allowed(*unit)]
    if not reached() and candidates:
        selection.remove(*min(candidates, key=lambda unit: selection.saving(*unit)))
    if not reached():
        raise ValueError(f"only a {budget.kind} reduction of {selection.saved / costs.total:.3f} of the target "
                         f"{budget.target:.3f} could be reached under the per-layer minimums; lower the target")
    return MaskSet({"head": selection.head, "neuron": selection.neuron})


def select_per_layer(structure: ModelStructure, spec: dict, scores: Mapping[str, torch.Tensor], budget: Budget,
                     min_heads: int = 1, min_neurons: int = 1, tolerance: float = DEFAULT_TOLERANCE,
                     multiple_of: int = 1, per_cost: bool = True) -> MaskSet:
    """Masks removing ``budget``'s fraction from every layer, lowest importance per cost first."""
    costs = budget.cost_model(structure, spec)
    layer_costs = [costs.layer(layer.heads, layer.kv_heads, layer.ffn) for layer in structure.layers]
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
                             layer_budget, min_heads, min_neurons, tolerance, multiple_of, per_cost)
        head.append(masks.masks["head"][0])
        neuron.append(masks.masks["neuron"][0])
    return MaskSet({"head": torch.stack(head), "neuron": torch.stack(neuron)})

