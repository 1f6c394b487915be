"""``sprint``: whole sublayers go one per round by loss per latency saved, tunability probes restore the weights, the
kept tuning is returned, and the masks with those weights compact to the model the search evaluated."""

from __future__ import annotations

import pytest
import torch

from structprune.arch import from_hf
from structprune.budget import Budget
from structprune.compaction import compact
from structprune.masked_model import MaskedModel
from structprune.maskset import MaskSet
from structprune.methods import get_method
from structprune.methods.block_influence import influences, sublayer_masks
from structprune.methods.sprint import calibration_loss
from tests.conftest import make_causal


def _data(vocab: int, n: int = 4, seq: int = 12) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, vocab, (n, seq), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def test_without_tuning_the_least_loss_per_latency_saved_goes_first():
    hf = make_causal("llama")
    with torch.no_grad():
        hf.model.layers[1].mlp.down_proj.weight.zero_()
    data = _data(hf.config.vocab_size)
    result = get_method("sprint")(hf, data, Budget(0.2), probe_steps=0, tune_steps=0)
    assert result.log["tuning_steps"] == 0 and result.log["achieved"] >= 0.2
    full = from_hf(hf)
    structure = MaskedModel(full).structure
    costs = Budget(0.2).cost_model(structure, full.spec)
    base = calibration_loss(MaskedModel(full).eval(), [data])
    keys = {}
    for name in ("attn_layer", "ffn_layer"):
        for i in range(structure.num_layers):
            masks = MaskSet(sublayer_masks({(name, i)}, structure.num_layers))
            loss = calibration_loss(MaskedModel(full, masks).eval(), [data])
            keys[f"{name}[{i}]"] = (loss - base) / costs.reduction(masks.resolve(structure))
    assert keys["ffn_layer[1]"] == pytest.approx(0.0, abs=1e-6)  # a sublayer that adds nothing costs no loss
    assert result.log["removed"][0]["removed"] == min(keys, key=keys.get)
    dense = full.state_dict()
    assert all(torch.equal(dense[k], v) for k, v in result.weights.items())  # no tuning: weights unchanged


def test_tuning_is_kept_probes_are_not_and_the_weights_compact_to_the_searched_model():
    hf = make_causal("qwen2")
    data = _data(hf.config.vocab_size)
    result = get_method("sprint")(hf, data, Budget(0.3), candidates=2, probe_steps=2, tune_steps=3, lr=1e-3,
                                  batch_size=2, max_examples=4)
    rounds = len(result.log["removed"])
    assert result.log["tuning_steps"] == rounds * (2 * 2 + 3)
    assert all(len(r["probed"]) == 2 and r["removed"] in r["probed"] for r in result.log["removed"])
    full = from_hf(hf)
    full.load_state_dict(result.weights)
    masked = MaskedModel(full, result.masks).eval()
    assert calibration_loss(masked, [data]) == pytest.approx(result.log["removed"][-1]["tuned_loss"], rel=1e-5)
    with torch.no_grad():
        small = compact(full, result.masks).eval()
        torch.testing.assert_close(small(data["input_ids"]).logits, masked(data["input_ids"]).logits, atol=1e-4,
                                   rtol=1e-4)


def test_bad_settings_are_refused():
    hf = make_causal("llama")
    data = _data(hf.config.vocab_size)
    with pytest.raises(ValueError, match="candidates"):
        get_method("sprint")(hf, data, Budget(0.2), candidates=0)
    with pytest.raises(ValueError, match="every sublayer"):
        get_method("sprint")(hf, data, Budget(0.99), probe_steps=0, tune_steps=0)
    with pytest.raises(ValueError, match="calibration data"):
        get_method("sprint")(hf, None, Budget(0.2))


def test_a_shortlist_measures_the_loss_of_the_lowest_influence_per_latency_saved_only():
    hf = make_causal("llama")
    data = _data(hf.config.vocab_size)
    every = get_method("sprint")(hf, data, Budget(0.3), probe_steps=0, tune_steps=0, shortlist=0)
    wide = get_method("sprint")(hf, data, Budget(0.3), probe_steps=0, tune_steps=0, shortlist=100)
    assert every.log["removed"] == wide.log["removed"]
    one = get_method("sprint")(hf, data, Budget(0.3), probe_steps=0, tune_steps=0, shortlist=1)
    full = from_hf(hf)
    structure = MaskedModel(full).structure
    costs = Budget(0.3).cost_model(structure, full.spec)
    scores = influences(full, [data], sublayer_masks(set(), structure.num_layers))
    saved = {(name, i): costs.reduction(MaskSet(sublayer_masks({(name, i)}, structure.num_layers)).resolve(structure))
             for name in ("attn_layer", "ffn_layer") for i in range(structure.num_layers)}
    first = min(saved, key=lambda u: (float(scores[u[0]][u[1]]) / saved[u], u[1], u[0]))
    assert one.log["removed"][0]["removed"] == f"{first[0]}[{first[1]}]"
    with pytest.raises(ValueError, match="shortlist"):
        get_method("sprint")(hf, data, Budget(0.3), shortlist=-1)
