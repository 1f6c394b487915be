"""``multiple_of``: kept FFN widths are multiples of N, chunks go least important first, the budget is still met."""

from __future__ import annotations

import pytest
import torch

from structprune.arch import ModelStructure, from_hf
from structprune.budget import Budget
from structprune.compaction import compact
from structprune.masked_model import MaskedModel
from structprune.methods import get_method
from structprune.methods.selection import aligned_chunks, select_units
from tests.conftest import make_causal


def _scores(structure: ModelStructure, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"head": torch.rand(structure.num_layers, structure.max_heads, generator=g),
            "neuron": torch.rand(structure.num_layers, structure.max_ffn, generator=g)}


@pytest.mark.parametrize("multiple_of", [4, 8, 13])
@pytest.mark.parametrize("target", [0.2, 0.5])
def test_kept_widths_are_aligned_and_the_budget_is_met(multiple_of, target):
    full = from_hf(make_causal("qwen2"))  # FFN 56: 13 leaves a remainder chunk of 4
    structure = ModelStructure.from_spec(full.spec)
    scores = _scores(structure)
    masks = select_units(structure, full.spec, scores, Budget(target), multiple_of=multiple_of)
    kept = masks.masks["neuron"].sum(dim=1).long().tolist()
    assert all(width % multiple_of == 0 for width in kept), kept
    summary = masks.summary(structure, full.spec)
    assert target <= summary["param_sparsity"] <= target + 0.01 + multiple_of * 3 * 32 / summary["params_dense"]
    for i, width in enumerate(kept):  # within a layer the least important neurons went
        removed = scores["neuron"][i][masks.masks["neuron"][i] == 0]
        if len(removed) and width:
            assert removed.max() <= scores["neuron"][i][masks.masks["neuron"][i] == 1].min()


def test_methods_take_multiple_of_and_compaction_keeps_the_alignment():
    hf = make_causal("llama")
    ids = torch.randint(3, 100, (8, 12), generator=torch.Generator().manual_seed(0))
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    for method in ("magnitude", "taylor", "fisher"):
        result = get_method(method)(hf, data, Budget(0.3), multiple_of=8)
        small = compact(MaskedModel(hf), result.masks)
        widths = [layer.ffn.up.out_features for layer in small.layers if layer.ffn is not None]
        assert all(width % 8 == 0 for width in widths), (method, widths)
        assert result.masks.meta["options"]["multiple_of"] == 8


def test_multiple_of_wider_than_every_layer_is_refused():
    full = from_hf(make_causal("llama"))
    structure = ModelStructure.from_spec(full.spec)
    with pytest.raises(ValueError, match="multiple_of must be between 1 and the widest FFN"):
        select_units(structure, full.spec, _scores(structure), Budget(0.3), multiple_of=41)


def test_aligned_chunks_put_the_remainder_first():
    assert aligned_chunks(list(range(10)), 4) == [(0, 1), (2, 3, 4, 5), (6, 7, 8, 9)]
    assert aligned_chunks([5, 3, 1, 0], 2) == [(5, 3), (1, 0)]
    assert aligned_chunks([7, 8], 1) == [(7,), (8,)] and aligned_chunks([], 4) == []
