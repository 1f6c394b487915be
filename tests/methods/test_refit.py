"""The least-squares refit of the output projections (``flap`` / ``expert`` with ``refit=True``): exact where the
removed channels are affine in the kept ones, FLAP's mean compensation under a huge ridge, never a worse fit of the
projection's output on the calibration tokens than the mean compensation, and a result that compacts and loads."""

from __future__ import annotations

import pytest
import torch

from structprune.arch import from_hf
from structprune.budget import Budget
from structprune.compaction import compact
from structprune.methods import get_method
from structprune.methods.channel_stats import ChannelStats
from structprune.methods.refit import refit_projection
from structprune.streaming import streamed_model
from tests.conftest import make_causal
from tests.methods.test_flap import _data, _inputs


def _stats(x: torch.Tensor) -> ChannelStats:
    stats = ChannelStats.zeros(x.shape[1], gram=True)
    stats.add(x)
    return stats


def _fit_error(weight, x, new, shift) -> float:
    return float((x @ weight.T - (x @ new.T + shift)).pow(2).sum())


def test_channels_affine_in_the_kept_ones_are_refitted_exactly():
    g = torch.Generator().manual_seed(0)
    kept = torch.randn(500, 4, generator=g, dtype=torch.float64)
    removed = kept @ torch.randn(4, 2, generator=g, dtype=torch.float64) + torch.tensor([1.5, -2.0]).double()
    x, weight = torch.cat([kept, removed], 1), torch.randn(3, 6, generator=g, dtype=torch.float64)
    keep = torch.tensor([True] * 4 + [False] * 2)
    new, shift = refit_projection(weight, _stats(x), keep, ridge=1e-12)
    assert (new[:, ~keep] == 0).all()
    torch.testing.assert_close(x @ new.T + shift, x @ weight.T, rtol=1e-6, atol=1e-6)
    # under a huge ridge the kept columns stay and the shift is the removed channels' mean output: FLAP's
    new, shift = refit_projection(weight, _stats(x), keep, ridge=1e12)
    torch.testing.assert_close(new[:, keep], weight[:, keep], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(shift, weight[:, ~keep] @ x[:, ~keep].mean(0), rtol=1e-6, atol=1e-6)


def test_nothing_removed_or_nothing_kept():
    x = torch.randn(50, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    weight = torch.randn(2, 5, dtype=torch.float64)
    new, shift = refit_projection(weight, _stats(x), torch.ones(5, dtype=torch.bool))
    assert torch.equal(new, weight) and not shift.any()
    new, shift = refit_projection(weight, _stats(x), torch.zeros(5, dtype=torch.bool))
    assert not new.any()
    torch.testing.assert_close(shift, weight @ x.mean(0))
    with pytest.raises(ValueError, match="gram=True"):
        refit_projection(weight, ChannelStats.zeros(5), torch.ones(5, dtype=torch.bool))


@pytest.mark.parametrize("method", ["flap", "expert"])
def test_the_refit_fits_each_projection_better_than_the_mean_and_loads(method):
    hf = make_causal("llama")
    model = from_hf(hf).eval()
    data, budget = _data(model.spec["vocab_size"], seq=40), Budget(0.4)
    plain = get_method(method)(hf, data, budget)
    refit = get_method(method)(hf, data, budget, refit=True)
    assert plain.weights is None and refit.log["achieved"] >= 0.4 - 1e-9
    for name, mask in plain.masks.masks.items():  # the same units go; only their stand-in differs
        assert torch.equal(mask, refit.masks.masks[name]), name
    refitted = from_hf(make_causal("llama"))
    refitted.load_state_dict(refit.weights)  # full-size, as sprint's
    small = compact(refitted, refit.masks).eval()
    for kind, name, unit in (("attn", "attn.o", "head"), ("ffn", "ffn.down", "neuron")):
        for i, x in enumerate(_inputs(model, data, name)):  # the dense model's inputs of layer i's projection
            keep = refit.masks.masks[unit][i].bool()
            if kind == "attn":
                keep = keep.repeat_interleave(model.layers[i].attn.head_dim)
            if keep.all() or not keep.any():
                continue
            dense = model.layers[i].get_submodule(name).weight.detach().double()
            mean = plain.masks.shifts[kind][i].double()
            got = small.layers[i].get_submodule(name)
            new, shift = torch.zeros_like(dense), got.bias.detach().double()
            new[:, keep] = got.weight.detach().double()
            assert _fit_error(dense, x, new, shift) <= _fit_error(dense, x, dense * keep, mean) * (1 + 1e-6) + 1e-9
    with torch.no_grad():  # the refitted compact model runs
        assert torch.isfinite(small(data["input_ids"], attention_mask=data["attention_mask"]).logits).all()


def test_refit_needs_compensation_and_a_model_in_memory(tmp_path):
    hf = make_causal("llama")
    data = _data(hf.config.vocab_size)
    with pytest.raises(ValueError, match="compensate=False"):
        get_method("flap")(hf, data, Budget(0.3), refit=True, compensate=False)
    hf.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="--stream"):
        get_method("expert")(streamed_model(tmp_path), data, Budget(0.3), refit=True)
