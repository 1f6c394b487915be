"""The cosine guard: the applied weights follow the schedule and the running trust, the guard's memory in optimiser
steps, the gradient cosine, an opposed source gets weight 0 and no tie, a rejected source's head still learns, and
a rejected source leaves the run exactly ``l0``'s."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from structprune import transfer
from structprune.methods import l0
from structprune.transfer import TransferConfig, guard
from structprune.transfer.guard import gradient_cosine
from structprune.transfer.objective import TransferObjective
from tests.methods.test_l0 import tiny_bert
from tests.transfer.transfer_support import (
    BATCH,
    DATA,
    SHORT,
    build,
    grads,
    nonzero,
    same,
    separate_step,
    toy_aux,
    toy_mlm,
)


def test_applied_weights_follow_the_anneal_schedule_and_the_cosine_guard():
    config = TransferConfig(l0=SHORT, coupling="joint", schedule="anneal", aux_weight=2.0)
    result = transfer.prune(tiny_bert(), DATA, 0.5, aux=[toy_aux(weight=0.5)], config=config)
    steps = result.log["aux_steps"]
    assert [s["step"] for s in steps] == list(range(6))
    mean = square = 0.0
    for s in steps:
        factor = 1 - s["step"] / 6
        assert s["factor"] == pytest.approx(factor)
        cosine = s["cosines"]["toy"]
        assert -1 <= cosine <= 1
        mean, square = 0.95 * mean + 0.05 * cosine, 0.95 * square + 0.05 * cosine ** 2
        trust = min(1.0, max(0.0, mean / (square / (1 - 0.95 ** (s["step"] + 1))) ** 0.5))
        assert s["weights"]["toy"] == pytest.approx(2.0 * factor * 0.5 * trust)
    assert any(s["weights"]["toy"] > 0 for s in steps) and any(s["cosines"]["toy"] != 0 for s in steps)
    assert (result.log["schedule"], result.log["guard"], result.log["aux_weight"]) == ("anneal", "cosine", 2.0)


def test_guard_memory_is_counted_in_optimiser_steps_whatever_grad_accum():
    objectives = {accum: build(TransferConfig(l0=dataclasses.replace(SHORT, grad_accum=accum), coupling="joint"),
                         [toy_aux()])[0]
                  for accum in (1, 4)}
    for step, similarity in enumerate([0.3, -0.1, 0.2, 0.25, 0.0, 0.1]):
        once = objectives[1].trust("toy", similarity)
        for _ in range(4):  # four micro-batches of the same step, each with that step's cosine
            per_micro = objectives[4].trust("toy", similarity)
        assert per_micro == pytest.approx(once, rel=1e-9), step


def test_gradient_cosine():
    p = nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    q = nn.Parameter(torch.ones(3))
    a, b = torch.tensor([1.0, 2.0, 0.0]), torch.tensor([2.0, -1.0, 3.0])  # a . b = 0
    target = (p * a).sum()
    assert gradient_cosine(target, 2 * (p * a).sum(), [p], [p]) == pytest.approx(1.0)
    assert gradient_cosine(target, -3 * (p * a).sum(), [p], [p]) == pytest.approx(-1.0)
    assert gradient_cosine(target, (p * b).sum(), [p], [p]) == pytest.approx(0.0)
    assert gradient_cosine(target, q.sum(), [p], [p]) == 0.0  # no gradient on the compared parameters


class Opposed(TransferObjective):
    """An auxiliary loss whose gradient is exactly the negative of the target loss's."""

    def distill_loss(self, batch, gates):
        loss, values = super().distill_loss(batch, gates)
        self.last = loss
        return loss, values

    def aux_loss(self, index, step, micro, gates, probe=False):
        return -2.0 * self.last, None


def test_cosine_guard_gives_an_opposed_auxiliary_loss_weight_zero():
    objective, reference = build(TransferConfig(l0=SHORT, coupling="joint"), [toy_aux()], Opposed)
    loss, values = objective(BATCH, 2, 0)
    assert values["cos/toy"] == pytest.approx(-1.0, abs=1e-6) and values["w/toy"] == 0.0
    assert objective.history[-1]["weights"] == {"toy": 0.0}
    assert torch.equal(loss, reference(BATCH, 2, 0)[0])  # the opposed loss contributes nothing
    unguarded, _ = build(TransferConfig(l0=SHORT, coupling="joint", guard="none"), [toy_aux()], Opposed)
    assert unguarded(BATCH, 2, 0)[1]["w/toy"] == 1.0


def test_cosine_guard_switches_off_the_tie_to_an_opposed_sources_mask():
    objective, reference, values = separate_step("both", "cosine", [toy_aux()], Opposed)
    assert values["cos/toy"] == pytest.approx(-1.0, abs=1e-6) and values["tie"] > 0
    assert objective.history[-1]["tie_factor"] == 0.0
    # neither the auxiliary loss nor the tie reaches the target's gates or the shared weights
    assert same(grads(objective.gates), grads(reference.gates))
    assert same(grads(objective.student), grads(reference.student))
    unguarded, reference, _ = separate_step("both", "none", [toy_aux()], Opposed)
    assert unguarded.history[-1]["tie_factor"] == 1.0
    assert not same(grads(unguarded.gates), grads(reference.gates))


def test_a_rejected_sources_head_still_learns_at_the_full_weight(monkeypatch):
    # the guard scales what reaches the shared weights and gates, not what the auxiliary heads learn: a fresh head
    # the guard switched off would never learn, and its gradient would never become informative
    unguarded, _, _ = separate_step("both", "none")
    monkeypatch.setattr(guard, "cosine", lambda a, b: -0.5)
    rejected, reference, values = separate_step("both", "cosine")
    assert values["w/toy"] == values["w/mlm"] == 0.0
    assert same(grads(rejected.student), grads(reference.student)) and same(grads(rejected.gates), grads(reference.gates))
    heads, full = grads(rejected.aux_heads), grads(unguarded.aux_heads)
    assert nonzero(rejected.aux_heads)
    assert all(torch.allclose(heads[name], full[name], rtol=1e-5, atol=1e-7) for name in full)


def test_a_rejected_source_leaves_the_whole_run_l0s_even_with_dropout(monkeypatch):
    # The auxiliary forwards draw their dropout from a stream of their own: before they did, they consumed the
    # global stream, and the target's dropout masks (so the whole run) differed from l0's though the guard had
    # switched the source off.
    def dropout_bert():
        model = tiny_bert()
        model.config.hidden_dropout_prob = 0.1
        return model

    reference = l0.prune(dropout_bert(), DATA, 0.5, config=SHORT)
    assert reference.log["prune_losses"] != l0.prune(tiny_bert(), DATA, 0.5, config=SHORT).log["prune_losses"]
    monkeypatch.setattr(guard, "cosine", lambda a, b: -0.5)
    rejected = transfer.prune(dropout_bert(), DATA, 0.5, aux=[toy_aux(), toy_mlm()],
                              config=TransferConfig(l0=SHORT, coupling="separate-masks"))
    assert all(s["weights"] == {"toy": 0.0, "mlm": 0.0} and s["tie_factor"] == 0.0 for s in rejected.log["aux_steps"])
    assert same(rejected.masks.masks, reference.masks.masks) and same(rejected.weights, reference.weights)
    assert rejected.log["finetune_losses"] == reference.log["finetune_losses"]
