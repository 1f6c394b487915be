"""Task fine-tuning, and the dense teacher of a pruning run.

:func:`finetune` trains any model that takes Hugging Face inputs and returns ``.loss`` (a Hugging Face
classifier, a structprune model dense or compact, or a :class:`~structprune.masked_model.MaskedModel`) on
encoded task tensors from :func:`structprune.data.encode`: AdamW, linear warm-up then linear decay to 0,
gradient clipping, shuffled batches. It is the shared loop of :mod:`structprune.train` with the task loss
(:class:`TaskLoss`), so it can checkpoint and resume. Under one seed it is deterministic on a given machine
and thread count (the shuffle order and dropout are seeded). Batches are cut to their longest real sequence
(:func:`structprune.data.encoding.trim_padding`). :func:`dense_teacher` gives a pruning run its teacher.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from structprune.data import TaskSpec
from structprune.data.encoding import model_inputs, num_rows, trim_padding
from structprune.modeling_structprune import StructpruneForSequenceClassification
from structprune.train import Objective, TrainConfig, TrainResult, digest, train


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


class TaskLoss(Objective):
    """The model's own task loss (cross-entropy, or MSE for regression): dense fine-tuning.

    AdamW decays matrices and embeddings only (not biases and norm weights); one learning rate
    with linear warm-up and decay.
    """

    def __init__(self, model: nn.Module, lr: float, weight_decay: float):
        super().__init__()
        self.model, self.lr, self.weight_decay = model, lr, weight_decay

    def param_groups(self) -> list[dict]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        return [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": self.weight_decay, "lr": self.lr,
             "schedule": "linear"},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, "lr": self.lr, "schedule": "linear"},
        ]

    def forward(self, batch: Mapping[str, torch.Tensor], step: int, micro: int) -> tuple[torch.Tensor, dict]:
        batch = trim_padding(batch)
        return self.model(**model_inputs(batch), labels=batch["labels"]).loss, {}


def finetune(model: nn.Module, encoded: Mapping[str, torch.Tensor], config: FinetuneConfig = FinetuneConfig(),
             progress: bool = True, description: str = "fine-tune", checkpoint_dir: str | os.PathLike | None = None,
             fingerprint: Mapping | None = None, evaluate: Callable[[], dict[str, float]] | None = None,
             eval_every: int | None = None) -> TrainResult:
    """Train ``model`` in place on ``encoded`` (with ``labels``) with :func:`structprune.train.train`;
    it is left in eval mode. ``checkpoint_dir`` makes the run resumable (see :mod:`structprune.train`)."""
    rows = num_rows(encoded, description)
    if "labels" not in encoded:
        raise ValueError(f"{description}: the data has no labels; fine-tuning needs labelled examples")
    train_config = TrainConfig(steps=config.total_steps(rows), batch_size=config.batch_size,
                               warmup_ratio=config.warmup_ratio, max_grad_norm=config.max_grad_norm,
                               seed=config.seed, eval_every=eval_every)
    return train(TaskLoss(model, config.lr, config.weight_decay), encoded, train_config, checkpoint_dir,
                 fingerprint, evaluate, progress, description)


def mark_task(model: nn.Module, task: TaskSpec) -> None:
    """Record in the model's config the task it was fine-tuned on and its label names, so a saved
    model says what it predicts (``finetuned_task``, ``id2label``) and a teacher can be checked."""
    model.config.finetuned_task = task.name
    names = task.label_names or ("score",)
    model.config.id2label = dict(enumerate(names))
    model.config.label2id = {name: i for i, name in enumerate(names)}


def _fine_tuned_for(model: StructpruneForSequenceClassification, task_name: str) -> bool:
    return getattr(model.config, "finetuned_task", None) == task_name


def dense_teacher(model: StructpruneForSequenceClassification, train_enc: Mapping[str, torch.Tensor], task: TaskSpec,
                  dense_config: FinetuneConfig, checkpoint_dir: Path | None, progress: bool = True,
                  model_name: str = "model", tag: str = "l0") -> tuple[StructpruneForSequenceClassification, bool]:
    """(the dense teacher, whether it was fine-tuned here): ``model`` itself when its config says it was
    fine-tuned on ``task``, else a copy fine-tuned on ``train_enc`` (resumable under ``checkpoint_dir/dense``)."""
    if _fine_tuned_for(model, task.name):
        return model, False
    dense = copy.deepcopy(model)
    print(f"[{tag}] {model_name} is not fine-tuned on {task.name}: fine-tuning the dense teacher first", flush=True)
    finetune(dense, train_enc, dense_config, progress=progress, description="dense fine-tune",
             checkpoint_dir=None if checkpoint_dir is None else checkpoint_dir / "dense",
             fingerprint={"task": task.name, "data": digest(train_enc), "model": digest(model.state_dict()),
                          "config": dataclasses.asdict(dense_config)})
    mark_task(dense, task)
    return dense, True
