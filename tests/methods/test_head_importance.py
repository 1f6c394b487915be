"""Head importance (Michel et al. 2019): planted important head, per-layer normalisation, iterations."""

from __future__ import annotations

import pytest
import torch
from conftest import make_hf, make_inputs

from structprune.arch import from_hf
from structprune.arch.structure import ModelStructure
from structprune.budget import Budget
from structprune.costs import count_flops
from structprune.masked_model import MaskedModel
from structprune.maskset import MaskSet
from structprune.methods import get_method
from structprune.methods.calibration import calibration_batches
from structprune.methods.head_importance import head_importance_scores
from structprune.methods.selection import DEFAULT_TOLERANCE


def _data(model, n: int = 16) -> dict[str, torch.Tensor]:
    data = make_inputs(model, batch=n, seq=10)
    with torch.no_grad():
        data["labels"] = model(**data).logits.argmax(-1)
    return data


def _planted():
    hf = make_hf("bert")
    hd = hf.config.hidden_size // hf.config.num_attention_heads
    with torch.no_grad():
        hf.bert.encoder.layer[2].attention.output.dense.weight[:, 3 * hd:4 * hd] *= 15.0
    return hf


def test_scores_match_manual_expected_abs_gradient_and_normalise_per_layer():
    hf = _planted()
    data = _data(hf)
    masked = MaskedModel(hf).eval()
    batches = calibration_batches(data, 8)
    scores = head_importance_scores(masked, batches)
    structure = masked.structure
    manual = torch.zeros(structure.num_layers, structure.max_heads, dtype=torch.float64)
    for batch in batches:
        gate = torch.ones(structure.num_layers, structure.max_heads, requires_grad=True)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        loss = masked(**inputs, labels=batch["labels"], gates={"head": gate}).loss
        manual += torch.autograd.grad(loss, gate)[0].abs().double()
    manual /= manual.norm(dim=1, keepdim=True)
    torch.testing.assert_close(scores["head"], manual, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(scores["head"].norm(dim=1), torch.ones(structure.num_layers, dtype=torch.float64))
    assert int(scores["head"][2].argmax()) == 3


def test_removed_units_score_zero():
    hf = make_hf("bert")
    masked = MaskedModel(hf).eval()
    structure = masked.structure
    masks = MaskSet.ones(structure, ("head", "neuron"))
    masks.masks["head"][1, 2] = 0
    masks.masks["neuron"][0, :5] = 0
    scores = head_importance_scores(masked, calibration_batches(_data(hf), 8), masks)
    assert scores["head"][1, 2] == 0 and (scores["neuron"][0, :5] == 0).all()
    assert (scores["head"][masks.masks["head"] > 0] > 0).all()


@pytest.mark.parametrize("target", [0.2, 0.5])
def test_iterative_budget_met_and_planted_head_kept(target):
    hf = _planted()
    budget = Budget(target, "flops", seq_len=32)
    result = get_method("head_importance")(hf, _data(hf), budget, iterations=3, batch_size=8)
    spec = from_hf(hf).spec
    structure = ModelStructure.from_spec(spec)
    reduction = 1 - count_flops(result.masks.resolve(structure), spec, 32) / count_flops(structure, spec, 32)
    assert target <= reduction <= target + DEFAULT_TOLERANCE
    assert result.masks.masks["head"][2, 3] == 1
    kept = [(step["heads_kept"], step["neurons_kept"]) for step in result.log["iterations"]]
    assert all(a[0] >= b[0] and a[1] >= b[1] for a, b in zip(kept, kept[1:]))
    assert len(kept) == 3


def test_head_importance_errors():
    hf = make_hf("bert")
    with pytest.raises(ValueError, match="iterations"):
        get_method("head_importance")(hf, _data(hf), Budget(0.3, "flops"), iterations=0)
    with pytest.raises(ValueError, match="needs labels"):
        get_method("head_importance")(hf, {k: v for k, v in _data(hf).items() if k != "labels"}, Budget(0.3, "flops"))
