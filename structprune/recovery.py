"""Recovery of a pruned causal LM: distil it from its dense parent on calibration text, with the one training
loop (:mod:`structprune.train`).

The loss is the KL divergence of the pruned model's next-token distributions from the dense model's, at
temperature 1, over every real token of the calibration windows (the prediction loss of
:mod:`structprune.methods.distill`). All of the pruned model's weights train; the dense model is only read.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from structprune.methods.distill import prediction_loss
from structprune.train import Objective, TrainConfig, TrainResult, train


class LMDistillation(Objective):
    """KL(dense || pruned) over next-token distributions; AdamW with one learning rate, linear warm-up and decay."""

    def __init__(self, student: nn.Module, teacher: nn.Module, lr: float, weight_decay: float = 0.0):
        super().__init__()
        self.student, self.lr, self.weight_decay = student, lr, weight_decay
        self.teacher = (teacher.eval(),)  # a tuple, not a submodule: neither trained nor checkpointed

    def param_groups(self) -> list[dict]:
        params = [p for p in self.student.parameters() if p.requires_grad]
        return [{"params": params, "lr": self.lr, "weight_decay": self.weight_decay, "schedule": "linear"}]

    def forward(self, batch: Mapping[str, torch.Tensor], step: int, micro: int) -> tuple[torch.Tensor, dict]:
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        with torch.no_grad():
            teacher = self.teacher[0](ids, attention_mask=mask).logits
        student = self.student(ids, attention_mask=mask).logits
        real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        return prediction_loss(student[real], teacher[real], 1.0), {}


def recover(student: nn.Module, teacher: nn.Module, windows: Mapping[str, torch.Tensor], steps: int,
            lr: float = 5e-5, batch_size: int = 4, seed: int = 0, progress: bool = True) -> TrainResult:
    """Distil ``student`` (trained in place, left in eval mode) from ``teacher`` for ``steps`` optimizer steps of
    ``batch_size`` calibration windows (:func:`structprune.likelihood.text_windows`)."""
    if student.spec.get("task") != "causal_lm" or teacher.spec.get("task") != "causal_lm":
        raise ValueError("recovery distils a pruned causal LM from its dense causal LM; got another kind of model")
    if student.spec["vocab_size"] != teacher.spec["vocab_size"]:
        raise ValueError(f"the pruned model has {student.spec['vocab_size']} tokens and the dense one "
                         f"{teacher.spec['vocab_size']}: they are not the same model")
    config = TrainConfig(steps=steps, batch_size=batch_size, seed=seed, warmup_ratio=0.05)
    result = train(LMDistillation(student, teacher, lr), windows, config, progress=progress, description="recovery")
    student.eval()
    return result
