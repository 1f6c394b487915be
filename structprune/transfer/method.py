"""The ``transfer`` method: learned structured pruning (``l0``) helped by auxiliary tasks under limited target data.

The target side is the ``l0`` method unchanged (:mod:`structprune.methods.l0`: hard-concrete gates, task loss +
prediction and layer distillation from the dense teacher, Lagrangian to the budget, extraction, fine-tuning of the
compact model). Auxiliary sources (:mod:`structprune.transfer.sources`) add losses before or during the pruning
phase, as the coupling says (``TransferConfig.coupling``; each in its module): ``joint``, ``separate-masks``
(during pruning, :class:`~structprune.transfer.objective.TransferObjective`), ``sequential`` (a pruning phase on the
auxiliary data first), ``intermediate`` (dense training on the auxiliary data first). The fine-tuning phase
(compact model, masks frozen) is target-only.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from structprune.budget import Budget
from structprune.masked_model import MaskedModel
from structprune.methods.l0 import (
    DistillObjective,
    LearnedSetup,
    finish,
    learned_setup,
    train_config,
)
from structprune.methods.result import PruneResult
from structprune.modeling_structprune import StructpruneForSequenceClassification
from structprune.train import TrainResult, digest, train
from structprune.transfer import intermediate, sequential
from structprune.transfer.config import TransferConfig, config_from_options
from structprune.transfer.objective import TransferObjective
from structprune.transfer.sources import AuxData


def _check_aux(aux: Sequence[AuxData]) -> None:
    if not aux:
        raise ValueError("the transfer method needs auxiliary data: pass aux=load_auxiliary(...)[0] with at least "
                         "one source, or use method l0 for target-only pruning")
    names = [source.name for source in aux]
    if len(set(names)) != len(names):
        raise ValueError(f"auxiliary sources must have distinct names, got {names}")
    for source in aux:
        if len(source) == 0:
            raise ValueError(f"auxiliary source {source.name!r} has no examples; drop it")
        labels = source.encoded.get("labels")
        if source.task is not None and source.task.num_labels > 1 and (
                int(labels.min()) < 0 or int(labels.max()) >= source.task.num_labels):
            raise ValueError(f"auxiliary source {source.name!r} has labels {int(labels.min())}..{int(labels.max())} "
                             f"but its task has {source.task.num_labels} classes")


def _check_vocabulary(aux: Sequence[AuxData], setup: LearnedSetup) -> None:
    for source in aux:
        if source.is_mlm and source.vocab_size > setup.full.spec["vocab_size"]:
            raise ValueError(f"the MLM data's tokenizer has {source.vocab_size} tokens, more than the model's "
                             f"{setup.full.spec['vocab_size']}: use the model's own tokenizer")


def prune(model: PreTrainedModel | MaskedModel, task_data: Mapping[str, torch.Tensor], budget: Budget | float, *,
          aux: Sequence[AuxData], config: TransferConfig = TransferConfig(),
          teacher: StructpruneForSequenceClassification | None = None,
          checkpoint_dir: str | os.PathLike | None = None,
          evaluate: Callable[[nn.Module], dict[str, float]] | None = None, eval_every: int | None = None,
          progress: bool = False, **settings: object) -> PruneResult:
    """Learn masks meeting ``budget`` with help from ``aux`` and fine-tune the compact model on the target.

    Arguments as :func:`structprune.methods.l0.prune`, plus ``aux``
    (:func:`structprune.transfer.sources.load_auxiliary`) and ``config``. Checkpoints go to ``checkpoint_dir/aux``
    (the auxiliary phase of sequential and intermediate), ``/retarget`` (intermediate's dense target fine-tuning),
    ``/prune`` and ``/finetune``. Intermediate's ``aux`` and ``retarget`` phases do not depend on the budget, and
    neither do their checkpoints: a run at another budget whose ``aux`` and ``retarget`` folders are those of a
    finished run (copies or links) starts pruning at once. ``result.log`` adds the coupling, transfer, schedule,
    guard, the sources and ``aux_steps``: per step of the phase with auxiliary losses the schedule factor, each
    source's applied weight and cosine. ``settings``: fields of :class:`~structprune.transfer.config.TransferConfig`
    or of its ``l0`` config that override ``config``'s.
    """
    config = config_from_options(settings, config)
    _check_aux(aux)
    c = config.l0
    setup = learned_setup(model, task_data, budget, c, teacher)
    _check_vocabulary(aux, setup)
    directory = None if checkpoint_dir is None else Path(checkpoint_dir)
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k != "l0"}
    fingerprint = setup.fingerprint | {"method": "transfer", "transfer": settings,
                                       "aux": [[s.name, s.weight, digest(s.encoded)] for s in aux]}
    dense_phases = {k: v for k, v in fingerprint.items() if k != "budget"}  # intermediate's, before any gate

    def run(objective: DistillObjective, steps: int, phase: str) -> TrainResult:
        key = dense_phases if objective.gates is None else fingerprint
        return train(objective, setup.data, train_config(c, steps), None if directory is None else directory / phase,
                     key | {"phase": phase}, progress=progress, description=f"transfer {phase}")

    student, gates, layers = setup.parts(c)
    if config.coupling == "sequential":
        before = sequential.aux_phase(setup, config, student, gates, layers, aux, run)
        student, gates, layers = sequential.target_start(setup, config, before)
    elif config.coupling == "intermediate":
        before = intermediate.aux_phase(setup, config, student, layers, aux, run)
        setup = intermediate.retarget(student, task_data, setup, config, teacher, directory, dense_phases, progress)
        student, gates, layers = setup.parts(c)
    if config.coupling in ("joint", "separate-masks"):
        objective = TransferObjective(student, setup.teacher, layers, config, gates, setup.budget,
                                      setup.warmup_steps(c), setup.prune_steps, aux)
    else:
        objective = DistillObjective(student, setup.teacher, layers, c, gates, setup.budget, setup.warmup_steps(c))
    pruning = run(objective, setup.prune_steps, "prune")
    history = (objective if isinstance(objective, TransferObjective) else before).history
    result = finish("transfer", setup, objective, pruning, c, dataclasses.asdict(config), directory,
                    fingerprint, evaluate, eval_every, progress)
    result.log |= settings | {"aux_sources": [{"name": s.name, "weight": s.weight, "rows": len(s),
                                               "task": "mlm" if s.is_mlm else s.task.name} for s in aux],
                              "aux_steps": history}
    return result
