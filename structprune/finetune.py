"""A small fine-tuning loop and the evaluation helper used by the CLI and the demo.

:func:`finetune` trains any model that takes Hugging Face inputs and returns ``.loss`` (a Hugging
Face classifier, a structprune model dense or compact, or a :class:`~structprune.masked.MaskedModel`)
on encoded task tensors from :func:`structprune.data.encode`: AdamW, linear warm-up then linear
decay to 0, gradient clipping, shuffled batches. Under one seed it is deterministic on a given
machine and thread count (the shuffle order and dropout are seeded).

:func:`evaluate` scores a model, or an ONNX Runtime session, with :mod:`structprune.metrics`.

Batches are cut to their longest real sequence (:func:`trim_padding`): ``encode`` pads every row
to the longest example of the whole data set, and most batches need far fewer columns.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from structprune.data import TaskSpec, batches
from structprune.metrics import compute_metrics

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def model_inputs(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of ``batch`` a model takes as inputs (labels and extra tokenizer fields left out)."""
    return {name: batch[name] for name in MODEL_INPUTS if name in batch}


def trim_padding(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``batch`` without trailing columns that are padding in every row.

    Exact for right and left padding alike: only columns after the last real token of every
    row go, which no real token attends to and no classifier reads.
    """
    mask = batch.get("attention_mask")
    if mask is None or mask.ndim != 2:
        return dict(batch)
    real = mask.any(0).nonzero()
    length = int(real.max()) + 1 if len(real) else 1
    return {name: t[:, :length] if t.ndim == 2 and t.shape[1] == mask.shape[1] else t for name, t in batch.items()}


def _num_rows(encoded: Mapping[str, torch.Tensor], what: str) -> int:
    if "input_ids" not in encoded or len(encoded["input_ids"]) == 0:
        raise ValueError(f"{what}: the data set is empty (no input_ids rows); load a task with examples")
    return len(encoded["input_ids"])


@dataclass(frozen=True)
class FinetuneConfig:
    """Settings of :func:`finetune`.

    ``max_steps`` (optional) stops early, e.g. for smoke tests; the learning-rate schedule is
    then laid out over ``max_steps``.
    """

    epochs: int = 3
    batch_size: int = 32
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    seed: int = 0
    max_steps: int | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs} and {self.batch_size}")
        if not self.lr > 0 or self.weight_decay < 0 or not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"need lr > 0, weight_decay >= 0 and 0 <= warmup_ratio < 1; got lr={self.lr}, "
                             f"weight_decay={self.weight_decay}, warmup_ratio={self.warmup_ratio}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 when given, got {self.max_steps}")

    def total_steps(self, rows: int) -> int:
        steps = self.epochs * math.ceil(rows / self.batch_size)
        return steps if self.max_steps is None else min(steps, self.max_steps)


@dataclass
class TrainLog:
    """Per-step training losses and the wall time of a :func:`finetune` run."""

    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def steps(self) -> int:
        return len(self.losses)


def _optimizer(model: nn.Module, config: FinetuneConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings only (not on biases and norm weights)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr)


def _linear_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Learning rate rising linearly over ``warmup`` steps, then falling linearly to 0 at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def finetune(model: nn.Module, encoded: Mapping[str, torch.Tensor], config: FinetuneConfig = FinetuneConfig(),
             progress: bool = True, description: str = "fine-tune") -> TrainLog:
    """Train ``model`` in place on ``encoded`` (with ``labels``); it is left in eval mode."""
    rows = _num_rows(encoded, description)
    if "labels" not in encoded:
        raise ValueError(f"{description}: the data has no labels; fine-tuning needs labelled examples")
    total = config.total_steps(rows)
    optimizer = _optimizer(model, config)
    scheduler = _linear_schedule(optimizer, math.ceil(config.warmup_ratio * total), total)
    torch.manual_seed(config.seed)
    log = TrainLog()
    start = time.perf_counter()
    model.train()
    with tqdm(total=total, desc=description, unit="step", disable=not progress) as bar:
        for epoch in range(config.epochs):
            for batch in batches(encoded, config.batch_size, shuffle=True, seed=config.seed + epoch):
                if log.steps == total:
                    break
                batch = trim_padding(batch)
                loss = model(**model_inputs(batch), labels=batch["labels"]).loss
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"{description}: the loss became {loss.item()} at step {log.steps}; "
                                             "lower the learning rate")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                log.losses.append(loss.item())
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.4f}")
    log.seconds = time.perf_counter() - start
    model.eval()
    return log


def _is_ort_session(model: object) -> bool:
    return hasattr(model, "run") and hasattr(model, "get_inputs") and not isinstance(model, nn.Module)


def predict(model, encoded: Mapping[str, torch.Tensor], batch_size: int = 64) -> torch.Tensor:
    """Logits of ``model`` (a torch model or an ONNX Runtime session) for every row, in order."""
    _num_rows(encoded, "predict")
    outputs = []
    if _is_ort_session(model):
        names = [i.name for i in model.get_inputs()]
        missing = [n for n in names if n not in encoded]
        if missing:
            raise ValueError(f"the ONNX graph needs inputs {missing}, which the encoded data lacks "
                             f"(it has {sorted(encoded)}); encode with the model's own tokenizer")
        for batch in batches(encoded, batch_size):
            batch = trim_padding(batch)
            feed = {n: batch[n].numpy().astype(np.int64) for n in names}
            outputs.append(torch.from_numpy(model.run(None, feed)[0]))
        return torch.cat(outputs)
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for batch in batches(encoded, batch_size):
            outputs.append(model(**model_inputs(trim_padding(batch))).logits.float())
    model.train(was_training)
    return torch.cat(outputs)


def evaluate(model, encoded: Mapping[str, torch.Tensor], task: TaskSpec, batch_size: int = 64) -> dict[str, float]:
    """The task's metrics (in percent) of ``model`` or an ONNX Runtime session on ``encoded``."""
    if "labels" not in encoded:
        raise ValueError(f"{task.name}: the data has no labels, so there is nothing to score against")
    return compute_metrics(task, predict(model, encoded, batch_size), encoded["labels"])
