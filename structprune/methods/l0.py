"""``l0``: learned structured pruning with hard-concrete gates and distillation (CoFiPruning).

Starting from a model fine-tuned on the task (also the teacher, unless another is given):

1. **Pruning** (``prune_epochs``): hard-concrete gates (:mod:`structprune.hardconcrete`) on the
   chosen granularities are trained with the weights. The loss is
   ``task_weight * task loss + pred_weight * prediction distillation (temperature)
   + layer_weight * layer distillation (dynamic mapping, :mod:`structprune.distill`)
   + lambda_1 * (s - t) + lambda_2 * (s - t)^2``, where ``s`` is the expected sparsity of the
   budget's kind (parameters or FLOPs, exact expectation of the compaction's counts) and ``t`` the
   target, raised linearly from the gates' initial expected sparsity over the first
   ``sparsity_warmup`` share of the phase (sparsity warm-up) and then held. The multipliers are
   trained by gradient ascent (AdamW, ``maximize``).
   Weights, gates and multipliers have separate learning rates.
2. **Extraction**: deterministic 0/1 masks (the rule of
   :meth:`~structprune.hardconcrete.HardConcreteGates.extract`), within ``tolerance`` of the target.
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
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from structprune.arch.structure import ModelStructure
from structprune.compact import compact
from structprune.distill import LayerDistillation, prediction_loss, teacher_layers
from structprune.finetune import model_inputs, trim_padding
from structprune.hardconcrete import HardConcreteGates, max_sparsity
from structprune.masked import MaskedModel
from structprune.masks import MASK_NAMES, count_flops, count_params
from structprune.methods import Budget, PruneResult, as_budget, dense_model
from structprune.modeling_compact import StructpruneForSequenceClassification
from structprune.train import Objective, TrainConfig, digest, train


@dataclass(frozen=True)
class L0Config:
    """Settings of the ``l0`` method (defaults: CoFi's design, step counts sized for ~1,000 examples).

    ``max_steps`` caps each phase (smoke tests). Learning rates: ``lr`` for the model weights and
    the distillation map (linear warm-up over ``lr_warmup_ratio``, then decay), ``gate_lr`` and
    ``lambda_lr`` constant.
    """

    granularities: tuple[str, ...] = MASK_NAMES
    prune_epochs: float = 10.0
    finetune_epochs: float = 5.0
    sparsity_warmup: float = 0.5
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 5e-5
    gate_lr: float = 0.05
    lambda_lr: float = 0.05
    weight_decay: float = 0.01
    lr_warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    init_log_alpha: float = 2.0
    task_weight: float = 0.5
    pred_weight: float = 0.5
    layer_weight: float = 0.5
    temperature: float = 2.0
    tolerance: float = 0.005
    seed: int = 0
    checkpoint_every: int | None = 50
    max_steps: int | None = None

    def __post_init__(self) -> None:
        unknown = set(self.granularities) - set(MASK_NAMES)
        if not self.granularities or unknown:
            raise ValueError(f"granularities must be a non-empty subset of {MASK_NAMES}, "
                             f"got {list(self.granularities)}")
        if self.prune_epochs <= 0 or self.finetune_epochs < 0:
            raise ValueError(f"need prune_epochs > 0 and finetune_epochs >= 0, got {self.prune_epochs} and "
                             f"{self.finetune_epochs}")
        if not 0 <= self.sparsity_warmup <= 1:
            raise ValueError(f"sparsity_warmup is a share of the pruning phase, in [0, 1]; got {self.sparsity_warmup}")
        if min(self.lr, self.gate_lr, self.lambda_lr, self.temperature) <= 0:
            raise ValueError("lr, gate_lr, lambda_lr and temperature must be > 0")
        if min(self.task_weight, self.pred_weight, self.layer_weight) < 0 or not (
                self.task_weight or self.pred_weight or self.layer_weight):
            raise ValueError("loss weights must be >= 0 and not all 0")

    def steps(self, epochs: float, rows: int) -> int:
        steps = math.ceil(epochs * math.ceil(rows / self.batch_size))
        return steps if self.max_steps is None else min(steps, self.max_steps)


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

    def expected_sparsity(self) -> torch.Tensor:
        params, flops = self.gates.expected_cost(self.student.spec, self.budget.seq_len)
        return 1 - (params if self.budget.kind == "params" else flops) / self.dense_cost

    def forward(self, batch: Mapping[str, torch.Tensor], step: int, micro: int) -> tuple[torch.Tensor, dict]:
        c = self.config
        batch = trim_padding(batch)
        inputs = model_inputs(batch)
        extra = {}
        if self.gates is not None:
            noise = torch.Generator().manual_seed(c.seed * 1_000_003 + step * 1_009 + micro)
            extra["gates"] = self.gates.sample(noise)
        out = self.student(**inputs, labels=batch["labels"], output_hidden_states=True, **extra)
        with torch.no_grad():
            teacher = self.teacher(**inputs, output_hidden_states=True)
        pred = prediction_loss(out.logits, teacher.logits, c.temperature)
        layer, _ = self.layers(out.hidden_states, teacher.hidden_states, batch["attention_mask"])
        loss = c.task_weight * out.loss + c.pred_weight * pred + c.layer_weight * layer
        values = {"task": out.loss.item(), "pred": pred.item(), "layer": layer.item()}
        if self.gates is not None:
            sparsity, target = self.expected_sparsity(), self.target(step)
            loss = loss + self.lagrangian(sparsity, target)
            values |= {"sparsity": sparsity.item(), "target": target,
                       "lambda1": self.lagrangian.lambdas[0].item(), "lambda2": self.lagrangian.lambdas[1].item()}
        return loss, values


def check_teacher(teacher: StructpruneForSequenceClassification, student: StructpruneForSequenceClassification,
                  task_name: str | None = None, label_names: tuple[str, ...] | None = None) -> None:
    """Raise ``ValueError`` when ``teacher`` cannot teach ``student`` (task, labels or vocabulary differ)."""
    t, s = teacher.spec, student.spec
    if t["num_labels"] != s["num_labels"]:
        raise ValueError(f"the teacher has {t['num_labels']} outputs but the student has {s['num_labels']}: "
                         "use a teacher fine-tuned on the same task (same labels)")
    if t["vocab_size"] != s["vocab_size"]:
        raise ValueError(f"the teacher's vocabulary ({t['vocab_size']} tokens) differs from the student's "
                         f"({s['vocab_size']}): teacher and student must share a tokenizer")
    trained_on = getattr(teacher.config, "finetuned_task", None)
    if task_name is not None and trained_on and trained_on != task_name:
        raise ValueError(f"the teacher was fine-tuned on {trained_on!r}, not on {task_name!r}: use a teacher "
                         f"fine-tuned on {task_name!r} (structprune finetune --task {task_name})")
    if label_names is not None and trained_on:
        labels = tuple(teacher.config.id2label[i] for i in range(len(teacher.config.id2label)))
        if labels != tuple(label_names):
            raise ValueError(f"the teacher's labels {labels} differ from the task's {tuple(label_names)}: "
                             "use a teacher fine-tuned on this task")


def _train_config(config: L0Config, steps: int) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=config.batch_size, grad_accum=config.grad_accum,
                       warmup_ratio=config.lr_warmup_ratio, max_grad_norm=config.max_grad_norm, seed=config.seed,
                       checkpoint_every=config.checkpoint_every)


def prune(model: PreTrainedModel | MaskedModel, task_data: Mapping[str, torch.Tensor], budget: Budget | float, *,
          config: L0Config = L0Config(), teacher: StructpruneForSequenceClassification | None = None,
          checkpoint_dir: str | os.PathLike | None = None,
          evaluate: Callable[[nn.Module], dict[str, float]] | None = None, eval_every: int | None = None,
          progress: bool = False) -> PruneResult:
    """Learn masks meeting ``budget`` and fine-tune the compacted model (see the module docstring).

    Args:
        model: the model fine-tuned on the task (Hugging Face, structprune full size, or MaskedModel);
            it is not changed.
        task_data: encoded, labelled training rows (:func:`structprune.data.encode`).
        teacher: the distillation teacher (default: ``model``); checked with :func:`check_teacher`.
        checkpoint_dir: makes the run resumable (and rank 0 of a DDP run writes there).
        evaluate: called with the compact model during fine-tuning (every ``eval_every`` steps and at
            the end) for the log and ``log["evaluations"]``; it must not use the global RNG.
    """
    budget = as_budget(budget)
    if budget.kind not in ("params", "flops"):
        raise ValueError(f"the l0 method takes a params or flops budget, not {budget.kind!r}: its sparsity "
                         "expectation is exact for counted parameters and FLOPs only")
    full = dense_model(model)
    structure = ModelStructure.from_spec(full.spec)
    limit = max_sparsity(structure, full.spec, config.granularities, budget.kind, budget.seq_len)
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
    device = next(full.parameters()).device
    rows = len(task_data["input_ids"])
    prune_steps = config.steps(config.prune_epochs, rows)
    finetune_steps = config.steps(config.finetune_epochs, rows) if config.finetune_epochs else 0
    fingerprint = {"method": "l0", "config": dataclasses.asdict(config), "budget": budget.as_dict(),
                   "data": digest(task_data), "model": digest(full.state_dict()),
                   "teacher": digest(teacher.state_dict())}
    directory = None if checkpoint_dir is None else Path(checkpoint_dir)

    student = MaskedModel(full)  # copies the weights: ``model`` is left as it was
    gates = HardConcreteGates(structure, config.granularities, config.init_log_alpha).to(device)
    layers = LayerDistillation(structure.hidden_size, teacher.spec["hidden_size"], structure.num_layers,
                               teacher_layers(len(teacher.layers))).to(device)
    objective = DistillObjective(student, teacher, layers, config, gates, budget,
                                 warmup_steps=round(config.sparsity_warmup * prune_steps))
    pruning = train(objective, task_data, _train_config(config, prune_steps),
                    None if directory is None else directory / "prune", fingerprint | {"phase": "prune"},
                    progress=progress, description="l0 pruning")
    with torch.no_grad():
        expected = float(objective.expected_sparsity())
    masks = gates.extract(full.spec, budget.target, budget.kind, budget.seq_len, config.tolerance)
    summary = masks.summary(structure, full.spec, seq_len=budget.seq_len)
    log = {"method": "l0", "prune_steps": prune_steps, "finetune_steps": finetune_steps,
           "prune_seconds": pruning.seconds, "prune_losses": pruning.losses, "expected_sparsity_end": expected,
           "lambdas": objective.lagrangian.lambdas.detach().cpu().tolist(), "summary": summary,
           "achieved": budget.achieved(summary), "evaluations": []}

    pruned = compact(student, masks)
    kept_hidden = masks.kept(structure)[1]
    tuned = DistillObjective(pruned, teacher, objective.layers.restrict(kept_hidden), config)
    if finetune_steps:
        finetuning = train(tuned, task_data, dataclasses.replace(_train_config(config, finetune_steps),
                                                                 eval_every=eval_every),
                           None if directory is None else directory / "finetune",
                           fingerprint | {"phase": "finetune", "masks": digest(masks.masks)},
                           evaluate=None if evaluate is None else (lambda: evaluate(pruned)), progress=progress,
                           description="l0 fine-tuning")
        log |= {"finetune_seconds": finetuning.seconds, "finetune_losses": finetuning.losses,
                "evaluations": finetuning.evaluations}
    pruned.eval()
    masks.meta = {"method": "l0", "budget": budget.as_dict(), "options": dataclasses.asdict(config)}
    return PruneResult(masks, {k: v.detach().clone() for k, v in pruned.state_dict().items()}, log)
