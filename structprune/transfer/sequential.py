"""``sequential``: prune on the auxiliary data first, then on the target.

Phase A prunes on the auxiliary data only: auxiliary heads and losses (:class:`TransferObjective` with
``target=False``: no target loss, no distillation, since there is no auxiliary teacher, and no guard), the
target's gates under their Lagrangian to the target sparsity, for ``aux_epochs`` epochs counted in TARGET steps
(``ceil(target rows / batch_size)`` per epoch, so phase A costs what the same number of target epochs would),
with the sparsity warm-up over its own ``sparsity_warmup`` share. Phase B is ordinary ``l0`` on the target,
starting from

* ``transfer="weights"``: the weights after phase A, with fresh gates;
* ``"masks"``: the gate logits after phase A, with the original weights;
* ``"both"``: both.

Only schedule ``start`` applies. Checkpoints: ``aux`` (phase A), then ``prune`` and ``finetune``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from structprune.masked_model import MaskedModel
from structprune.methods.distill import LayerDistillation
from structprune.methods.hardconcrete import HardConcreteGates
from structprune.methods.l0 import DistillObjective, LearnedSetup
from structprune.train import TrainResult
from structprune.transfer.config import TransferConfig
from structprune.transfer.objective import TransferObjective
from structprune.transfer.sources import AuxData


def aux_phase(setup: LearnedSetup, config: TransferConfig, student: MaskedModel, gates: HardConcreteGates,
              layers: LayerDistillation, aux: Sequence[AuxData],
              run: Callable[[DistillObjective, int, str], TrainResult]) -> TransferObjective:
    """Phase A: train ``student`` and ``gates`` on the auxiliary losses with ``run`` (phase ``"aux"``); the
    trained objective."""
    c = config.l0
    steps = c.steps(config.aux_phase_epochs, setup.rows)
    before = TransferObjective(student, setup.teacher, layers, config, gates, setup.budget,
                               setup.warmup_steps(c, steps), steps, aux, target=False)
    run(before, steps, "aux")
    return before


def target_start(setup: LearnedSetup, config: TransferConfig, before: TransferObjective
                 ) -> tuple[MaskedModel, HardConcreteGates, LayerDistillation]:
    """Phase B's student, gates and layer distillation map: phase A's weights and/or gate logits (``transfer``),
    fresh parts otherwise."""
    student, gates, layers = setup.parts(config.l0, before.student if config.transfer in ("weights", "both") else None)
    if config.transfer in ("masks", "both"):
        gates.load_state_dict(before.gates.state_dict())
    return student, gates, layers
