"""Fisher mask search (Kwon et al. 2022): Fisher values, search, rearrangement and mask tuning."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from conftest import make_hf, make_inputs
from scipy.sparse.linalg import lsmr
from transformers import BertConfig, BertForSequenceClassification

from structprune.arch import from_hf
from structprune.arch.structure import ModelStructure
from structprune.budget import Budget
from structprune.compaction import compact
from structprune.costs import count_flops
from structprune.masked_model import MaskedModel
from structprune.maskset import MaskSet
from structprune.methods import get_method
from structprune.methods.calibration import calibration_batches
from structprune.methods.fisher import (
    fisher_information,
    mask_gradients,
    rearrange,
    search_masks,
)
from structprune.methods.mask_tuning import _solve, _System


def _data(model, n: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    data = make_inputs(model, batch=n, seq=9, seed=seed)
    data["labels"] = torch.randint(0, model.config.num_labels, (n,), generator=torch.Generator().manual_seed(seed))
    return data


def _example_loss(full, example, gates) -> float:
    with torch.no_grad():
        return float(full(**example, gates=gates).loss)


def test_fisher_equals_brute_force_per_example_gradients():
    """With one example per gradient, the Fisher is sum_i (dL_i/dg)^2; check it against central
    finite differences of each example's loss in float64 on the plain (kernel-free) model."""
    hf = make_hf("bert")
    data = _data(hf, n=4)
    masked = MaskedModel(hf).eval()
    fisher = fisher_information(mask_gradients(masked, calibration_batches(data, 1)))
    full = from_hf(make_hf("bert")).double().eval()
    structure = ModelStructure.from_spec(full.spec)
    expected = {"head": torch.zeros(structure.num_layers, structure.max_heads, dtype=torch.float64),
                "neuron": torch.zeros(structure.num_layers, structure.max_ffn, dtype=torch.float64)}
    eps = 1e-5
    for i in range(4):
        example = {k: v[i:i + 1] for k, v in data.items()}
        length = int(example["attention_mask"].sum())
        example = {k: v[:, :length] if v.ndim == 2 else v for k, v in example.items()}
        for name, table in expected.items():
            for index in itertools.product(*map(range, table.shape)):
                gates = {n: torch.ones_like(t) for n, t in expected.items()}
                gates[name][index] += eps
                up = _example_loss(full, example, gates)
                gates[name][index] -= 2 * eps
                down = _example_loss(full, example, gates)
                table[index] += ((up - down) / (2 * eps)) ** 2
    for name in expected:
        torch.testing.assert_close(fisher[name], expected[name], rtol=2e-3, atol=1e-9)


def _micro():
    config = BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=3, max_position_embeddings=16, num_labels=2)
    torch.manual_seed(0)
    full = from_hf(BertForSequenceClassification(config).eval())
    return ModelStructure.from_spec(full.spec), full.spec


@pytest.mark.parametrize("target", [0.2, 0.45, 0.7])
def test_search_is_optimal_against_every_subset(target):
    """Kwon's search keeps the largest Fisher sum among *all* masks that meet the budget."""
    structure, spec = _micro()
    g = torch.Generator().manual_seed(int(target * 100))
    fisher = {"head": torch.rand(2, 2, generator=g, dtype=torch.float64),
              "neuron": torch.rand(2, 3, generator=g, dtype=torch.float64) * 0.3}
    budget = Budget(target, "flops", seq_len=16)
    masks = search_masks(structure, spec, fisher, budget)
    dense = count_flops(structure, spec, 16)

    def value(m: MaskSet) -> float:
        return float((fisher["head"] * m.masks["head"]).sum() + (fisher["neuron"] * m.masks["neuron"]).sum())

    def reduction(m: MaskSet) -> float:
        return 1 - count_flops(m.resolve(structure), spec, 16) / dense

    best = -1.0
    for bits in itertools.product((0.0, 1.0), repeat=10):
        candidate = MaskSet({"head": torch.tensor(bits[:4]).view(2, 2), "neuron": torch.tensor(bits[4:]).view(2, 3)})
        if reduction(candidate) >= target:
            best = max(best, value(candidate))
    assert reduction(masks) >= target
    assert value(masks) == pytest.approx(best)


def test_search_meets_flops_budget_exactly_on_a_real_shape():
    hf = make_hf("bert")
    full = from_hf(hf)
    structure = ModelStructure.from_spec(full.spec)
    g = torch.Generator().manual_seed(0)
    fisher = {"head": torch.rand(3, 6, generator=g, dtype=torch.float64),
              "neuron": torch.rand(3, 40, generator=g, dtype=torch.float64)}
    dense = count_flops(structure, full.spec, 128)
    S, D, hd = 128, structure.hidden_size, structure.head_dim
    head_share = 2 * (4 * S * D * hd + 2 * S * S * hd) / dense  # q, k, v, o rows + scores and context
    # Overshoot: less than one unit; a head when every neuron left is worth keeping.
    for target in (0.3, 0.4, 0.5, 0.7):
        masks = search_masks(structure, full.spec, fisher, Budget(target, "flops"), min_heads=1, min_neurons=1)
        achieved = 1 - count_flops(masks.resolve(structure), full.spec, 128) / dense
        assert target <= achieved < target + head_share
        assert (masks.masks["head"].sum(1) >= 1).all() and (masks.masks["neuron"].sum(1) >= 1).all()


def test_rearrangement_prefers_units_whose_gradients_cancel():
    """Units 0 and 1 have large opposite gradients: removing both costs nothing to first order,
    though their diagonal Fisher is the largest. Removing 3 of 4 units, the lowest-Fisher start
    takes only one of them (summed-gradient norm^2 > 10); rearrangement removes both (norm^2 0.77)."""
    grads = torch.tensor([[3.0, -3.0, 0.5, 0.4], [2.0, -2.0, 0.6, 0.5], [-1.0, 1.0, 0.4, 0.6]]).unsqueeze(1)
    start = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    out = rearrange(start, grads)
    assert out[0, 0] == 0 and out[0, 1] == 0 and int(out.sum()) == 1
    norm = float(grads[:, 0, out[0] == 0].sum(1).pow(2).sum())
    assert norm == pytest.approx(0.77)


def test_rearrangement_keeps_counts_and_never_raises_the_norm():
    g = torch.Generator().manual_seed(1)
    grads = torch.randn(16, 3, 12, generator=g)
    fisher = grads.pow(2).sum(0)
    mask = torch.ones(3, 12)
    for i, k in enumerate((3, 6, 0)):
        mask[i, fisher[i].argsort()[:k]] = 0
    out = rearrange(mask, grads)
    assert torch.equal(out.sum(1), mask.sum(1))
    for i in range(3):
        norm = lambda m: float(grads[:, i, m[i] == 0].sum(1).pow(2).sum())  # noqa: E731
        assert norm(out) <= norm(mask) + 1e-9


def test_lsmr_iteration_cap_lets_small_systems_converge():
    """A 2-unit system that SciPy's default cap (min(m, n) = 2 iterations) leaves unsolved."""
    rng = np.random.default_rng(0)
    for _ in range(50):
        a = rng.normal(size=(50, 2))
        a[:, 0] *= 1e3
        ata, rhs = a.T @ a, rng.normal(size=2) * 1e3
        if lsmr(ata, rhs, damp=1.0, maxiter=2)[1] == 7:
            break
    else:
        pytest.fail("no test system needed more than min(m, n) iterations")
    system = _System(torch.from_numpy(ata), torch.from_numpy(rhs + ata @ np.ones(2)))
    scales, istop, itn, ok = _solve(system, damping=1.0, max_scale=1e9)
    assert ok and istop in (1, 2) and itn > 2
    damped = np.linalg.solve(ata.T @ ata + np.eye(2), ata.T @ rhs)  # min |ata d - rhs|^2 + |d|^2
    np.testing.assert_allclose(scales.numpy() - 1, damped, rtol=1e-4, atol=1e-6)


def _hidden_error(hf, masks, data) -> float:
    dense = MaskedModel(hf).eval()
    pruned = MaskedModel(hf, masks).eval()
    inputs = {k: v for k, v in data.items() if k != "labels"}
    with torch.no_grad():
        a = dense(**inputs, output_hidden_states=True).hidden_states[-1]
        b = pruned(**inputs, output_hidden_states=True).hidden_states[-1]
    return float((a - b)[:, 0].pow(2).sum())  # the last layer is fit on the token the classifier reads


def test_mask_tuning_runs_on_every_layer_and_lowers_the_error():
    hf = make_hf("bert")
    data = _data(hf, n=24)
    # The tiny model's normal equations are O(1), so the default damping of 1 would hold the scales
    # near 1 (a real model's are O(1e5)); a small damping lets the end-to-end check below see the fit.
    result = get_method("fisher")(hf, data, Budget(0.4, "flops", seq_len=16), grad_batch_size=8, damping=1e-3)
    fits = result.log["tuning"]
    layers = ModelStructure.from_spec(from_hf(hf).spec).num_layers
    assert [(f["layer"], f["sublayer"]) for f in fits] == [(i, s) for i in range(layers) for s in ("attention", "ffn")]
    for fit in fits:
        assert fit["applied"] and fit["lsmr_istop"] in (1, 2)
        assert fit["error_after"] < fit["error_before"]
    untuned = MaskSet(result.masks.masks)
    assert _hidden_error(hf, result.masks, data) < _hidden_error(hf, untuned, data)


def test_compact_folds_tuned_scales():
    hf = make_hf("bert")
    data = _data(hf, n=12)
    result = get_method("fisher")(hf, data, Budget(0.5, "flops", seq_len=16), grad_batch_size=6,
                                  teacher="intermediate")
    assert result.masks.scales
    inputs = make_inputs(hf, batch=3, seq=11, seed=5)
    with torch.no_grad():
        expected = MaskedModel(hf, result.masks).eval()(**inputs).logits
        got = compact(hf, result.masks).eval()(**inputs).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_fisher_pseudo_labels_need_no_labels_and_weights_stay():
    hf = make_hf("bert")
    before = {k: v.clone() for k, v in hf.state_dict().items()}
    data = {k: v for k, v in _data(hf).items() if k != "labels"}
    result = get_method("fisher")(hf, data, Budget(0.3, "flops", seq_len=16), objective="pseudo", tune=False)
    assert 0.3 <= result.log["achieved"] < 0.31
    assert all(torch.equal(before[k], v) for k, v in hf.state_dict().items())


def test_grouped_query_attention_uses_exact_greedy_selection():
    hf = make_hf("llama")
    result = get_method("fisher")(hf, _data(hf), Budget(0.3, "flops", seq_len=16), grad_batch_size=4)
    assert 0.3 <= result.log["achieved"] <= 0.31
    assert all(fit["applied"] for fit in result.log["tuning"])
    structure = ModelStructure.from_spec(from_hf(hf).spec)
    with pytest.raises(ValueError, match="grouped-query"):
        search_masks(structure, from_hf(hf).spec, result.log["fisher"], Budget(0.3, "flops"))


def test_fisher_clear_errors():
    hf = make_hf("bert")
    with pytest.raises(ValueError, match="teacher"):
        get_method("fisher")(hf, _data(hf), Budget(0.3, "flops"), teacher="oracle")
    with pytest.raises(ValueError, match="supervised"):
        get_method("fisher")(hf, _data(hf), Budget(0.3, "flops"), objective="entropy")
