"""``taylor``: first-order Taylor importance of attention heads and FFN neurons.

The importance of a unit is ``|g * dL/dg|`` for a gate ``g`` on its output, taken at ``g = 1``
(Molchanov et al., 2019; Michel et al., 2019 for heads): to first order, the change of the loss
when the unit is removed. It is summed over a few calibration batches of labelled task data (the
absolute value is taken per batch, so units whose effect flips sign between batches still count). Under
``torchrun`` the batches are shared out among the processes (:mod:`structprune.methods.distributed`).
The gates are those of :class:`~structprune.masked_model.MaskedModel`, so the gradients come from the
same masked forward the rest of the project uses. Weights are not changed.

Units are then removed by :func:`structprune.methods.selection.select_units`: lowest importance per
parameter (or per FLOP) first, until the budget is met.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from structprune.budget import Budget
from structprune.data.encoding import batches, model_inputs, trim_padding
from structprune.masked_model import MaskedModel
from structprune.methods.distributed import gathered, my_share
from structprune.methods.result import PruneResult, prune_by_importance
from structprune.methods.selection import DEFAULT_TOLERANCE
from structprune.methods.setup import PruningInputs


def taylor_scores(model: MaskedModel, data: Mapping[str, torch.Tensor], batch_size: int = 32,
                  calib_batches: int | None = 8, seed: int = 0, progress: bool = False) -> dict[str, torch.Tensor]:
    """``head [L, H]`` and ``neuron [L, F]`` importances summed over ``calib_batches`` batches.

    ``data`` holds encoded tensors with ``labels``; batches are drawn shuffled with ``seed``
    (``calib_batches=None`` uses all of them). Dropout is off while scoring.
    """
    if data is None or "input_ids" not in data or len(data["input_ids"]) == 0:
        raise ValueError("taylor needs calibration data: pass encoded task tensors (structprune.data.encode) "
                         "with at least one example")
    if "labels" not in data:
        raise ValueError("taylor needs labelled calibration data (its importance is the gradient of the task "
                         "loss); the data has no labels")
    if calib_batches is not None and calib_batches < 1:
        raise ValueError(f"calib_batches must be >= 1 (or None for all), got {calib_batches}")
    structure = model.structure
    weight = model.model.embeddings.word.weight
    gates = {
        "head": torch.ones(structure.num_layers, structure.max_heads, dtype=weight.dtype, device=weight.device,
                           requires_grad=True),
        "neuron": torch.ones(structure.num_layers, structure.max_ffn, dtype=weight.dtype, device=weight.device,
                             requires_grad=True),
    }
    n_batches = -(-len(data["input_ids"]) // batch_size)
    total = n_batches if calib_batches is None else min(calib_batches, n_batches)
    was_training = model.training
    model.eval()
    per_batch = {}
    try:
        mine = my_share(list(itertools.islice(batches(data, batch_size, shuffle=True, seed=seed), total)))
        for j, batch in tqdm(mine, desc="taylor scores", unit="batch", disable=not progress):
            batch = {name: t.to(weight.device) for name, t in trim_padding(batch).items()}
            loss = model(**model_inputs(batch), labels=batch["labels"], gates=gates).loss
            grads = torch.autograd.grad(loss, list(gates.values()))
            per_batch[j] = {name: (gate.detach() * grad).abs().double().cpu()
                            for (name, gate), grad in zip(gates.items(), grads)}
    finally:
        model.train(was_training)
    every = gathered(per_batch, total)  # batch order, whichever process ran each
    return {name: torch.stack([b[name] for b in every]).sum(0) for name in gates}


def prune(model: PreTrainedModel | MaskedModel, task_data: Mapping[str, torch.Tensor], budget: Budget | float, *,
          batch_size: int = 32, calib_batches: int | None = 8, seed: int = 0, min_heads: int = 1,
          min_neurons: int = 1, tolerance: float = DEFAULT_TOLERANCE, multiple_of: int = 1,
          progress: bool = False) -> PruneResult:
    """Masks removing the heads and neurons with the lowest Taylor importance per cost.

    Args:
        model: a Hugging Face classifier, a full-size structprune model or a MaskedModel
            (its own masks, if any, are ignored: the dense model is scored).
        task_data: encoded, labelled calibration tensors (:func:`structprune.data.encode`).
        budget: a :class:`~structprune.budget.Budget`, or a float parameter sparsity.
        batch_size, calib_batches, seed: the calibration batches (see :func:`taylor_scores`).
        min_heads, min_neurons, tolerance, multiple_of: see :func:`structprune.methods.selection.select_units`.
    """
    def importance(inputs: PruningInputs) -> tuple[dict[str, torch.Tensor], dict]:
        scores = taylor_scores(inputs.masked, task_data, batch_size, calib_batches, seed, progress)
        return scores, {"scores": scores}

    options = {"batch_size": batch_size, "calib_batches": calib_batches, "seed": seed, "min_heads": min_heads,
               "min_neurons": min_neurons, "tolerance": tolerance, "multiple_of": multiple_of}
    return prune_by_importance("taylor", model, budget, importance, options)
