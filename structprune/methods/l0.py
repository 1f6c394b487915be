"""``l0``: learned structured pruning with hard-concrete gates and distillation (CoFiPruning).

Starting from a model fine-tuned on the task (also the teacher, unless another is given):

1. **Pruning** (``prune_epochs``): hard-concrete gates (:mod:`structprune.methods.hardconcrete`) on the
   chosen granularities are trained with the weights. The loss is
   ``task_weight * task loss + pred_weight * prediction distillation (temperature)
   + layer_weight * layer distillation (dynamic mapping, :mod:`structprune.methods.distill`)
   + lambda_1 * (s - t) + lambda_2 * (s - t)^2``, where ``s`` is the expected sparsity of the
   budget's kind (parameters or FLOPs, exact expectation of the compaction's counts) and ``t`` the
   target, raised linearly from the gates' initial expected sparsity over the first
   ``sparsity_warmup`` share of the phase (sparsity warm-up; by default 0.8 under ``hold``, CoFi's 0.5 under
   ``lagrangian``) and then held. The multipliers are
   trained by gradient ascent (AdamW, ``maximize``).
   Weights, gates and multipliers have separate learning rates.
   **Controller.** The Lagrangian alone (``controller="lagrangian"``, CoFi's) lags the target through
   the warm-up, then overshoots it unless the phase is long, so extraction may land the masks away from
   the sparsity the model trained at. ``hold`` (the default) keeps the Lagrangian through the warm-up,
   where its multipliers price each unit by its cost, and from the end of the warm-up ends every
   optimizer step by adding one shift to every gate logit, the one that puts the expected sparsity
   exactly on the target (:meth:`HardConcreteGates.project`, bisection): the gates train at the budget
   for the last part of the phase, whatever its length, and the multipliers stop moving (the gap they
   learn from is zero) while their pressure stays. The log keeps the expected sparsity and the target
   of every step (``sparsity_trace``).
2. **Extraction**: deterministic 0/1 masks (the rule of
   :meth:`~structprune.methods.hardconcrete.HardConcreteGates.extract`), within ``tolerance`` of the target,
   every kept FFN width and the hidden size multiples of ``multiple_of``.
3. **Fine-tuning** (``finetune_epochs``): the model is compacted with the masks frozen and trained
   on the same loss without the Lagrangian term.

Gate noise is drawn from a generator seeded by ``(seed, step, micro-batch)``, so it is the same in
every process of a DDP run and after a resume. Both phases run on :func:`structprune.train.train`
(checkpoints under ``checkpoint_dir/prune`` and ``checkpoint_dir/finetune``, exact resume, DDP).

The result's ``weights`` are the state dict of the fine-tuned compact model:
``compact(model, result.masks).load_state_dict(result.weights)`` rebuilds it.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from structprune.arch.structure import ModelStructure
from structprune.budget import Budget, as_budget
from structprune.compaction import compact
from structprune.costs import count_flops, count_params
from structprune.data.encoding import model_inputs, trim_padding
from structprune.masked_model import MaskedModel
from structprune.methods.distill import (
    CACHE_LIMIT_BYTES,
    LayerDistillation,
    TeacherCache,
    check_teacher,
    prediction_loss,
    teacher_layers,
)
from structprune.methods.hardconcrete import HardConcreteGates, check_multiple_of, max_sparsity
from structprune.methods.options import L0Config
from structprune.methods.result import PruneResult
from structprune.methods.setup import dense_model
from structprune.modeling_structprune import StructpruneForSequenceClassification
from structprune.train import Objective, TrainConfig, TrainResult, digest, train


class Lagrangian(nn.Module):
    """``lambda_1 * (s - t) + lambda_2 * (s - t)^2`` with the multipliers trained by gradient ascent."""

    def __init__(self):
        super().__init__()
        self.lambdas = nn.Parameter(torch.zeros(2))

    def forward(self, sparsity: torch.Tensor, target: float) -> torch.Tensor:
        gap = sparsity - target
        return self.lambdas[0] * gap + self.lambdas[1] * gap * gap


class DistillObjective(Objective):
    """The loss of both phases: task + prediction + layer distillation, and with gates the Lagrangian.

    The teacher is held outside the module tree (frozen, not in state dicts or DDP).
    """

    def __init__(self, student: nn.Module, teacher: StructpruneForSequenceClassification, layers: LayerDistillation,
                 config: L0Config, gates: HardConcreteGates | None = None, budget: Budget | None = None,
                 warmup_steps: int = 0):
        super().__init__()
        self.student, self.layers, self.config = student, layers, config
        self.__dict__["teacher"] = teacher  # not a submodule: frozen, never checkpointed
        self.gates, self.budget, self.warmup_steps = gates, budget, warmup_steps
        self.lagrangian = Lagrangian() if gates is not None else None
        if gates is not None:
            spec = student.spec
            structure = ModelStructure.from_spec(spec)
            self.dense_cost = (count_params(structure, spec) if budget.kind == "params"
                               else count_flops(structure, spec, budget.seq_len))
            with torch.no_grad():
                self.initial_sparsity = float(self.expected_sparsity())

    def param_groups(self) -> list[dict]:
        c = self.config
        weights = [p for p in self.student.parameters() if p.requires_grad] + list(self.layers.parameters())
        groups = [
            {"params": [p for p in weights if p.ndim >= 2], "lr": c.lr, "weight_decay": c.weight_decay,
             "schedule": "linear"},
            {"params": [p for p in weights if p.ndim < 2], "lr": c.lr, "weight_decay": 0.0, "schedule": "linear"},
        ]
        if self.gates is not None:
            groups += [
                {"params": list(self.gates.parameters()), "lr": c.gate_lr, "weight_decay": 0.0,
                 "schedule": "constant", "clip": False},
                {"params": list(self.lagrangian.parameters()), "lr": c.lambda_lr, "weight_decay": 0.0,
                 "schedule": "constant", "clip": False, "maximize": True},
            ]
        return groups

    def target(self, step: int) -> float:
        """The sparsity target at ``step``: linear warm-up from the gates' initial expected sparsity, then the
        budget (starting at 0 would first push the gates open, away from the target)."""
        if step >= self.warmup_steps:
            return self.budget.target
        start = min(self.initial_sparsity, self.budget.target)
        return start + (self.budget.target - start) * step / self.warmup_steps

    def expected_sparsity(self, gates: HardConcreteGates | None = None, shift: float = 0.0) -> torch.Tensor:
        """Expected sparsity of the budget's kind under ``gates`` (default: this objective's gates), every
        ``log_alpha`` shifted by ``shift``."""
        gates = self.gates if gates is None else gates
        params, flops = gates.expected_cost(self.student.spec, self.budget.seq_len, shift)
        return 1 - (params if self.budget.kind == "params" else flops) / self.dense_cost

    def project(self, step: int, gates: HardConcreteGates | None = None) -> float:
        """Shift ``gates`` (default: this objective's) onto the target of ``step``; the shift."""
        gates = self.gates if gates is None else gates
        return gates.project(lambda shift: float(self.expected_sparsity(gates, shift)), self.target(step))

    def holds(self, step: int) -> bool:
        """Whether the ``hold`` controller puts the gates on the target after step ``step`` (from the warm-up's end)."""
        return self.config.controller == "hold" and step >= self.warmup_steps

    def after_step(self, step: int) -> None:
        if self.gates is not None and self.holds(step):
            self.project(step)

    def sample_gates(self, step: int, micro: int) -> dict[str, torch.Tensor] | None:
        """One draw of the gates for ``(step, micro)`` (noise seeded by ``(seed, step, micro)``), or ``None``."""
        if self.gates is None:
            return None
        noise = torch.Generator().manual_seed(self.config.seed * 1_000_003 + step * 1_009 + micro)
        return self.gates.sample(noise)

    def distill_loss(self, batch: Mapping[str, torch.Tensor],
                     gates: dict[str, torch.Tensor] | None) -> tuple[torch.Tensor, dict]:
        """``task_weight * task + pred_weight * prediction + layer_weight * layer distillation`` of ``batch``
        under ``gates`` (the loss without the Lagrangian), and its parts."""
        c = self.config
        batch = trim_padding(batch)
        inputs = model_inputs(batch)
        extra = {} if gates is None else {"gates": gates}
        out = self.student(**inputs, labels=batch["labels"], output_hidden_states=True, **extra)
        teacher_logits, teacher_states = TeacherCache.outputs(self.teacher, batch, inputs)
        pred = prediction_loss(out.logits, teacher_logits, c.temperature)
        layer, _ = self.layers(out.hidden_states, teacher_states, batch["attention_mask"])
        loss = c.task_weight * out.loss + c.pred_weight * pred + c.layer_weight * layer
        return loss, {"task": out.loss.item(), "pred": pred.item(), "layer": layer.item()}

    def constraint(self, step: int, gates: HardConcreteGates | None = None, lagrangian: Lagrangian | None = None,
                   prefix: str = "") -> tuple[torch.Tensor, dict]:
        """The Lagrangian term driving ``gates`` (default: this objective's) to the target at ``step``, and
        the values to log (names prefixed with ``prefix``)."""
        lagrangian = self.lagrangian if lagrangian is None else lagrangian
        sparsity, target = self.expected_sparsity(gates), self.target(step)
        return lagrangian(sparsity, target), {
            f"{prefix}sparsity": sparsity.item(), f"{prefix}target": target,
            f"{prefix}lambda1": lagrangian.lambdas[0].item(), f"{prefix}lambda2": lagrangian.lambdas[1].item()}

    def forward(self, batch: Mapping[str, torch.Tensor], step: int, micro: int) -> tuple[torch.Tensor, dict]:
        loss, values = self.distill_loss(batch, self.sample_gates(step, micro))
        if self.gates is not None:
            penalty, more = self.constraint(step)
            loss = loss + penalty
            values |= more
        return loss, values


def train_config(config: L0Config, steps: int) -> TrainConfig:
    """The :class:`~structprune.train.TrainConfig` of a phase of ``steps`` steps under ``config``."""
    return TrainConfig(steps=steps, batch_size=config.batch_size, grad_accum=config.grad_accum,
                       warmup_ratio=config.lr_warmup_ratio, max_grad_norm=config.max_grad_norm, seed=config.seed,
                       checkpoint_every=config.checkpoint_every)


@dataclass(frozen=True)
class LearnedSetup:
    """What a learned pruning run starts from, checked (see :func:`learned_setup`); shared by ``l0`` and
    ``transfer``."""

    budget: Budget
    full: StructpruneForSequenceClassification
    structure: ModelStructure
    teacher: StructpruneForSequenceClassification
    rows: int
    prune_steps: int
    finetune_steps: int
    fingerprint: dict
    data: Mapping[str, torch.Tensor]
    """The task data the phases train on: with each row's index (``row``) when the teacher's outputs are
    cached (:class:`~structprune.methods.distill.TeacherCache`, built by :func:`learned_setup` when it fits in
    :data:`~structprune.methods.distill.CACHE_LIMIT_BYTES`)."""

    def parts(self, config: L0Config, student: MaskedModel | None = None
              ) -> tuple[MaskedModel, HardConcreteGates, LayerDistillation]:
        """A fresh student (a copy of the model, unless ``student`` is given), fresh gates and a fresh layer
        distillation map, on the model's device."""
        device = next(self.full.parameters()).device
        student = MaskedModel(self.full) if student is None else student  # copies: ``model`` is left as it was
        gates = HardConcreteGates(self.structure, config.granularities, config.init_log_alpha).to(device)
        layers = LayerDistillation(self.structure.hidden_size, self.teacher.spec["hidden_size"],
                                   self.structure.num_layers, teacher_layers(len(self.teacher.layers))).to(device)
        return student, gates, layers

    def warmup_steps(self, config: L0Config, steps: int | None = None) -> int:
        """Sparsity warm-up steps of a pruning phase of ``steps`` steps (default: the pruning phase)."""
        return round(config.warmup_share * (self.prune_steps if steps is None else steps))


def learned_setup(model: PreTrainedModel | MaskedModel, task_data: Mapping[str, torch.Tensor],
                  budget: Budget | float, config: L0Config,
                  teacher: StructpruneForSequenceClassification | None) -> LearnedSetup:
    """Check the budget (reachable with ``config.granularities``), ``config.multiple_of``, the teacher and the
    labels before any training, and lay out the phases; the fingerprint identifies the run for checkpoints."""
    budget = as_budget(budget)
    if budget.kind not in ("params", "flops"):
        raise ValueError(f"the l0 method takes a params or flops budget, not {budget.kind!r}: its sparsity "
                         "expectation is exact for counted parameters and FLOPs only")
    full = dense_model(model)
    structure = ModelStructure.from_spec(full.spec)
    check_multiple_of(structure, config.multiple_of)
    limit = max_sparsity(structure, full.spec, config.granularities, budget.kind, budget.seq_len, config.multiple_of)
    if budget.target > limit - config.tolerance:
        raise ValueError(f"a {budget.kind} sparsity of {budget.target:.3f} cannot be reached by gating only "
                         f"{', '.join(config.granularities)}: removing all of them gives at most {limit:.3f}. "
                         "Add granularities (e.g. neuron, ffn_layer) or lower the target")
    teacher = copy.deepcopy(dense_model(teacher) if teacher is not None else full).eval()
    check_teacher(teacher, full)
    labels = task_data.get("labels")
    if labels is not None and labels.dtype == torch.long and full.spec["num_labels"] > 1 and (
            int(labels.max()) >= full.spec["num_labels"] or int(labels.min()) < 0):
        raise ValueError(f"labels range over {int(labels.min())}..{int(labels.max())} but the model has "
                         f"{full.spec['num_labels']} outputs: the model and teacher must be trained for this task")
    for p in teacher.parameters():
        p.requires_grad_(False)
    rows = len(task_data["input_ids"])
    fingerprint = {"method": "l0", "config": dataclasses.asdict(config), "budget": budget.as_dict(),
                   "data": digest(task_data), "model": digest(full.state_dict()),
                   "teacher": digest(teacher.state_dict())}
    data = task_data
    layers = teacher_layers(len(teacher.layers))
    if TeacherCache.nbytes(rows, task_data["input_ids"].shape[1], teacher.spec["hidden_size"],
                           layers) <= CACHE_LIMIT_BYTES:
        TeacherCache(teacher, task_data, layers).attach(teacher)
        data = dict(task_data) | {"row": torch.arange(rows)}
    return LearnedSetup(budget, full, structure, teacher, rows, config.steps(config.prune_epochs, rows),
                      config.steps(config.finetune_epochs, rows) if config.finetune_epochs else 0, fingerprint, data)


def sparsity_trace(pruning: TrainResult) -> dict[str, list[float]]:
    """Per step of a pruning phase: its target and the gates' expected sparsity in the step's forward."""
    return {key: [values[key] for values in pruning.history] for key in ("target", "sparsity")}


def finish(method: str, setup: LearnedSetup, objective: DistillObjective, pruning: TrainResult,
           config: L0Config, options: Mapping[str, object],
           directory: Path | None, fingerprint: Mapping, evaluate: Callable[[nn.Module], dict[str, float]] | None,
           eval_every: int | None, progress: bool) -> PruneResult:
    """Steps 2 and 3 of the module docstring after a pruning phase trained ``objective``: extract masks from
    its gates, compact its student and fine-tune it (under ``directory / "finetune"``)."""
    budget, structure, full, teacher = setup.budget, setup.structure, setup.full, setup.teacher
    with torch.no_grad():
        expected = float(objective.expected_sparsity())
    rounded = objective.gates.rounded_masks(multiple_of=config.multiple_of).summary(structure, full.spec,
                                                                                   seq_len=budget.seq_len)
    masks = objective.gates.extract(full.spec, budget.target, budget.kind, budget.seq_len, config.tolerance,
                                    config.multiple_of)
    summary = masks.summary(structure, full.spec, seq_len=budget.seq_len)
    log = {"method": method, "prune_steps": setup.prune_steps, "finetune_steps": setup.finetune_steps,
           "prune_seconds": pruning.seconds, "prune_losses": pruning.losses, "expected_sparsity_end": expected,
           "rounded_sparsity": budget.achieved(rounded), "multiple_of": config.multiple_of,
           "sparsity_trace": sparsity_trace(pruning),
           "lambdas": objective.lagrangian.lambdas.detach().cpu().tolist(), "summary": summary,
           "achieved": budget.achieved(summary), "evaluations": []}

    pruned = compact(objective.student, masks)
    kept_hidden = masks.kept(structure)[1]
    tuned = DistillObjective(pruned, teacher, objective.layers.restrict(kept_hidden), config)
    if setup.finetune_steps:
        finetuning = train(tuned, setup.data, dataclasses.replace(train_config(config, setup.finetune_steps),
                                                                 eval_every=eval_every),
                           None if directory is None else directory / "finetune",
                           dict(fingerprint) | {"phase": "finetune", "masks": digest(masks.masks)},
                           evaluate=None if evaluate is None else (lambda: evaluate(pruned)), progress=progress,
                           description=f"{method} fine-tuning")
        log |= {"finetune_seconds": finetuning.seconds, "finetune_losses": finetuning.losses,
                "evaluations": finetuning.evaluations}
    pruned.eval()
    masks.meta = {"method": method, "budget": budget.as_dict(), "options": dict(options)}
    return PruneResult(masks, {k: v.detach().clone() for k, v in pruned.state_dict().items()}, log)


def prune(model: PreTrainedModel | MaskedModel, task_data: Mapping[str, torch.Tensor], budget: Budget | float, *,
          config: L0Config = L0Config(), teacher: StructpruneForSequenceClassification | None = None,
          checkpoint_dir: str | os.PathLike | None = None,
          evaluate: Callable[[nn.Module], dict[str, float]] | None = None, eval_every: int | None = None,
          progress: bool = False, **settings: object) -> PruneResult:
    """Learn masks meeting ``budget`` and fine-tune the compacted model (see the module docstring).

    Args:
        model: the model fine-tuned on the task (Hugging Face, structprune full size, or MaskedModel);
            it is not changed.
        task_data: encoded, labelled training rows (:func:`structprune.data.encode`).
        teacher: the distillation teacher (default: ``model``); checked with
            :func:`structprune.methods.distill.check_teacher`.
        checkpoint_dir: makes the run resumable (and rank 0 of a DDP run writes there).
        evaluate: called with the compact model during fine-tuning (every ``eval_every`` steps and at
            the end) for the log and ``log["evaluations"]``; it must not use the global RNG.
        settings: :class:`~structprune.methods.options.L0Config` fields that override ``config``'s.
    """
    config = dataclasses.replace(config, **settings)
    setup = learned_setup(model, task_data, budget, config, teacher)
    directory = None if checkpoint_dir is None else Path(checkpoint_dir)
    student, gates, layers = setup.parts(config)
    objective = DistillObjective(student, setup.teacher, layers, config, gates, setup.budget,
                                 warmup_steps=setup.warmup_steps(config))
    pruning = train(objective, setup.data, train_config(config, setup.prune_steps),
                    None if directory is None else directory / "prune", setup.fingerprint | {"phase": "prune"},
                    progress=progress, description="l0 pruning")
    return finish("l0", setup, objective, pruning, config, dataclasses.asdict(config), directory,
                  setup.fingerprint, evaluate, eval_every, progress)
