"""``attribution``: integrated-gradients attribution of attention heads and FFN neurons.

Every head and neuron has a gate on its output (the gates of :class:`~structprune.masked_model.MaskedModel`).
The attribution of unit ``i`` to a task objective ``F`` (the log-likelihood of the labels: minus the
loss of :mod:`structprune.methods.calibration`) is its integrated gradient (Sundararajan et al.,
2017) along a straight path that scales a group of gates from 0 to 1, all other gates staying 1::

    IG_i = (1 - 0) * integral_0^1 dF/dg_i(path(alpha)) d alpha  ~  (1/m) * sum_k dF/dg_i(path(alpha_k))

with ``m = steps`` midpoints ``alpha_k = (k + 1/2) / m``. ``path="sublayer"`` (default) scales one
sublayer's units at a time (the heads of one layer, or its FFN neurons; as Hao et al., 2021 do for
attention), so by completeness a sublayer's attributions add up to ``F(1) - F(sublayer at 0+)``:
what the sublayer contributes to the task objective. ``path="model"`` scales every gate together,
and all attributions add up to ``F(1) - F(0+)`` (``0+``: the limit, where every sublayer still adds
its output bias). The sublayer path prunes better (BENCHMARKS.md, attribution): along the model path most of
the integral is taken where the whole network is switched off.
Attributions are summed over the calibration examples and divided by their number.

Importance (``aggregate``): ``"squared"`` (default) sums the squares of per-batch attributions, the
way a Fisher information sums squared per-batch gradients: a unit that moves the objective a lot
for some examples matters even when its effects cancel over the set. The batch is the grain of
that second moment, so small batches (``batch_size=8``, the default) see more of the per-example
spread, at no extra cost. ``"total"`` takes ``|IG_i|`` of the whole set. The sign is never used: a unit
with a large negative attribution is not harmless, it moves the output a lot. BENCHMARKS.md compares the
batch sizes, and ``squared`` with ``total``.

Cost: each (batch, path point) pair is one forward and backward pass, with ``groups * steps``
path points (12 * 4 for MiniLM with the defaults). With ``stratify=True`` (default) the points are
spread over the batches (batch ``j`` at the points ``p`` with ``j = p mod min(batches, points)``),
so scoring costs ``max(batches, points)`` passes instead of ``batches * points``; each point's sum
is scaled to the whole set, so the estimate stays unbiased. ``stratify=False`` evaluates every
batch at every point (exact per-batch IG, for small calibration sets and tests).

Settings: ``objective="supervised"`` (gold labels), ``"pseudo"`` (the dense model's predictions as
labels, for unlabelled text) or ``"entropy"`` (prediction entropy, unlabelled classification);
few-shot use is simply little data (8 to 64 examples per class). Weights are never changed;
``tune=True`` adds the least-squares rescaling of :mod:`structprune.methods.mask_tuning` (scales).

Budget scope: ``scope="global"`` (default) ranks all units of all layers together (importance per
unit of cost, :func:`structprune.methods.selection.select_units`): attributions are in the same unit (change
of the log-likelihood) in every layer, so they are comparable across layers, and layers differ in
how much they matter to a task, which a global ranking exploits. ``scope="layer"`` removes the
budget's fraction from every layer separately (:func:`structprune.methods.selection.select_per_layer`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from structprune.arch.structure import ModelStructure
from structprune.budget import Budget
from structprune.masked_model import MaskedModel
from structprune.methods.calibration import (
    calibration_batches,
    gate_gradient,
    objective_batches,
    unit_gates,
)
from structprune.methods.mask_tuning import tune_scales
from structprune.methods.result import PruneResult, prune_by_importance
from structprune.methods.selection import DEFAULT_TOLERANCE
from structprune.methods.setup import PruningInputs

SCOPES = ("global", "layer")
PATHS = ("sublayer", "model")
AGGREGATES = ("squared", "total")


def path_pairs(n_batches: int, points: int, stratify: bool) -> list[tuple[int, int]]:
    """The (batch, path point) pairs evaluated (see the module docstring)."""
    if points < 1:
        raise ValueError(f"the path needs at least one point, got {points}")
    if not stratify:
        return [(j, k) for j in range(n_batches) for k in range(points)]
    period = min(n_batches, points)
    return [(j, k) for j in range(n_batches) for k in range(points) if j % period == k % period]


def path_groups(structure: ModelStructure, path: str) -> list[tuple[str, int] | None]:
    """Units scaled together along one path: all of them, or one sublayer's (``(gate name, layer)``)."""
    if path == "model":
        return [None]
    if path == "sublayer":
        return [(name, i) for i in range(structure.num_layers) for name in ("head", "neuron")]
    raise ValueError(f"attribution: path {path!r} is not one of {PATHS}")


def attribution_scores(model: MaskedModel, data: Mapping[str, torch.Tensor], steps: int = 8,
                       objective: str = "supervised", path: str = "sublayer", batch_size: int = 32,
                       max_examples: int | None = None, stratify: bool = True, seed: int = 0,
                       progress: bool = False) -> dict[str, torch.Tensor]:
    """Integrated-gradient attributions of every head and neuron, two ways.

    ``head [L, H]``, ``neuron [L, F]``: the signed attribution of the whole calibration set, per
    example. The attributions of the units scaled together along one path add up to
    ``F(1) - F(0+)`` for that path (up to the midpoint rule; in expectation with ``stratify=True``).

    ``head_squared``, ``neuron_squared``: the second moment of per-batch attributions, per example:
    each batch's IG of a path's units (the mean gradient over the path points evaluated on that
    batch: every point with ``stratify=False``, one sampled point with ``stratify=True``) squared,
    summed over the batches that path saw and divided by their examples.
    """
    groups = path_groups(model.structure, path)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    points = [(g, (k + 0.5) / steps) for g in range(len(groups)) for k in range(steps)]
    was_training = model.training
    model.eval()
    try:
        batches = objective_batches(model, data, objective, "attribution", batch_size, max_examples, seed)
        sizes = [len(b["input_ids"]) for b in batches]
        total = sum(sizes)
        zeros = {name: torch.zeros_like(g, dtype=torch.float64) for name, g in unit_gates(model).items()}
        point_sums = [{name: z.clone() for name, z in zeros.items()} for _ in points]
        seen = [0] * len(points)  # examples evaluated at each point
        per_batch: dict[tuple[int, int], list] = {}  # (batch, group) -> [summed contributions, points]
        for j, p in tqdm(path_pairs(len(batches), len(points), stratify), desc="attribution", unit="pass",
                         disable=not progress):
            g, alpha = points[p]
            group = groups[g]
            gates = unit_gates(model, alpha if group is None else 1.0)
            if group is not None:
                with torch.no_grad():
                    gates[group[0]][group[1]] = alpha
            _, grads = gate_gradient(model, batches[j], gates, objective)
            contribution = {name: z.clone() for name, z in zeros.items()}
            for name, grad in grads.items():
                if group is None:
                    contribution[name] -= grad.double().cpu() * sizes[j]  # F = -loss
                elif group[0] == name:
                    contribution[name][group[1]] -= grad[group[1]].double().cpu() * sizes[j]
            for name in zeros:
                point_sums[p][name] += contribution[name]
            seen[p] += sizes[j]
            entry = per_batch.setdefault((j, g), [{name: z.clone() for name, z in zeros.items()}, 0])
            for name in zeros:
                entry[0][name] += contribution[name]
            entry[1] += 1
        signed = {name: z.clone() for name, z in zeros.items()}
        for p in range(len(points)):
            for name in signed:
                signed[name] += point_sums[p][name] * (total / seen[p]) / steps
        squared = [{name: z.clone() for name, z in zeros.items()} for _ in groups]
        group_seen = [0] * len(groups)
        for (j, g), (summed, count) in per_batch.items():
            for name in zeros:
                squared[g][name] += (summed[name] / count).pow(2) / sizes[j]
            group_seen[g] += sizes[j]
    finally:
        model.train(was_training)
    scores = {name: s / total for name, s in signed.items()}
    for name in zeros:
        scores[f"{name}_squared"] = sum(sq[name] * (total / n) for sq, n in zip(squared, group_seen)) / total
    return scores


def prune(model: PreTrainedModel | MaskedModel, task_data: Mapping[str, torch.Tensor], budget: Budget | float, *,
          steps: int = 4, objective: str = "supervised", path: str = "sublayer", aggregate: str = "squared",
          scope: str = "global",
          batch_size: int = 8, max_examples: int | None = 2048, stratify: bool = True, tune: bool = False,
          seed: int = 0, min_heads: int = 1,
          min_neurons: int = 1, tolerance: float = DEFAULT_TOLERANCE, multiple_of: int = 1,
          progress: bool = False) -> PruneResult:
    """Masks removing the heads and neurons with the lowest attribution per unit of cost.

    Args:
        model: a Hugging Face classifier, a full-size structprune model or a MaskedModel (the dense
            model is scored; its weights are not changed).
        task_data: encoded calibration tensors; labels are needed only for ``objective="supervised"``.
        budget: a :class:`~structprune.budget.Budget`, or a float parameter sparsity.
        steps: points on each integration path (see the module docstring).
        path: ``sublayer`` (default: one path per sublayer) or ``model`` (one path for all units).
        aggregate: ``squared`` (default: second moment of per-batch attributions) or ``total``
            (absolute attribution of the whole calibration set).
        objective: ``supervised``, ``pseudo`` or ``entropy``.
        scope: ``global`` (default) or ``layer`` budget.
        max_examples: calibration examples drawn from ``task_data`` with ``seed`` (``None``: all).
        tune: rescale the kept units by layer-wise least squares afterwards
            (:mod:`structprune.methods.mask_tuning`; scales, not weights, change).
        min_heads, min_neurons, tolerance, multiple_of: see :func:`structprune.methods.selection.select_units`.
    """
    if scope not in SCOPES:
        raise ValueError(f"attribution: scope {scope!r} is not one of {SCOPES}")
    if aggregate not in AGGREGATES:
        raise ValueError(f"attribution: aggregate {aggregate!r} is not one of {AGGREGATES}")

    def importance(inputs: PruningInputs) -> tuple[dict[str, torch.Tensor], dict]:
        attributions = attribution_scores(inputs.masked, task_data, steps, objective, path, batch_size, max_examples,
                                          stratify, seed, progress)
        scores = {name: attributions[f"{name}_squared"] if aggregate == "squared" else attributions[name].abs()
                  for name in ("head", "neuron")}
        return scores, {"attributions": attributions}

    def tune_kept(inputs: PruningInputs, result: PruneResult) -> None:
        device = inputs.full.embeddings.word.weight.device
        batches = calibration_batches(task_data, batch_size, max_examples, seed, device)
        masks, fits = tune_scales(inputs.full, result.masks, batches, progress=progress)
        result.masks.scales = masks.scales
        result.log["tuning"] = [asdict(fit) for fit in fits]

    options = {"steps": steps, "objective": objective, "path": path, "aggregate": aggregate, "scope": scope,
               "batch_size": batch_size, "max_examples": max_examples, "stratify": stratify, "tune": tune,
               "seed": seed, "min_heads": min_heads, "min_neurons": min_neurons, "tolerance": tolerance,
               "multiple_of": multiple_of}
    return prune_by_importance("attribution", model, budget, importance, options, tune_kept if tune else None)
