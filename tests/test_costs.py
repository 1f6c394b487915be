"""The cost model: parameter and FLOPs counts against hand counts, their expectation under keep probabilities
against the counts of sampled masks, and the FLOPs-ideal speedup."""

from __future__ import annotations

import math

import pytest
import torch

from structprune.arch import from_hf
from structprune.arch.structure import LayerStructure, ModelStructure
from structprune.costs import (
    count_flops,
    count_params,
    decode_bytes,
    decode_ideal_speedup,
    expected_cost,
    flops_ideal_speedup,
    kv_cache_bytes,
    prefill_flops,
    prefill_ideal_speedup,
)
from structprune.maskset import MaskSet, mask_shapes
from tests.conftest import make_hf

SPEC = {"qkv_bias": True, "o_bias": True, "ffn_bias": True}


def _tiny(heads=2, kv=2, ffn=3, gated=False) -> ModelStructure:
    kv_map = None if heads == kv else tuple(h // (heads // kv) for h in range(heads))
    return ModelStructure("bert", "bert", hidden_size=4, head_dim=2, gated_ffn=gated,
                          layers=(LayerStructure(heads, kv, kv_map, ffn),))


def test_flops_match_a_hand_count():
    # seq 5, hidden 4, 2 heads of dim 2, FFN 3:
    # q,k,v,o projections 4 * 5*4*4 = 320 MACs; scores + context 2 * 5*5*4 = 200; FFN 2 * 5*4*3 = 120
    assert count_flops(_tiny(), SPEC, seq_len=5) == 2 * (320 + 200 + 120)
    # GQA: 2 query heads share 1 kv head: q,o 2*5*4*4 = 160, k,v 2*5*4*2 = 80; scores 200; gated FFN 3*5*4*3 = 180
    assert count_flops(_tiny(kv=1, gated=True), SPEC, seq_len=5) == 2 * (160 + 80 + 200 + 180)


def test_params_match_a_hand_count():
    # attention: 4 matrices 4x4 + biases 3*4 + 4 = 80; FFN: 2 matrices 3x4 + biases 3 + 4 = 31
    assert count_params(_tiny(), SPEC) == 111
    assert count_params(_tiny(ffn=0, heads=0, kv=0), SPEC) == 0


SEQ = 16


def structure_and_spec(arch: str) -> tuple[ModelStructure, dict]:
    """The structure and spec of a tiny random model of ``arch``."""
    model = from_hf(make_hf(arch))
    return ModelStructure.from_spec(model.spec), model.spec


def _counts(masks: MaskSet, structure: ModelStructure, spec: dict) -> tuple[int, int]:
    pruned = masks.resolve(structure)
    return count_params(pruned, spec), count_flops(pruned, spec, SEQ)


@pytest.mark.parametrize("arch", ["bert", "electra", "llama", "mistral"])
def test_expected_cost_of_binary_probabilities_is_the_compaction_count(arch):
    structure, spec = structure_and_spec(arch)
    g = torch.Generator().manual_seed(0)
    shapes = mask_shapes(structure)
    for trial in range(25):
        keep = 0.2 + 0.8 * trial / 25  # from mostly removed to mostly kept
        masks = {name: (torch.rand(shape, generator=g) < keep).double() for name, shape in shapes.items()}
        masks["hidden"][0] = 1.0
        params, flops = expected_cost(structure, spec, masks, SEQ)
        assert (round(float(params)), round(float(flops))) == _counts(MaskSet(masks), structure, spec)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_expected_cost_equals_the_monte_carlo_mean(arch):
    """Independent Bernoulli masks with the gates' keep probabilities: the mean count converges to it."""
    structure, spec = structure_and_spec(arch)
    g = torch.Generator().manual_seed(1)
    shapes = mask_shapes(structure)
    probs = {name: 0.3 + 0.65 * torch.rand(shape, generator=g, dtype=torch.float64) for name, shape in shapes.items()}
    probs["hidden"].clamp_(min=0.8)  # an all-zero hidden mask is invalid; make it vanishingly rare
    samples = torch.tensor([_counts(MaskSet({n: (torch.rand(p.shape, generator=g, dtype=torch.float64) < p).float()
                                            for n, p in probs.items()}), structure, spec) for _ in range(1500)],
                           dtype=torch.float64)
    expected = torch.stack(expected_cost(structure, spec, probs, SEQ))
    standard_error = samples.std(0) / math.sqrt(len(samples))
    assert torch.all((samples.mean(0) - expected).abs() < 4 * standard_error)


def _structure(layers: list[tuple[int, int]]) -> ModelStructure:
    return ModelStructure("bert", "bert", hidden_size=8, head_dim=2, gated_ffn=False,
                          layers=tuple(LayerStructure(h, h, None, f) for h, f in layers))


def test_flops_ideal_speedup_matches_hand_count():
    # hidden D=8, head_dim 2, seq S=4. Multiply-adds per layer:
    #   projections S*D*(2q + 2kv), scores + context 2*S*S*q, FFN S*D*F*2 (q = kv = heads*2).
    # dense layer (4 heads, F=16): 4*8*32 + 2*16*8 + 4*8*16*2 = 1024 + 256 + 1024 = 2304; two layers 4608 MACs.
    # pruned layer 0 (2 heads, F=8): 4*8*16 + 2*16*4 + 4*8*8*2 = 512 + 128 + 512 = 1152
    # pruned layer 1 (no attention, F=4): 4*8*4*2 = 256 -> 1408 MACs. FLOPs are 2 x MACs for both.
    dense, pruned = _structure([(4, 16), (4, 16)]), _structure([(2, 8), (0, 4)])
    spec = {"embedding_project": False}
    assert flops_ideal_speedup(dense, pruned, spec, seq_len=4) == pytest.approx(2 * 4608 / (2 * 1408))
    assert flops_ideal_speedup(dense, dense, spec, seq_len=4) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no counted FLOPs"):
        flops_ideal_speedup(dense, _structure([(0, 0), (0, 0)]), spec, seq_len=4)


LM_SPEC = {"qkv_bias": False, "o_bias": False, "ffn_bias": False, "vocab_size": 10}


def _lm(layers: list[tuple[int, int, int]]) -> ModelStructure:
    """Hidden 4, head dim 2, gated FFN; each layer ``(heads, kv_heads, ffn)`` (query heads grouped in pairs)."""
    return ModelStructure("llama", "llama", hidden_size=4, head_dim=2, gated_ffn=True, layers=tuple(
        LayerStructure(h, kv, tuple(i // 2 for i in range(h)) if h != kv else None, f) for h, kv, f in layers))


def test_decode_bytes_match_a_hand_count():
    # one layer, 2 query heads sharing 1 key/value head, gated FFN of 3, vocabulary 10, fp32:
    # weights: q 4x4 + k 4x2 + v 4x2 + o 4x4 = 48, FFN 3 * 3x4 = 36, LM head 10x4 = 40 -> 124 values
    # cache at context 5, batch 2: keys and values of 2 dims for 5 + 1 tokens per sequence: 2*2*6*2 = 48
    structure = _lm([(2, 1, 3)])
    assert kv_cache_bytes(structure, tokens=6, batch=2) == 4 * 48
    assert decode_bytes(structure, LM_SPEC, context=5, batch=2) == 4 * (124 + 48)
    assert decode_bytes(structure, LM_SPEC, context=5, batch=2, bytes_per_value=2) == 2 * (124 + 48)
    # a layer without attention keeps no cache and reads no attention weights: FFN 36 + LM head 40
    assert decode_bytes(_lm([(0, 0, 3)]), LM_SPEC, context=5, batch=2) == 4 * 76


def test_decode_ideal_speedup_weighs_weights_once_and_the_cache_per_sequence():
    dense, pruned = _lm([(2, 1, 3), (2, 1, 3)]), _lm([(0, 0, 3), (2, 1, 0)])
    # dense: weights 2 * 84 + 40 = 208, cache 2 layers * 2*2*(context+1)*batch
    # pruned: FFN 36 + attention 48 + LM head 40 = 124, cache 1 layer
    for context, batch in ((5, 1), (5, 8), (100, 8)):
        cache = 2 * 2 * (context + 1) * batch
        assert decode_ideal_speedup(dense, pruned, LM_SPEC, context, batch) == pytest.approx(
            (208 + 2 * cache) / (124 + cache))
    assert decode_ideal_speedup(dense, dense, LM_SPEC, 7, 3) == pytest.approx(1.0)


def test_prefill_flops_add_the_lm_head_of_the_last_position_only():
    structure = _lm([(2, 1, 3)])
    # count_flops at prompt 5: q,o 2*5*4*4 = 160, k,v 2*5*4*2 = 80, scores + context 2*5*5*4 = 200,
    # gated FFN 3*5*4*3 = 180 -> 620 MACs; LM head on one position: 10*4 = 40 MACs
    assert prefill_flops(structure, LM_SPEC, prompt=5) == 2 * (620 + 40)
    pruned = _lm([(0, 0, 3)])
    assert prefill_ideal_speedup(structure, pruned, LM_SPEC, prompt=5) == pytest.approx(660 / (180 + 40))
