"""Exact resume of the ``transfer`` method (after an exception and after a real kill) and DDP with two gloo
processes (the subprocess runs of tests/methods/test_l0.py's RUN_SCRIPT with method transfer)."""

from __future__ import annotations

import dataclasses

import pytest

from structprune import transfer
from structprune.transfer import TransferConfig
from structprune.transfer.objective import TransferObjective
from tests.methods.test_l0 import (
    assert_matches_one_process,
    assert_same_run,
    kill_and_resume,
    run_once,
    run_two_processes,
    tiny_bert,
)
from tests.transfer.transfer_support import DATA, SHORT, same, toy_aux, toy_mlm


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
"""Pruning steps of the subprocess runs (RUN_SCRIPT of tests/methods/test_l0.py with method transfer)."""


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
