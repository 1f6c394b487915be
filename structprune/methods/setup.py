"""The checked starting point of a pruning method: budget, full-size model, structure, masked model."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from transformers import PreTrainedModel

from structprune.arch import from_hf
from structprune.arch.structure import ModelStructure
from structprune.budget import Budget, as_budget
from structprune.masked_model import MaskedModel
from structprune.maskset import MaskSet
from structprune.methods.selection import check_reachable
from structprune.modeling_structprune import StructpruneForSequenceClassification


def dense_model(model: PreTrainedModel | MaskedModel) -> StructpruneForSequenceClassification:
    """The full-size structprune model behind ``model``; an error if it is already compacted."""
    full = model.model if isinstance(model, MaskedModel) else from_hf(model)
    structure = ModelStructure.from_spec(full.spec)
    MaskSet.ones(structure).validate(structure)
    return full


@dataclass(frozen=True)
class PruningInputs:
    """What a method starts from: see :func:`prepare_pruning`."""

    budget: Budget
    full: StructpruneForSequenceClassification
    structure: ModelStructure
    model: PreTrainedModel | MaskedModel
    """The model as the caller gave it."""

    @cached_property
    def masked(self) -> MaskedModel:
        """A :class:`MaskedModel` over the full model (the given one when it is one; else over a copy)."""
        return self.model if isinstance(self.model, MaskedModel) else MaskedModel(self.full)


def prepare_pruning(model: PreTrainedModel | MaskedModel, budget: Budget | float, min_heads: int = 1,
                    min_neurons: int = 1) -> PruningInputs:
    """The budget as a :class:`Budget`, the full-size model and its structure (and, on first use, a
    :class:`MaskedModel` over it).
    Raises before any work when the budget cannot be met with ``min_heads`` / ``min_neurons``."""
    budget = as_budget(budget)
    full = dense_model(model)
    structure = ModelStructure.from_spec(full.spec)
    check_reachable(structure, full.spec, budget, min_heads, min_neurons)
    return PruningInputs(budget, full, structure, model)
