"""Hard-concrete gates: sampling law, mask extraction onto the target, aligned to ``multiple_of`` (expected costs:
tests/test_costs.py)."""

from __future__ import annotations

import functools
import hashlib
import math

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

from structprune.arch import from_hf
from structprune.arch.structure import ModelStructure
from structprune.compaction import compact
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


@functools.cache
def _aligned_model(arch: str) -> tuple[ModelStructure, dict]:
    """Structure and spec fine enough for chunks of 8 to land within 1%: 4 layers, hidden 128, 8 heads of 16,
    FFN 512 (bert) or gated FFN 384 with grouped-query attention (llama)."""
    if arch == "bert":
        config = BertConfig(vocab_size=16, hidden_size=128, num_hidden_layers=4, num_attention_heads=8,
                            intermediate_size=512, max_position_embeddings=16)
        hf = BertForSequenceClassification(config)
    else:
        config = LlamaConfig(vocab_size=16, hidden_size=128, num_hidden_layers=4, num_attention_heads=8,
                             num_key_value_heads=4, intermediate_size=384, max_position_embeddings=16, pad_token_id=0)
        hf = LlamaForSequenceClassification(config)
    spec = from_hf(hf).spec
    return ModelStructure.from_spec(spec), spec


def _random_gates(structure: ModelStructure, seed: int, names=MASK_NAMES) -> HardConcreteGates:
    gates = HardConcreteGates(structure, names)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in gates.log_alpha.values():
            a.copy_(torch.randn(a.shape, generator=g) * 2)
    return gates


def _kept_widths(masks, structure: ModelStructure, spec: dict) -> tuple[list[int], int]:
    summary = masks.summary(structure, spec, seq_len=32)
    return [layer["ffn"] for layer in summary["layers"]], summary["hidden"]


@pytest.mark.parametrize("target", [0.3, 0.5, 0.7, 0.9])
@pytest.mark.parametrize("kind", ["params", "flops"])
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_aligned_extraction_keeps_multiples_of_the_largest_log_alpha_on_the_budget(arch, kind, target):
    structure, spec = _aligned_model(arch)
    gates = _random_gates(structure, seed=round(target * 10))
    masks = gates.extract(spec, target, kind, seq_len=32, multiple_of=8)
    widths, hidden = _kept_widths(masks, structure, spec)
    assert all(width % 8 == 0 for width in widths) and hidden % 8 == 0 and hidden >= 8, (widths, hidden)
    summary = masks.summary(structure, spec, seq_len=32)
    assert abs(summary["param_sparsity" if kind == "params" else "flops_reduction"] - target) <= 0.01
    rows = [(gates.log_alpha["neuron"][i], masks.masks["neuron"][i]) for i in range(structure.num_layers)]
    for log_alpha, kept in [*rows, (gates.log_alpha["hidden"], masks.masks["hidden"])]:
        if 0 < kept.sum() < len(kept):  # the kept units are those with the largest log_alpha
            assert log_alpha[kept == 1].min() > log_alpha[kept == 0].max()
    plain_widths, plain_hidden = _kept_widths(gates.extract(spec, target, kind, seq_len=32), structure, spec)
    assert any(width % 8 for width in [*plain_widths, plain_hidden])  # unaligned without multiple_of


def _digest(masks) -> str:
    h = hashlib.sha256()
    for name in sorted(masks.masks):
        h.update(name.encode())
        h.update(masks.masks[name].to(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


@pytest.mark.parametrize("arch,seed,kind,target,digest", [
    ("bert", 0, "params", 0.3, "02dcb933dd57263d"),
    ("bert", 0, "flops", 0.7, "8fd8032ee746977b"),
    ("bert", 2, "params", 0.9, "22275d39ccf359a8"),
    ("llama", 1, "params", 0.5, "8237d888d4371fc8"),
    ("llama", 2, "flops", 0.3, "1c258e5ce1674ce8"),
    ("bert", None, "params", 0.3, "048451aac6c5b7e7"),
    ("llama", None, "params", 0.4, "0f856cf8acaec2eb"),
])
def test_multiple_of_one_gives_the_masks_of_the_plain_rule(arch, seed, kind, target, digest):
    """Digests of the plain rule's masks, which ``multiple_of=1`` keeps bit for bit (seed None: the tied gates of an
    unpolarised start, which the repair flips by index)."""
    structure, spec = _model(arch)
    if seed is None:
        gates = HardConcreteGates(structure, ("head", "neuron"), init_log_alpha=0.0)
    else:
        gates = _random_gates(structure, seed)
    assert _digest(gates.extract(spec, target, kind, 16, 0.005, multiple_of=1)) == digest


def test_aligned_rounding_takes_the_nearest_allowed_count():
    """FFN 40, hidden 48. Chunks of 8: 3 expected neurons -> none, 5 -> 8, 37 -> 40; 2 hidden dims -> one chunk.
    Chunks of 16 (40 is no multiple): 37 -> the whole 40, 34 -> 32."""
    structure, _ = _model("bert")
    gates = HardConcreteGates(structure, ("neuron", "hidden"))

    def kept(neurons: tuple[int, ...], hidden: int, multiple_of: int) -> list[int]:
        with torch.no_grad():  # keep probabilities 0 or 1: the expected counts are the given ones
            for name, counts in (("neuron", neurons), ("hidden", (hidden,))):
                rows = gates.log_alpha[name].view(len(counts), -1)
                rows.fill_(-30.0)
                for row, count in zip(rows, counts):
                    row[:count] = 30.0
        masks = gates.rounded_masks(multiple_of=multiple_of).masks
        return [*masks["neuron"].sum(1).long().tolist(), int(masks["hidden"].sum())]

    assert kept((3, 5, 37), 2, 1) == [3, 5, 37, 2]
    assert kept((3, 5, 37), 2, 8) == [0, 8, 40, 8]
    assert kept((3, 12, 37), 2, 16) == [0, 16, 40, 16]
    assert kept((3, 12, 34), 2, 16) == [0, 16, 32, 16]


def test_bad_multiple_of_is_refused():
    structure, spec = _model("bert")  # FFN 40, hidden 48
    gates = HardConcreteGates(structure)
    for bad in (0, 41, 2.0, True):
        with pytest.raises(ValueError, match=r"multiple_of must be a whole number between 1 and 40 \(the widest FFN "
                                             r"has 40 neurons, the hidden size is 48\)"):
            gates.extract(spec, 0.5, multiple_of=bad)


def test_aligned_masks_compact_to_aligned_widths():
    hf = BertForSequenceClassification(BertConfig(vocab_size=16, hidden_size=64, num_hidden_layers=2,
                                                  num_attention_heads=4, intermediate_size=96,
                                                  max_position_embeddings=16)).eval()
    full = from_hf(hf)
    structure = ModelStructure.from_spec(full.spec)
    masks = _random_gates(structure, seed=1).extract(full.spec, 0.5, multiple_of=16)
    small = ModelStructure.from_spec(compact(full, masks).spec)
    assert small.hidden_size % 16 == 0 and small.hidden_size < 64
    assert all(layer.ffn % 16 == 0 for layer in small.layers) and any(0 < layer.ffn < 96 for layer in small.layers)


def test_a_chunk_jumping_over_the_band_is_made_up_by_later_passes():
    """Tiny BERT (hidden 48): at this shift the masks are too sparse with 40 hidden dims and too dense with 48; the
    first pass adds the hidden chunk, the next one removes neurons."""
    structure, spec = _model("bert")
    masks = _random_gates(structure, seed=6).extract(spec, 0.3, multiple_of=8)
    summary = masks.summary(structure, spec)
    assert summary["hidden"] == 48 and abs(summary["param_sparsity"] - 0.3) <= 0.01
