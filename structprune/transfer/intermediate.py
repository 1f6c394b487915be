"""``intermediate``: transfer through the dense model, before any pruning (intermediate-task training, Phang et
al. 2018, "STILTs").

Phase I trains the dense model, no gates, on the auxiliary losses alone (:class:`TransferObjective` with
``gates=None`` and ``target=False``) for ``aux_epochs`` epochs counted in TARGET steps (``ceil(target rows /
batch_size)`` per epoch; default 15); phase R fine-tunes it on the target's task loss for ``retarget_epochs``
epochs (the target's own head, :func:`structprune.finetune.finetune`); both phases at ``dense_lr``, the learning
rate of dense fine-tuning. Then ordinary ``l0`` prunes that model, with it as the teacher unless a teacher is
given. Only weights move (there is no mask yet): transfer ``weights`` or ``both``, schedule ``start``. The one
coupling that changes the teacher: the others distil from the target-only dense model.

Checkpoints: ``aux`` (phase I), ``retarget`` (phase R), ``prune``, ``finetune``. Phases I and R do not depend on
the budget, and neither do their checkpoints' fingerprints: a run at another budget whose ``aux`` and
``retarget`` folders are those of a finished run (copies or links) starts pruning at once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from structprune.finetune import FinetuneConfig, finetune
from structprune.masked_model import MaskedModel
from structprune.methods.distill import LayerDistillation
from structprune.methods.l0 import DistillObjective, LearnedSetup, learned_setup
from structprune.modeling_structprune import StructpruneForSequenceClassification
from structprune.train import TrainResult
from structprune.transfer.config import TransferConfig
from structprune.transfer.objective import TransferObjective
from structprune.transfer.sources import AuxData


def aux_phase(setup: LearnedSetup, config: TransferConfig, student: MaskedModel, layers: LayerDistillation,
              aux: Sequence[AuxData], run: Callable[[DistillObjective, int, str], TrainResult]) -> TransferObjective:
    """Phase I: train the dense ``student`` on the auxiliary losses at ``dense_lr`` with ``run`` (phase
    ``"aux"``); the trained objective."""
    c = config.l0
    steps = c.steps(config.aux_phase_epochs, setup.rows)
    dense = dataclasses.replace(config, l0=dataclasses.replace(c, lr=config.dense_lr))
    before = TransferObjective(student, setup.teacher, layers, dense, None, setup.budget, 0, steps, aux, target=False)
    run(before, steps, "aux")
    return before


def retarget(student: MaskedModel, task_data: Mapping[str, torch.Tensor], setup: LearnedSetup,
             config: TransferConfig, teacher: StructpruneForSequenceClassification | None, directory: Path | None,
             fingerprint: Mapping, progress: bool) -> LearnedSetup:
    """Phase R: fine-tune ``student``'s model on the target (checkpoints under ``directory / "retarget"``, keyed by
    the budget-free ``fingerprint``); the setup of pruning that model, the teacher too unless ``teacher`` is
    given."""
    c = config.l0
    dense = FinetuneConfig(epochs=config.retarget_epochs, batch_size=c.batch_size, lr=config.dense_lr,
                           max_grad_norm=c.max_grad_norm, seed=c.seed, max_steps=c.max_steps)
    finetune(student.model, setup.data, dense, progress=progress, description="transfer retarget",
             checkpoint_dir=None if directory is None else directory / "retarget",
             fingerprint=dict(fingerprint) | {"phase": "retarget"})
    return learned_setup(student.model, task_data, setup.budget, c, teacher)
