"""Helpers shared by the tests of structprune.transfer: toy auxiliary sources on the tiny BERT of tests/methods/test_l0.py,
a transfer objective built beside the l0 one, one backward of separate-masks, gradient snapshots, and a spy on
the teachers of pruning phases.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from structprune.data import get_task
from structprune.methods import l0
from structprune.transfer import TransferConfig, method
from structprune.transfer.objective import TransferObjective
from structprune.transfer.sources import MLM, AuxData
from tests.methods.test_l0 import FAST, VOCAB, tiny_bert
from tests.methods.test_methods import encoded_data

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
    setup = l0.learned_setup(tiny_bert(), DATA, 0.5, config.l0, None)
    student, gates, layers = setup.parts(config.l0)
    objective = cls(student, setup.teacher, layers, config, gates, setup.budget, setup.warmup_steps(config.l0),
                    setup.prune_steps, aux)
    student, gates, layers = setup.parts(config.l0)
    reference = l0.DistillObjective(student, setup.teacher, layers, config.l0, gates, setup.budget,
                                    setup.warmup_steps(config.l0))
    return objective, reference


def separate_step(kind: str, guard: str = "none", aux: list[AuxData] | None = None, cls: type = TransferObjective):
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


def nonzero(module: nn.Module) -> bool:
    """Every parameter of ``module`` got a gradient."""
    return all(float(g.abs().sum()) > 0 for g in grads(module).values())


def spy_prune_teacher(monkeypatch) -> list[bool]:
    """Record, for every pruning phase that starts, whether its teacher is the model it starts pruning."""
    taught_by_start, real_train = [], method.train

    def spy(objective, data, config, directory, fingerprint, **options):
        if fingerprint["phase"] == "prune":
            taught_by_start.append(same(objective.student.model.state_dict(), objective.teacher.state_dict()))
        return real_train(objective, data, config, directory, fingerprint, **options)

    monkeypatch.setattr(method, "train", spy)
    return taught_by_start
