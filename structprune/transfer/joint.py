"""``joint``: one set of weights, one set of gates, the auxiliary losses added during pruning.

The loss is the full ``l0`` objective + ``w(step) * sum_i weight_i * guard_i * aux_loss_i``
(:class:`~structprune.transfer.objective.TransferObjective`), the auxiliary losses computed under the SAME gate
sample as the target batch. Weights and mask are both shared, so only ``transfer="both"``. The cosine guard
compares gradients on the last encoder layer (:mod:`structprune.transfer.guard`).

:class:`Joint` is the auxiliary side of every objective with one gate set: ``joint``'s pruning phase, and the
auxiliary phases of ``sequential`` (its gates) and ``intermediate`` (no gates: the dense model).
:class:`~structprune.transfer.separate_masks.SeparateMasks` overrides it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import torch

from structprune.methods.hardconcrete import HardConcreteGates
from structprune.methods.l0 import Lagrangian
from structprune.transfer.config import TransferConfig
from structprune.transfer.guard import last_layer

if TYPE_CHECKING:  # the objective imports this module
    from structprune.transfer.objective import TransferObjective


class Joint:
    """The coupling-specific parts of a :class:`~structprune.transfer.objective.TransferObjective` with one gate
    set: no gates of its own, the auxiliary losses under the target's gate sample, on the shared weights."""

    def second_gates(self, gates: HardConcreteGates | None, config: TransferConfig, device: torch.device
                     ) -> tuple[HardConcreteGates | None, Lagrangian | None]:
        """The auxiliary gates and their Lagrangian: none."""
        return None, None

    def aux_sample(self, objective: TransferObjective, gates: dict[str, torch.Tensor] | None, step: int,
                   micro: int) -> dict[str, torch.Tensor] | None:
        """The gate sample the auxiliary losses of ``(step, micro)`` run under: the target's, ``gates``."""
        return gates

    def guard_params(self, objective: TransferObjective) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The parameters the cosine guard compares gradients on: (target side, auxiliary side)."""
        shared = last_layer(objective.student)
        return shared, shared

    def run(self, objective: TransferObjective, inputs: Mapping[str, torch.Tensor],
            gates: dict[str, torch.Tensor] | None, readout: Callable[[torch.Tensor], tuple]) -> tuple:
        """The auxiliary forward: the student's encoder under ``gates``, then ``readout``."""
        return objective.encoder(inputs, gates, readout)

    def tie_term(self, objective: TransferObjective, loss: torch.Tensor, values: dict, record: dict, factor: float,
                 tie_trust: float) -> torch.Tensor:
        """``loss`` with a tie between target and auxiliary masks: there is none."""
        return loss

    def constraint(self, objective: TransferObjective, loss: torch.Tensor, values: dict, step: int) -> torch.Tensor:
        """``loss`` with the auxiliary gates' Lagrangian term: there is none."""
        return loss

    def after_step(self, objective: TransferObjective, step: int) -> None:
        """After each optimizer step: nothing (no auxiliary gates)."""

    def param_groups(self, objective: TransferObjective) -> list[dict]:
        """Optimiser groups of the coupling's own parameters: none."""
        return []
