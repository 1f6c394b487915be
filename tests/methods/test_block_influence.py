"""``block_influence`` (ShortGPT): the influence is 1 - cos(stream in, stream out), the least influential blocks go
first until the budget is met, and a budget that would remove every block is refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from structprune.arch import from_hf
from structprune.budget import Budget
from structprune.compaction import compact
from structprune.masked_model import MaskedModel
from structprune.methods import get_method
from structprune.methods.block_influence import influences
from tests.conftest import make_causal


def _data(vocab: int, n: int = 8, seq: int = 12) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, vocab, (n, seq), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def test_influence_is_one_minus_the_cosine_of_the_stream():
    model = from_hf(make_causal("qwen2")).eval()
    data = _data(model.spec["vocab_size"], n=2)
    ones = {name: torch.ones(len(model.layers)) for name in ("attn_layer", "ffn_layer")}
    scores = influences(model, [data], ones)
    with torch.no_grad():
        states = model.backbone(data["input_ids"], data["attention_mask"])[1]
    expected = (1 - F.cosine_similarity(states[1], states[2], dim=-1)).mean()
    assert scores["layer"][1] == pytest.approx(float(expected), rel=1e-5)


def test_a_block_that_changes_nothing_goes_first_and_the_budget_is_met():
    hf = make_causal("llama")
    with torch.no_grad():  # layer 1 adds nothing to the residual stream
        hf.model.layers[1].self_attn.o_proj.weight.zero_()
        hf.model.layers[1].mlp.down_proj.weight.zero_()
    data = _data(hf.config.vocab_size)
    result = get_method("block_influence")(hf, data, Budget(0.3), granularity="layer")
    assert result.log["removed"][0]["removed"] == ["attn_layer[1]", "ffn_layer[1]"]
    assert result.log["removed"][0]["influence"] == pytest.approx(0.0, abs=1e-6)
    assert result.log["achieved"] >= 0.3
    small = compact(MaskedModel(hf), result.masks)
    assert small.layers[1].attn is None and small.layers[1].ffn is None
    sub = get_method("block_influence")(hf, data, Budget(0.2), granularity="sublayer", iterative=True)
    assert {tuple(r["removed"]) for r in sub.log["removed"][:2]} == {("attn_layer[1]",), ("ffn_layer[1]",)}


def test_bad_settings_are_refused():
    hf = make_causal("llama")
    data = _data(hf.config.vocab_size)
    with pytest.raises(ValueError, match="would remove every layer"):
        get_method("block_influence")(hf, data, Budget(0.9))
    with pytest.raises(ValueError, match="granularity 'heads'"):
        get_method("block_influence")(hf, data, Budget(0.3), granularity="heads")
    with pytest.raises(ValueError, match="needs calibration data"):
        get_method("block_influence")(hf, None, Budget(0.3))
