"""Settings and input of the ``transfer`` method: the schedule factor's formula, the settings and inputs refused
before any training, and ``multiple_of`` reaching the target side's extraction."""

from __future__ import annotations

import pytest

from structprune import transfer
from structprune.methods.l0 import L0Config
from structprune.methods.options import MULTIPLE_OF
from structprune.transfer import TransferConfig
from structprune.transfer.config import OPTIONS, config_from_options
from tests.methods.test_l0 import tiny_bert
from tests.transfer.transfer_support import DATA, SHORT, toy_aux


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


def test_bad_settings_and_inputs_are_refused():
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


def test_multiple_of_reaches_the_target_side_extraction():
    assert OPTIONS["multiple_of"] is MULTIPLE_OF  # one --multiple-of flag for every method
    assert config_from_options({"multiple_of": 4}).l0.multiple_of == 4
    result = transfer.prune(tiny_bert(), DATA, 0.5, aux=[toy_aux()], config=TransferConfig(l0=SHORT, coupling="joint"),
                            multiple_of=4)
    summary = result.log["summary"]
    widths = [layer["ffn"] for layer in summary["layers"]]
    assert all(width % 4 == 0 for width in widths) and summary["hidden"] % 4 == 0, (widths, summary["hidden"])
    assert summary["hidden"] < 32 and any(0 < width < 64 for width in widths)  # pruned, not just left whole
    assert (result.log["multiple_of"], result.masks.meta["options"]["l0"]["multiple_of"]) == (4, 4)
