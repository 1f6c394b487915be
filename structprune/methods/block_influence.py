"""``block_influence``: remove whole layers or sublayers whose output turns the residual stream least
(ShortGPT's Block Influence, Men et al. 2024).

A block's influence is ``1 - cos(h_in, h_out)``, averaged over the real tokens of the calibration data, where
``h_in`` is the residual stream entering the block and ``h_out`` the stream leaving it: a block that barely
changes the direction of the stream matters least. ``granularity="layer"`` scores whole layers (both sublayers
go together, as ShortGPT removes layers); ``"sublayer"`` scores attention and FFN sublayers apart. Blocks go
lowest influence per unit of cost first (the rule of :mod:`structprune.methods.selection`; all layers cost the
same, so whole layers go in ShortGPT's order) until the budget is met; whole blocks are coarse, so the last one
may overshoot the target (the result reports what was reached). Ranked by influence alone, sublayers go
cheapest first: on SmolLM2 at 20% of the parameters that removed 20 attention sublayers and 2 FFNs. ``iterative=True`` scores the remaining blocks again after each
removal, on the model without the blocks removed so far (one calibration pass per removal).

Scoring is forward passes only, layer by layer: no gradient, so it runs on models whose backward pass would not
fit, and on models streamed from their files (:mod:`structprune.streaming`). The
metric was made for pre-norm decoders (Llama family), where the stream between blocks is the residual itself;
on post-LN encoders it reads the normalised stream.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from structprune.arch.structure import ModelStructure
from structprune.budget import Budget
from structprune.masked_model import MaskedModel
from structprune.maskset import MaskSet
from structprune.methods.calibration import calibration_batches
from structprune.methods.channel_stats import layer_by_layer
from structprune.methods.result import PruneResult, result_from_masks
from structprune.methods.setup import prepare_pruning
from structprune.modeling_structprune import StructprunePreTrainedModel

GRANULARITIES = ("layer", "sublayer")
BLOCKS = ("attn_layer", "ffn_layer")


@torch.no_grad()
def influences(model: StructprunePreTrainedModel, batches: list[dict[str, torch.Tensor]],
               gates: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``attn_layer [L]`` and ``ffn_layer [L]``: each sublayer's ``1 - cos(stream in, stream out)`` over real
    tokens, and ``layer [L]`` for whole layers, with the sublayers whose gate is 0 removed. Runs layer by layer
    (:func:`~structprune.methods.channel_stats.layer_by_layer`), so a streamed model is scored too."""
    L = len(model.layers)
    sums = {name: torch.zeros(L, dtype=torch.float64) for name in (*BLOCKS, "layer")}
    tokens = sum(int(b["attention_mask"].sum()) if b.get("attention_mask") is not None else b["input_ids"].numel()
                 for b in batches)

    def run(i, layer, x, ctx, rope, real):
        def change(a: torch.Tensor, b: torch.Tensor) -> float:
            return float((1 - F.cosine_similarity(a.float(), b.float(), dim=-1))[real].sum())

        g = {name: gates[name][i] for name in BLOCKS}
        mid = layer.attention_block(x, ctx, rope, g)
        out = layer.ffn_block(mid, g)
        sums["attn_layer"][i] += change(x, mid)
        sums["ffn_layer"][i] += change(mid, out)
        sums["layer"][i] += change(x, out)
        return out

    layer_by_layer(model, batches, run)
    return {name: (s / max(tokens, 1)).float() for name, s in sums.items()}


def sublayer_masks(removed: set[tuple[str, int]], L: int) -> dict[str, torch.Tensor]:
    """``attn_layer [L]`` and ``ffn_layer [L]`` masks removing the ``(sublayer, layer)`` units ``removed``."""
    gates = {name: torch.ones(L) for name in BLOCKS}
    for name, i in removed:
        gates[name][i] = 0.0
    return gates


def resolved_without(removed: set[tuple[str, int]], structure: ModelStructure) -> ModelStructure:
    """The structure left once the sublayers ``removed`` are gone."""
    return MaskSet(sublayer_masks(removed, structure.num_layers)).resolve(structure)


def _blocks(granularity: str, L: int) -> list[tuple[tuple[str, int], ...]]:
    """The removable blocks, each a tuple of (sublayer, layer) units."""
    if granularity == "layer":
        return [tuple((name, i) for name in BLOCKS) for i in range(L)]
    return [((name, i),) for i in range(L) for name in BLOCKS]


def _score(block: tuple[tuple[str, int], ...], scores: Mapping[str, torch.Tensor]) -> float:
    return float(scores["layer"][block[0][1]]) if len(block) == 2 else float(scores[block[0][0]][block[0][1]])


def prune(model: PreTrainedModel | MaskedModel, task_data: Mapping[str, torch.Tensor], budget: Budget | float, *,
          granularity: str = "layer", iterative: bool = False, batch_size: int = 8, max_examples: int | None = 128,
          seed: int = 0, progress: bool = False) -> PruneResult:
    """Masks removing the layers (or sublayers) of lowest block influence until ``budget`` is met.

    Args:
        model: a Hugging Face model of a supported architecture, a full-size structprune model or a MaskedModel.
        task_data: encoded calibration tensors (``input_ids``, ``attention_mask``; labels are not read).
        budget: parameters, FLOPs or latency to remove (a float: parameters).
        granularity: ``layer`` or ``sublayer``; iterative: score again after each removal.
        batch_size, max_examples, seed: the calibration batches (examples drawn with ``seed``).
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"block_influence: granularity {granularity!r} is not one of {GRANULARITIES}")
    inputs = prepare_pruning(model, budget, min_heads=0, min_neurons=0)
    full, structure, budget = inputs.full, inputs.structure, inputs.budget
    if task_data is None or len(task_data.get("input_ids", ())) == 0:
        raise ValueError("block_influence needs calibration data: encoded tensors with at least one example")
    batches = calibration_batches({k: v for k, v in task_data.items() if k in ("input_ids", "attention_mask")},
                                  batch_size, max_examples, seed)  # layer_by_layer moves them to the model
    was_training = full.training
    full.eval()
    costs = budget.cost_model(structure, full.spec)
    L = structure.num_layers
    removed: set[tuple[str, int]] = set()
    remaining = _blocks(granularity, L)
    scores = influences(full, batches, sublayer_masks(removed, L))
    history = []
    while costs.reduction(resolved_without(removed, structure)) < budget.target:
        if len(remaining) == 1:
            full.train(was_training)
            raise ValueError(f"block_influence: reaching {budget.kind} sparsity {budget.target} would remove every "
                             f"{granularity} of the model; choose a smaller target")
        before = costs.of(resolved_without(removed, structure))

        def per_cost(b: tuple[tuple[str, int], ...]) -> float:
            return _score(b, scores) / max(before - costs.of(resolved_without(removed | set(b), structure)), 1e-12)

        block = min(remaining, key=per_cost)
        remaining.remove(block)
        removed |= set(block)
        history.append({"removed": [f"{name}[{i}]" for name, i in block], "influence": _score(block, scores)})
        if iterative:
            scores = influences(full, batches, sublayer_masks(removed, L))
    full.train(was_training)
    masks = MaskSet(sublayer_masks(removed, L))
    options = {"granularity": granularity, "iterative": iterative, "batch_size": batch_size,
               "max_examples": max_examples, "seed": seed}
    log = {"influence": {name: s.tolist() for name, s in scores.items()}, "removed": history,
           "calibration_examples": sum(len(b["input_ids"]) for b in batches)}
    return result_from_masks("block_influence", full, masks, budget, options, log)
