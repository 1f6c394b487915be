"""The torch reference ops against hand-written loops, and their gradients (fp64 gradcheck).

The reference is the ground truth for every kernel, so it is itself checked here against
the most literal implementation possible: scalar Python loops over tiny tensors.
"""

from __future__ import annotations

import math

import pytest
import torch

from structprune.ops import reference

F64 = torch.float64


def _act(z: float, activation: str) -> float:
    if activation == "gelu":
        return 0.5 * z * (1.0 + math.erf(z / math.sqrt(2.0)))
    if activation == "gelu_tanh":
        return 0.5 * z * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z**3)))
    if activation == "relu":
        return max(z, 0.0)
    return z / (1.0 + math.exp(-z))


def naive_gated_ffn(x, w_up, b_up, w_down, b_down, gate, activation, w_gate) -> torch.Tensor:
    """The FFN one scalar at a time."""
    xs = x.reshape(-1, x.shape[-1])
    n_ff, d_in = w_up.shape
    d_out = w_down.shape[0]
    out = torch.zeros(xs.shape[0], d_out, dtype=F64)
    for n in range(xs.shape[0]):
        hidden = []
        for f in range(n_ff):
            up = sum(float(xs[n, d]) * float(w_up[f, d]) for d in range(d_in))
            up += float(b_up[f]) if b_up is not None else 0.0
            if w_gate is not None:
                z = sum(float(xs[n, d]) * float(w_gate[f, d]) for d in range(d_in))
                h = _act(z, activation) * up
            else:
                h = _act(up, activation)
            hidden.append(h * (float(gate[f]) if gate is not None else 1.0))
        for o in range(d_out):
            y = sum(hidden[f] * float(w_down[o, f]) for f in range(n_ff))
            out[n, o] = y + (float(b_down[o]) if b_down is not None else 0.0)
    return out.reshape(*x.shape[:-1], d_out)


def naive_attention(q, k, v, gate, key_padding_mask, causal, scale) -> torch.Tensor:
    """Attention one query row at a time; masked keys score the lowest finite float."""
    B, H, S, D = q.shape
    group = H // k.shape[1]
    lowest = torch.finfo(q.dtype).min
    out = torch.zeros(B, H, S, D, dtype=F64)
    for b in range(B):
        for h in range(H):
            g = 1.0 if gate is None else float(gate[h] if gate.dim() == 1 else gate[b, h])
            for i in range(S):
                scores = []
                for j in range(S):
                    masked = (causal and j > i) or (
                        key_padding_mask is not None and not bool(key_padding_mask[b, j])
                    )
                    dot = sum(float(q[b, h, i, d]) * float(k[b, h // group, j, d]) for d in range(D))
                    scores.append(lowest if masked else dot * scale)
                top = max(scores)
                weights = [math.exp(s - top) for s in scores]
                total = sum(weights)
                for d in range(D):
                    acc = sum(w * float(v[b, h // group, j, d]) for j, w in enumerate(weights))
                    out[b, h, i, d] = g * acc / total
    return out


def _ffn_inputs(gen, n_tokens, d_in, n_ff, d_out, bias, gated, gate):
    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64)

    return {
        "x": rnd(2, n_tokens, d_in),
        "w_up": rnd(n_ff, d_in) / math.sqrt(d_in),
        "b_up": rnd(n_ff) if bias else None,
        "w_down": rnd(d_out, n_ff) / math.sqrt(n_ff),
        "b_down": rnd(d_out) if bias else None,
        "neuron_gate": gate,
        "w_gate": rnd(n_ff, d_in) / math.sqrt(d_in) if gated else None,
    }


@pytest.mark.parametrize("activation", reference.ACTIVATIONS)
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_gated_ffn_matches_loops(activation: str, gated: bool, bias: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    gate = torch.tensor([0.5, 0.0, 1.0, 2.0, 0.0, 0.25], dtype=F64)
    inputs = _ffn_inputs(gen, 3, 4, 6, 5, bias, gated, gate)
    got = reference.gated_ffn(activation=activation, **inputs)
    want = naive_gated_ffn(activation=activation, gate=inputs.pop("neuron_gate"), **inputs)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def _attention_inputs(gen, B, H, Hkv, S, D):
    return (
        torch.randn(B, H, S, D, generator=gen, dtype=F64),
        torch.randn(B, Hkv, S, D, generator=gen, dtype=F64),
        torch.randn(B, Hkv, S, D, generator=gen, dtype=F64),
    )


@pytest.mark.parametrize("heads", [(2, 2), (4, 2), (4, 1)], ids=["mha", "gqa2", "mqa"])
@pytest.mark.parametrize("gate_kind", ["none", "head", "batch_head"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padding", [False, True])
def test_masked_attention_matches_loops(
    heads: tuple[int, int], gate_kind: str, causal: bool, padding: bool
) -> None:
    H, Hkv = heads
    B, S, D = 2, 5, 3
    gen = torch.Generator().manual_seed(1)
    q, k, v = _attention_inputs(gen, B, H, Hkv, S, D)
    gate = {
        "none": None,
        "head": torch.linspace(0.0, 1.0, H, dtype=F64),
        "batch_head": torch.rand(B, H, generator=gen, dtype=F64).index_fill_(1, torch.tensor([0]), 0.0),
    }[gate_kind]
    # Batch 0 is left-padded, so with a causal mask its first query sees no key at all.
    mask = torch.tensor([[False, False, True, True, True], [True] * 5]) if padding else None
    got = reference.masked_attention(q, k, v, gate, mask, causal, 0.7)
    want = naive_attention(q, k, v, gate, mask, causal, 0.7)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_fully_masked_query_is_uniform_average() -> None:
    """A query that sees no key averages every value (Hugging Face eager), never NaN."""
    gen = torch.Generator().manual_seed(2)
    q, k, v = _attention_inputs(gen, 1, 1, 1, 4, 2)
    mask = torch.tensor([[False, False, True, True]])
    out = reference.masked_attention(q, k, v, None, mask, causal=True)
    torch.testing.assert_close(out[0, 0, 0], v[0, 0].mean(0))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("gated", [False, True])
def test_gated_ffn_gradcheck(gated: bool) -> None:
    gen = torch.Generator().manual_seed(3)
    gate = torch.tensor([0.5, 1.5, 1.0, 0.75], dtype=F64)
    inputs = _ffn_inputs(gen, 2, 3, 4, 2, True, gated, gate)
    names = [n for n, t in inputs.items() if t is not None]
    tensors = [inputs[n].clone().requires_grad_() for n in names]

    def fn(*ts: torch.Tensor) -> torch.Tensor:
        return reference.gated_ffn(activation="gelu", **dict(zip(names, ts)))

    assert torch.autograd.gradcheck(fn, tensors)


@pytest.mark.parametrize("gate_shape", ["head", "batch_head"])
def test_masked_attention_gradcheck(gate_shape: str) -> None:
    gen = torch.Generator().manual_seed(4)
    q, k, v = (t.requires_grad_() for t in _attention_inputs(gen, 2, 4, 2, 5, 3))
    shape = (4,) if gate_shape == "head" else (2, 4)
    gate = (torch.rand(*shape, generator=gen, dtype=F64) + 0.5).requires_grad_()
    mask = torch.tensor([[False, True, True, True, True], [True] * 5])
    assert torch.autograd.gradcheck(
        lambda *t: reference.masked_attention(*t, key_padding_mask=mask, causal=True), (q, k, v, gate)
    )


def test_removed_units_get_zero_gradient() -> None:
    """A gate of exactly 0 removes the unit: no gradient to it or to its gate."""
    gen = torch.Generator().manual_seed(5)
    inputs = _ffn_inputs(gen, 2, 3, 4, 2, True, False, torch.tensor([1.0, 0.0, 0.5, 0.0], dtype=F64))
    for name in ("w_up", "b_up", "w_down", "neuron_gate"):
        inputs[name].requires_grad_()
    reference.gated_ffn(activation="gelu", **inputs).sum().backward()
    dead = [1, 3]
    assert (inputs["neuron_gate"].grad[dead] == 0).all()
    assert (inputs["w_up"].grad[dead] == 0).all()
    assert (inputs["b_up"].grad[dead] == 0).all()
    assert (inputs["w_down"].grad[:, dead] == 0).all()

    q, k, v = (t.requires_grad_() for t in _attention_inputs(gen, 1, 2, 2, 3, 2))
    head_gate = torch.tensor([0.0, 1.0], dtype=F64, requires_grad=True)
    reference.masked_attention(q, k, v, head_gate).sum().backward()
    assert head_gate.grad[0] == 0
    assert (q.grad[:, 0] == 0).all() and (k.grad[:, 0] == 0).all() and (v.grad[:, 0] == 0).all()
