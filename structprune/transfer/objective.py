""":class:`TransferObjective`: the ``l0`` objective plus the auxiliary losses, shared by the couplings.

It is the pruning-phase loss of ``joint`` (:mod:`~structprune.transfer.joint`) and ``separate-masks``
(:mod:`~structprune.transfer.separate_masks`), whose specific parts it calls, and (``target=False``, auxiliary
losses only) the auxiliary phase of ``sequential`` (with gates) and ``intermediate`` (``gates=None``: the dense
model). At step ``s``, with the schedule factor ``f(s)`` (:mod:`~structprune.transfer.config`) and
``w = aux_weight * f(s)``, the loss is

    l0's task + prediction + layer distillation (under the step's gate sample; not with ``target=False``)
    + sum_i w * weight_i * trust_i * aux_loss_i + sum_i w * weight_i * (1 - trust_i) * probe_i
    [+ separate-masks' tie] + the Lagrangian of the target gates [+ that of the auxiliary gates]

``trust_i`` is the cosine guard's (:mod:`~structprune.transfer.guard`; 1 without it or without a target loss).
``probe_i`` is source ``i``'s loss with the encoder's states (and a tied MLM decoder) detached: it reaches only
the auxiliary head, so every head learns at the full weight whatever the guard lets through. When ``w = 0``
no auxiliary loss is computed.

Auxiliary batches: each source draws ``max(1, aux_batch_size // grad_accum)`` rows per micro-batch, and runs its
forward on a dropout stream of its own (:mod:`~structprune.transfer.streams`), so the target's dropout draws are
``l0``'s. Auxiliary losses: cross-entropy over the masked tokens (MLM), mean squared error (regression),
cross-entropy (classification), each on a head of its own (:mod:`~structprune.transfer.sources`). The auxiliary
heads and gates are left out of the clipped gradient norm, so the clip coefficient is the target model's. A
source the guard rejects (weight 0, tie factor 0) thus leaves the run exactly ``l0``'s. The auxiliary heads,
gates and multipliers, the guard's statistics and the per-step log (:attr:`TransferObjective.history`: per step
the factor, each source's applied weight and cosine, and separate-masks' ``tie`` and ``tie_factor``) are in the
objective's state, so checkpoints hold them (exact resume, as for ``l0``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from structprune.budget import Budget
from structprune.data.encoding import model_inputs, trim_padding
from structprune.masked_model import MaskedModel, effective_gates
from structprune.methods.distill import LayerDistillation
from structprune.methods.hardconcrete import HardConcreteGates
from structprune.methods.l0 import DistillObjective
from structprune.modeling_structprune import StructpruneForSequenceClassification
from structprune.transfer.config import TransferConfig
from structprune.transfer.guard import update_trust, verdicts
from structprune.transfer.joint import Joint
from structprune.transfer.separate_masks import SeparateMasks
from structprune.transfer.sources import (
    IGNORE_INDEX,
    AuxData,
    MLMHead,
    classification_head,
)
from structprune.transfer.streams import key_generator, own_dropout


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
    """The ``l0`` objective plus the auxiliary losses (module docstring).

    Args:
        prune_steps: steps of this phase (the ``anneal`` schedule ends there).
        aux: the encoded auxiliary sources.
        target: include the target loss (False: the auxiliary phase of sequential and intermediate).
    """

    def __init__(self, student: MaskedModel, teacher: StructpruneForSequenceClassification, layers: LayerDistillation,
                 config: TransferConfig, gates: HardConcreteGates | None, budget: Budget | None, warmup_steps: int,
                 prune_steps: int, aux: Sequence[AuxData], target: bool = True):
        super().__init__(student, teacher, layers, config.l0, gates, budget, warmup_steps)
        self.transfer, self.prune_steps, self.with_target = config, prune_steps, target
        self.aux = list(aux)  # data, not modules
        device = next(student.parameters()).device
        init = key_generator(config.l0.seed, "aux-heads")
        self.aux_heads = nn.ModuleList(
            MLMHead(student.spec, student.model.embeddings.word, init) if source.is_mlm
            else classification_head(student.spec, source.task.num_labels, init) for source in self.aux).to(device)
        self.coupling = SeparateMasks(config) if config.coupling == "separate-masks" else Joint()
        self.aux_gates, self.aux_lagrangian = self.coupling.second_gates(gates, config, device)
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
        trust in the source (:func:`~structprune.transfer.guard.update_trust`)."""
        return update_trust(self.cosine_stats, name, similarity, self.config.grad_accum)

    def after_step(self, step: int) -> None:
        super().after_step(step)
        self.coupling.after_step(self, step)

    def param_groups(self) -> list[dict]:
        c = self.config
        heads = list(self.aux_heads.parameters())
        groups = super().param_groups() + [
            {"params": [p for p in heads if p.ndim >= 2], "lr": c.lr, "weight_decay": c.weight_decay,
             "schedule": "linear", "clip": False},
            {"params": [p for p in heads if p.ndim < 2], "lr": c.lr, "weight_decay": 0.0, "schedule": "linear",
             "clip": False},
        ] + self.coupling.param_groups(self)
        return [g for g in groups if g["params"]]

    def aux_loss(self, index: int, step: int, micro: int, gates: dict[str, torch.Tensor] | None,
                 probe: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The loss of auxiliary source ``index`` on its batch of ``(step, micro)`` under ``gates``; with ``probe``
        also the probe loss (the same loss of the head on the encoder's states detached, and with a tied MLM
        decoder detached: its gradient reaches the auxiliary head only), else ``None``."""
        source, head = self.aux[index], self.aux_heads[index]
        size = max(1, self.transfer.batch_size // self.config.grad_accum)
        device = next(head.parameters()).device
        drawn = source.draw(key_generator(self.config.seed, "aux-batch", step, micro, index), size)
        batch = trim_padding({name: t.to(device) for name, t in drawn.items()})
        inputs, labels = model_inputs(batch), batch["labels"]
        chosen = labels != IGNORE_INDEX

        def read(hidden: torch.Tensor, detached: bool) -> torch.Tensor:
            return head(hidden[chosen], detached) if source.is_mlm else head(hidden, inputs["input_ids"])

        def readout(hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            return read(hidden, False), read(hidden.detach(), True) if probe else None

        with own_dropout(device, self.config.seed, "aux-dropout", step, micro, index):
            logits, probed = self.coupling.run(self, inputs, gates, readout)
        return _task_loss(source, logits, labels, chosen), None if probed is None else _task_loss(
            source, probed, labels, chosen)

    def add_aux_losses(self, loss: torch.Tensor, values: dict, record: dict, gates: dict[str, torch.Tensor] | None,
                       rows: int, step: int, micro: int, factor: float) -> tuple[torch.Tensor, float]:
        """``loss`` (the target loss of this process's ``rows`` rows) plus every source's weighted, guarded loss and
        its probe at schedule factor ``factor``; and the guard's source-weighted mean trust (1 unguarded)."""
        t = self.transfer
        aux_gates = self.coupling.aux_sample(self, gates, step, micro)
        guarded = t.guard == "cosine" and self.with_target
        losses = [self.aux_loss(i, step, micro, aux_gates, probe=guarded) for i in range(len(self.aux))]
        found = verdicts(loss, rows, [aux_loss for aux_loss, _ in losses], [source.name for source in self.aux],
                         self.coupling.guard_params(self), self.cosine_stats, self.config.grad_accum) \
            if guarded else [None] * len(losses)
        trusted = 0.0
        for source, (aux_loss, probe), verdict in zip(self.aux, losses, found):
            full = weight = t.aux_weight * factor * source.weight
            if verdict is not None:
                similarity, trust = verdict
                trusted += source.weight * trust
                weight *= trust
                record["cosines"][source.name] = values[f"cos/{source.name}"] = similarity
            loss = loss + weight * aux_loss
            if probe is not None:  # the head learns at the full weight whatever the guard lets through
                loss = loss + (full - weight) * probe
            record["weights"][source.name] = values[f"w/{source.name}"] = weight
            values[f"aux/{source.name}"] = aux_loss.item()
        return loss, trusted / sum(source.weight for source in self.aux) if guarded else 1.0

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
            loss, tie_trust = self.add_aux_losses(loss, values, record, gates, len(batch["input_ids"]), step, micro,
                                                  factor)
        loss = self.coupling.tie_term(self, loss, values, record, factor, tie_trust)
        if self.gates is not None:
            penalty, more = self.constraint(step)
            loss = loss + penalty
            values |= more
        loss = self.coupling.constraint(self, loss, values, step)
        if micro == 0:
            self.history.append(record)
        return loss, values
