"""Pruning methods: one signature, one registry, and the budgeted selection they share.

Every method is a function ``prune(model, task_data, budget, **options) -> PruneResult``:

* ``model``: a Hugging Face classification model of a supported architecture, a full-size
  structprune model, or a :class:`~structprune.masked.MaskedModel`;
* ``task_data``: encoded task tensors from :func:`structprune.data.encode` (``input_ids``,
  ``attention_mask``, ``labels``...); methods that need no data accept ``None``;
* ``budget``: a :class:`Budget` (or a float, read as a parameter sparsity).

Scoring methods (``taylor``, ``magnitude``) give every attention head and FFN neuron an importance
and hand it to :func:`select_units`, which turns scores into masks that meet the budget. Its rule:

1. Rank units by importance per unit of cost (cost = the parameters, or FLOPs, that removing the
   unit alone from the dense layer saves), lowest first; ties go to the earlier layer and index.
2. Walk the ranking and remove each unit unless its layer would keep fewer than ``min_heads``
   heads / ``min_neurons`` neurons, or removing it would overshoot the target by more than
   ``tolerance``; stop once the target is met. If the walk ends short of the target, the skipped
   unit that overshoots least is removed (any one of them closes the gap), so the budget is
   always reached, overshooting by more than ``tolerance`` only when no unit is small enough.
3. Costs are counted exactly with :func:`structprune.masks.count_params` /
   :func:`~structprune.masks.count_flops`, including what goes with a unit's removal: with
   grouped-query attention a key/value head goes when the last query head of its group goes (the
   rule of :mod:`structprune.masks`), and a sublayer's output bias goes with its last unit.

With the defaults (``min_heads=1``, ``min_neurons=1``) every layer keeps an attention and an FFN
sublayer; pass 0 to allow removing whole sublayers.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch
from transformers import PreTrainedModel

from structprune.arch import from_hf
from structprune.arch.structure import LayerStructure, ModelStructure
from structprune.masked import MaskedModel
from structprune.latency import LatencyTable
from structprune.masks import MaskSet, count_flops, count_params
from structprune.modeling_compact import StructpruneForSequenceClassification

BUDGET_KINDS = ("params", "flops", "latency")
DEFAULT_TOLERANCE = 0.005


@dataclass(frozen=True)
class Budget:
    """How much to remove: a fraction of parameters, of FLOPs, or of measured latency.

    ``target`` in [0, 1): with ``kind="params"`` the parameter sparsity (attention and FFN
    projections, embeddings excluded, as in :mod:`structprune.masks`); with ``kind="flops"`` the
    fraction of forward FLOPs removed at sequence length ``seq_len``; with ``kind="latency"`` the
    fraction of latency removed as predicted by the :class:`~structprune.latency.LatencyTable` saved
    at ``latency_table`` (0.5: 2x faster on the backend and input shape the table was measured on).
    """

    target: float
    kind: str = "params"
    seq_len: int = 128
    latency_table: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.target, bool) or not isinstance(self.target, (int, float)):
            raise TypeError(f"budget target must be a number in [0, 1), got {self.target!r}")
        if not 0.0 <= self.target < 1.0:
            raise ValueError(
                f"target sparsity {self.target} is outside [0, 1): it is the fraction to remove "
                "(0.5 removes half); choose a value such as 0.5"
            )
        if self.kind not in BUDGET_KINDS:
            raise ValueError(f"budget kind {self.kind!r} is not one of {BUDGET_KINDS}")
        if (self.kind == "latency") != (self.latency_table is not None):
            raise ValueError(f"a budget of kind {self.kind!r} with latency_table={self.latency_table!r}: kind "
                             "'latency' needs latency_table (a table file from structprune.latency), and only "
                             "kind 'latency' takes one")
        if self.seq_len < 1:
            raise ValueError(f"budget seq_len must be >= 1, got {self.seq_len}")

    def achieved(self, summary: Mapping[str, float]) -> float:
        """The fraction a :meth:`MaskSet.summary` shows removed, in this budget's kind."""
        return summary[{"params": "param_sparsity", "flops": "flops_reduction",
                        "latency": "latency_reduction_predicted"}[self.kind]]

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def as_budget(budget: Budget | float) -> Budget:
    """``budget`` itself, or a parameter-sparsity budget for a plain number."""
    return budget if isinstance(budget, Budget) else Budget(budget)


@dataclass
class PruneResult:
    """What a method returns: frozen masks, updated weights (methods that train them) and a log."""

    masks: MaskSet
    weights: dict[str, torch.Tensor] | None
    log: dict


PruneFn = Callable[..., PruneResult]


@dataclass(frozen=True)
class _Layer:
    """Live counts of one layer during selection."""

    heads: int
    kv_heads: int
    ffn: int


class _Costs:
    """Exact cost of layer shapes in the budget's unit, from the project's counting functions."""

    def __init__(self, structure: ModelStructure, spec: dict, budget: Budget):
        self.structure, self.spec, self.budget = structure, spec, budget
        self.table = None
        if budget.kind == "latency":
            self.table = LatencyTable.load(budget.latency_table)
            self.table.check(structure)
        self.total = self._count(structure)

    def _count(self, structure: ModelStructure) -> float:
        if self.table is not None:
            return self.table.estimate(structure)
        if self.budget.kind == "params":
            return count_params(structure, self.spec)
        return count_flops(structure, self.spec, self.budget.seq_len)

    def layer(self, layer: _Layer) -> int:
        """Cost of one layer (constant terms outside layers cancel in every difference taken)."""
        one = LayerStructure(layer.heads, layer.kv_heads, None, layer.ffn)
        return self._count(dataclasses.replace(self.structure, layers=(one,)))

    def fraction(self, saved: int) -> float:
        return saved / self.total


def _groups(layer: LayerStructure) -> tuple[int, ...]:
    """The key/value head of each query head (each head its own under multi-head attention)."""
    return layer.kv_map if layer.kv_map is not None else tuple(range(layer.heads))


class _Selection:
    """Which heads and neurons are still alive, and what removing one more would save."""

    def __init__(self, structure: ModelStructure, costs: _Costs, min_heads: int, min_neurons: int):
        self.structure, self.costs = structure, costs
        self.min_heads, self.min_neurons = min_heads, min_neurons
        self.head = torch.ones(structure.num_layers, structure.max_heads)
        self.neuron = torch.ones(structure.num_layers, structure.max_ffn)
        self.group_alive = [{g: _groups(layer).count(g) for g in set(_groups(layer))} for layer in structure.layers]
        self.layers = [_Layer(layer.heads, layer.kv_heads, layer.ffn) for layer in structure.layers]
        self.saved = 0

    def _after(self, kind: str, i: int, h: int) -> _Layer:
        layer = self.layers[i]
        if kind == "neuron":
            return dataclasses.replace(layer, ffn=layer.ffn - 1)
        last_of_group = self.group_alive[i][_groups(self.structure.layers[i])[h]] == 1
        return dataclasses.replace(layer, heads=layer.heads - 1, kv_heads=layer.kv_heads - last_of_group)

    def allowed(self, kind: str, i: int) -> bool:
        layer = self.layers[i]
        return layer.heads > self.min_heads if kind == "head" else layer.ffn > self.min_neurons

    def saving(self, kind: str, i: int, j: int) -> int:
        """Cost saved by removing unit ``j`` of layer ``i`` now."""
        return self.costs.layer(self.layers[i]) - self.costs.layer(self._after(kind, i, j))

    def remove(self, kind: str, i: int, j: int) -> None:
        self.saved += self.saving(kind, i, j)
        self.layers[i] = self._after(kind, i, j)
        if kind == "head":
            self.group_alive[i][_groups(self.structure.layers[i])[j]] -= 1
            self.head[i, j] = 0
        else:
            self.neuron[i, j] = 0


def max_reduction(structure: ModelStructure, spec: dict, budget: Budget, min_heads: int = 1,
                  min_neurons: int = 1) -> float:
    """The largest fraction :func:`select_units` can remove while keeping the per-layer minimums."""
    costs = _Costs(structure, spec, budget)
    saved = 0
    for layer in structure.layers:
        kept_heads = min(min_heads, layer.heads)
        kept_groups = len(set(_groups(layer)[:kept_heads]))
        floor = _Layer(kept_heads, kept_groups, min(min_neurons, layer.ffn))
        saved += costs.layer(_Layer(layer.heads, layer.kv_heads, layer.ffn)) - costs.layer(floor)
    return costs.fraction(saved)


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
                 min_heads: int = 1, min_neurons: int = 1, tolerance: float = DEFAULT_TOLERANCE) -> MaskSet:
    """Masks removing the least important heads and neurons per unit of cost until ``budget`` is met.

    Args:
        scores: non-negative importances ``head [L, H]`` and ``neuron [L, F]`` (higher = keep).
        min_heads, min_neurons: units every layer keeps (0 allows removing a whole sublayer).
        tolerance: a unit that would overshoot the target by more than this is skipped at first
            (see the module docstring), so the result lands within ``tolerance`` when it can.
    """
    check_reachable(structure, spec, budget, min_heads, min_neurons)
    costs = _Costs(structure, spec, budget)
    selection = _Selection(structure, costs, min_heads, min_neurons)
    ranked = []
    for kind in ("head", "neuron"):
        score = scores[kind].detach().double().cpu()
        if tuple(score.shape) != tuple(getattr(selection, kind).shape):
            raise ValueError(f"{kind} scores have shape {list(score.shape)}, the model needs "
                             f"{list(getattr(selection, kind).shape)}")
        if not torch.isfinite(score).all() or (score < 0).any():
            raise ValueError(f"{kind} scores must be finite and non-negative")
        for i in range(structure.num_layers):
            for j in range(score.shape[1]):
                ranked.append((float(score[i, j]) / selection.saving(kind, i, j), kind, i, j))
    ranked.sort(key=lambda unit: (unit[0], unit[1] == "neuron", unit[2], unit[3]))

    def reached() -> bool:
        return costs.fraction(selection.saved) >= budget.target

    skipped = []
    for _, kind, i, j in ranked:
        if reached():
            break
        if not selection.allowed(kind, i):
            continue
        if costs.fraction(selection.saved + selection.saving(kind, i, j)) > budget.target + tolerance:
            skipped.append((kind, i, j))
            continue
        selection.remove(kind, i, j)
    # Every skipped unit overshoots the remaining gap, so one of them closes it: the one overshooting least.
    candidates = [unit for unit in skipped if selection.allowed(unit[0], unit[1])]
    if not reached() and candidates:
        selection.remove(*min(candidates, key=lambda unit: selection.saving(*unit)))
    if not reached():
        raise ValueError(f"only a {budget.kind} reduction of {costs.fraction(selection.saved):.3f} of the target "
                         f"{budget.target:.3f} could be reached under the per-layer minimums; lower the target")
    return MaskSet({"head": selection.head, "neuron": selection.neuron})


def dense_model(model: PreTrainedModel | MaskedModel) -> StructpruneForSequenceClassification:
    """The full-size structprune model behind ``model``; an error if it is already compacted."""
    full = model.model if isinstance(model, MaskedModel) else from_hf(model)
    structure = ModelStructure.from_spec(full.spec)
    MaskSet.ones(structure).validate(structure)
    return full


@dataclass(frozen=True)
class PruningInputs:
    """What a data-driven method starts from: see :func:`prepare_pruning`."""

    budget: Budget
    full: StructpruneForSequenceClassification
    structure: ModelStructure
    masked: MaskedModel


def prepare_pruning(model: PreTrainedModel | MaskedModel, budget: Budget | float, min_heads: int = 1,
                    min_neurons: int = 1) -> PruningInputs:
    """The budget as a :class:`Budget`, the full-size model and its structure, and a
    :class:`MaskedModel` over it (``model`` itself when it is one; a structprune model is copied).
    Raises before any work when the budget cannot be met with ``min_heads`` / ``min_neurons``."""
    budget = as_budget(budget)
    full = dense_model(model)
    structure = ModelStructure.from_spec(full.spec)
    check_reachable(structure, full.spec, budget, min_heads, min_neurons)
    masked = model if isinstance(model, MaskedModel) else MaskedModel(full)
    return PruningInputs(budget, full, structure, masked)


def result_from_scores(method: str, model: StructpruneForSequenceClassification, scores: Mapping[str, torch.Tensor],
                       budget: Budget, options: Mapping[str, object], log: Mapping[str, object]) -> PruneResult:
    """Select units from ``scores`` (see :func:`select_units`) and record what was done.

    ``options`` are the method's settings (stored in the masks' metadata, so a mask folder says
    how it was made); they must include ``min_heads``, ``min_neurons`` and ``tolerance``.
    """
    structure = ModelStructure.from_spec(model.spec)
    select = selection.select_per_layer if options.get("scope") == "layer" else select_units
    masks = select(structure, model.spec, scores, budget, options["min_heads"], options["min_neurons"],
                   options["tolerance"])
    return result_from_masks(method, model, masks, budget, options, log)


def result_from_masks(method: str, model: StructpruneForSequenceClassification, masks: MaskSet, budget: Budget,
                      options: Mapping[str, object], log: Mapping[str, object]) -> PruneResult:
    """The :class:`PruneResult` of ``masks``: a summary (with the predicted latency reduction under a
    latency budget) and the method's settings in the masks' metadata."""
    structure = ModelStructure.from_spec(model.spec)
    summary = masks.summary(structure, model.spec, seq_len=budget.seq_len)
    if budget.kind == "latency":
        costs = _Costs(structure, model.spec, budget)
        summary["latency_reduction_predicted"] = 1.0 - costs.table.estimate(masks.resolve(structure)) / costs.total
    masks.meta = {"method": method, "budget": budget.as_dict(), "options": dict(options)}
    return PruneResult(masks, None, {**log, "method": method, "achieved": budget.achieved(summary), "summary": summary})


def list_methods() -> list[str]:
    return sorted(METHODS)


def get_method(name: str) -> PruneFn:
    """The ``prune`` function of method ``name``, or a ``ValueError`` listing the methods."""
    if name in METHODS:
        return METHODS[name]
    close = difflib.get_close_matches(name, list(METHODS), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown pruning method {name!r}.{hint} Available methods: {', '.join(list_methods())}")


# Imported last: the method modules import the definitions above.
from structprune.methods import attribution, fisher, head_importance, l0, magnitude, selection, taylor, transfer

METHODS: Mapping[str, PruneFn] = MappingProxyType({"taylor": taylor.prune, "magnitude": magnitude.prune,
                                                   "l0": l0.prune, "transfer": transfer.prune,
                                                   "attribution": attribution.prune, "fisher": fisher.prune,
                                                   "head_importance": head_importance.prune})
"""Every pruning method by name."""
