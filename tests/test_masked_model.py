"""MaskedModel with units pruned against a Hugging Face model whose pruned units are zeroed."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from structprune.arch.structure import ModelStructure
from structprune.masked_model import MaskedModel, effective_gates
from structprune.maskset import MaskError, MaskSet
from tests.conftest import BERT_FAMILY, make_hf, make_inputs


def _zeroed_hf(hf, head: torch.Tensor, neuron: torch.Tensor):
    """A copy of ``hf`` with o-proj input columns of pruned heads and down-proj columns of pruned neurons zeroed."""
    hf = copy.deepcopy(hf)
    base = hf.base_model
    layers = base.encoder.layer if hf.config.model_type in BERT_FAMILY else base.layers
    head_dim = hf.config.hidden_size // hf.config.num_attention_heads
    with torch.no_grad():
        for i, layer in enumerate(layers):
            if hf.config.model_type in BERT_FAMILY:
                o, down = layer.attention.output.dense, layer.output.dense
            else:
                o, down = layer.self_attn.o_proj, layer.mlp.down_proj
                head_dim = o.in_features // hf.config.num_attention_heads
            for h in (head[i] == 0).nonzero().flatten().tolist():
                o.weight[:, h * head_dim:(h + 1) * head_dim] = 0
            down.weight[:, neuron[i] == 0] = 0
    return hf


@pytest.mark.parametrize("seed", range(3))
def test_pruned_heads_and_neurons_match_zeroed_hf(arch, seed):
    hf = make_hf(arch)
    masked = MaskedModel(hf).eval()
    s = masked.structure
    g = torch.Generator().manual_seed(seed)
    head = (torch.rand(s.num_layers, s.max_heads, generator=g) < 0.5).float()
    neuron = (torch.rand(s.num_layers, s.max_ffn, generator=g) < 0.5).float()
    head[:, 0] = 1  # a layer with no heads drops its o-proj bias too, which zeroing columns cannot express
    neuron[:, 0] = 1
    masked.set_masks(MaskSet({"head": head, "neuron": neuron}))
    inputs = make_inputs(hf)
    with torch.no_grad():
        expected = _zeroed_hf(hf, head, neuron)(**inputs).logits
        got = masked(**inputs).logits
    assert (got - expected).abs().max() <= 1e-5


def test_removed_sublayer_adds_nothing_not_even_bias():
    hf = make_hf("bert")
    masked = MaskedModel(hf).eval()
    s = masked.structure
    inputs = make_inputs(hf)
    head = torch.ones(s.num_layers, s.max_heads)
    head[1] = 0
    layer_off = torch.ones(s.num_layers)
    layer_off[1] = 0
    with torch.no_grad():
        by_heads = masked(**inputs, gates={"head": head}).logits
        by_layer = masked(**inputs, gates={"attn_layer": layer_off}).logits
    assert torch.allclose(by_heads, by_layer, atol=1e-6)
    gates = effective_gates({"head": head, "neuron": torch.zeros(s.num_layers, s.max_ffn)})
    assert gates["attn_layer"].tolist() == [1.0, 0.0, 1.0]
    assert gates["ffn_layer"].tolist() == [0.0, 0.0, 0.0]


def test_gates_receive_gradients():
    hf = make_hf("llama")
    masked = MaskedModel(hf).train()
    s = masked.structure
    gates = {"head": torch.rand(s.num_layers, s.max_heads, requires_grad=True),
             "neuron": torch.rand(s.num_layers, s.max_ffn, requires_grad=True),
             "hidden": torch.rand(s.hidden_size, requires_grad=True)}
    inputs = make_inputs(hf)
    out = masked(**inputs, gates=gates, labels=torch.tensor([0, 1, 2]))
    out.loss.backward()
    for name, gate in gates.items():
        assert gate.grad is not None and gate.grad.abs().sum() > 0, name


def test_masks_that_do_not_fit_are_refused():
    masked = MaskedModel(make_hf("bert"))
    with pytest.raises(MaskError, match=r"'head' has shape \[3, 5\].*needs \[3, 6\]"):
        masked.set_masks(MaskSet({"head": torch.ones(3, 5)}))
    with pytest.raises(MaskError, match="only 0 and 1"):
        MaskSet({"neuron": torch.full((3, 40), 0.5)})
    with pytest.raises(MaskError, match="unknown mask names"):
        MaskSet({"heads": torch.ones(3, 6)})


def test_structure_of_masked_model_is_dense():
    masked = MaskedModel(make_hf("qwen2"))
    assert masked.structure == ModelStructure.from_spec(masked.spec)
    assert masked.structure.group_size == 2


def _cpp_ops_or_skip():
    try:
        from structprune.ops import cpp as _cpp_ops
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("structprune._C did not build: CI requires the C++ extension")
        pytest.skip("structprune._C is not built (pure-Python install)")
    return _cpp_ops


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_masked_model_runs_on_the_cpp_ops(monkeypatch, arch):
    cpp = _cpp_ops_or_skip()
    calls = {"gated_ffn": 0, "masked_attention": 0}
    for name in calls:
        original = getattr(cpp, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(cpp, name, counted)
    hf = make_hf(arch)
    masked = MaskedModel(hf).eval()  # no dropout, so both backends see the same computation
    s = masked.structure
    g = torch.Generator().manual_seed(0)
    gates = {"head": (torch.rand(s.num_layers, s.max_heads, generator=g) < 0.6).float().requires_grad_(),
             "neuron": (torch.rand(s.num_layers, s.max_ffn, generator=g) < 0.6).float().requires_grad_()}
    inputs = make_inputs(hf)
    labels = torch.tensor([0, 1, 1])

    def run():
        for gate in gates.values():
            gate.grad = None
        masked.zero_grad()
        out = masked(**inputs, gates=gates, labels=labels)
        out.loss.backward()
        return out.logits.detach(), {k: v.grad.clone() for k, v in gates.items()}

    logits, grads = run()
    assert calls["gated_ffn"] == s.num_layers and calls["masked_attention"] == s.num_layers
    monkeypatch.setenv("STRUCTPRUNE_BACKEND", "reference")
    ref_logits, ref_grads = run()
    assert calls["gated_ffn"] == s.num_layers  # the reference run did not touch the C++ ops
    assert (logits - ref_logits).abs().max() <= 1e-5
    for name in gates:
        assert (grads[name] - ref_grads[name]).abs().max() <= 1e-5, name


@pytest.mark.parametrize("arch_name", ["bert", "llama", "mistral"])
def test_dead_heads_are_not_projected_and_gradients_match_the_eager_model(arch_name):
    """With dead heads the masked model gathers the alive heads' q/k/v/o weights: same outputs and
    gradients (weights, alive gates) as the plain eager forward multiplying head outputs by the
    gate, including GQA groups left uneven by the dead heads. Dead gates get exactly 0 (the eager
    forward differentiates through the multiplication by 0 instead)."""
    masked = MaskedModel(make_hf(arch_name))
    eager = copy.deepcopy(masked.model)
    for layer in eager.layers:
        layer.attn.attention_fn = None
        layer.ffn.ffn_fn = None
    structure = masked.structure
    g = torch.Generator().manual_seed(3)
    heads = torch.rand(structure.num_layers, structure.max_heads, generator=g) + 0.5
    heads[0, 1] = heads[1, 0] = heads[1, 3] = 0.0  # uneven groups in the GQA models
    neurons = torch.rand(structure.num_layers, structure.max_ffn, generator=g) + 0.5
    neurons[:, ::4] = 0.0
    inputs = make_inputs(masked.model)
    results = []
    for model in (masked.model, eager):
        gates = {"head": heads.clone().requires_grad_(), "neuron": neurons.clone().requires_grad_()}
        logits = model(**inputs, gates=effective_gates(gates)).logits
        params = [model.layers[1].attn.q.weight, model.layers[1].attn.o.weight, model.layers[0].attn.k.weight]
        grads = torch.autograd.grad(logits.square().sum(), [gates["head"], gates["neuron"], *params])
        results.append((logits, grads))
    (got, got_grads), (want, want_grads) = results
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    for gate, a, b in zip((heads, neurons), got_grads, want_grads):
        torch.testing.assert_close(a[gate != 0], b[gate != 0], atol=1e-5, rtol=1e-4)
        assert torch.equal(a[gate == 0], torch.zeros_like(a[gate == 0]))
    for a, b in zip(got_grads[2:], want_grads[2:]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_a_pass_on_the_kernels_never_builds_the_dense_attention_mask(monkeypatch, arch):
    from structprune.arch import from_hf
    from structprune.modeling_structprune import AttentionContext

    hf = make_hf(arch)
    inputs = make_inputs(hf)
    built = []
    original = AttentionContext._additive
    monkeypatch.setattr(AttentionContext, "_additive",
                        lambda self, window: built.append(window) or original(self, window))
    with torch.no_grad():
        MaskedModel(hf).eval()(**inputs)
        assert built == []
        from_hf(hf).eval()(**inputs)  # eager: one mask, shared by every layer
    assert built == [None]
