"""``fisher``: retraining-free pruning by Fisher-based mask search, rearrangement and tuning.

Kwon et al., "A Fast Post-Training Pruning Framework for Transformers" (NeurIPS 2022), in four steps,
none of which changes a weight:

1. **Fisher information** of the head and neuron masks: the gradient of the task loss with respect
   to the gates of a :class:`~structprune.masked_model.MaskedModel` at 1, one gradient per calibration
   mini-batch (``grad_batch_size`` examples, the batch-mean loss); the diagonal Fisher of unit ``i``
   is ``sum_b g_{b,i}^2``. With ``grad_batch_size=1`` that is the per-example empirical Fisher.
   The loss is the task loss with gold labels, or with the dense model's predictions
   (``objective="pseudo"``) for unlabelled data.
2. **Mask search** (:func:`search_masks`): rank heads and neurons separately by Fisher, across all
   layers; for every number of kept heads, keep as many of the best neurons as the budget allows,
   and choose the split with the largest kept Fisher sum. Costs are exact per-unit FLOPs (or
   parameters) from :mod:`structprune.maskset`; a unit's cost is the same in every layer for
   multi-head attention, which makes this search exact. Under a latency budget, units are chosen
   by :func:`structprune.methods.selection.select_units` with the measured per-layer table instead (latency
   is not linear in the number of units).
3. **Mask rearrangement** (:func:`rearrange`): within each layer, keep the number of pruned units
   but choose *which* ones by a greedy search that minimises the norm of the summed gradient
   vectors of the pruned set: the loss increase predicted by the Fisher with cross terms between
   units of a layer, which the diagonal ignores.
4. **Mask tuning**: least-squares rescaling of the kept units, layer by layer
   (:mod:`structprune.methods.mask_tuning`); the scales go into :attr:`MaskSet.scales`, which
   ``compact()`` folds into the weights of the compacted model.

Speed (all-MiniLM-L6-v2, 2,048 RTE pairs, 2 CPU cores: 181 s in fp32 with tuning on every example, 51 s
with the defaults): the gradient and tuning passes run under bf16 autocast where the hardware has native
bf16 (:mod:`structprune.precision`; the gates' gradients and the least-squares sums stay in fp32), and
mask tuning fits ``tune_examples`` (512) of the calibration examples, still hundreds of thousands of rows
for at most a few thousand unknowns per sublayer. ``bf16=False, tune_examples=None`` is the exact fp32
procedure; BENCHMARKS.md compares the two.

With grouped-query attention a query head's cost depends on whether its key/value group survives,
so the search above would not be exact: units are then chosen by
:func:`structprune.methods.selection.select_units` on the Fisher values (exact costs, greedy), as under a
latency budget.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import asdict

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from structprune.arch.structure import ModelStructure
from structprune.budget import Budget
from structprune.masked_model import MaskedModel
from structprune.maskset import MaskSet
from structprune.methods.calibration import (
    calibration_batches,
    gate_gradient,
    objective_batches,
    unit_gates,
)
from structprune.methods.distributed import gathered, my_share
from structprune.methods.mask_tuning import tune_scales
from structprune.methods.result import PruneResult, result_from_masks
from structprune.methods.selection import check_reachable, select_units
from structprune.methods.setup import prepare_pruning
from structprune.precision import bf16_autocast, resolve_bf16

TEACHERS = ("dense", "intermediate")
TUNE_EXAMPLES = 512


def mask_gradients(model: MaskedModel, batches: list[dict[str, torch.Tensor]], objective: str = "supervised",
                   progress: bool = False, bf16: bool = False) -> dict[str, torch.Tensor]:
    """Gradients of each batch's mean loss w.r.t. the gates at 1: ``head [B, L, H]``, ``neuron [B, L, F]``.

    ``bf16`` runs the passes under bf16 autocast (the gradients come back in fp32). Under ``torchrun`` the
    batches are shared out among the processes and gathered back (:mod:`structprune.methods.distributed`).
    """
    per_batch = {}
    device = model.model.embeddings.word.weight.device
    for j, batch in tqdm(my_share(batches), desc="fisher gradients", unit="batch", disable=not progress):
        with bf16_autocast(device, bf16):
            _, g = gate_gradient(model, batch, unit_gates(model), objective)
        per_batch[j] = {name: g[name].float().cpu() for name in ("head", "neuron")}
    every = gathered(per_batch, len(batches))
    return {name: torch.stack([b[name] for b in every]) for name in ("head", "neuron")}


def fisher_information(grads: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Diagonal Fisher ``sum_b g_b^2`` of each gate, from :func:`mask_gradients`."""
    return {name: g.double().pow(2).sum(0) for name, g in grads.items()}


def _unit_costs(structure: ModelStructure, spec: dict, budget: Budget) -> tuple[float, float, float]:
    """Cost of the dense model, of one head and of one neuron, in the budget's unit."""
    costs = budget.cost_model(structure, spec)
    h, kv, f = structure.layers[0].heads, structure.layers[0].kv_heads, structure.layers[0].ffn
    dense = costs.layer(h, kv, f)
    return costs.total, dense - costs.layer(h - 1, kv - 1, f), dense - costs.layer(h, kv, f - 1)


def search_masks(structure: ModelStructure, spec: dict, fisher: Mapping[str, torch.Tensor], budget: Budget,
                 min_heads: int = 0, min_neurons: int = 0) -> MaskSet:
    """Kept heads and neurons maximising the kept Fisher sum under a FLOPs or parameter budget.

    Every layer keeps its ``min_heads`` / ``min_neurons`` best units; the rest are ranked globally.
    The result removes at least ``budget.target`` and less than one more unit's cost.
    """
    if any(layer.kv_map is not None for layer in structure.layers):
        raise ValueError("search_masks assumes multi-head attention (equal per-head costs); with grouped-query "
                         "attention select units with structprune.methods.selection.select_units")
    if budget.kind == "latency":
        raise ValueError("search_masks takes a FLOPs or parameter budget; latency budgets go through select_units")
    check_reachable(structure, spec, budget, min_heads, min_neurons)
    total, head_cost, neuron_cost = _unit_costs(structure, spec, budget)
    keep_cost = (1.0 - budget.target) * total - (total - sum(
        layer.heads * head_cost + layer.ffn * neuron_cost for layer in structure.layers))
    masks, pools = {}, {}
    for name, floor in (("head", min_heads), ("neuron", min_neurons)):
        score = fisher[name].double()
        order = score.argsort(dim=1, descending=True)
        mask = torch.zeros_like(score)
        mask.scatter_(1, order[:, :floor], 1.0)
        rest = order[:, floor:]
        values = score.gather(1, rest).flatten()
        rank = values.argsort(descending=True)
        rows = torch.arange(score.shape[0]).repeat_interleave(rest.shape[1])[rank]
        masks[name], pools[name] = mask, (rows, rest.flatten()[rank], torch.cat([values.new_zeros(1),
                                                                               values[rank].cumsum(0)]))
    reserved = structure.num_layers * (min(min_heads, structure.max_heads) * head_cost
                                       + min(min_neurons, structure.max_ffn) * neuron_cost)
    free = keep_cost - reserved
    best, best_split = -math.inf, None
    n_heads_max, n_neurons_max = len(pools["head"][0]), len(pools["neuron"][0])
    for n_heads in range(n_heads_max + 1):
        room = free - n_heads * head_cost
        if room < 0:
            break
        n_neurons = min(int(room // neuron_cost), n_neurons_max)
        kept = float(pools["head"][2][n_heads] + pools["neuron"][2][n_neurons])
        if kept > best:
            best, best_split = kept, (n_heads, n_neurons)
    for name, count in zip(("head", "neuron"), best_split):
        rows, cols, _ = pools[name]
        masks[name][rows[:count], cols[:count]] = 1.0
    return MaskSet(masks)


def rearrange(mask: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Per layer, the pruned set of the same size whose summed gradient vectors have the least norm.

    ``mask [L, N]`` (0/1), ``grads [B, L, N]`` per-batch gradients. Greedy (Kwon et al.): start from
    the units of lowest Fisher; take the others in increasing Fisher order, add each to the pruned
    set and drop the member whose absence leaves the smallest summed-gradient norm.
    """
    out = mask.clone()
    fisher = grads.double().pow(2).sum(0)
    for i in range(mask.shape[0]):
        n_pruned = int((mask[i] == 0).sum())
        if n_pruned in (0, mask.shape[1]):
            continue
        g = grads[:, i, :].double().t()  # [N, B]
        order = fisher[i].argsort().tolist()
        pruned = order[:n_pruned]
        total = g[pruned].sum(0)
        for unit in order[n_pruned:]:
            pruned.append(unit)
            total = total + g[unit]
            drop = int((total.unsqueeze(0) - g[pruned]).pow(2).sum(1).argmin())
            total = total - g[pruned[drop]]
            del pruned[drop]
        out[i] = 1.0
        out[i, pruned] = 0.0
    return out


def prune(model: PreTrainedModel | MaskedModel, task_data: Mapping[str, torch.Tensor], budget: Budget | float, *,
          objective: str = "supervised", max_examples: int | None = 2048, grad_batch_size: int = 32,
          tune: bool = True, tune_examples: int | None = TUNE_EXAMPLES, teacher: str = "dense",
          rearrange_masks: bool = True, damping: float = 1.0, min_heads: int = 0, min_neurons: int = 0,
          bf16: bool | None = None, seed: int = 0, multiple_of: int = 1, progress: bool = False) -> PruneResult:
    """Fisher mask search, rearrangement and mask tuning (see the module docstring).

    Args:
        model: a Hugging Face classifier, a full-size structprune model or a MaskedModel.
        task_data: encoded calibration tensors (labels needed for ``objective="supervised"``).
        budget: a FLOPs, parameter or latency :class:`~structprune.budget.Budget` (a float: parameters).
        objective: ``supervised`` (gold labels) or ``pseudo`` (the dense model's predictions).
        max_examples: calibration examples drawn with ``seed`` (``None``: all); Kwon et al. used 2,048.
        grad_batch_size: examples per gradient (the reference used 32).
        tune: run mask tuning; ``tune_examples`` of the calibration examples (``None``: all) are
            the rows it fits; ``teacher`` is the model whose sublayer outputs it reconstructs:
            ``dense``, or ``intermediate`` (the mask searched at the square root of the kept
            fraction, as the reference code does).
        rearrange_masks: run the rearrangement step.
        damping: LSMR damping of mask tuning.
        min_heads, min_neurons: units every layer keeps (0, as in the reference, allows removing
            whole sublayers).
        bf16: run the gradient and tuning passes under bf16 autocast (``None``: where the hardware
            has native bf16, :func:`structprune.precision.native_bf16`).
        multiple_of: kept FFN widths are multiples of it (units then go through
            :func:`structprune.methods.selection.select_units`, as under latency budgets).
    """
    if objective == "entropy":
        raise ValueError("fisher needs a loss over labels: use objective='supervised' or 'pseudo'")
    if teacher not in TEACHERS:
        raise ValueError(f"fisher: teacher {teacher!r} is not one of {TEACHERS}")
    inputs = prepare_pruning(model, budget, min_heads, min_neurons)
    budget, full, structure, masked = inputs.budget, inputs.full, inputs.structure, inputs.masked
    if tune_examples is not None and tune_examples < 1:
        raise ValueError(f"fisher: tune_examples must be >= 1 (or None for all), got {tune_examples}")
    device = masked.model.embeddings.word.weight.device
    bf16 = resolve_bf16(bf16, device)
    start = time.perf_counter()
    was_training = masked.training
    masked.eval()
    try:
        batches = objective_batches(masked, task_data, objective, "fisher", grad_batch_size, max_examples, seed)
        grads = mask_gradients(masked, batches, objective, progress, bf16)
    finally:
        masked.train(was_training)
    fisher = fisher_information(grads)
    seconds = {"gradients": time.perf_counter() - start}

    grouped = any(layer.kv_map is not None for layer in structure.layers)

    def search(b: Budget) -> MaskSet:
        if b.kind == "latency" or grouped or multiple_of > 1:
            return select_units(structure, full.spec, fisher, b, max(min_heads, 1), max(min_neurons, 1),
                                multiple_of=multiple_of)
        return search_masks(structure, full.spec, fisher, b, min_heads, min_neurons)

    masks = search(budget)
    if rearrange_masks:
        masks = MaskSet({name: rearrange(masks.masks[name], grads[name]) for name in ("head", "neuron")})
    seconds["search"] = time.perf_counter() - start - seconds["gradients"]
    fits = []
    if tune:
        teacher_masks = None
        if teacher == "intermediate":
            teacher_masks = search(Budget(1.0 - math.sqrt(1.0 - budget.target), budget.kind, budget.seq_len,
                                          budget.latency_table))
        if tune_examples is None or tune_examples >= sum(len(b["input_ids"]) for b in batches):
            tune_batches = batches
        else:  # the same seeded draw, cut shorter: a subset of the calibration examples
            tune_batches = calibration_batches(task_data, grad_batch_size, tune_examples, seed, device)
        masks, fits = tune_scales(full, masks, tune_batches, teacher_masks, damping, bf16=bf16, progress=progress)
    seconds["total"] = time.perf_counter() - start
    options = {"objective": objective, "max_examples": max_examples, "grad_batch_size": grad_batch_size,
               "tune": tune, "tune_examples": tune_examples, "teacher": teacher, "rearrange": rearrange_masks,
               "damping": damping, "min_heads": min_heads, "min_neurons": min_neurons, "bf16": bf16, "seed": seed,
               "multiple_of": multiple_of}
    log = {"fisher": fisher, "seconds": seconds, "scoring_seconds": seconds["total"],
           "calibration_examples": sum(len(b["input_ids"]) for b in batches), "tuning": [asdict(fit) for fit in fits]}
    return result_from_masks("fisher", full, masks, budget, options, log)
