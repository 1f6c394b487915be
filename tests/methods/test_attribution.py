"""Integrated-gradients attribution: completeness, a planted important unit, budgets, settings."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_hf, make_inputs

from structprune.arch import from_hf
from structprune.arch.structure import ModelStructure
from structprune.budget import Budget
from structprune.costs import count_flops
from structprune.masked_model import MaskedModel
from structprune.methods import get_method
from structprune.methods.attribution import attribution_scores, path_pairs
from structprune.methods.selection import DEFAULT_TOLERANCE


def _data(model, n: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    data = make_inputs(model, batch=n, seq=10, seed=seed)
    with torch.no_grad():
        data["labels"] = model(**data).logits.argmax(-1)  # labels the model fits: a meaningful loss
    return data


def _loss(masked: MaskedModel, data, gates) -> float:
    masked.eval()
    inputs = {k: v for k, v in data.items() if k != "labels"}
    with torch.no_grad():
        return float(masked(**inputs, labels=data["labels"], gates=gates).loss)


def _planted(seed: int = 0):
    """Tiny BERT whose FFN neuron 7 of layer 2 and head 4 of layer 1 dominate the output."""
    hf = make_hf("bert", seed)
    with torch.no_grad():
        hf.bert.encoder.layer[2].output.dense.weight[:, 7] *= 40.0
        hd = hf.config.hidden_size // hf.config.num_attention_heads
        hf.bert.encoder.layer[1].attention.output.dense.weight[:, 4 * hd:5 * hd] *= 15.0
    return hf


def test_completeness_model_path():
    """Attributions along the all-units path add up to F(1) - F(0+) (F = minus the mean loss)."""
    hf = _planted()
    data = _data(hf)
    masked = MaskedModel(hf)
    scores = attribution_scores(masked, data, steps=32, path="model", batch_size=len(data["labels"]),
                                stratify=False)
    structure = masked.structure
    ones = {"head": torch.ones(structure.num_layers, structure.max_heads),
            "neuron": torch.ones(structure.num_layers, structure.max_ffn)}
    eps = {name: g * 1e-7 for name, g in ones.items()}
    expected = _loss(masked, data, eps) - _loss(masked, data, ones)
    total = float(scores["head"].sum() + scores["neuron"].sum())
    assert abs(expected) > 1e-3
    assert total == pytest.approx(expected, rel=0.01)


def test_completeness_sublayer_paths():
    """Each sublayer's attributions add up to the loss change of scaling that sublayer alone to 0+."""
    hf = _planted()
    data = _data(hf)
    masked = MaskedModel(hf)
    scores = attribution_scores(masked, data, steps=24, path="sublayer", batch_size=len(data["labels"]),
                                stratify=False)
    structure = masked.structure
    for name in ("head", "neuron"):
        for i in range(structure.num_layers):
            ones = {"head": torch.ones(structure.num_layers, structure.max_heads),
                    "neuron": torch.ones(structure.num_layers, structure.max_ffn)}
            scaled = copy.deepcopy(ones)
            scaled[name][i] = 1e-7
            expected = _loss(masked, data, scaled) - _loss(masked, data, ones)
            assert float(scores[name][i].sum()) == pytest.approx(expected, rel=0.02, abs=2e-5), (name, i)


def test_squared_aggregate_of_one_batch_is_the_square_of_its_attribution():
    hf = _planted()
    data = _data(hf)
    scores = attribution_scores(MaskedModel(hf), data, steps=4, batch_size=len(data["labels"]), stratify=False)
    for name in ("head", "neuron"):
        torch.testing.assert_close(scores[f"{name}_squared"], scores[name].pow(2), rtol=1e-6, atol=1e-12)


def test_stratified_pairs_cover_every_point_and_batch():
    assert path_pairs(3, 8, stratify=True) == [(0, 0), (0, 3), (0, 6), (1, 1), (1, 4), (1, 7), (2, 2), (2, 5)]
    pairs = path_pairs(64, 8, stratify=True)
    assert len(pairs) == 64 and {k for _, k in pairs} == set(range(8)) and {j for j, _ in pairs} == set(range(64))
    assert len(path_pairs(5, 4, stratify=False)) == 20


@pytest.mark.parametrize("objective", ["supervised", "pseudo", "entropy"])
def test_planted_units_rank_first(objective):
    hf = _planted()
    data = _data(hf, n=16)
    if objective != "supervised":
        del data["labels"]
    scores = attribution_scores(MaskedModel(hf), data, steps=8, objective=objective, batch_size=8, stratify=False)
    for suffix in ("", "_squared"):
        assert int(scores[f"neuron{suffix}"].abs()[2].argmax()) == 7
        assert int(scores[f"head{suffix}"].abs()[1].argmax()) == 4


def test_budget_met_exactly_and_weights_unchanged():
    hf = make_hf("bert")
    before = {k: v.clone() for k, v in hf.state_dict().items()}
    data = _data(hf)
    budget = Budget(0.3, "flops", seq_len=64)
    result = get_method("attribution")(hf, data, budget, batch_size=4)
    structure = ModelStructure.from_spec(from_hf(hf).spec)
    spec = from_hf(hf).spec
    pruned = result.masks.resolve(structure)
    reduction = 1 - count_flops(pruned, spec, 64) / count_flops(structure, spec, 64)
    assert budget.target <= reduction <= budget.target + DEFAULT_TOLERANCE
    assert result.log["achieved"] == pytest.approx(reduction)
    assert all(torch.equal(before[k], v) for k, v in hf.state_dict().items())


def test_layer_scope_prunes_every_layer_alike():
    hf = make_hf("bert")
    budget = Budget(0.4, "flops", seq_len=64)
    result = get_method("attribution")(hf, _data(hf), budget, scope="layer", batch_size=4)
    spec = from_hf(hf).spec
    structure = ModelStructure.from_spec(spec)
    for dense_layer, kept in zip(structure.layers, result.masks.resolve(structure).layers):
        one = ModelStructure(structure.family, structure.arch, structure.hidden_size, structure.head_dim,
                             structure.gated_ffn, (dense_layer,))
        small = ModelStructure(structure.family, structure.arch, structure.hidden_size, structure.head_dim,
                               structure.gated_ffn, (kept,))
        layer_reduction = 1 - count_flops(small, spec, 64) / count_flops(one, spec, 64)
        assert budget.target <= layer_reduction <= budget.target + 0.1
    assert budget.target <= result.log["achieved"] <= budget.target + DEFAULT_TOLERANCE


def test_attribution_tuning_sets_scales():
    hf = make_hf("bert")
    result = get_method("attribution")(hf, _data(hf), Budget(0.3, "flops", seq_len=64), batch_size=4, tune=True)
    kept = result.masks.masks["head"] > 0
    assert set(result.masks.scales) == {"head", "neuron"}
    assert not torch.equal(result.masks.scales["head"][kept], torch.ones(int(kept.sum())))
    assert all(fit["applied"] for fit in result.log["tuning"])


def test_clear_errors():
    hf = make_hf("bert")
    data = _data(hf)
    unlabelled = {k: v for k, v in data.items() if k != "labels"}
    with pytest.raises(ValueError, match="needs labels"):
        get_method("attribution")(hf, unlabelled, Budget(0.3, "flops"))
    with pytest.raises(ValueError, match="objective"):
        get_method("attribution")(hf, data, Budget(0.3, "flops"), objective="oracle")
    with pytest.raises(ValueError, match="scope"):
        get_method("attribution")(hf, data, Budget(0.3, "flops"), scope="row")
    with pytest.raises(ValueError, match="path"):
        get_method("attribution")(hf, data, Budget(0.3, "flops"), path="zigzag")
