"""What a pruning method returns, and the one way scoring methods turn importances into it."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from structprune.arch.structure import ModelStructure
from structprune.budget import Budget
from structprune.masked_model import MaskedModel
from structprune.maskset import MaskSet
from structprune.methods.selection import select_per_layer, select_units
from structprune.methods.setup import PruningInputs, prepare_pruning
from structprune.modeling_structprune import StructpruneForSequenceClassification


@dataclass
class PruneResult:
    """What a method returns: frozen masks, updated weights (methods that change them) and a log."""

    masks: MaskSet
    weights: dict[str, torch.Tensor] | None
    """The state dict the masks go with: of the compact model for the learned methods (``l0``, ``transfer``), of
    the full-size model for the others (``sprint``'s tuning, ``flap`` / ``expert`` with ``refit``)."""
    log: dict


PruneFn = Callable[..., PruneResult]

Importance = Callable[[PruningInputs], tuple[Mapping[str, torch.Tensor], Mapping[str, object]]]
"""A scorer: ``head [L, H]`` and ``neuron [L, F]`` importances of a model (higher = keep), and what to log."""


def prune_by_importance(method: str, model: PreTrainedModel | MaskedModel, budget: Budget | float,
                        importance: Importance, options: Mapping[str, object],
                        refine: Callable[[PruningInputs, PruneResult], None] | None = None,
                        per_cost: bool = True) -> PruneResult:
    """The one pruner of scoring methods: check the budget, score the units with ``importance``, select
    them (:func:`result_from_scores`; ``per_cost``: see :func:`select_units`), then let ``refine`` adjust the result
    (e.g. mask tuning).

    ``options`` are the method's settings, ``min_heads``, ``min_neurons`` and ``tolerance`` included.
    """
    inputs = prepare_pruning(model, budget, options["min_heads"], options["min_neurons"])
    start = time.perf_counter()
    scores, log = importance(inputs)
    result = result_from_scores(method, inputs.full, scores, inputs.budget, options, log, per_cost)
    if refine is not None:
        refine(inputs, result)
    result.log["scoring_seconds"] = time.perf_counter() - start
    return result


def result_from_scores(method: str, model: StructpruneForSequenceClassification, scores: Mapping[str, torch.Tensor],
                       budget: Budget, options: Mapping[str, object], log: Mapping[str, object],
                       per_cost: bool = True) -> PruneResult:
    """Select units from ``scores`` (see :func:`select_units`) and record what was done.

    ``options`` are the method's settings (stored in the masks' metadata, so a mask folder says
    how it was made); they must include ``min_heads``, ``min_neurons`` and ``tolerance``.
    """
    structure = ModelStructure.from_spec(model.spec)
    select = select_per_layer if options.get("scope") == "layer" else select_units
    masks = select(structure, model.spec, scores, budget, options["min_heads"], options["min_neurons"],
                   options["tolerance"], options.get("multiple_of", 1), per_cost)
    return result_from_masks(method, model, masks, budget, options, log)


def result_from_masks(method: str, model: StructpruneForSequenceClassification, masks: MaskSet, budget: Budget,
                      options: Mapping[str, object], log: Mapping[str, object]) -> PruneResult:
    """The :class:`PruneResult` of ``masks``: a summary (with the predicted latency reduction under a
    latency budget) and the method's settings in the masks' metadata."""
    structure = ModelStructure.from_spec(model.spec)
    summary = masks.summary(structure, model.spec, seq_len=budget.seq_len)
    if budget.kind == "latency":
        summary["latency_reduction_predicted"] = budget.cost_model(structure, model.spec).reduction(
            masks.resolve(structure))
    masks.meta = {"method": method, "budget": budget.as_dict(), "options": dict(options)}
    return PruneResult(masks, None, {**log, "method": method, "achieved": budget.achieved(summary), "summary": summary})
