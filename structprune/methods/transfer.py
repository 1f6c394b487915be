"""``transfer``: learned structured pruning (``l0``) helped by auxiliary tasks under limited target data.

The target side is the ``l0`` method unchanged (:mod:`structprune.methods.l0`: hard-concrete gates,
task loss + prediction and layer distillation from the dense teacher, Lagrangian to the budget,
extraction, fine-tuning of the compact model). Auxiliary sources (:mod:`structprune.auxiliary`:
labelled tasks with their own heads, and MLM on the target's text with a tied decoder) add losses
during the pruning phase. The fine-tuning phase (compact model, masks frozen) is target-only.

Couplings (``TransferConfig.coupling``):

* ``joint``: one set of weights, one set of gates; loss = the full l0 objective
  + ``w(step) * sum_i weight_i * guard_i * aux_loss_i``, the auxiliary losses computed under the SAME
  gate sample as the target batch. Weights and mask are both shared, so only ``transfer="both"``.
* ``separate-masks``: shared weights; a second set of gates for the auxiliary data, driven to the
  same target by its own Lagrangian; the auxiliary losses use samples of those gates.
  ``transfer="weights"``: the auxiliary loss trains the shared weights, no tie between the masks;
  ``"masks"``: a tie penalty ``tie_weight * f(step) * mean((log_alpha - log_alpha_aux)^2)`` over all
  gate logits (``f``: the schedule factor below), and the auxiliary forward runs on detached shared weights
  (``torch.func.functional_call``), so the auxiliary loss reaches only the auxiliary gates and heads
  and, through the tie, the target gates; ``"both"``: both. The target mask is extracted.
* ``sequential``: phase A prunes on the auxiliary data only (auxiliary heads and losses, Lagrangian
  to the target, no distillation: there is no auxiliary teacher) for ``aux_epochs`` epochs counted
  in TARGET steps (``ceil(target rows / batch_size)`` per epoch, so phase A costs what the same
  number of target epochs would); phase B is ordinary l0 on the target, starting from
  ``"weights"``: the weights after phase A with fresh gates; ``"masks"``: the gate logits after
  phase A with the original weights; ``"both"``: both. Only schedule ``start`` applies.
* ``intermediate``: transfer through the dense model, before any pruning (intermediate-task training, Phang et
  al. 2018, "STILTs"): phase I trains the dense model, no gates, on the auxiliary losses alone for ``aux_epochs``
  epochs counted as in ``sequential`` (default 15: a fresh head has a whole task to learn; at 5 epochs and the l0
  learning rate MNLI's loss barely left chance on RTE's 1,000 rows); phase R fine-tunes it on the target's task
  loss for ``retarget_epochs`` epochs (the target's own head); both phases at ``dense_lr``, the learning rate of
  dense fine-tuning. Then ordinary l0 prunes that model with it as the teacher (unless a teacher is given). Only
  weights move (there is no mask yet): transfer ``weights`` or ``both``, schedule ``start``. The one coupling that
  changes the teacher: the others distil from the target-only dense model, whose score bounds the pruned model's
  (on RTE the dense model is near chance; the issue's dense reference gains 7.6 points there from MNLI first).

Schedules (``joint``, ``separate-masks``) give a factor ``f(step)`` in [0, 1], ``w(step) = aux_weight * f``:
``start``: 1; ``after:N``: 0 before step N, then 1; ``anneal``: ``1 - step / prune_steps`` (linear to 0
at the end of the pruning phase); ``warmup``: 1 during the sparsity warm-up steps, then 0. The tie
penalty is scaled by the same factor. When ``w(step) = 0`` nothing auxiliary is computed, so
``joint`` with ``aux_weight=0`` is the ``l0`` method bit for bit.

Harm guard ``cosine`` (after Du et al. 2018, "Adapting auxiliary losses using gradient similarity"): at
every step the gradients of the target loss (task + distillation) and of each auxiliary loss are taken with
respect to a small shared set of parameters, the last encoder layer (``torch.autograd.grad``, retaining the
graph, so only its top is traversed), and their cosine is added to the source's running statistics. The
source's weight is multiplied by its trust: the running mean of the cosine over its running root mean square
(exponential averages with decay :data:`GUARD_DECAY`; the mean starts from 0, so a source earns trust over its
first steps), clipped to [0, 1]. Du et al. multiply by ``max(0, cos)`` of the step; at this scale that gives
every source a weight near 0 (measured on CR, BENCHMARKS.md, "The cosine guard"): the cosine of two mini-batch
gradients over a whole layer is about 0.6 between two target batches but 0.00-0.04 between the target and any
auxiliary task, related (SST-2) or not (AGNEWS), with a spread of 0.02-0.04 from batch to batch. The ratio is
scale-free (it is 1 for a cosine that is the same at every step, whatever its size); the measured ratios did not
separate SST-2 from AGNEWS. With ``separate-masks`` / ``"masks"`` the auxiliary loss does not reach the weights, so the gradients
compared are those of the gate logits (target loss vs. target gates, auxiliary loss vs. auxiliary gates). A zero
gradient on either side gives ``cos = 0``. Under DDP the target gradient is summed over the processes, each
weighted by its rows (as ``structprune.train`` weights their losses), so every process applies the weights one
process would over the whole batch (every process draws the same auxiliary batch, so the auxiliary gradient
needs no reduction). The guard scales only what reaches the shared weights and gates: the auxiliary head always
learns at the full weight, from a probe loss on the encoder's states detached. (Before, a fresh head whose loss
the guard had switched off never learnt, so its gradient stayed uninformative and the guard never switched it
on.) The guard scales the separate-masks tie penalty too, by the source-weighted mean trust: an auxiliary mask
whose loss the guard has switched off learns from its sparsity constraint alone, and tying the target mask to
it would pull the target towards a mask that knows nothing of either task (measured: CR with AGNEWS lost 0.8
point before the tie was guarded). ``sequential`` has no target loss in phase A, so the guard does not apply
there. The log holds every step's factor, applied weight and cosine per source (``log["aux_steps"]``).

Auxiliary batches: the training loop draws target batches; each auxiliary source draws
``aux_batch_size / grad_accum`` rows per micro-batch from a generator seeded by
``(seed, step, micro, source)``, and MLM masks them from the same generator, so a resumed run draws
the same rows. The auxiliary forwards draw their dropout from a stream of their own, seeded the same way, and
leave the global random state as they found it: the target's dropout masks are those ``l0`` would draw. The
auxiliary heads are left out of the clipped gradient norm, so the clip coefficient is the target model's too.
Together: a source the guard rejects (weight 0, tie factor 0) leaves the run exactly ``l0``'s, and an unrelated
source costs nothing beyond what the guard lets through. The auxiliary heads, the auxiliary gates and multipliers
and the per-step log are in the objective's state, so checkpoints hold them (exact resume, as for ``l0``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from structprune.auxiliary import IGNORE_INDEX, AuxData, MLMHead, classification_head
from structprune.distill import LayerDistillation
from structprune.finetune import FinetuneConfig, finetune, model_inputs, trim_padding
from structprune.hardconcrete import HardConcreteGates
from structprune.masked_model import MaskedModel, effective_gates
from structprune.budget import Budget
from structprune.methods.result import PruneResult
from structprune.methods.l0 import DistillObjective, L0Config, Lagrangian, finish, prepare, train_config
from structprune.modeling_structprune import StructpruneForSequenceClassification
from structprune.train import TrainResult, digest, train

COUPLINGS = ("joint", "separate-masks", "sequential", "intermediate")
TRANSFERS = ("weights", "masks", "both")
SCHEDULES = ("start", "after:N", "anneal", "warmup")
GUARDS = ("cosine", "none")
GUARD_DECAY = 0.95
"""Decay of the cosine guard's running averages (a memory of about 20 steps)."""


def _after_step(schedule: str) -> int | None:
    """N of ``after:N``, ``None`` for the other schedules; a clear error for an unknown schedule."""
    if schedule in ("start", "anneal", "warmup"):
        return None
    kind, _, steps = schedule.partition(":")
    if kind != "after" or not steps.strip().isdigit():
        raise ValueError(f"schedule must be one of start, after:N (N steps, e.g. after:100), anneal, warmup; "
                         f"got {schedule!r}")
    return int(steps)


@dataclass(frozen=True)
class TransferConfig:
    """Settings of the ``transfer`` method (semantics in the module docstring).

    ``l0``: the target-side settings (and the seed, batch size, step caps of every phase).
    ``tie_weight``: the separate-masks tie penalty's weight (transfer ``masks`` / ``both``).
    ``aux_epochs``: sequential and intermediate, length of the auxiliary phase in epochs of the target data's steps
    (default: 5 for sequential, 15 for intermediate; :attr:`aux_phase_epochs`).
    ``retarget_epochs``, ``dense_lr``: intermediate only, epochs of dense target fine-tuning after the auxiliary
    phase, and the learning rate of both dense phases.
    ``aux_batch_size``: auxiliary rows per source and step (default: ``l0.batch_size``).
    """

    l0: L0Config = L0Config()
    coupling: str = "intermediate"  # the default chosen from the experiment in BENCHMARKS.md
    transfer: str = "both"
    schedule: str = "start"
    aux_weight: float = 1.0
    tie_weight: float = 1.0
    aux_epochs: float | None = None
    retarget_epochs: int = 3
    dense_lr: float = 1e-4
    guard: str = "cosine"
    aux_batch_size: int | None = None

    def __post_init__(self) -> None:
        for name, allowed in (("coupling", COUPLINGS), ("transfer", TRANSFERS), ("guard", GUARDS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        _after_step(self.schedule)  # validates the schedule
        if self.coupling == "joint" and self.transfer != "both":
            raise ValueError(f"coupling 'joint' shares both weights and mask, so transfer={self.transfer!r} means "
                             "nothing there; use transfer 'both', or coupling 'separate-masks' or 'sequential' to "
                             "transfer only weights or masks")
        before = self.coupling in ("sequential", "intermediate")  # the auxiliary phase comes first
        if before and self.schedule != "start":
            raise ValueError(f"schedule {self.schedule!r} applies to joint and separate-masks training; "
                             f"{self.coupling} runs the auxiliary phase before the target phase, so use schedule "
                             "'start'")
        if self.coupling == "intermediate" and self.transfer == "masks":
            raise ValueError("coupling 'intermediate' trains the dense model before any mask exists, so it transfers "
                             "weights only; use transfer 'weights', or coupling 'sequential' to transfer masks")
        for name in ("aux_weight", "tie_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if before and self.aux_weight == 0:
            raise ValueError(f"{self.coupling} with aux_weight 0 gives the auxiliary phase no loss to learn from; use "
                             "a positive aux_weight, or method l0")
        if isinstance(self.retarget_epochs, bool) or not isinstance(self.retarget_epochs, int) \
                or self.retarget_epochs < 1:
            raise ValueError(f"retarget_epochs must be an integer >= 1, got {self.retarget_epochs!r}")
        if self.aux_epochs is not None and not self.aux_epochs > 0:
            raise ValueError(f"aux_epochs must be > 0 when given, got {self.aux_epochs}")
        if not self.dense_lr > 0:
            raise ValueError(f"dense_lr must be > 0, got {self.dense_lr}")
        if self.aux_batch_size is not None and self.aux_batch_size < 1:
            raise ValueError(f"aux_batch_size must be >= 1 when given, got {self.aux_batch_size}")

    @property
    def aux_phase_epochs(self) -> float:
        """Length of the auxiliary phase (sequential, intermediate) in epochs of the target data's steps."""
        if self.aux_epochs is not None:
            return self.aux_epochs
        return 15.0 if self.coupling == "intermediate" else 5.0

    @property
    def after_step(self) -> int | None:
        """N of schedule ``after:N`` (``None`` for the other schedules)."""
        return _after_step(self.schedule)

    @property
    def batch_size(self) -> int:
        return self.l0.batch_size if self.aux_batch_size is None else self.aux_batch_size

    def factor(self, step: int, prune_steps: int, warmup_steps: int) -> float:
        """``f(step)`` in [0, 1] of the schedule (``w(step) = aux_weight * f(step)``)."""
        if self.schedule == "start":
            return 1.0
        if self.schedule == "anneal":
            return max(0.0, 1.0 - step / prune_steps)
        if self.schedule == "warmup":
            return 1.0 if step < warmup_steps else 0.0
        return 0.0 if step < self.after_step else 1.0


def _seed(*key: object) -> int:
    """A seed from ``key`` (a stable hash: the same on every machine and run)."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, key)).encode()).digest()[:8], "little") >> 1


def _generator(*key: object) -> torch.Generator:
    """A CPU generator seeded from ``key``."""
    return torch.Generator().manual_seed(_seed(*key))


@contextmanager
def _own_dropout(device: torch.device, *key: object) -> Iterator[None]:
    """Run the block on a dropout stream seeded from ``key`` and give the global random state back as it was, so
    an auxiliary forward leaves the target's dropout draws those of a run without auxiliary data."""
    seed = _seed(*key)
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(seed)
        for index in cuda:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


def flat_gradient(loss: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
    """The gradient of ``loss`` w.r.t. ``params`` as one float64 vector (zeros where ``loss`` does not depend
    on a parameter); the graph is retained for the backward pass that follows."""
    grads = torch.autograd.grad(loss, list(params), retain_graph=True, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).detach().double().flatten()
                      for g, p in zip(grads, params)])


def over_processes(gradient: torch.Tensor, rows: int) -> torch.Tensor:
    """A process's gradient on its shard of ``rows`` rows -> the gradient over the whole batch of a DDP step, up to
    scale (the sum over processes weighted by rows); ``gradient`` itself with one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return gradient
    gradient = gradient * rows
    dist.all_reduce(gradient)
    return gradient


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """The cosine of two vectors; 0 when either is zero (no evidence that the auxiliary loss helps)."""
    norms = float(a.norm() * b.norm())
    return float(a @ b) / norms if norms > 0 else 0.0


def gradient_cosine(target_loss: torch.Tensor, aux_loss: torch.Tensor, target_params: Sequence[torch.Tensor],
                    aux_params: Sequence[torch.Tensor]) -> float:
    """The cosine between the gradient of ``target_loss`` w.r.t. ``target_params`` and that of ``aux_loss``
    w.r.t. ``aux_params`` (the same shapes); 0 when either gradient is zero. The graphs are retained."""
    return cosine(flat_gradient(target_loss, target_params), flat_gradient(aux_loss, aux_params))


def _task_loss(source: AuxData, logits: torch.Tensor, labels: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """The loss of an auxiliary source's logits: cross-entropy over the masked tokens (MLM), mean squared error
    (regression) or cross-entropy (classification)."""
    if source.is_mlm:
        return F.cross_entropy(logits.float(), labels[chosen], reduction="sum") / chosen.sum().clamp(min=1)
    if source.task.num_labels == 1:
        return F.mse_loss(logits.squeeze(-1).float(), labels.float())
    return F.cross_entropy(logits.float(), labels)


class _Encoder(nn.Module):
    """The student's encoder followed by a read-out, as a module forward, so that
    ``torch.func.functional_call`` can run it on detached weights (the read-out runs inside, so a tied
    MLM decoder reads the detached embedding too)."""

    def __init__(self, model: StructpruneForSequenceClassification):
        super().__init__()
        self.model = model

    def forward(self, inputs: Mapping[str, torch.Tensor], gates: dict[str, torch.Tensor] | None,
                readout: Callable[[torch.Tensor], tuple]) -> tuple:
        hidden, _ = self.model.backbone(**inputs, gates=effective_gates(gates) if gates else None)
        return readout(hidden)


class TransferObjective(DistillObjective):
    """The pruning-phase loss of ``joint`` and ``separate-masks``, and (``target=False``) phase A of
    ``sequential``: the l0 objective plus the auxiliary losses (module docstring); with ``gates=None`` (phase I of
    ``intermediate``) the dense model under the auxiliary losses alone.

    Args:
        prune_steps: steps of this phase (the ``anneal`` schedule ends there).
        aux: the encoded auxiliary sources.
        target: include the target loss (False: sequential phase A, auxiliary losses only).
    """

    def __init__(self, student: MaskedModel, teacher: StructpruneForSequenceClassification, layers: LayerDistillation,
                 config: TransferConfig, gates: HardConcreteGates | None, budget: Budget | None, warmup_steps: int,
                 prune_steps: int, aux: Sequence[AuxData], target: bool = True):
        super().__init__(student, teacher, layers, config.l0, gates, budget, warmup_steps)
        self.transfer, self.prune_steps, self.with_target = config, prune_steps, target
        self.aux = list(aux)  # data, not modules
        device = next(student.parameters()).device
        init = _generator(config.l0.seed, "aux-heads")
        self.aux_heads = nn.ModuleList(
            MLMHead(student.spec, student.model.embeddings.word, init) if source.is_mlm
            else classification_head(student.spec, source.task.num_labels, init) for source in self.aux).to(device)
        separate = config.coupling == "separate-masks"
        self.aux_gates = (HardConcreteGates(gates.structure, gates.names, config.l0.init_log_alpha).to(device)
                          if separate else None)
        self.aux_lagrangian = Lagrangian().to(device) if separate else None
        self.tied = separate and config.transfer in ("masks", "both")
        self.detached = separate and config.transfer == "masks"
        self.__dict__["encoder"] = _Encoder(student.model)  # a view of the student, not a second copy
        self.history: list[dict] = []
        self.cosine_stats: dict[str, tuple[float, float, int]] = {}

    def get_extra_state(self) -> dict:
        return {"history": self.history, "cosine_stats": self.cosine_stats}

    def set_extra_state(self, state: dict) -> None:
        self.history = list(state["history"])
        self.cosine_stats = dict(state.get("cosine_stats", {}))

    def trust(self, name: str, similarity: float) -> float:
        """Add this micro-batch's gradient ``similarity`` to source ``name``'s running cosine statistics; the guard's
        trust in the source, in [0, 1]: the running mean of the cosine over its running root mean square. The decay
        per micro-batch is ``GUARD_DECAY ** (1 / grad_accum)``, so the memory is counted in optimiser steps."""
        decay = GUARD_DECAY ** (1 / self.config.grad_accum)
        mean, square, updates = self.cosine_stats.get(name, (0.0, 0.0, 0))
        mean = decay * mean + (1 - decay) * similarity
        square = decay * square + (1 - decay) * similarity ** 2
        updates += 1
        self.cosine_stats[name] = (mean, square, updates)
        rms = math.sqrt(square / (1 - decay ** updates))
        return min(1.0, max(0.0, mean / rms)) if rms > 0 else 0.0

    def param_groups(self) -> list[dict]:
        c = self.config
        heads = list(self.aux_heads.parameters())
        groups = super().param_groups() + [
            {"params": [p for p in heads if p.ndim >= 2], "lr": c.lr, "weight_decay": c.weight_decay,
             "schedule": "linear", "clip": False},
            {"params": [p for p in heads if p.ndim < 2], "lr": c.lr, "weight_decay": 0.0, "schedule": "linear",
             "clip": False},
        ]
        if self.aux_gates is not None:
            groups += [
                {"params": list(self.aux_gates.parameters()), "lr": c.gate_lr, "weight_decay": 0.0,
                 "schedule": "constant", "clip": False},
                {"params": list(self.aux_lagrangian.parameters()), "lr": c.lambda_lr, "weight_decay": 0.0,
                 "schedule": "constant", "clip": False, "maximize": True},
            ]
        return [g for g in groups if g["params"]]

    def tie(self) -> torch.Tensor:
        """``mean((log_alpha - log_alpha_aux)^2)`` over every gate logit."""
        gaps = [(self.gates.log_alpha[name] - self.aux_gates.log_alpha[name]).flatten() for name in self.gates.names]
        return torch.cat(gaps).pow(2).mean()

    def guard_params(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The parameters the cosine guard compares gradients on: (target side, auxiliary side)."""
        if self.detached:
            return list(self.gates.parameters()), list(self.aux_gates.parameters())
        shared = [p for p in self.student.model.layers[-1].parameters() if p.requires_grad]
        return shared, shared

    def aux_loss(self, index: int, step: int, micro: int, gates: dict[str, torch.Tensor],
                 probe: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The loss of auxiliary source ``index`` on its batch of ``(step, micro)`` under ``gates``; with ``probe``
        also the probe loss (the same loss of the head on the encoder's states detached, and with a tied MLM
        decoder detached: its gradient reaches the auxiliary head only), else ``None``."""
        source, head = self.aux[index], self.aux_heads[index]
        size = max(1, self.transfer.batch_size // self.config.grad_accum)
        device = next(head.parameters()).device
        drawn = source.draw(_generator(self.config.seed, "aux-batch", step, micro, index), size)
        batch = trim_padding({name: t.to(device) for name, t in drawn.items()})
        inputs, labels = model_inputs(batch), batch["labels"]
        chosen = labels != IGNORE_INDEX

        def read(hidden: torch.Tensor, detached: bool) -> torch.Tensor:
            return head(hidden[chosen], detached) if source.is_mlm else head(hidden, inputs["input_ids"])

        def readout(hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            return read(hidden, False), read(hidden.detach(), True) if probe else None

        with _own_dropout(device, self.config.seed, "aux-dropout", step, micro, index):
            logits, probed = self._run(inputs, gates, readout)
        return _task_loss(source, logits, labels, chosen), None if probed is None else _task_loss(
            source, probed, labels, chosen)

    def _run(self, inputs: Mapping[str, torch.Tensor], gates: dict[str, torch.Tensor],
             readout: Callable[[torch.Tensor], tuple]) -> tuple:
        if not self.detached:
            return self.encoder(inputs, gates, readout)
        weights = {f"model.{name}": p.detach() for name, p in self.student.model.named_parameters()}
        return torch.func.functional_call(self.encoder, weights, (inputs, gates, readout))

    def forward(self, batch: Mapping[str, torch.Tensor], step: int, micro: int) -> tuple[torch.Tensor, dict]:
        t = self.transfer
        gates = self.sample_gates(step, micro)
        if self.with_target:
            loss, values = self.distill_loss(batch, gates)
        else:
            loss, values = torch.zeros((), device=next(self.student.parameters()).device), {}
        factor = t.factor(step, self.prune_steps, self.warmup_steps)
        record = {"step": step, "factor": factor, "weights": {}, "cosines": {}}
        tie_trust = 1.0  # the guard's verdict on the auxiliary sources, which scales the tie penalty too
        if factor * t.aux_weight > 0:
            aux_gates = gates if self.aux_gates is None else self.aux_gates.sample(
                _generator(self.config.seed, "aux-gates", step, micro))
            guarded = t.guard == "cosine" and self.with_target
            losses = [self.aux_loss(i, step, micro, aux_gates, probe=guarded) for i in range(len(self.aux))]
            if guarded:
                ours, theirs = self.guard_params()
                target_gradient = over_processes(flat_gradient(loss, ours), len(batch["input_ids"]))
                trusted = 0.0
            for source, (aux_loss, probe) in zip(self.aux, losses):
                full = weight = t.aux_weight * factor * source.weight
                if guarded:
                    similarity = cosine(target_gradient, flat_gradient(aux_loss, theirs))
                    trusted += source.weight * (verdict := self.trust(source.name, similarity))
                    weight *= verdict
                    record["cosines"][source.name] = values[f"cos/{source.name}"] = similarity
                loss = loss + weight * aux_loss
                if probe is not None:  # the head learns at the full weight whatever the guard lets through
                    loss = loss + (full - weight) * probe
                record["weights"][source.name] = values[f"w/{source.name}"] = weight
                values[f"aux/{source.name}"] = aux_loss.item()
            if guarded:
                tie_trust = trusted / sum(source.weight for source in self.aux)
        if self.tied and factor > 0:
            tie = self.tie()
            tie_factor = factor * tie_trust
            loss = loss + t.tie_weight * tie_factor * tie
            values["tie"] = record["tie"] = tie.item()
            record["tie_factor"] = tie_factor
        if self.gates is not None:
            penalty, more = self.constraint(step)
            loss = loss + penalty
            values |= more
        if self.aux_gates is not None:
            penalty, more = self.constraint(step, self.aux_gates, self.aux_lagrangian, prefix="aux_")
            loss = loss + penalty
            values |= more
        if micro == 0:
            self.history.append(record)
        return loss, values


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


def prune(model: PreTrainedModel | MaskedModel, task_data: Mapping[str, torch.Tensor], budget: Budget | float, *,
          aux: Sequence[AuxData], config: TransferConfig = TransferConfig(),
          teacher: StructpruneForSequenceClassification | None = None,
          checkpoint_dir: str | os.PathLike | None = None,
          evaluate: Callable[[nn.Module], dict[str, float]] | None = None, eval_every: int | None = None,
          progress: bool = False) -> PruneResult:
    """Learn masks meeting ``budget`` with help from ``aux`` and fine-tune the compact model on the target.

    Arguments as :func:`structprune.methods.l0.prune`, plus ``aux`` (:func:`structprune.auxiliary.load_auxiliary`)
    and ``config``. Checkpoints go to ``checkpoint_dir/aux`` (the auxiliary phase of sequential and intermediate),
    ``/retarget`` (intermediate's dense target fine-tuning), ``/prune`` and
    ``/finetune``. Intermediate's ``aux`` and ``retarget`` phases do not depend on the budget, and neither do their
    checkpoints: a run at another budget whose ``aux`` and ``retarget`` folders are those of a finished run (copies
    or links) starts pruning at once. ``result.log`` adds the coupling, transfer, schedule, guard, the sources and
    ``aux_steps``: per pruning step the schedule factor, each source's applied weight and cosine.
    """
    _check_aux(aux)
    c = config.l0
    setup = prepare(model, task_data, budget, c, teacher)
    for source in aux:
        if source.is_mlm and source.vocab_size > setup.full.spec["vocab_size"]:
            raise ValueError(f"the MLM data's tokenizer has {source.vocab_size} tokens, more than the model's "
                             f"{setup.full.spec['vocab_size']}: use the model's own tokenizer")
    directory = None if checkpoint_dir is None else Path(checkpoint_dir)
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k != "l0"}
    fingerprint = setup.fingerprint | {"method": "transfer", "transfer": settings,
                                       "aux": [[s.name, s.weight, digest(s.encoded)] for s in aux]}

    dense_phases = {k: v for k, v in fingerprint.items() if k != "budget"}  # intermediate's, before any gate

    def run(objective: DistillObjective, steps: int, phase: str) -> TrainResult:
        key = dense_phases if objective.gates is None else fingerprint
        return train(objective, setup.data, train_config(c, steps), None if directory is None else directory / phase,
                     key | {"phase": phase}, progress=progress, description=f"transfer {phase}")

    aux_steps = c.steps(config.aux_phase_epochs, setup.rows)
    student, gates, layers = setup.parts(c)
    if config.coupling in ("sequential", "intermediate"):
        gated = config.coupling == "sequential"  # intermediate's auxiliary phase trains the dense model
        phase = config if gated else dataclasses.replace(config, l0=dataclasses.replace(c, lr=config.dense_lr))
        before = TransferObjective(student, setup.teacher, layers, phase, gates if gated else None, setup.budget,
                                   setup.warmup_steps(c, aux_steps) if gated else 0, aux_steps, aux, target=False)
        run(before, aux_steps, "aux")
        history = before.history
    if config.coupling == "intermediate":
        retarget = FinetuneConfig(epochs=config.retarget_epochs, batch_size=c.batch_size, lr=config.dense_lr,
                                  max_grad_norm=c.max_grad_norm, seed=c.seed, max_steps=c.max_steps)
        finetune(student.model, setup.data, retarget,
                 progress=progress, description="transfer retarget",
                 checkpoint_dir=None if directory is None else directory / "retarget",
                 fingerprint=dense_phases | {"phase": "retarget"})
        setup = prepare(student.model, task_data, setup.budget, c, teacher)  # the retargeted model teaches
        student, gates, layers = setup.parts(c)
    elif config.coupling == "sequential":
        student, gates, layers = setup.parts(c, student if config.transfer in ("weights", "both") else None)
        if config.transfer in ("masks", "both"):
            gates.load_state_dict(before.gates.state_dict())
    if config.coupling in ("joint", "separate-masks"):
        objective = TransferObjective(student, setup.teacher, layers, config, gates, setup.budget,
                                      setup.warmup_steps(c), setup.prune_steps, aux)
    else:
        objective = DistillObjective(student, setup.teacher, layers, c, gates, setup.budget, setup.warmup_steps(c))
    pruning = run(objective, setup.prune_steps, "prune")
    if isinstance(objective, TransferObjective):
        history = objective.history
    result = finish("transfer", setup, objective, pruning, c, dataclasses.asdict(config), directory,
                    fingerprint, evaluate, eval_every, progress)
    result.log |= settings | {"aux_sources": [{"name": s.name, "weight": s.weight, "rows": len(s),
                                               "task": "mlm" if s.is_mlm else s.task.name} for s in aux],
                              "aux_steps": history}
    return result
