"""``flap``: fluctuation-based adaptive structured pruning with bias compensation (An et al., AAAI 2024).

Forward passes only, one layer at a time (:mod:`structprune.methods.channel_stats`), so it scores models whose
backward pass would not fit, and models streamed from their files (:mod:`structprune.streaming`) that do not fit
in memory at all.

* **Score.** An input channel of an output projection (o-proj for heads, down-proj for neurons) scores the sample
  variance of its input over the calibration tokens times the squared norm of its weight column: a channel whose
  input barely fluctuates can be replaced by its mean. ``metric="norm"`` takes the mean square instead of the
  variance (Wanda-sp's ``|W| * |x|``, squared).
* **Adaptive structure.** Within each layer, the channel scores of the attention and of the FFN are standardised
  apart (zero mean, unit variance); a head scores the mean of its channels. Units then go lowest standardised score
  first across all layers and both kinds until the budget is met, ranked by score and not per unit of cost, as FLAP
  does; layers thereby end up with different widths.
* **Bias compensation.** A sublayer that keeps units adds the removed units' mean contribution,
  ``W[:, removed] @ mean(x[removed])``, to its output (:attr:`MaskSet.shifts`; compaction makes it the o-proj /
  down-proj bias). ``compensate=False`` leaves it out. Under a parameter budget the selection reserves room for
  these biases (one per kept sublayer), so the compacted model meets the budget with them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from transformers import PreTrainedModel

from structprune.arch.structure import ModelStructure
from structprune.budget import Budget, as_budget
from structprune.costs import count_params
from structprune.masked_model import MaskedModel
from structprune.methods.calibration import calibration_batches
from structprune.methods.channel_stats import LayerStats, channel_stats, projection_weight
from structprune.methods.refit import refitted
from structprune.methods.result import (
    PruneResult,
    prune_by_importance,
    result_from_masks,
)
from structprune.methods.selection import DEFAULT_TOLERANCE
from structprune.methods.setup import PruningInputs, dense_model
from structprune.modeling_structprune import StructprunePreTrainedModel
from structprune.streaming import source_of

METRICS = ("fluctuation", "norm")


def _standardised(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean()) / x.std().clamp_min(1e-12)


def _channel_scores(stats, columns: torch.Tensor, metric: str) -> torch.Tensor:
    spread = stats.variance if metric == "fluctuation" else stats.meansq
    return _standardised(spread * columns)


def flap_scores(model: StructprunePreTrainedModel, stats: list[LayerStats], metric: str) -> dict[str, torch.Tensor]:
    """``head [L, H]`` and ``neuron [L, F]``: standardised scores shifted so that the lowest is 0 (the order of
    units across layers and kinds is FLAP's)."""
    heads = max(layer.attn.heads for layer in model.layers if layer.attn is not None)
    width = max(layer.ffn.down.in_features for layer in model.layers if layer.ffn is not None)
    head = torch.zeros(len(model.layers), heads, dtype=torch.float64)
    neuron = torch.zeros(len(model.layers), width, dtype=torch.float64)
    for i, (layer, layer_stats) in enumerate(zip(model.layers, stats)):
        if layer.attn is not None:
            head[i] = _channel_scores(layer_stats.attn, layer_stats.o_columns, metric).view(heads, -1).mean(1)
        if layer.ffn is not None:
            neuron[i] = _channel_scores(layer_stats.ffn, layer_stats.down_columns, metric)
    low = min(head.min(), neuron.min())
    return {"head": head - low, "neuron": neuron - low}


def compensation(model: StructprunePreTrainedModel, stats: list[LayerStats], head: torch.Tensor,
                 neuron: torch.Tensor) -> dict[str, torch.Tensor]:
    """Shifts ``attn`` and ``ffn`` ``[L, D]``: each sublayer's removed units' mean contribution to its output."""
    L, D = len(model.layers), model.spec["hidden_size"]
    shifts = {"attn": torch.zeros(L, D), "ffn": torch.zeros(L, D)}
    for i, (layer, layer_stats) in enumerate(zip(model.layers, stats)):
        if layer.attn is not None:
            removed = (head[i] == 0).repeat_interleave(layer.attn.head_dim).double()
            w = projection_weight(model, i, "attn.o")
            shifts["attn"][i] = (w @ (layer_stats.attn.mean * removed)).float()
        if layer.ffn is not None:
            w = projection_weight(model, i, "ffn.down")
            shifts["ffn"][i] = (w @ (layer_stats.ffn.mean * (neuron[i] == 0).double())).float()
    return shifts


def bias_reserve(budget: Budget, full: StructprunePreTrainedModel) -> Budget:
    """The budget a compensating selection aims at: under a parameter budget, raised by the output biases the shifts
    add (one per sublayer that has none), so that the compacted model meets ``budget`` with them."""
    if budget.kind != "params":
        return budget
    structure = ModelStructure.from_spec(full.spec)
    missing = (not full.spec["o_bias"]) + (not full.spec["ffn_bias"])
    biases = missing * structure.num_layers * structure.hidden_size
    return dataclasses.replace(budget, target=budget.target + biases / count_params(structure, full.spec))


def compensated(method: str, inputs: PruningInputs, result: PruneResult, stats: list[LayerStats], budget: Budget,
                options: Mapping[str, object]) -> None:
    """Add the bias-compensation shifts to ``result``'s masks (with ``options["refit"]``, the least-squares refit:
    its shifts, and the refitted full-size weights as ``result.weights``) and count their biases in its log (against
    the user's ``budget``)."""
    masks = result.masks
    head, neuron = masks.masks["head"], masks.masks["neuron"]
    if options.get("refit"):
        result.weights, masks.shifts = refitted(inputs.full, stats, head, neuron)
    else:
        masks.shifts = compensation(inputs.full, stats, head, neuron)
    result.log |= result_from_masks(method, inputs.full, masks, budget, options, result.log).log


def check_refit(method: str, refit: bool, compensate: bool, full: StructprunePreTrainedModel) -> None:
    """``refit`` replaces the bias compensation and refits weights held in memory: it needs both."""
    if refit and not compensate:
        raise ValueError(f"{method}: refit is a least-squares bias compensation; it cannot go with compensate=False "
                         "(drop --no-compensate, or --refit)")
    if refit and source_of(full) is not None:
        raise ValueError(f"{method}: refit changes weights held in memory; a model "
                         "streamed from its files (--stream) holds none: drop --refit or --stream")


def prune(model: PreTrainedModel | MaskedModel, task_data: Mapping[str, torch.Tensor], budget: Budget | float, *,
          metric: str = "fluctuation", compensate: bool = True, refit: bool = False, batch_size: int = 8,
          max_examples: int | None = 128,
          seed: int = 0, min_heads: int = 1, min_neurons: int = 1, tolerance: float = DEFAULT_TOLERANCE,
          multiple_of: int = 1, device: torch.device | str | None = None, progress: bool = False) -> PruneResult:
    """Masks (and output shifts) removing the heads and neurons of lowest FLAP score until ``budget`` is met.

    Args:
        model: a Hugging Face model of a supported architecture, a full-size structprune model or a MaskedModel.
        task_data: encoded calibration tensors (``input_ids``, ``attention_mask``; labels are not read).
        budget: parameters, FLOPs or latency to remove (a float: parameters).
        metric: ``fluctuation`` (FLAP) or ``norm``; compensate: add the bias compensation shifts.
        refit: compensate by the least-squares refit of :mod:`~structprune.methods.refit` (the kept columns of
            each output projection change too: the result carries the full-size model's weights).
        batch_size, max_examples, seed: the calibration batches (examples drawn with ``seed``).
        min_heads, min_neurons, tolerance, multiple_of: the selection's (:func:`~structprune.methods.selection.select_units`).
        device: run each layer there in turn (the model may stay on the CPU); default: where the model is.
        progress: accepted for the methods' common signature (scoring is one pass).
    """
    if metric not in METRICS:
        raise ValueError(f"flap: metric {metric!r} is not one of {METRICS}")
    if task_data is None or len(task_data.get("input_ids", ())) == 0:
        raise ValueError("flap needs calibration data: encoded tensors with at least one example")
    found: dict[str, list[LayerStats]] = {}
    budget, full = as_budget(budget), dense_model(model)
    check_refit("flap", refit, compensate, full)

    def importance(inputs: PruningInputs) -> tuple[dict[str, torch.Tensor], dict]:
        batches = calibration_batches({k: v for k, v in task_data.items() if k in ("input_ids", "attention_mask")},
                                      batch_size, max_examples, seed)
        inputs.full.eval()
        found["stats"] = channel_stats(inputs.full, batches, device, head_change=False, gram=refit)
        scores = flap_scores(inputs.full, found["stats"], metric)
        tokens = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
                     for b in batches)
        return scores, {"scores": scores, "calibration_tokens": tokens}

    def refine(inputs: PruningInputs, result: PruneResult) -> None:
        if compensate:
            compensated("flap", inputs, result, found["stats"], budget, options)

    options = {"metric": metric, "compensate": compensate, "refit": refit, "batch_size": batch_size,
               "max_examples": max_examples,
               "seed": seed, "min_heads": min_heads, "min_neurons": min_neurons, "tolerance": tolerance,
               "multiple_of": multiple_of}
    return prune_by_importance("flap", full, bias_reserve(budget, full) if compensate else budget, importance,
                               options, refine, per_cost=False)
