"""``flap``: channel statistics gathered layer by layer, the fluctuation score, bias compensation that equals the
removed units' mean output, and masks + shifts that compact to the same model."""

from __future__ import annotations

import pytest
import torch

from structprune.arch import from_hf
from structprune.budget import Budget
from structprune.compaction import compact, from_pretrained, save
from structprune.masked_model import MaskedModel
from structprune.maskset import MaskError, MaskSet
from structprune.methods import get_method
from structprune.methods.channel_stats import channel_stats, neuron_change
from structprune.methods.flap import flap_scores
from tests.conftest import make_causal


def _data(vocab: int, n: int = 6, seq: int = 10) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, vocab, (n, seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # padding is not counted
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.clone()}


def _inputs(model, data, name: str) -> list[torch.Tensor]:
    """Each layer's inputs of projection ``name`` over the real tokens, from a plain (eager) forward with hooks."""
    seen = [[] for _ in model.layers]
    real = data["attention_mask"].bool()
    hooks = [layer.get_submodule(name).register_forward_pre_hook(lambda m, a, i=i: seen[i].append(a[0][real]))
             for i, layer in enumerate(model.layers)]
    with torch.no_grad():
        model(data["input_ids"], attention_mask=data["attention_mask"])
    for hook in hooks:
        hook.remove()
    return [torch.cat(x).double() for x in seen]


@pytest.mark.parametrize("seq", [10, 80])  # 80: more tokens per sequence than one step of the statistics takes
def test_layer_by_layer_statistics_equal_a_whole_model_forward(seq):
    model = from_hf(make_causal("qwen2")).eval()
    data = _data(model.spec["vocab_size"], seq=seq)
    batches = [{k: v[:3] for k, v in data.items()}, {k: v[3:] for k, v in data.items()}]
    stats = channel_stats(model, batches)
    for layer, layer_stats, x, o in zip(model.layers, stats, _inputs(model, data, "ffn.down"),
                                        _inputs(model, data, "attn.o")):
        assert layer_stats.ffn.count == int(data["attention_mask"].sum())
        torch.testing.assert_close(layer_stats.ffn.mean, x.mean(0), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(layer_stats.ffn.variance, x.var(0), rtol=1e-6, atol=1e-9)
        change = (x[:, :, None] * layer.ffn.down.weight.detach().double().t()[None]).pow(2).sum((0, 2))
        torch.testing.assert_close(neuron_change(layer_stats), change, rtol=1e-9, atol=1e-9)
        heads, w = layer.attn.heads, layer.attn.o.weight.detach().double()
        per_head = torch.einsum("nhd,ehd->nhe", o.view(o.shape[0], heads, -1), w.view(w.shape[0], heads, -1))
        # the library takes each head's product in float32 and squares it in float64
        torch.testing.assert_close(layer_stats.head_change, per_head.pow(2).sum((0, 2)), rtol=1e-6, atol=1e-8)
    assert all(layer.attn.attention_fn is None for layer in model.layers)  # the kernels' route was only lent


def test_a_constant_channel_scores_lowest_and_compensation_restores_its_output():
    hf = make_causal("llama")
    model = from_hf(hf).eval()
    data = _data(model.spec["vocab_size"])
    stats = channel_stats(model, [data], head_change=False)
    stats[0].ffn.sumsq[5] = stats[0].ffn.sum[5] ** 2 / stats[0].ffn.count  # neuron 5 of layer 0: no fluctuation
    scores = flap_scores(model, stats, "fluctuation")
    assert int(scores["neuron"][0].argmin()) == 5 and float(scores["neuron"].min()) == 0.0

    result = get_method("flap")(hf, data, Budget(0.3))
    assert result.log["achieved"] >= 0.3 - 1e-9
    masks = result.masks
    assert set(masks.shifts) == {"attn", "ffn"}
    with torch.no_grad():
        plain = MaskedModel(hf, MaskSet(masks.masks)).eval()(data["input_ids"], data["attention_mask"]).logits
        dense = model(data["input_ids"], attention_mask=data["attention_mask"]).logits
        masked = MaskedModel(hf, masks).eval()
        shifted = masked(data["input_ids"], data["attention_mask"]).logits
        small = compact(masked, masks).eval()
        torch.testing.assert_close(small(data["input_ids"], attention_mask=data["attention_mask"]).logits, shifted,
                                   atol=1e-4, rtol=1e-4)
    real = data["attention_mask"].bool()
    # on the calibration text, compensation brings the pruned model closer to the dense one
    assert (shifted - dense)[real].pow(2).mean() < (plain - dense)[real].pow(2).mean()
    assert small.layers[0].ffn.down.bias is not None and small.config.structprune["ffn_out_bias"]


def test_the_shifts_survive_saving_and_compaction_counts_their_biases(tmp_path):
    hf = make_causal("mistral")
    result = get_method("flap")(hf, _data(hf.config.vocab_size), Budget(0.4), metric="norm", multiple_of=4)
    result.masks.save(tmp_path / "masks")
    loaded = MaskSet.load(tmp_path / "masks")
    for name in ("attn", "ffn"):
        assert torch.equal(loaded.shifts[name], result.masks.shifts[name])
    small = compact(MaskedModel(hf), loaded)
    with pytest.warns(UserWarning, match="without a tokenizer"):
        save(small, tmp_path / "model")
    ids = torch.randint(3, hf.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(from_pretrained(tmp_path / "model")(ids).logits, small.eval()(ids).logits)
    summary = result.log["summary"]
    kept = sum(p.numel() for n, p in small.named_parameters() if ".attn." in n and "norm" not in n or ".ffn." in n)
    assert summary["params_kept"] == kept
    assert all(layer.ffn is None or layer.ffn.down.in_features % 4 == 0 for layer in small.layers)
    without = get_method("flap")(hf, _data(hf.config.vocab_size), Budget(0.4), compensate=False)
    assert without.masks.shifts == {}


def test_bad_shifts_and_options_are_refused():
    hf = make_causal("llama")
    structure = MaskedModel(hf).structure
    with pytest.raises(MaskError, match="shift 'ffn' has shape"):
        MaskSet({}, shifts={"ffn": torch.zeros(1, 3)}).validate(structure)
    with pytest.raises(MaskError, match="unknown shift names"):
        MaskSet({}, shifts={"out": torch.zeros(1, 3)})
    with pytest.raises(ValueError, match="metric"):
        get_method("flap")(hf, _data(hf.config.vocab_size), Budget(0.3), metric="wanda")
    with pytest.raises(ValueError, match="calibration data"):
        get_method("flap")(hf, None, Budget(0.3))
