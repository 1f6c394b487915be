"""The ``transfer`` method: every coupling, transfer and schedule changes what is trained (asserted on
gradients, phase starts and logs), the cosine guard, exact resume (also after a real kill), DDP with two gloo
processes, bad input, the sweep of ``transfer-search``, and the ``prune --method transfer`` / ``transfer-search``
commands."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from structprune.auxiliary import MLM, AuxData
from structprune.data import get_task
from structprune.methods import l0, transfer
from structprune.methods.l0 import L0Config
from structprune.methods.transfer import TransferConfig, TransferObjective, gradient_cosine
from structprune.transfer_search import BASELINE, SearchResult, run_name, sweep
from tests.test_cli import make_model, ok, write_task
from tests.test_l0 import (
    FAST,
    VOCAB,
    assert_matches_one_process,
    assert_same_run,
    kill_and_resume,
    run_once,
    run_two_processes,
    tiny_bert,
)
from tests.test_methods import encoded_data

SHORT = dataclasses.replace(FAST, max_steps=6)
"""6 steps per phase (64 rows, batch 16: 4 steps per epoch)."""
DATA = encoded_data(2, rows=64)
BATCH = {name: t[:16] for name, t in DATA.items()}


def toy_aux(name: str = "toy", weight: float = 1.0) -> AuxData:
    """A 3-class pair task on other token ids than the target's."""
    data = encoded_data(3, rows=48, seq=8)
    real = data["attention_mask"].bool()
    data["input_ids"] = torch.where(real, (data["input_ids"] * 7 + 3) % (VOCAB - 5) + 5, data["input_ids"])
    return AuxData(name, weight, data, get_task("mnli"))


def toy_mlm(weight: float = 1.0) -> AuxData:
    data = encoded_data(2, rows=40, seq=9)
    data.pop("labels")
    special = torch.zeros_like(data["input_ids"], dtype=torch.bool)
    special[:, 0] = True
    return AuxData(MLM, weight, data | {"special_tokens_mask": special}, None, mask_token_id=4, vocab_size=VOCAB)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: torch.zeros_like(p) if p.grad is None else p.grad.clone() for name, p in module.named_parameters()}


def build(config: TransferConfig, aux: list[AuxData], cls: type = TransferObjective):
    """A transfer objective and the l0 objective over identical copies of the model (same gate noise)."""
    setup = l0.prepare(tiny_bert(), DATA, 0.5, config.l0, None)
    student, gates, layers = setup.parts(config.l0)
    objective = cls(student, setup.teacher, layers, config, gates, setup.budget, setup.warmup_steps(config.l0),
                    setup.prune_steps, aux)
    student, gates, layers = setup.parts(config.l0)
    reference = l0.DistillObjective(student, setup.teacher, layers, config.l0, gates, setup.budget,
                                    setup.warmup_steps(config.l0))
    return objective, reference


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


@pytest.mark.parametrize("schedule,expected", [
    ("start", [1.0, 1.0, 1.0, 1.0]),
    ("after:25", [0.0, 0.0, 1.0, 1.0]),
    ("anneal", [1.0, 0.76, 0.5, 0.01]),
    ("warmup", [1.0, 1.0, 0.0, 0.0]),
])
def test_schedule_factor_formula(schedule, expected):
    config = TransferConfig(coupling="joint", schedule=schedule)
    factors = [config.factor(step, prune_steps=100, warmup_steps=30) for step in (0, 24, 50, 99)]
    assert factors == pytest.approx(expected)


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


def _separate(kind: str, guard: str = "none", aux: list[AuxData] | None = None, cls: type = TransferObjective):
    """One backward of separate-masks with ``kind`` transfer and of l0, on the same batch and gate noise."""
    config = TransferConfig(l0=SHORT, coupling="separate-masks", transfer=kind, guard=guard, tie_weight=5.0)
    objective, reference = build(config, aux or [toy_aux(), toy_mlm()], cls)
    with torch.no_grad():  # start the two masks apart, so the tie pulls
        for name, a in objective.aux_gates.log_alpha.items():
            a.add_(torch.randn(a.shape, generator=torch.Generator().manual_seed(len(name))))
    loss, values = objective(BATCH, 2, 0)
    loss.backward()
    reference(BATCH, 2, 0)[0].backward()
    return objective, reference, values


def test_cosine_guard_switches_off_the_tie_to_an_opposed_sources_mask():
    objective, reference, values = _separate("both", "cosine", [toy_aux()], Opposed)
    assert values["cos/toy"] == pytest.approx(-1.0, abs=1e-6) and values["tie"] > 0
    assert objective.history[-1]["tie_factor"] == 0.0
    # neither the auxiliary loss nor the tie reaches the target's gates or the shared weights
    assert same(grads(objective.gates), grads(reference.gates))
    assert same(grads(objective.student), grads(reference.student))
    unguarded, reference, _ = _separate("both", "none", [toy_aux()], Opposed)
    assert unguarded.history[-1]["tie_factor"] == 1.0
    assert not same(grads(unguarded.gates), grads(reference.gates))


def test_a_rejected_sources_head_still_learns_at_the_full_weight(monkeypatch):
    # the guard scales what reaches the shared weights and gates, not what the auxiliary heads learn: a fresh head
    # the guard switched off would never learn, and its gradient would never become informative
    unguarded, _, _ = _separate("both", "none")
    monkeypatch.setattr(transfer, "cosine", lambda a, b: -0.5)
    rejected, reference, values = _separate("both", "cosine")
    assert values["w/toy"] == values["w/mlm"] == 0.0
    assert same(grads(rejected.student), grads(reference.student)) and same(grads(rejected.gates), grads(reference.gates))
    heads, full = grads(rejected.aux_heads), grads(unguarded.aux_heads)
    assert _nonzero(rejected.aux_heads)
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
    monkeypatch.setattr(transfer, "cosine", lambda a, b: -0.5)
    rejected = transfer.prune(dropout_bert(), DATA, 0.5, aux=[toy_aux(), toy_mlm()],
                              config=TransferConfig(l0=SHORT, coupling="separate-masks"))
    assert all(s["weights"] == {"toy": 0.0, "mlm": 0.0} and s["tie_factor"] == 0.0 for s in rejected.log["aux_steps"])
    assert same(rejected.masks.masks, reference.masks.masks) and same(rejected.weights, reference.weights)
    assert rejected.log["finetune_losses"] == reference.log["finetune_losses"]


def _nonzero(module: nn.Module) -> bool:
    """Every parameter of ``module`` got a gradient."""
    return all(float(g.abs().sum()) > 0 for g in grads(module).values())


def _touched(gates: nn.Module) -> bool:
    """Some gate got a gradient (a gate sampled at exactly 0 or 1 gets none)."""
    return any(float(g.abs().sum()) > 0 for g in grads(gates).values())


def test_separate_masks_transfer_masks_reaches_only_gates_and_heads():
    objective, reference, values = _separate("masks")
    # the shared weights get exactly the target's gradient: the auxiliary forward ran on detached weights
    assert same(grads(objective.student), grads(reference.student))
    assert same(grads(objective.layers), grads(reference.layers))
    assert not same(grads(objective.gates), grads(reference.gates))  # the tie pulls the target gates
    assert _nonzero(objective.aux_gates) and _nonzero(objective.aux_heads)  # the tie reaches every aux gate
    assert values["tie"] > 0 and "aux_sparsity" in values


def test_separate_masks_transfer_weights_has_no_tie():
    objective, reference, values = _separate("weights")
    assert same(grads(objective.gates), grads(reference.gates))  # zero tie gradient: only the target loss
    assert not same(grads(objective.student), grads(reference.student))  # the auxiliary loss trains the weights
    assert _touched(objective.aux_gates) and _nonzero(objective.aux_heads) and "tie" not in values


def test_separate_masks_transfer_both_moves_weights_and_target_gates():
    objective, reference, values = _separate("both")
    assert not same(grads(objective.student), grads(reference.student))
    assert not same(grads(objective.gates), grads(reference.gates))
    assert values["tie"] > 0


@pytest.mark.parametrize("kind", ["weights", "masks", "both"])
def test_sequential_phase_b_starts_from_phase_a(kind, monkeypatch):
    starts, ends = {}, {}
    real = transfer.train

    def snapshot(objective):
        return ({k: v.detach().clone() for k, v in objective.gates.state_dict().items()},
                {k: v.detach().clone() for k, v in objective.student.state_dict().items()})

    def spy(objective, data, config, directory, fingerprint, **options):
        starts[fingerprint["phase"]] = snapshot(objective)
        result = real(objective, data, config, directory, fingerprint, **options)
        ends[fingerprint["phase"]] = snapshot(objective)
        return result

    monkeypatch.setattr(transfer, "train", spy)
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
    real_train, real_finetune = transfer.train, transfer.finetune

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

    monkeypatch.setattr(transfer, "train", spy_train)
    monkeypatch.setattr(transfer, "finetune", spy_finetune)
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
    trained, real_train = {}, transfer.train

    def spy(objective, data, config, directory, fingerprint, **options):
        result = real_train(objective, data, config, directory, fingerprint, **options)
        trained[fingerprint["phase"]] = result.steps - result.start_step
        return result

    monkeypatch.setattr(transfer, "train", spy)
    second = transfer.prune(tiny_bert(), DATA, 0.3, aux=aux, config=config, checkpoint_dir=tmp_path / "b")
    assert trained == {"aux": 0, "prune": SHORT.max_steps}  # the auxiliary phase resumed finished, pruning ran
    assert second.log["aux_steps"] == first.log["aux_steps"]
    assert abs(second.log["achieved"] - 0.3) <= 0.01
    with pytest.raises(Exception, match="budget"):  # the pruning phase's checkpoint still belongs to its budget
        transfer.prune(tiny_bert(), DATA, 0.4, aux=aux, config=config, checkpoint_dir=tmp_path / "b")


@pytest.mark.parametrize("coupling, schedule, killed_in", [("separate-masks", "anneal", "prune"),
                                                           ("intermediate", "start", "aux")])
def test_interrupted_run_resumes_exactly(coupling, schedule, killed_in, tmp_path, monkeypatch):
    config = TransferConfig(l0=dataclasses.replace(SHORT, checkpoint_every=1), coupling=coupling, schedule=schedule)
    aux = [toy_aux(), toy_mlm()]
    reference = transfer.prune(tiny_bert(), DATA, 0.5, aux=aux, config=config)
    real = TransferObjective.aux_loss

    def killed(self, index, step, micro, gates, probe=False):
        if step == 3:
            raise RuntimeError("killed")
        return real(self, index, step, micro, gates, probe)

    monkeypatch.setattr(TransferObjective, "aux_loss", killed)
    with pytest.raises(RuntimeError, match="killed"):
        transfer.prune(tiny_bert(), DATA, 0.5, aux=aux, config=config, checkpoint_dir=tmp_path)
    assert (tmp_path / killed_in / "checkpoint.pt").is_file()
    monkeypatch.undo()
    resumed = transfer.prune(tiny_bert(), DATA, 0.5, aux=aux, config=config, checkpoint_dir=tmp_path)
    assert resumed.log["prune_losses"] == reference.log["prune_losses"]
    assert resumed.log["finetune_losses"] == reference.log["finetune_losses"]
    assert resumed.log["aux_steps"] == reference.log["aux_steps"]  # the per-step log is in the checkpoint
    assert same(resumed.masks.masks, reference.masks.masks) and same(resumed.weights, reference.weights)


STEPS = 16
"""Pruning steps of the subprocess runs (RUN_SCRIPT of tests/test_l0.py with method transfer)."""


@pytest.fixture(scope="module")
def uninterrupted(run_script, tmp_path_factory) -> dict:
    """The record of one uninterrupted separate-masks run with the cosine guard."""
    return run_once(run_script, tmp_path_factory.mktemp("transfer-ref") / "ref", STEPS, "transfer")


@pytest.mark.parametrize("phase,at_step", [("prune", 8), ("finetune", 3)])
def test_killed_run_resumes_to_identical_masks_and_metrics(run_script, uninterrupted, tmp_path, phase, at_step):
    # the aux heads, aux gates, their multipliers and the per-step guard log come back from the checkpoint
    assert_same_run(kill_and_resume(run_script, tmp_path, STEPS, phase, at_step, "transfer"), uninterrupted)
    assert [s["step"] for s in uninterrupted["aux_steps"]] == list(range(STEPS))
    assert abs(uninterrupted["achieved"] - 0.5) <= 0.01


def test_ddp_two_gloo_processes_match_one_process(run_script, uninterrupted, tmp_path):
    ranks = run_two_processes(run_script, tmp_path, STEPS, "transfer")
    assert_matches_one_process(uninterrupted, ranks)
    # the guard compares the auxiliary gradient with the whole batch's target gradient, not a process's half
    assert ranks[0]["aux_steps"] == ranks[1]["aux_steps"]
    cosines = [[s["cosines"]["toy"] for s in run["aux_steps"][:10]] for run in (uninterrupted, ranks[0])]
    assert cosines[1] == pytest.approx(cosines[0], abs=1e-4)


def test_ddp_sequential_matches_one_process(run_script, tmp_path):
    # phase A has no target loss: every process draws the same auxiliary batch and dropout, and the phase B
    # that follows starts from the same weights and gates in both processes
    one = run_once(run_script, tmp_path / "one", STEPS, "transfer:sequential")
    ranks = run_two_processes(run_script, tmp_path, STEPS, "transfer:sequential")
    assert_matches_one_process(one, ranks)
    assert ranks[0]["aux_steps"] == ranks[1]["aux_steps"] and len(one["aux_steps"]) == 5 * 4  # 5 target epochs



    with pytest.raises(ValueError, match="coupling 'joint' shares both weights and mask"):
        TransferConfig(coupling="joint", transfer="masks")
    with pytest.raises(ValueError, match="sequential runs the auxiliary phase before"):
        TransferConfig(coupling="sequential", schedule="anneal")
    with pytest.raises(ValueError, match="schedule must be one of start, after:N"):
        TransferConfig(schedule="after:soon")
    with pytest.raises(ValueError, match="coupling must be one of joint, separate-masks, sequential"):
        TransferConfig(coupling="parallel")
    with pytest.raises(ValueError, match="tie_weight must be a finite number >= 0"):
        TransferConfig(tie_weight=-1.0)
    with pytest.raises(ValueError, match="aux_weight 0 gives the auxiliary phase no loss"):
        TransferConfig(coupling="sequential", aux_weight=0.0)
    with pytest.raises(ValueError, match="intermediate with aux_weight 0 gives the auxiliary phase no loss"):
        TransferConfig(coupling="intermediate", aux_weight=0.0)
    with pytest.raises(ValueError, match="intermediate runs the auxiliary phase before"):
        TransferConfig(coupling="intermediate", schedule="warmup")
    with pytest.raises(ValueError, match="'intermediate' trains the dense model before any mask exists"):
        TransferConfig(coupling="intermediate", transfer="masks")
    with pytest.raises(ValueError, match="retarget_epochs must be an integer >= 1, got 0"):
        TransferConfig(coupling="intermediate", retarget_epochs=0)
    with pytest.raises(ValueError, match="dense_lr must be > 0"):
        TransferConfig(coupling="intermediate", dense_lr=0.0)
    assert (TransferConfig(coupling="intermediate").aux_phase_epochs, TransferConfig(coupling="sequential")
            .aux_phase_epochs, TransferConfig(coupling="sequential", aux_epochs=2.0).aux_phase_epochs) == (15, 5, 2)
    with pytest.raises(ValueError, match="needs auxiliary data"):
        transfer.prune(tiny_bert(), DATA, 0.5, aux=[])
    with pytest.raises(ValueError, match="distinct names"):
        transfer.prune(tiny_bert(), DATA, 0.5, aux=[toy_aux(), toy_aux()])
    bad = toy_aux()
    bad.encoded["labels"] = bad.encoded["labels"] + 5
    with pytest.raises(ValueError, match="'toy' has labels 5..7 but its task has 3 classes"):
        transfer.prune(tiny_bert(), DATA, 0.5, aux=[bad])
    with pytest.raises(ValueError, match="cannot be reached by gating only head"):
        transfer.prune(tiny_bert(), DATA, 0.9, aux=[toy_aux()],
                       config=TransferConfig(l0=L0Config(granularities=("head",))))
    with pytest.raises(ValueError, match="teacher has 3 outputs but the student has 2"):
        transfer.prune(tiny_bert(), DATA, 0.5, aux=[toy_aux()], teacher=tiny_bert(num_labels=3))


def test_sweep_order_follows_the_best_coupling_and_stops_at_the_budget():
    def scorer(best: str):
        def score(config):
            name = run_name(config)
            return {"score": 60.0 if name == best else 50.0 if config is None else 40.0, "achieved": 0.5}
        return score

    # the base's coupling first: the default (intermediate), or the one given
    assert [r["name"] for r in sweep(scorer("x"), TransferConfig(), 40, budget_runs=3)] == [
        BASELINE, "intermediate/both/start", "joint/both/start"]
    base = TransferConfig(coupling="separate-masks", aux_weight=0.7)
    runs = sweep(scorer("separate-masks/both/start"), base, prune_steps=40, budget_runs=20)
    assert [r["name"] for r in runs] == [
        BASELINE, "separate-masks/both/start", "joint/both/start", "sequential/both/start", "intermediate/both/start",
        "separate-masks/both/after:10", "separate-masks/both/anneal", "separate-masks/both/warmup",
        "separate-masks/weights/start", "separate-masks/masks/start"]
    assert all(r["config"].aux_weight == 0.7 for r in runs[1:])
    runs = sweep(scorer("sequential/both/start"), base, prune_steps=40, budget_runs=20)
    assert [r["name"] for r in runs[4:]] == ["intermediate/both/start", "sequential/weights/start",
                                             "sequential/masks/start"]
    runs = sweep(scorer("intermediate/both/start"), base, prune_steps=40, budget_runs=20)
    assert [r["name"] for r in runs[4:]] == ["intermediate/both/start"]  # nothing else to vary
    runs = sweep(scorer("joint/both/start"), base, prune_steps=40, budget_runs=6)
    assert [r["name"] for r in runs[3:]] == ["sequential/both/start", "intermediate/both/start",
                                             "joint/both/after:10"]
    assert [r["name"] for r in sweep(scorer("x"), base, 40, budget_runs=2)] == [BASELINE,
                                                                              "separate-masks/both/start"]
    assert [r["name"] for r in sweep(scorer("x"), base, 40, budget_runs=9, budget_minutes=0)] == [BASELINE]
    # ties go to the earlier run: the baseline beats transfer settings that do no better
    result = SearchResult("t", "accuracy", sweep(lambda c: {"score": 50.0, "achieved": 0.5}, base, 40, 3))
    assert result.choice["name"] == BASELINE
    # min_confidence: only runs that beat the baseline that surely compete with it
    runs = [{"name": BASELINE, "score": 50.0, "confidence": None}, {"name": "a", "score": 52.0, "confidence": 0.7},
            {"name": "b", "score": 51.0, "confidence": 0.95}]
    assert [SearchResult("t", "accuracy", runs, min_confidence=m).choice["name"] for m in (0.0, 0.9, 0.99)] == [
        "a", "b", BASELINE]
    with pytest.raises(ValueError, match="budget_runs must be >= 1"):
        sweep(scorer("x"), base, 40, budget_runs=0)


def _aux_file(path):
    """Five labelled sentences; two are target sentences of write_task (case and spaces changed)."""
    rows = [("The  FILM was bad", 0), ("the plot is fun", 1), ("the plot is not fun", 0),
            ("the Film  was very FUN", 1), ("a dull plot", 0)]
    path.write_text("sentence\tlabel\n" + "".join(f"{text}\t{label}\n" for text, label in rows))
    return path


def test_cli_prune_transfer_writes_the_folder_with_sources_and_removed_counts(tmp_path):
    model_dir = make_model(tmp_path / "model")
    task = write_task(tmp_path / "task.tsv", rows=32)
    aux = _aux_file(tmp_path / "aux.tsv")
    out = ok("prune", "--method", "transfer", "--model", model_dir, "--task", task, "--aux", f"mlm,{aux}:0.5",
             "--coupling", "separate-masks", "--transfer", "masks", "--schedule", "anneal", "--target-sparsity", 0.3,
             "--batch-size", 16, "--max-steps", 2, "--seq-len", 16, "--max-length", 32, "--out", tmp_path / "tr",
             "--checkpoint-dir", tmp_path / "ckpt")
    assert "removed as duplicates" in out and "parameter sparsity" in out
    folder = tmp_path / "tr"
    for name in ("masks/masks.json", "pruned/config.json", "onnx-pruned/model.onnx", "report.md", "transfer-log.json"):
        assert (folder / name).is_file(), name
    log = json.loads((folder / "transfer-log.json").read_text())
    assert log["aux_dedup"] == {"mlm": {"split": "train", "kept": 32, "removed": 0},
                                str(aux): {"split": "train", "kept": 3, "removed": 2}}
    assert (log["coupling"], log["transfer"], log["schedule"]) == ("separate-masks", "masks", "anneal")
    assert [s["factor"] for s in log["aux_steps"]] == [1.0, 0.5]
    report = (folder / "report.md").read_text()
    assert "3 examples used, 2 removed as duplicates" in report and "Coupling separate-masks" in report
    assert json.loads((folder / "masks" / "masks.json").read_text())["meta"]["method"] == "transfer"
    assert (tmp_path / "ckpt" / "transfer" / "prune" / "checkpoint.pt").is_file()


def spy_prune_teacher(monkeypatch) -> list[bool]:
    """Record, for every pruning phase that starts, whether its teacher is the model it starts pruning."""
    taught_by_start, real_train = [], transfer.train

    def spy(objective, data, config, directory, fingerprint, **options):
        if fingerprint["phase"] == "prune":
            taught_by_start.append(same(objective.student.model.state_dict(), objective.teacher.state_dict()))
        return real_train(objective, data, config, directory, fingerprint, **options)

    monkeypatch.setattr(transfer, "train", spy)
    return taught_by_start


def test_cli_prune_transfer_intermediate_checkpoints_each_phase(tmp_path, monkeypatch):
    taught_by_start = spy_prune_teacher(monkeypatch)
    model_dir = make_model(tmp_path / "model")
    task = write_task(tmp_path / "task.tsv", rows=32)
    ok("prune", "--method", "transfer", "--model", model_dir, "--task", task, "--aux", "mlm", "--coupling",
       "intermediate", "--aux-epochs", 0.5, "--retarget-epochs", 2, "--target-sparsity", 0.3, "--batch-size", 16,
       "--max-steps", 2, "--seq-len", 16, "--max-length", 32, "--out", tmp_path / "tr", "--checkpoint-dir",
       tmp_path / "ckpt")
    log = json.loads((tmp_path / "tr" / "transfer-log.json").read_text())
    assert (log["coupling"], log["retarget_epochs"], len(log["aux_steps"])) == ("intermediate", 2, 1)
    for phase in ("aux", "retarget", "prune", "finetune"):
        assert (tmp_path / "ckpt" / "transfer" / phase / "checkpoint.pt").is_file(), phase
    assert taught_by_start == [True]  # the retargeted model teaches, not the dense model fine-tuned first


def test_transfer_search_intermediate_distils_from_its_retargeted_model(tmp_path, monkeypatch):
    taught_by_start = spy_prune_teacher(monkeypatch)
    model_dir = make_model(tmp_path / "model")
    task = write_task(tmp_path / "task.tsv", rows=40)
    ok("transfer-search", "--model", model_dir, "--task", task, "--aux", "mlm", "--coupling", "intermediate",
       "--aux-epochs", 0.5, "--target-sparsity", 0.3, "--budget-runs", 2, "--batch-size", 8, "--max-steps", 2,
       "--max-length", 32, "--seq-len", 16, "--out", tmp_path / "search.json")
    runs = json.loads((tmp_path / "search.json").read_text())["runs"]
    assert [r["name"] for r in runs] == [BASELINE, "intermediate/both/start"]
    assert taught_by_start == [True]


def test_cli_transfer_search_writes_runs_and_the_choice(tmp_path):
    model_dir = make_model(tmp_path / "model")
    task = write_task(tmp_path / "task.tsv", rows=40)
    out = ok("transfer-search", "--model", model_dir, "--task", task, "--aux", "mlm", "--target-sparsity", 0.3,
             "--budget-runs", 2, "--batch-size", 8, "--max-steps", 2, "--max-length", 32, "--seq-len", 16,
             "--out", tmp_path / "search.json")
    assert "<- choice" in out and BASELINE in out and "P(> l0)" in out
    result = json.loads((tmp_path / "search.json").read_text())
    assert [r["name"] for r in result["runs"]] == [BASELINE, "intermediate/both/start"]  # the default coupling
    assert result["runs"][0]["confidence"] is None and 0.0 <= result["runs"][1]["confidence"] <= 1.0
    assert result["choice"]["score"] == max(r["score"] for r in result["runs"])
    assert (result["setup"]["search_train"], result["setup"]["search_dev"]) == (32, 8)
    assert result["setup"]["aux"] == {"mlm": {"split": "train", "kept": 40, "removed": 0}}


def test_cli_transfer_search_refuses_a_confidence_outside_0_1(tmp_path):
    from tests.test_cli import cli
    code, _, err = cli("transfer-search", "--model", tmp_path / "m", "--task", "sst2", "--aux", "mlm",
                       "--target-sparsity", 0.3, "--budget-runs", 2, "--min-confidence", 1.5, "--out", tmp_path / "s")
    assert code == 1 and "--min-confidence is a probability in [0, 1], got 1.5" in err


def test_cli_transfer_refuses_bad_sources(tmp_path):
    from tests.test_cli import cli
    model_dir = make_model(tmp_path / "model")
    task = write_task(tmp_path / "task.tsv", rows=16)
    base = ["prune", "--method", "transfer", "--model", model_dir, "--task", task, "--target-sparsity", 0.3,
            "--out", tmp_path / "out"]
    code, _, err = cli(*base)
    assert code == 1 and "needs auxiliary sources: --aux" in err and "Traceback" not in err
    code, _, err = cli(*base, "--aux", "mnli,nosuch")
    assert code == 1 and "unknown task 'nosuch'" in err
    code, _, err = cli(*base, "--aux", "mlm", "--coupling", "joint", "--transfer", "weights")
    assert code == 1 and "coupling 'joint' shares both weights and mask" in err
    assert not (tmp_path / "out").exists()
