"""Calibration data and objectives shared by the training-free scoring methods.

The training-free methods (``attribution``, ``fisher``, ``head_importance``) all differentiate a
task objective with respect to the head and neuron gates of a :class:`~structprune.masked_model.MaskedModel`
over a small calibration set, without changing any weight. This module holds what they share:

* :func:`calibration_batches`: the calibration examples in batches of similar length (sorted by
  length, then cut), each trimmed to its longest sequence. Sentence-pair tasks vary a lot in length,
  and sorting removes most of the padding work, which is most of the cost on a CPU;
* :data:`OBJECTIVES` and :func:`objective`: what is differentiated. ``supervised``: the task loss
  with gold labels (for a causal LM, the next-token loss on the calibration text). ``pseudo``: the same loss with the dense model's own predictions as labels
  (unlabelled data). ``entropy``: the mean entropy of the predicted distribution (unlabelled data,
  classification only): units that make the model confident matter;
* :func:`unit_gates`: head ``[L, H]`` and neuron ``[L, F]`` gate tensors to differentiate.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from structprune.data.encoding import model_inputs, trim_padding
from structprune.masked_model import MaskedModel

OBJECTIVES = ("supervised", "pseudo", "entropy")


def check_objective(name: str, data: Mapping[str, torch.Tensor] | None, method: str) -> None:
    """Raise ``ValueError`` when ``data`` cannot be used for objective ``name``."""
    if name not in OBJECTIVES:
        raise ValueError(f"{method}: objective {name!r} is not one of {OBJECTIVES}")
    if data is None or "input_ids" not in data or len(data["input_ids"]) == 0:
        raise ValueError(f"{method} needs calibration data: pass encoded task tensors (structprune.data.encode) "
                         "with at least one example")
    if name == "supervised" and "labels" not in data:
        raise ValueError(f"{method}: the supervised objective needs labels and the data has none; use "
                         "objective='pseudo' or 'entropy' for unlabelled text")


def calibration_batches(data: Mapping[str, torch.Tensor], batch_size: int, max_examples: int | None = None,
                        seed: int = 0, device: torch.device | str = "cpu") -> list[dict[str, torch.Tensor]]:
    """Up to ``max_examples`` examples (drawn with ``seed``) in length-sorted, padding-trimmed batches."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    n = len(data["input_ids"])
    if max_examples is not None:
        if max_examples < 1:
            raise ValueError(f"max_examples must be >= 1 (or None for all), got {max_examples}")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_examples]
    else:
        order = torch.arange(n)
    if "attention_mask" in data:
        lengths = data["attention_mask"][order].sum(dim=1)
        order = order[torch.argsort(lengths, stable=True)]
    return [{name: t.to(device) for name, t in trim_padding({k: v[idx] for k, v in data.items()}).items()}
            for idx in order.split(batch_size)]


def unit_gates(model: MaskedModel, value: float = 1.0) -> dict[str, torch.Tensor]:
    """Head ``[L, H]`` and neuron ``[L, F]`` gates filled with ``value``, requiring grad."""
    structure = model.structure
    weight = model.model.embeddings.word.weight
    return {name: torch.full(shape, value, dtype=weight.dtype, device=weight.device, requires_grad=True)
            for name, shape in (("head", (structure.num_layers, structure.max_heads)),
                                ("neuron", (structure.num_layers, structure.max_ffn)))}


@torch.no_grad()
def add_pseudo_labels(model: MaskedModel, batches: list[dict[str, torch.Tensor]]) -> None:
    """Store the dense model's predictions as ``pseudo_labels`` in every batch (argmax, or the value)."""
    for batch in batches:
        logits = model(**model_inputs(batch), gates={}).logits
        batch["pseudo_labels"] = logits.squeeze(-1) if logits.shape[-1] == 1 else logits.argmax(-1)


def objective(name: str, logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The batch-mean loss to differentiate (lower is better) for objective ``name``. Causal-LM logits
    ``[B, S, V]`` take the next-token loss on the text itself (``labels``: the input ids, -100 on padding)."""
    if logits.dim() == 3:
        if name != "supervised":
            raise ValueError(f"objective {name!r} is for classifiers; a causal LM learns from the text itself "
                             "(objective='supervised')")
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                               ignore_index=-100)
    regression = logits.shape[-1] == 1
    if name == "entropy":
        if regression:
            raise ValueError("the entropy objective needs a classification task; use objective='pseudo' for "
                             "regression")
        logp = F.log_softmax(logits.float(), dim=-1)
        return -(logp.exp() * logp).sum(-1).mean()
    labels = batch["labels"] if name == "supervised" else batch["pseudo_labels"]
    if regression:
        return F.mse_loss(logits.squeeze(-1).float(), labels.float())
    return F.cross_entropy(logits.float(), labels)


def objective_batches(model: MaskedModel, data: Mapping[str, torch.Tensor], name: str, method: str,
                      batch_size: int, max_examples: int | None, seed: int) -> list[dict[str, torch.Tensor]]:
    """Checked calibration batches for objective ``name`` (with pseudo-labels when it needs them)."""
    check_objective(name, data, method)
    device = model.model.embeddings.word.weight.device
    batches = calibration_batches(data, batch_size, max_examples, seed, device)
    if name == "pseudo":
        add_pseudo_labels(model, batches)
    return batches


def gate_gradient(model: MaskedModel, batch: Mapping[str, torch.Tensor], gates: dict[str, torch.Tensor],
                  name: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The objective of one batch at ``gates`` and its gradient with respect to each gate tensor."""
    logits = model(**model_inputs(batch), gates=gates).logits
    loss = objective(name, logits, batch)
    grads = torch.autograd.grad(loss, list(gates.values()))
    return loss.detach(), {key: g.detach() for key, g in zip(gates, grads)}
