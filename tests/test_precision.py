"""bf16 autocast of the training-free passes: the hardware check, the masked model under CPU autocast,
and the Fisher gradients and mask tuning in bf16 against fp32."""

from __future__ import annotations

import pytest
import torch
from conftest import make_hf, make_inputs

from structprune.arch import from_hf
from structprune.arch.structure import ModelStructure
from structprune.budget import Budget
from structprune.masked_model import MaskedModel, effective_gates
from structprune.maskset import MaskSet
from structprune.methods import get_method
from structprune.methods.calibration import calibration_batches
from structprune.methods.fisher import fisher_information, mask_gradients
from structprune.methods.mask_tuning import tune_scales
from structprune.modeling_structprune import (
    StructpruneForSequenceClassification,
    gate_product,
)
from structprune.precision import bf16_autocast, native_bf16, resolve_bf16


def _data(model, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    data = make_inputs(model, batch=n, seq=9, seed=seed)
    data["labels"] = torch.randint(0, model.config.num_labels, (n,), generator=torch.Generator().manual_seed(seed))
    return data


def test_resolve_bf16_follows_the_hardware_only_when_unset():
    assert isinstance(native_bf16("cpu"), bool)
    assert resolve_bf16(None, "cpu") == native_bf16("cpu")
    assert resolve_bf16(True, "cpu") is True and resolve_bf16(False, "cpu") is False
    assert native_bf16("meta") is False
    with bf16_autocast("cpu", False):
        assert not torch.is_autocast_enabled("cpu")
    with bf16_autocast("cpu", True):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_masked_model_under_cpu_autocast_runs_the_plain_torch_sublayers(arch):
    hf = make_hf(arch)
    masked = MaskedModel(hf).eval()
    plain = from_hf(make_hf(arch)).eval()  # no kernels installed: attention_fn / ffn_fn are None
    structure = ModelStructure.from_spec(plain.spec)
    gates = {name: torch.rand(shape, generator=torch.Generator().manual_seed(1))
             for name, shape in (("head", (structure.num_layers, structure.max_heads)),
                                 ("neuron", (structure.num_layers, structure.max_ffn)))}
    gates["head"][0, 0] = 0.0  # a dead head: the fp32 path would gather the alive heads
    inputs = make_inputs(hf, batch=3, seq=11)
    with torch.no_grad():
        exact = masked(**inputs, gates=gates).logits
        with bf16_autocast("cpu", True):
            got = masked(**inputs, gates=gates).logits
            expected = plain(**inputs, gates=effective_gates(gates)).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)  # the same plain torch ops, bit for bit
    assert not torch.equal(got, exact)  # it did run in bf16
    torch.testing.assert_close(got.float(), exact, rtol=0.05, atol=0.05)


def test_bf16_fisher_gradients_match_fp32():
    hf = make_hf("bert")
    masked = MaskedModel(hf).eval()
    batches = calibration_batches(_data(hf, 16), 4)
    exact = fisher_information(mask_gradients(masked, batches, bf16=False))
    fast = fisher_information(mask_gradients(masked, batches, bf16=True))
    for name in exact:
        assert fast[name].dtype == exact[name].dtype
        assert not torch.equal(fast[name], exact[name])
        assert float((fast[name] - exact[name]).norm() / exact[name].norm()) < 0.05


def test_bf16_mask_tuning_fits_like_fp32():
    hf = make_hf("bert")
    full: StructpruneForSequenceClassification = from_hf(hf).eval()
    structure = ModelStructure.from_spec(full.spec)
    keep = {"head": torch.ones(structure.num_layers, structure.max_heads),
            "neuron": (torch.rand(structure.num_layers, structure.max_ffn,
                                  generator=torch.Generator().manual_seed(0)) > 0.4).float()}
    keep["head"][:, 0] = 0.0
    masks = MaskSet(keep)
    batches = calibration_batches(_data(hf, 24), 8)
    exact, exact_fits = tune_scales(full, masks, batches, damping=1e-3, bf16=False)
    fast, fast_fits = tune_scales(full, masks, batches, damping=1e-3, bf16=True)
    for a, b in zip(exact_fits, fast_fits):
        assert b.applied and b.error_after < b.error_before
        assert b.error_before == pytest.approx(a.error_before, rel=0.05)
        assert b.error_after == pytest.approx(a.error_after, rel=0.1)
    for name in ("head", "neuron"):
        assert not torch.equal(fast.scales[name], exact.scales[name])
        torch.testing.assert_close(fast.scales[name], exact.scales[name], rtol=0, atol=0.1)


def test_fisher_tunes_on_a_subset_of_the_calibration_examples():
    hf = make_hf("bert")
    data = _data(hf, 24)
    options = dict(grad_batch_size=8, damping=1e-3, bf16=False)
    every = get_method("fisher")(hf, data, Budget(0.4, "flops", seq_len=16), tune_examples=None, **options)
    part = get_method("fisher")(hf, data, Budget(0.4, "flops", seq_len=16), tune_examples=8, **options)
    assert part.masks.meta["options"]["tune_examples"] == 8
    assert all(torch.equal(part.masks.masks[n], every.masks.masks[n]) for n in ("head", "neuron"))
    # layer 0's attention sees the same inputs and mask: its error sums over fewer tokens
    first = [r.log["tuning"][0] for r in (part, every)]
    assert first[0]["error_before"] < first[1]["error_before"]
    assert all(fit["applied"] for fit in part.log["tuning"])
    with pytest.raises(ValueError, match="tune_examples"):
        get_method("fisher")(hf, data, Budget(0.4, "flops", seq_len=16), tune_examples=0)


@pytest.mark.parametrize("shape,gate_shape", [((2, 7, 9), (9,)), ((2, 3, 5, 4), (1, 3, 1, 1))])
def test_gate_product_keeps_the_activation_dtype_and_sums_the_gate_gradient_in_fp32(shape, gate_shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).bfloat16().requires_grad_()
    gate = torch.rand(gate_shape, generator=torch.Generator().manual_seed(1)).requires_grad_()
    upstream = torch.randn(shape, generator=torch.Generator().manual_seed(2)).bfloat16()
    out = gate_product(x, gate)
    assert out.dtype == torch.bfloat16
    out.backward(upstream)
    exact = (upstream.float() * x.detach().float()).sum_to_size(gate_shape)  # exact products, fp32 sum
    torch.testing.assert_close(gate.grad, exact, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, upstream * gate.detach().bfloat16(), rtol=0, atol=0)
    same = torch.randn(3, 4)
    assert torch.equal(gate_product(same, torch.ones(4) * 2), same * 2)  # one dtype: the plain product
