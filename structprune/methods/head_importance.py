"""``head_importance``: Michel et al. (2019), "Are Sixteen Heads Really Better than One?", as a baseline.

The importance of a head is the expected absolute gradient of the task loss with respect to its
gate, ``E |dL/d xi_h|``, taken at the current mask (1 for kept units, 0 for removed ones) and
summed over calibration batches; it is normalised per layer by the L2 norm of that layer's head
importances (Michel et al. found this necessary to compare heads across layers). FFN neurons get
the same treatment (their own per-layer normalisation), so that FLOPs budgets beyond the
attention's share can be met.

Pruning is iterative, in ``iterations`` steps: each step scores the units with those removed so far
masked out (they score 0), selects the units the whole budget would remove
(:func:`structprune.methods.selection.select_units`), and commits the lowest-scoring ``step / iterations``
of those heads and of those neurons; the last step commits the whole selection, which keeps
every earlier removal (importance 0 ranks first). Committing a share of a full-budget selection,
rather than selecting for a share of the budget, keeps a step from removing a cheap useful unit
because a useless but costly one (a head) would overshoot the step's smaller target. Weights are
not changed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from structprune.budget import Budget
from structprune.masked_model import MaskedModel
from structprune.maskset import MaskSet
from structprune.methods.calibration import gate_gradient, objective_batches
from structprune.methods.result import PruneResult, result_from_masks
from structprune.methods.selection import DEFAULT_TOLERANCE, select_units
from structprune.methods.setup import prepare_pruning

FLOOR = 1e-12
"""Floor of a kept unit's normalised importance (at most 1), so that it ranks after every removed unit (0)."""


def head_importance_scores(model: MaskedModel, batches: list[dict[str, torch.Tensor]], masks: MaskSet | None = None,
                           objective: str = "supervised") -> dict[str, torch.Tensor]:
    """Per-layer L2-normalised ``sum_b |dL/dg|`` at the gates of ``masks`` (``None``: all ones).

    Removed units score exactly 0.
    """
    structure = model.structure
    weight = model.model.embeddings.word.weight
    current = masks.masks if masks is not None else MaskSet.ones(structure, ("head", "neuron")).masks
    gates = {name: current[name].to(device=weight.device, dtype=weight.dtype).clone().requires_grad_(True)
             for name in ("head", "neuron")}
    sums = {name: torch.zeros(g.shape, dtype=torch.float64) for name, g in gates.items()}
    for batch in batches:
        _, grads = gate_gradient(model, batch, gates, objective)
        for name, grad in grads.items():
            sums[name] += grad.abs().double().cpu()
    scores = {}
    for name, total in sums.items():
        total = total * current[name].double()
        norm = total.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
        normalised = total / norm
        scores[name] = torch.where(current[name] > 0, normalised.clamp_min(FLOOR), torch.zeros_like(normalised))
    return scores


def _commit(selected: MaskSet, scores: Mapping[str, torch.Tensor], fraction: float) -> MaskSet:
    """Masks removing the lowest-scoring ``fraction`` of the heads and of the neurons ``selected`` removes."""
    masks = {}
    for name in ("head", "neuron"):
        removed = (selected.masks[name] == 0).flatten().nonzero().flatten()
        order = removed[scores[name].flatten()[removed].argsort(stable=True)]
        mask = torch.ones(selected.masks[name].numel())
        mask[order[:math.ceil(fraction * len(order))]] = 0
        masks[name] = mask.view_as(selected.masks[name])
    return MaskSet(masks)


def prune(model: PreTrainedModel | MaskedModel, task_data: Mapping[str, torch.Tensor], budget: Budget | float, *,
          iterations: int = 5, objective: str = "supervised", batch_size: int = 32, max_examples: int | None = 512,
          seed: int = 0, min_heads: int = 1, min_neurons: int = 1, tolerance: float = DEFAULT_TOLERANCE,
          progress: bool = False) -> PruneResult:
    """Iterative pruning by per-layer-normalised expected absolute gate gradients.

    Args:
        iterations: budget steps; importances are recomputed before each.
        objective: ``supervised`` or ``pseudo`` (see :mod:`structprune.methods.calibration`).
        max_examples: calibration examples drawn with ``seed`` (``None``: all); every iteration
            uses the same ones.
        min_heads, min_neurons, tolerance: see :func:`structprune.methods.selection.select_units`.
    """
    if iterations < 1:
        raise ValueError(f"head_importance: iterations must be >= 1, got {iterations}")
    if objective == "entropy":
        raise ValueError("head_importance differentiates a loss over labels: use objective='supervised' or 'pseudo'")
    inputs = prepare_pruning(model, budget, min_heads, min_neurons)
    budget, full, structure, masked = inputs.budget, inputs.full, inputs.structure, inputs.masked
    start = time.perf_counter()
    was_training = masked.training
    masked.eval()
    masks, history = None, []
    try:
        batches = objective_batches(masked, task_data, objective, "head_importance", batch_size, max_examples, seed)
        for step in tqdm(range(1, iterations + 1), desc="head importance", unit="iteration", disable=not progress):
            scores = head_importance_scores(masked, batches, masks, objective)
            selected = select_units(structure, full.spec, scores, budget, min_heads, min_neurons, tolerance)
            masks = selected if step == iterations else _commit(selected, scores, step / iterations)
            history.append({"step": step, "heads_kept": int(masks.masks["head"].sum()),
                            "neurons_kept": int(masks.masks["neuron"].sum())})
    finally:
        masked.train(was_training)
    options = {"iterations": iterations, "objective": objective, "batch_size": batch_size,
               "max_examples": max_examples, "seed": seed, "min_heads": min_heads, "min_neurons": min_neurons,
               "tolerance": tolerance}
    return result_from_masks("head_importance", full, masks, budget, options,
                             {"iterations": history, "scores": scores, "scoring_seconds": time.perf_counter() - start})
