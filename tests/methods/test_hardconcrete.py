"""Hard-concrete gates: sampling law, mask extraction onto the target (expected costs: tests/test_costs.py)."""

from __future__ import annotations

import math

import pytest
import torch

from structprune.costs import count_params
from structprune.maskset import MASK_NAMES
from structprune.methods.hardconcrete import HardConcreteGates, max_sparsity
from tests.test_costs import structure_and_spec as _model

def test_samples_follow_the_hard_concrete_law():
    structure, _ = _model("bert")
    gates = HardConcreteGates(structure, ("head", "neuron"), init_log_alpha=0.0)
    with torch.no_grad():
        gates.log_alpha["neuron"].copy_(torch.linspace(-3, 3, gates.log_alpha["neuron"].numel()).view_as(
            gates.log_alpha["neuron"]))
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([gates.sample(g)["neuron"].detach() for _ in range(4000)])
    assert draws.min() == 0.0 and draws.max() == 1.0  # exact zeros and ones occur (stretched, clamped)
    nonzero = (draws > 0).double().mean(0)
    p = gates.keep_probabilities()["neuron"].detach().double()
    assert torch.allclose(nonzero, p, atol=4 * math.sqrt(0.25 / 4000))


def test_sampling_is_differentiable_and_reproducible():
    structure, _ = _model("bert")
    gates = HardConcreteGates(structure)
    first = gates.sample(torch.Generator().manual_seed(7))
    second = gates.sample(torch.Generator().manual_seed(7))
    assert all(torch.equal(first[n], second[n]) for n in first)
    sum(z.sum() for z in first.values()).backward()
    assert all(gates.log_alpha[n].grad is not None and gates.log_alpha[n].grad.abs().sum() > 0 for n in MASK_NAMES)


def test_rounded_masks_keep_the_expected_count_of_the_largest_log_alpha():
    structure, _ = _model("bert")
    gates = HardConcreteGates(structure, ("head", "hidden"))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for a in gates.log_alpha.values():
            a.copy_(torch.randn(a.shape, generator=g) * 3)
    masks = gates.rounded_masks()
    probs = gates.keep_probabilities()
    for layer in range(structure.num_layers):
        row, kept = gates.log_alpha["head"][layer].detach(), masks.masks["head"][layer]
        assert int(kept.sum()) == round(float(probs["head"][layer].detach().sum()))
        if 0 < kept.sum() < len(kept):
            assert row[kept == 1].min() > row[kept == 0].max()
    assert int(masks.masks["hidden"].sum()) == round(float(probs["hidden"].detach().sum()))
    assert set(masks.masks) == {"head", "hidden"}


@pytest.mark.parametrize("target", [0.3, 0.4])
def test_extraction_shifts_unpolarised_gates_onto_the_target(target):
    """Gates that have not polarised (P(keep) 0.83 everywhere): rounding alone misses, the shift lands in band."""
    structure, spec = _model("bert")
    gates = HardConcreteGates(structure, ("head", "neuron"), init_log_alpha=0.0)
    rounded = gates.rounded_masks().summary(structure, spec)["param_sparsity"]
    assert abs(rounded - target) > 0.05
    masks = gates.extract(spec, target, tolerance=0.005)
    achieved = masks.summary(structure, spec)["param_sparsity"]
    assert abs(achieved - target) <= 0.005
    assert torch.equal(masks.masks["neuron"], gates.extract(spec, target, tolerance=0.005).masks["neuron"])


@pytest.mark.parametrize("target", [0.2, 0.6])
def test_projection_shifts_every_gate_onto_the_expected_target(target):
    structure, spec = _model("bert")
    gates = HardConcreteGates(structure, ("head", "neuron", "hidden"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for a in gates.log_alpha.values():
            a.copy_(torch.randn(a.shape, generator=g) * 2)
    before = {name: a.detach().clone() for name, a in gates.log_alpha.items()}
    dense = count_params(structure, spec)

    def reduction(shift: float) -> float:
        return float(1 - gates.expected_cost(spec, 16, shift)[0] / dense)

    shift = gates.project(reduction, target)
    assert reduction(0.0) == pytest.approx(target, abs=1e-5)
    for name, a in gates.log_alpha.items():  # one shift for all: the order of the gates is kept
        assert torch.allclose(a.detach(), before[name] + shift, atol=1e-5)


def test_flops_budget_extraction_counts_flops():
    structure, spec = _model("llama")
    gates = HardConcreteGates(structure, ("head", "neuron"), init_log_alpha=0.5)
    masks = gates.extract(spec, 0.4, kind="flops", seq_len=32, tolerance=0.01)
    assert abs(masks.summary(structure, spec, seq_len=32)["flops_reduction"] - 0.4) <= 0.01


def test_max_sparsity_of_a_granularity_subset():
    structure, spec = _model("bert")
    dense = count_params(structure, spec)
    attention = sum(4 * layer.heads * structure.head_dim * structure.hidden_size + 4 * structure.hidden_size
                    for layer in structure.layers)  # q, k, v, o weights and biases
    assert max_sparsity(structure, spec, ("head",)) == pytest.approx(attention / dense)
    assert max_sparsity(structure, spec, ("attn_layer", "ffn_layer")) == pytest.approx(1.0)
    assert max_sparsity(structure, spec, ("hidden",)) > 0.95


def test_unknown_granularity_is_refused():
    structure, _ = _model("bert")
    with pytest.raises(ValueError, match="subset of"):
        HardConcreteGates(structure, ("heads",))
