"""The shared training loop: accumulation, schedules, evaluation and best state, checkpoints, refusals."""

from __future__ import annotations

import json
import os

import pytest
import torch

import structprune
from structprune.arch import from_hf
from structprune.data import get_task
from structprune.evaluation import evaluate
from structprune.finetune import FinetuneConfig, TaskLoss, finetune
from structprune.train import (
    BEST_FILE,
    CHECKPOINT_FILE,
    LOG_FILE,
    CheckpointError,
    TrainConfig,
    check_writable,
    train,
)
from tests.methods.test_methods import encoded_data, tiny_bert


def _model():
    model = tiny_bert()
    model.config.hidden_dropout_prob = 0.0
    return from_hf(model)


def _state(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def test_gradient_accumulation_matches_one_big_batch():
    data = encoded_data(2, rows=32)
    results = []
    for accum in (1, 4):
        model = _model()
        config = TrainConfig(steps=4, batch_size=16, grad_accum=accum, seed=0)
        log = train(TaskLoss(model, 1e-3, 0.01), data, config, progress=False)
        results.append((torch.tensor(log.losses), _state(model)))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-5)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-5)


def test_finished_run_resumes_to_its_final_state_and_log_is_complete(tmp_path):
    data = encoded_data(2, rows=24)
    model = _model()
    config = TrainConfig(steps=6, batch_size=8, seed=1, checkpoint_every=2, log_every=1)
    first = train(TaskLoss(model, 1e-3, 0.01), data, config, tmp_path, {"run": 1}, progress=False)
    again = _model()
    second = train(TaskLoss(again, 1e-3, 0.01), data, config, tmp_path, {"run": 1}, progress=False)
    assert torch.equal(_state(model), _state(again)) and second.losses == first.losses
    steps = [json.loads(line)["step"] for line in (tmp_path / LOG_FILE).read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_evaluation_keeps_the_best_state(tmp_path):
    data = encoded_data(2, rows=24)
    model = _model()
    task = get_task("sst2")
    scores = iter([3.0, 9.0, 1.0])  # the best evaluation is the second (step 4)
    snapshots = {}

    def judge():
        snapshots[len(snapshots)] = _state(model).clone()
        return {"score": next(scores), "accuracy": evaluate(model, data, task)["accuracy"]}

    config = TrainConfig(steps=6, batch_size=8, eval_every=2, keep_best=True, best_metric="score")
    log = train(TaskLoss(model, 1e-2, 0.0), data, config, tmp_path, {}, evaluate=judge, progress=False)
    assert [e["step"] for e in log.evaluations] == [2, 4, 6]
    assert log.best["step"] == 4 and (tmp_path / BEST_FILE).is_file()
    assert torch.equal(_state(model), snapshots[1])


def test_schedules_and_maximize():
    """A 'constant' group keeps its rate; a 'linear' one warms up then decays; 'maximize' ascends."""

    class Probe(TaskLoss):
        def __init__(self):
            super().__init__(_model(), 1e-3, 0.0)
            self.up = torch.nn.Parameter(torch.zeros(()))

        def param_groups(self):
            return [{"params": list(self.model.parameters()), "lr": 1e-3, "weight_decay": 0.0, "schedule": "linear"},
                    {"params": [self.up], "lr": 0.1, "weight_decay": 0.0, "schedule": "constant", "maximize": True,
                     "clip": False}]

        def forward(self, batch, step, micro):
            loss, values = super().forward(batch, step, micro)
            return loss + self.up, values  # d loss / d up = 1: ascent makes it grow by ~lr per step

    probe = Probe()
    train(probe, encoded_data(2, rows=16), TrainConfig(steps=5, batch_size=8, warmup_ratio=0.4), progress=False)
    assert float(probe.up.detach()) == pytest.approx(0.5, rel=1e-3)


def test_finetune_is_the_shared_loop():
    data = encoded_data(2, rows=20)
    first, second = _model(), _model()
    config = FinetuneConfig(epochs=2, batch_size=8, lr=1e-3, seed=4)
    log = finetune(first, data, config, progress=False)
    reference = train(TaskLoss(second, config.lr, config.weight_decay), data,
                      TrainConfig(steps=config.total_steps(20), batch_size=8, seed=4), progress=False)
    assert log.losses == reference.losses and torch.equal(_state(first), _state(second))


def test_resume_of_another_run_is_refused(tmp_path):
    data = encoded_data(2, rows=16)
    config = TrainConfig(steps=2, batch_size=8)
    train(TaskLoss(_model(), 1e-3, 0.0), data, config, tmp_path, {"seed": 0, "target": 0.5}, progress=False)
    with pytest.raises(CheckpointError, match=r"different run \(seed: saved 0, now 1"):
        train(TaskLoss(_model(), 1e-3, 0.0), data, config, tmp_path, {"seed": 1, "target": 0.5}, progress=False)


def test_resume_of_another_version_is_refused(tmp_path, monkeypatch):
    data = encoded_data(2, rows=16)
    config = TrainConfig(steps=2, batch_size=8)
    train(TaskLoss(_model(), 1e-3, 0.0), data, config, tmp_path, {}, progress=False)
    monkeypatch.setattr(structprune, "__version__", "99.0")
    with pytest.raises(CheckpointError, match="written by structprune 0.1.0.*this is structprune 99.0"):
        train(TaskLoss(_model(), 1e-3, 0.0), data, config, tmp_path, {}, progress=False)


def test_corrupt_checkpoint_is_refused(tmp_path):
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        train(TaskLoss(_model(), 1e-3, 0.0), encoded_data(2, rows=16), TrainConfig(steps=1, batch_size=8), tmp_path,
              {}, progress=False)


@pytest.fixture
def unwritable_dir(tmp_path):
    """A folder this process cannot write to: a read-only folder, or for root (whom permissions do not
    stop) a path on sysfs, which refuses new entries to everyone."""
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        return locked / "checkpoints"
    if not os.path.isdir("/sys/kernel"):
        pytest.skip("running as root without sysfs: no folder here refuses writes")
    return "/sys/structprune-checkpoints"


def test_unwritable_checkpoint_dir_is_refused_before_training(tmp_path, unwritable_dir):
    model = _model()
    before = _state(model).clone()
    with pytest.raises(CheckpointError, match=r"cannot write checkpoints to .*(Permission denied|not permitted)"):
        train(TaskLoss(model, 1e-3, 0.0), encoded_data(2, rows=16), TrainConfig(steps=2, batch_size=8),
              unwritable_dir, {}, progress=False)
    assert torch.equal(_state(model), before)
    assert check_writable(tmp_path / "fine").is_dir()  # a writable folder passes, and is created


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="must be >= 1"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="smaller than grad_accum"):
        train(TaskLoss(_model(), 1e-3, 0.0), encoded_data(2, rows=16), TrainConfig(steps=1, batch_size=2, grad_accum=4),
              progress=False)
