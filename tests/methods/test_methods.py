"""Pruning methods: the registry, budgets, and the taylor / magnitude masks on tiny random models."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
)

from structprune.arch import from_hf
from structprune.arch.structure import ModelStructure
from structprune.budget import Budget
from structprune.compaction import compact
from structprune.costs import count_params
from structprune.masked_model import MaskedModel
from structprune.maskset import mask_shapes
from structprune.methods import METHODS, get_method
from structprune.methods.selection import max_reduction, select_units

VOCAB = 100


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32, num_labels=2)
    return BertForSequenceClassification(config).eval()


def tiny_llama() -> LlamaForSequenceClassification:
    """Grouped-query attention: 4 query heads share 2 key/value heads."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=48, pad_token_id=0, num_labels=3)
    return LlamaForSequenceClassification(config).eval()


def encoded_data(num_labels: int, rows: int = 24, seq: int = 10) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, VOCAB, (rows, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[1::2, seq // 2:] = 0
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, num_labels, (rows,), generator=g)}


MODELS = {"bert": tiny_bert, "llama": tiny_llama}


# Unit scorers (heads, neurons); block_influence and sprint remove whole sublayers (their own test files).
SCORING = sorted(name for name in METHODS if name not in ("l0", "transfer", "block_influence", "sprint"))
"""Methods that score units and select them with select_units (l0 and transfer learn their masks:
tests/methods/test_l0.py, tests/transfer/)."""


def run(method: str, model, budget: Budget):
    return get_method(method)(model, encoded_data(model.config.num_labels), budget)


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("method", SCORING)
@pytest.mark.parametrize("budget", [Budget(0.5), Budget(0.3, "flops", seq_len=16), Budget(0.0)],
                         ids=["params-0.5", "flops-0.3", "zero"])
def test_masks_reach_the_budget_and_fit_the_model(arch, method, budget):
    model = MODELS[arch]()
    result = run(method, model, budget)
    structure = ModelStructure.from_spec(from_hf(model).spec)
    shapes = mask_shapes(structure)
    assert {name: tuple(m.shape) for name, m in result.masks.masks.items()} == {
        "head": shapes["head"], "neuron": shapes["neuron"]}
    summary = result.masks.summary(structure, from_hf(model).spec, seq_len=budget.seq_len)
    achieved = budget.achieved(summary)
    assert budget.target <= achieved <= budget.target + 0.01
    assert result.log["achieved"] == pytest.approx(achieved)
    assert all(layer["heads"] >= 1 and layer["ffn"] >= 1 for layer in summary["layers"])
    assert result.masks.meta["method"] == method and result.weights is None


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_masks_compact_to_the_masked_model(arch):
    model = MODELS[arch]()
    masks = run("taylor", model, Budget(0.4)).masks
    data = encoded_data(model.config.num_labels)
    inputs = {k: data[k] for k in ("input_ids", "attention_mask")}
    with torch.inference_mode():
        expected = MaskedModel(model, masks)(**inputs).logits
        got = compact(model, masks).eval()(**inputs).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def _zero_units(model, heads: list[tuple[int, int]], neurons: list[tuple[int, int]]) -> None:
    """Zero every weight of the given heads and neurons, so they contribute exactly nothing."""
    full = from_hf(model)
    hd = full.spec["head_dim"]
    layers = model.bert.encoder.layer
    with torch.no_grad():
        for i, h in heads:
            rows = slice(h * hd, (h + 1) * hd)
            attn = layers[i].attention
            for linear in (attn.self.query, attn.self.key, attn.self.value):
                linear.weight[rows] = 0
                linear.bias[rows] = 0
            attn.output.dense.weight[:, rows] = 0
        for i, j in neurons:
            layers[i].intermediate.dense.weight[j] = 0
            layers[i].intermediate.dense.bias[j] = 0
            layers[i].output.dense.weight[:, j] = 0


# flap and expert standardise scores within each layer (FLAP's adaptive structure), so a dead unit of one layer may
# rank above a live one of another; tests/methods/test_flap.py checks the order within a layer.
@pytest.mark.parametrize("method", [name for name in SCORING if name not in ("flap", "expert")])
def test_useless_units_go_first_and_useful_ones_stay(method):
    """Units whose weights are all zero have zero importance under both methods: exactly they go."""
    model = tiny_bert()
    dead_heads, dead_neurons = [(0, 1), (1, 3)], [(0, j) for j in range(6)] + [(1, 60)]
    _zero_units(model, dead_heads, dead_neurons)
    full = from_hf(model)
    structure = ModelStructure.from_spec(full.spec)
    one_head = 4 * 32 * 8 + 3 * 8  # q, k, v rows and o columns, q/k/v biases (the o bias stays)
    one_neuron = 2 * 32 + 1  # up row and bias, down column
    target = (2 * one_head + 7 * one_neuron) / count_params(structure, full.spec) - 1e-9
    masks = run(method, model, Budget(target)).masks
    removed_heads = {tuple(x) for x in (masks.masks["head"] == 0).nonzero().tolist()}
    removed_neurons = {tuple(x) for x in (masks.masks["neuron"] == 0).nonzero().tolist()}
    assert removed_heads == set(dead_heads)
    assert removed_neurons == set(dead_neurons)


def test_taylor_is_deterministic_and_leaves_the_callers_model_alone():
    full = from_hf(tiny_bert())
    data = encoded_data(2)
    first = get_method("taylor")(full, data, 0.5, calib_batches=2, batch_size=8, seed=3)
    second = get_method("taylor")(full, data, 0.5, calib_batches=2, batch_size=8, seed=3)
    for name in ("head", "neuron"):
        assert torch.equal(first.masks.masks[name], second.masks.masks[name])
        assert torch.equal(first.log["scores"][name], second.log["scores"][name])
    assert all(layer.attn.attention_fn is None and layer.ffn.ffn_fn is None for layer in full.layers)


def test_taylor_score_is_the_gate_gradient():
    """On one batch, the head score equals |dL/dg| computed by hand with a gate of ones."""
    model = tiny_bert()
    data = encoded_data(2, rows=8)
    scores = get_method("taylor")(model, data, 0.2, calib_batches=1, batch_size=8).log["scores"]
    masked = MaskedModel(model).eval()
    gate = torch.ones(2, 4, requires_grad=True)
    loss = masked(data["input_ids"], data["attention_mask"], labels=data["labels"], gates={"head": gate}).loss
    loss.backward()
    torch.testing.assert_close(scores["head"].float(), gate.grad.abs(), rtol=1e-4, atol=1e-7)


def test_gqa_key_value_heads_go_with_their_last_query_head():
    model = tiny_llama()
    full = from_hf(model)
    structure = ModelStructure.from_spec(full.spec)
    scores = {"head": torch.tensor([[0.0, 0.0, 5.0, 5.0], [5.0, 5.0, 5.0, 5.0]]), "neuron": torch.full((2, 48), 9.0)}
    one_query_head = 2 * 8 * 32  # q rows and o columns (no biases in Llama)
    one_kv_head = 2 * 8 * 32  # k and v rows, removed with the last query head of the group
    target = (2 * one_query_head + one_kv_head) / count_params(structure, full.spec) - 1e-9
    masks = select_units(structure, full.spec, scores, Budget(target))
    summary = masks.summary(structure, full.spec)
    assert masks.masks["head"][0].tolist() == [0, 0, 1, 1]
    assert masks.masks["neuron"].all()
    assert summary["layers"][0]["kv_heads"] == 1 and summary["layers"][1]["kv_heads"] == 2
    assert summary["param_sparsity"] == pytest.approx(target, abs=1e-8)


def test_max_reduction_keeps_the_per_layer_minimums():
    full = from_hf(tiny_bert())
    structure = ModelStructure.from_spec(full.spec)
    assert max_reduction(structure, full.spec, Budget(0.0), 0, 0) == pytest.approx(1.0)
    kept = 2 * (4 * 32 * 8 + 3 * 8 + 32 + 2 * 32 + 1 + 32)  # one head, one neuron and both output biases per layer
    assert max_reduction(structure, full.spec, Budget(0.0)) == pytest.approx(1 - kept / count_params(structure, full.spec))


@pytest.mark.parametrize("value", [1.0, -0.1, 1.5])
def test_budget_outside_unit_interval_is_refused(value):
    with pytest.raises(ValueError, match=r"outside \[0, 1\)"):
        Budget(value)


def test_budget_errors():
    with pytest.raises(ValueError, match="kind"):
        Budget(0.5, "latency")
    with pytest.raises(TypeError):
        Budget("0.5")  # type: ignore[arg-type]


def test_unknown_method_lists_the_methods():
    with pytest.raises(ValueError, match="taylor") as err:
        get_method("tylor")
    assert "magnitude" in str(err.value) and "Did you mean 'taylor'" in str(err.value)


def test_unreachable_budget_is_refused_before_scoring():
    with pytest.raises(ValueError, match="cannot be reached"):
        run("taylor", tiny_bert(), Budget(0.99))


def test_taylor_needs_labelled_data():
    data = encoded_data(2)
    del data["labels"]
    with pytest.raises(ValueError, match="labelled"):
        get_method("taylor")(tiny_bert(), data, 0.5)
    with pytest.raises(ValueError, match="calibration data"):
        get_method("taylor")(tiny_bert(), None, 0.5)


def test_compacted_models_are_refused():
    model = tiny_bert()
    pruned = compact(model, run("magnitude", model, Budget(0.5)).masks)
    with pytest.raises(ValueError, match="already compacted"):
        get_method("magnitude")(pruned, None, 0.2)
