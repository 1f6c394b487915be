"""Every coupling, transfer and schedule changes what is trained, asserted on gradients, phase starts and logs:
``joint`` with weight 0 is ``l0``, ``separate-masks`` per transfer, ``sequential``'s phase B start,
``intermediate``'s dense phases and teacher."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from structprune import transfer
from structprune.methods import l0
from structprune.transfer import TransferConfig, intermediate, method
from tests.methods.test_l0 import tiny_bert
from tests.transfer.transfer_support import (
    DATA,
    SHORT,
    grads,
    nonzero,
    same,
    separate_step,
    toy_aux,
    toy_mlm,
)


def test_joint_with_aux_weight_zero_is_l0_bit_for_bit_and_a_positive_weight_changes_it():
    reference = l0.prune(tiny_bert(), DATA, 0.5, config=SHORT)
    aux = [toy_aux(), toy_mlm()]
    zero = transfer.prune(tiny_bert(), DATA, 0.5, aux=aux, config=TransferConfig(l0=SHORT, coupling="joint", aux_weight=0.0))
    assert zero.log["prune_losses"] == reference.log["prune_losses"]
    assert zero.log["finetune_losses"] == reference.log["finetune_losses"]
    assert same(zero.masks.masks, reference.masks.masks) and same(zero.weights, reference.weights)
    assert [step["weights"] for step in zero.log["aux_steps"]] == [{}] * 6
    on = transfer.prune(tiny_bert(), DATA, 0.5, aux=aux, config=TransferConfig(l0=SHORT, coupling="joint", guard="none"))
    assert on.log["prune_losses"][0] > reference.log["prune_losses"][0]  # the auxiliary losses are added
    assert not same(on.weights, reference.weights)
    assert [step["weights"] for step in on.log["aux_steps"]] == [{"toy": 1.0, "mlm": 1.0}] * 6
    assert on.log["coupling"] == "joint" and on.log["aux_sources"][1] == {"name": "mlm", "weight": 1.0, "rows": 40,
                                                                          "task": "mlm"}


def _touched(gates: nn.Module) -> bool:
    """Some gate got a gradient (a gate sampled at exactly 0 or 1 gets none)."""
    return any(float(g.abs().sum()) > 0 for g in grads(gates).values())


def test_separate_masks_transfer_masks_reaches_only_gates_and_heads():
    objective, reference, values = separate_step("masks")
    # the shared weights get exactly the target's gradient: the auxiliary forward ran on detached weights
    assert same(grads(objective.student), grads(reference.student))
    assert same(grads(objective.layers), grads(reference.layers))
    assert not same(grads(objective.gates), grads(reference.gates))  # the tie pulls the target gates
    assert nonzero(objective.aux_gates) and nonzero(objective.aux_heads)  # the tie reaches every aux gate
    assert values["tie"] > 0 and "aux_sparsity" in values


def test_separate_masks_transfer_weights_has_no_tie():
    objective, reference, values = separate_step("weights")
    assert same(grads(objective.gates), grads(reference.gates))  # zero tie gradient: only the target loss
    assert not same(grads(objective.student), grads(reference.student))  # the auxiliary loss trains the weights
    assert _touched(objective.aux_gates) and nonzero(objective.aux_heads) and "tie" not in values


def test_separate_masks_transfer_both_moves_weights_and_target_gates():
    objective, reference, values = separate_step("both")
    assert not same(grads(objective.student), grads(reference.student))
    assert not same(grads(objective.gates), grads(reference.gates))
    assert values["tie"] > 0


@pytest.mark.parametrize("kind", ["weights", "masks", "both"])
def test_sequential_phase_b_starts_from_phase_a(kind, monkeypatch):
    starts, ends = {}, {}
    real = method.train

    def snapshot(objective):
        return ({k: v.detach().clone() for k, v in objective.gates.state_dict().items()},
                {k: v.detach().clone() for k, v in objective.student.state_dict().items()})

    def spy(objective, data, config, directory, fingerprint, **options):
        starts[fingerprint["phase"]] = snapshot(objective)
        result = real(objective, data, config, directory, fingerprint, **options)
        ends[fingerprint["phase"]] = snapshot(objective)
        return result

    monkeypatch.setattr(method, "train", spy)
    config = TransferConfig(l0=SHORT, coupling="sequential", transfer=kind, aux_epochs=1.0)
    result = transfer.prune(tiny_bert(), DATA, 0.5, aux=[toy_aux(), toy_mlm()], config=config)
    assert set(starts) == {"aux", "prune"}
    (gates_a0, weights_a0), (gates_a1, weights_a1) = starts["aux"], ends["aux"]
    gates_b0, weights_b0 = starts["prune"]
    assert not same(gates_a0, gates_a1) and not same(weights_a0, weights_a1)  # phase A trained both
    assert same(gates_b0, gates_a1 if kind in ("masks", "both") else gates_a0)
    assert same(weights_b0, weights_a1 if kind in ("weights", "both") else weights_a0)
    # phase A: one target epoch of steps (4), auxiliary losses only, no guard (no target loss there)
    assert [s["weights"] for s in result.log["aux_steps"]] == [{"toy": 1.0, "mlm": 1.0}] * 4
    assert abs(result.log["achieved"] - 0.5) <= 0.01


def test_intermediate_trains_the_dense_model_on_the_aux_data_retargets_it_and_prunes_it_as_the_teacher(
        monkeypatch):
    states, teachers, rates = {}, {}, {}
    real_train, real_finetune = method.train, intermediate.finetune

    def weights(module):
        return {k: v.detach().clone() for k, v in module.state_dict().items()}

    def spy_train(objective, data, config, directory, fingerprint, **options):
        states[fingerprint["phase"], "start"] = weights(objective.student.model)
        teachers[fingerprint["phase"]] = weights(objective.teacher)
        rates[fingerprint["phase"]] = objective.param_groups()[0]["lr"]
        result = real_train(objective, data, config, directory, fingerprint, **options)
        states[fingerprint["phase"], "end"] = weights(objective.student.model)
        return result

    def spy_finetune(model, data, config, **options):
        states["retarget", "start"] = weights(model)
        rates["retarget"] = config.lr
        result = real_finetune(model, data, config, **options)
        states["retarget", "end"] = weights(model)
        return result

    monkeypatch.setattr(method, "train", spy_train)
    monkeypatch.setattr(intermediate, "finetune", spy_finetune)
    config = TransferConfig(l0=SHORT, coupling="intermediate", aux_epochs=1.0, retarget_epochs=1, dense_lr=3e-4)
    result = transfer.prune(tiny_bert(), DATA, 0.5, aux=[toy_aux(), toy_mlm()], config=config)
    assert rates == {"aux": 3e-4, "retarget": 3e-4, "prune": SHORT.lr}  # dense phases at the dense rate
    assert set(states) == {(phase, when) for phase in ("aux", "retarget", "prune") for when in ("start", "end")}
    start, end = states["aux", "start"], states["aux", "end"]
    assert same(start, teachers["aux"])  # the dense model, which teaches nothing in this phase
    head = {k for k in start if k.startswith("head.")}
    assert head and all(torch.equal(start[k], end[k]) for k in head)  # the auxiliary losses leave the target head
    assert not same({k: v for k, v in start.items() if k not in head}, {k: v for k, v in end.items() if k not in head})
    assert same(states["retarget", "start"], end)
    retargeted = states["retarget", "end"]
    assert all(not torch.equal(end[k], retargeted[k]) for k in head)  # the target loss trained the head
    assert same(states["prune", "start"], retargeted) and same(teachers["prune"], retargeted)
    # the auxiliary phase: one target epoch of steps (4), auxiliary losses only, no gates and no guard
    assert [s["weights"] for s in result.log["aux_steps"]] == [{"toy": 1.0, "mlm": 1.0}] * 4
    assert abs(result.log["achieved"] - 0.5) <= 0.01


def test_intermediate_dense_phases_serve_another_budget(tmp_path, monkeypatch):
    config = TransferConfig(l0=SHORT, coupling="intermediate", aux_epochs=1.0, retarget_epochs=1)
    aux = [toy_aux()]
    first = transfer.prune(tiny_bert(), DATA, 0.5, aux=aux, config=config, checkpoint_dir=tmp_path / "a")
    for phase in ("aux", "retarget"):
        (tmp_path / "b").mkdir(exist_ok=True)
        (tmp_path / "b" / phase).symlink_to(tmp_path / "a" / phase, target_is_directory=True)
    trained, real_train = {}, method.train

    def spy(objective, data, config, directory, fingerprint, **options):
        result = real_train(objective, data, config, directory, fingerprint, **options)
        trained[fingerprint["phase"]] = result.steps - result.start_step
        return result

    monkeypatch.setattr(method, "train", spy)
    second = transfer.prune(tiny_bert(), DATA, 0.3, aux=aux, config=config, checkpoint_dir=tmp_path / "b")
    assert trained == {"aux": 0, "prune": SHORT.max_steps}  # the auxiliary phase resumed finished, pruning ran
    assert second.log["aux_steps"] == first.log["aux_steps"]
    assert abs(second.log["achieved"] - 0.3) <= 0.01
    with pytest.raises(Exception, match="budget"):  # the pruning phase's checkpoint still belongs to its budget
        transfer.prune(tiny_bert(), DATA, 0.4, aux=aux, config=config, checkpoint_dir=tmp_path / "b")


def test_hold_puts_target_and_auxiliary_gates_on_the_budget_after_the_warm_up():
    objective, _, _ = separate_step("masks")
    objective.config = dataclasses.replace(objective.config, controller="hold")
    objective.after_step(objective.warmup_steps - 1)  # still warming up: the Lagrangian alone drives the gates
    assert abs(float(objective.expected_sparsity(objective.aux_gates)) - 0.5) > 0.05
    objective.after_step(objective.warmup_steps)
    for gates in (objective.gates, objective.aux_gates):
        assert float(objective.expected_sparsity(gates)) == pytest.approx(0.5, abs=1e-4)
