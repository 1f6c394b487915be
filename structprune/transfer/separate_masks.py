"""``separate-masks``: shared weights, a second set of gates for the auxiliary data.

The auxiliary gates are driven to the same target as the target's by their own Lagrangian (logged with prefix
``aux_``); the auxiliary losses run under a sample of those gates (stream ``"aux-gates"``,
:mod:`structprune.transfer.streams`). The rest of the loss is ``joint``'s
(:class:`~structprune.transfer.objective.TransferObjective`). The target mask is extracted.

* ``transfer="weights"``: the auxiliary loss trains the shared weights; no tie between the masks.
* ``"masks"``: a tie penalty ``tie_weight * f(step) * trust * mean((log_alpha - log_alpha_aux)^2)`` over all gate
  logits (``f``: the schedule factor; ``trust``: the guard's source-weighted mean trust, 1 without the guard), and
  the auxiliary forward runs on detached shared weights (``torch.func.functional_call``), so the auxiliary loss
  reaches only the auxiliary gates and heads and, through the tie, the target gates. The cosine guard compares
  the gradients of the gate logits (target loss vs. target gates, auxiliary loss vs. auxiliary gates).
* ``"both"``: both: the auxiliary loss trains the shared weights, and the tie pulls the masks together.

The tie is added whenever ``f(step) > 0``, also with ``aux_weight=0``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import torch

from structprune.methods.hardconcrete import HardConcreteGates
from structprune.methods.l0 import Lagrangian
from structprune.transfer.config import TransferConfig
from structprune.transfer.joint import Joint
from structprune.transfer.streams import key_generator

if TYPE_CHECKING:  # the objective imports this module
    from structprune.transfer.objective import TransferObjective


def tie(gates: HardConcreteGates, aux_gates: HardConcreteGates) -> torch.Tensor:
    """``mean((log_alpha - log_alpha_aux)^2)`` over every gate logit."""
    gaps = [(gates.log_alpha[name] - aux_gates.log_alpha[name]).flatten() for name in gates.names]
    return torch.cat(gaps).pow(2).mean()


class SeparateMasks(Joint):
    """The coupling-specific parts of a separate-masks :class:`~structprune.transfer.objective.TransferObjective`:
    the auxiliary gates and their Lagrangian (held by the objective as ``aux_gates``, ``aux_lagrangian``), the tie
    (transfer ``masks``, ``both``) and the forward on detached weights (``masks``)."""

    def __init__(self, config: TransferConfig):
        self.tied = config.transfer in ("masks", "both")
        self.detached = config.transfer == "masks"

    def second_gates(self, gates: HardConcreteGates, config: TransferConfig, device: torch.device
                     ) -> tuple[HardConcreteGates, Lagrangian]:
        """Fresh auxiliary gates on the target gates' structure and granularities, and their Lagrangian."""
        return (HardConcreteGates(gates.structure, gates.names, config.l0.init_log_alpha).to(device),
                Lagrangian().to(device))

    def aux_sample(self, objective: TransferObjective, gates: dict[str, torch.Tensor] | None, step: int,
                   micro: int) -> dict[str, torch.Tensor]:
        """A sample of the auxiliary gates for ``(step, micro)``."""
        return objective.aux_gates.sample(key_generator(objective.config.seed, "aux-gates", step, micro))

    def guard_params(self, objective: TransferObjective) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if self.detached:
            return list(objective.gates.parameters()), list(objective.aux_gates.parameters())
        return super().guard_params(objective)

    def run(self, objective: TransferObjective, inputs: Mapping[str, torch.Tensor],
            gates: dict[str, torch.Tensor] | None, readout: Callable[[torch.Tensor], tuple]) -> tuple:
        """The auxiliary forward; with transfer ``masks`` on the student's weights detached."""
        if not self.detached:
            return super().run(objective, inputs, gates, readout)
        weights = {f"model.{name}": p.detach() for name, p in objective.student.model.named_parameters()}
        return torch.func.functional_call(objective.encoder, weights, (inputs, gates, readout))

    def tie_term(self, objective: TransferObjective, loss: torch.Tensor, values: dict, record: dict, factor: float,
                 tie_trust: float) -> torch.Tensor:
        """``loss + tie_weight * factor * tie_trust * tie`` when tied and ``factor > 0``; logs ``tie`` and
        ``tie_factor``."""
        if not (self.tied and factor > 0):
            return loss
        gap = tie(objective.gates, objective.aux_gates)
        tie_factor = factor * tie_trust
        loss = loss + objective.transfer.tie_weight * tie_factor * gap
        values["tie"] = record["tie"] = gap.item()
        record["tie_factor"] = tie_factor
        return loss

    def constraint(self, objective: TransferObjective, loss: torch.Tensor, values: dict, step: int) -> torch.Tensor:
        """``loss`` plus the Lagrangian term driving the auxiliary gates to the target at ``step``."""
        penalty, more = objective.constraint(step, objective.aux_gates, objective.aux_lagrangian, prefix="aux_")
        values |= more
        return loss + penalty

    def after_step(self, objective: TransferObjective, step: int) -> None:
        """Under the ``hold`` controller, hold the auxiliary gates on the target of ``step`` too."""
        if objective.holds(step):
            objective.project(step, objective.aux_gates)

    def param_groups(self, objective: TransferObjective) -> list[dict]:
        """The auxiliary gates (constant ``gate_lr``) and multipliers (ascent at ``lambda_lr``), unclipped."""
        c = objective.config
        return [
            {"params": list(objective.aux_gates.parameters()), "lr": c.gate_lr, "weight_decay": 0.0,
             "schedule": "constant", "clip": False},
            {"params": list(objective.aux_lagrangian.parameters()), "lr": c.lambda_lr, "weight_decay": 0.0,
             "schedule": "constant", "clip": False, "maximize": True},
        ]
