"""The C++ CPU kernels (``structprune._C``) against the torch reference.

Outputs and every gradient are compared with :mod:`structprune.ops.reference` over shapes
(odd sequence lengths, GQA, several head dims), gates with exact zeros, padding and causal
masks, activations, biases and SwiGLU; gradients are also checked with fp64 gradcheck and
the registrations with ``torch.library.opcheck``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import pytest
import torch

from structprune import ops
from structprune.ops import reference

_cpp_ops = pytest.importorskip("structprune.ops.cpp", reason="the C++ extension structprune._C is not built")

TOLERANCE = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-4},
    torch.float64: {"atol": 1e-10, "rtol": 1e-10},
}
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])


def _fresh_leaves(inputs: dict, names: list[str]) -> dict:
    """A copy of ``inputs`` with new leaf tensors; those in ``names`` require grad."""
    return {
        n: t.detach().clone().requires_grad_(n in names) if isinstance(t, torch.Tensor) else t
        for n, t in inputs.items()
    }


def _assert_same_forward_and_grads(cpp_fn, ref_fn, inputs: dict, dtype: torch.dtype, seed: int) -> None:
    """cpp_fn(**inputs) matches ref_fn(**inputs) in value and in the gradient of every input."""
    names = [n for n, t in inputs.items() if isinstance(t, torch.Tensor) and t.requires_grad]
    cpp_in, ref_in = _fresh_leaves(inputs, names), _fresh_leaves(inputs, names)
    got, want = cpp_fn(**cpp_in), ref_fn(**ref_in)
    torch.testing.assert_close(got, want, **TOLERANCE[dtype])
    grad_out = torch.randn(want.shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    got_grads = torch.autograd.grad(got, [cpp_in[n] for n in names], grad_out)
    want_grads = torch.autograd.grad(want, [ref_in[n] for n in names], grad_out)
    for name, g, w in zip(names, got_grads, want_grads):
        torch.testing.assert_close(g, w, **TOLERANCE[dtype], msg=lambda m, name=name: f"grad of {name}: {m}")


# ---------------------------------------------------------------------------- gated_ffn


@dataclass(frozen=True)
class FfnCase:
    lead: tuple[int, ...]  # leading dims of x
    d_in: int
    n_ff: int
    d_out: int
    activation: str = "gelu"
    bias: bool = True
    gated: bool = False
    gate: str = "zeros"  # none | random | zeros (some exact zeros) | all_zero


def ffn_inputs(case: FfnCase, dtype: torch.dtype, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, dtype=dtype) * scale).requires_grad_()

    gate = None
    if case.gate != "none":
        gate = torch.rand(case.n_ff, generator=gen, dtype=dtype) + 0.25
        if case.gate == "zeros":
            gate[::3] = 0.0
        elif case.gate == "all_zero":
            gate.zero_()
        gate.requires_grad_()
    return {
        "x": rnd(*case.lead, case.d_in),
        "w_up": rnd(case.n_ff, case.d_in, scale=case.d_in**-0.5),
        "b_up": rnd(case.n_ff, scale=0.5) if case.bias else None,
        "w_down": rnd(case.d_out, case.n_ff, scale=case.n_ff**-0.5),
        "b_down": rnd(case.d_out, scale=0.5) if case.bias else None,
        "neuron_gate": gate,
        "activation": case.activation,
        "w_gate": rnd(case.n_ff, case.d_in, scale=case.d_in**-0.5) if case.gated else None,
    }


FFN_SHAPES = {
    "tok7": ((7,), 8, 16, 8),
    "batch2x3": ((2, 3), 16, 24, 12),
    "tok33": ((1, 33), 32, 20, 16),
}


@DTYPES
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "swiglu"])
@pytest.mark.parametrize("activation", reference.ACTIVATIONS)
@pytest.mark.parametrize("shape", list(FFN_SHAPES), ids=list(FFN_SHAPES))
def test_gated_ffn_activations_match_reference(
    shape: str, activation: str, gated: bool, dtype: torch.dtype
) -> None:
    case = FfnCase(*FFN_SHAPES[shape], activation=activation, gated=gated, gate="zeros")
    _assert_same_forward_and_grads(_cpp_ops.gated_ffn, reference.gated_ffn, ffn_inputs(case, dtype), dtype, 1)


@DTYPES
@pytest.mark.parametrize("gate", ["none", "random", "zeros", "all_zero"])
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "swiglu"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("shape", list(FFN_SHAPES), ids=list(FFN_SHAPES))
def test_gated_ffn_gates_and_biases_match_reference(
    shape: str, bias: bool, gated: bool, gate: str, dtype: torch.dtype
) -> None:
    case = FfnCase(*FFN_SHAPES[shape], bias=bias, gated=gated, gate=gate)
    _assert_same_forward_and_grads(_cpp_ops.gated_ffn, reference.gated_ffn, ffn_inputs(case, dtype), dtype, 2)


@pytest.mark.parametrize("seed", range(30))
def test_gated_ffn_random_configurations(seed: int) -> None:
    rng = random.Random(seed)
    lead = tuple(rng.randint(1, 9) for _ in range(rng.randint(1, 3)))
    case = FfnCase(
        lead,
        d_in=rng.randint(1, 24),
        n_ff=rng.randint(1, 40),
        d_out=rng.randint(1, 24),
        activation=rng.choice(reference.ACTIVATIONS),
        bias=rng.random() < 0.5,
        gated=rng.random() < 0.5,
        gate=rng.choice(["none", "random", "zeros", "all_zero"]),
    )
    dtype = rng.choice([torch.float32, torch.float64])
    inputs = ffn_inputs(case, dtype, seed)
    _assert_same_forward_and_grads(_cpp_ops.gated_ffn, reference.gated_ffn, inputs, dtype, seed)


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "swiglu"])
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "silu"])
def test_gated_ffn_gradcheck(activation: str, gated: bool) -> None:
    case = FfnCase((2, 3), 4, 6, 3, activation=activation, gated=gated, gate="random")
    inputs = ffn_inputs(case, torch.float64)
    names = [n for n, t in inputs.items() if isinstance(t, torch.Tensor)]

    def fn(*tensors: torch.Tensor) -> torch.Tensor:
        return _cpp_ops.gated_ffn(**{**inputs, **dict(zip(names, tensors))})

    assert torch.autograd.gradcheck(fn, [inputs[n] for n in names])


def test_gated_ffn_gradcheck_with_removed_neurons() -> None:
    """Dead neurons (gate exactly 0, not itself differentiated) are constant in every weight."""
    inputs = ffn_inputs(FfnCase((5,), 4, 6, 3, activation="silu", gated=True, gate="zeros"), torch.float64)
    inputs["neuron_gate"] = inputs["neuron_gate"].detach()
    names = [n for n, t in inputs.items() if isinstance(t, torch.Tensor) and t.requires_grad]

    def fn(*tensors: torch.Tensor) -> torch.Tensor:
        return _cpp_ops.gated_ffn(**{**inputs, **dict(zip(names, tensors))})

    assert torch.autograd.gradcheck(fn, [inputs[n] for n in names])


def test_gated_ffn_skips_removed_neurons() -> None:
    """Dead neurons are never read: NaN weights there change nothing, gradients are exactly 0."""
    inputs = ffn_inputs(FfnCase((3, 5), 8, 12, 6, gated=True, gate="zeros"), torch.float32)
    dead = (inputs["neuron_gate"] == 0).nonzero().flatten()
    with torch.no_grad():
        inputs["w_up"][dead] = math.nan
        inputs["w_gate"][dead] = math.nan
        inputs["b_up"][dead] = math.nan
        inputs["w_down"][:, dead] = math.nan
    y = _cpp_ops.gated_ffn(**inputs)
    assert torch.isfinite(y).all()
    y.sum().backward()
    assert (inputs["neuron_gate"].grad[dead] == 0).all()
    assert (inputs["w_up"].grad[dead] == 0).all() and (inputs["w_gate"].grad[dead] == 0).all()
    assert (inputs["b_up"].grad[dead] == 0).all() and (inputs["w_down"].grad[:, dead] == 0).all()
    for name in ("x", "w_up", "b_up", "w_down", "b_down", "neuron_gate", "w_gate"):
        assert torch.isfinite(inputs[name].grad).all(), name


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "swiglu"])
def test_gated_ffn_large_enough_to_run_in_parallel(gated: bool) -> None:
    """Enough tokens that the pointwise kernels split their work across threads."""
    case = FfnCase((2, 1500), 16, 48, 16, activation="gelu_tanh", gated=gated, gate="zeros")
    _assert_same_forward_and_grads(
        _cpp_ops.gated_ffn, reference.gated_ffn, ffn_inputs(case, torch.float64), torch.float64, 0
    )


def test_gated_ffn_grad_only_where_needed() -> None:
    """Frozen weights (mask tuning) still give correct gradients for x and the gate."""
    inputs = ffn_inputs(FfnCase((4,), 8, 10, 8, gated=True), torch.float64)
    for name in ("w_up", "b_up", "w_down", "b_down", "w_gate"):
        inputs[name] = inputs[name].detach()
    _assert_same_forward_and_grads(_cpp_ops.gated_ffn, reference.gated_ffn, inputs, torch.float64, 0)


def test_gated_ffn_errors_name_the_problem() -> None:
    inputs = ffn_inputs(FfnCase((2,), 4, 6, 3), torch.float32)
    with pytest.raises(RuntimeError, match=r"w_down has shape \[3, 5\]"):
        _cpp_ops.gated_ffn(**{**inputs, "w_down": torch.zeros(3, 5)})
    with pytest.raises(ValueError, match="unknown activation 'tanh'"):
        _cpp_ops.gated_ffn(**{**inputs, "activation": "tanh"})
    with pytest.raises(RuntimeError, match="dtype"):
        _cpp_ops.gated_ffn(**{**inputs, "x": inputs["x"].double()})


# --------------------------------------------------------------------- masked_attention


@dataclass(frozen=True)
class AttnCase:
    batch: int
    heads: int
    kv_heads: int
    seq: int
    head_dim: int
    gate: str = "head"  # none | head | head_zero | all_zero | batch_head | batch_head_zero
    padding: str = "some"  # none | some | full_batch (batch 0 entirely padded)
    causal: bool = False


def attention_inputs(case: AttnCase, dtype: torch.dtype, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    B, H, Hkv, S, D = case.batch, case.heads, case.kv_heads, case.seq, case.head_dim

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_()

    gate = None
    if case.gate != "none":
        gate = (
            torch.rand(
                (H,) if case.gate.startswith("head") or case.gate == "all_zero" else (B, H),
                generator=gen,
                dtype=dtype,
            )
            + 0.25
        )
        if case.gate == "head_zero":
            gate[1::2] = 0.0
        elif case.gate == "batch_head_zero":
            gate[0, 0] = 0.0
            gate[-1, -1] = 0.0
        elif case.gate == "all_zero":
            gate.zero_()
        gate.requires_grad_()
    mask = None
    if case.padding != "none":
        mask = torch.ones(B, S, dtype=torch.bool)
        if case.padding == "some":
            mask[0, : min(2, S - 1)] = False  # left padding: with causal, query 0 sees nothing
            mask[-1, -min(3, S - 1) :] = False
        else:
            mask[0] = False
    return {
        "q": rnd(B, H, S, D),
        "k": rnd(B, Hkv, S, D),
        "v": rnd(B, Hkv, S, D),
        "head_gate": gate,
        "key_padding_mask": mask,
        "causal": case.causal,
    }


ATTN_SHAPES = {
    "mha_s7_d8": (2, 4, 4, 7, 8),
    "gqa2_s33_d16": (2, 4, 2, 33, 16),
    "mqa_s7_d32": (1, 4, 1, 7, 32),
    "mqa_s33_d8": (2, 4, 1, 33, 8),
}


@DTYPES
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("gate", ["none", "head", "head_zero", "all_zero", "batch_head", "batch_head_zero"])
@pytest.mark.parametrize("shape", list(ATTN_SHAPES), ids=list(ATTN_SHAPES))
def test_masked_attention_gates_match_reference(
    shape: str, gate: str, causal: bool, dtype: torch.dtype
) -> None:
    case = AttnCase(*ATTN_SHAPES[shape], gate=gate, padding="some", causal=causal)
    inputs = attention_inputs(case, dtype)
    _assert_same_forward_and_grads(_cpp_ops.masked_attention, reference.masked_attention, inputs, dtype, 2)


@DTYPES
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("padding", ["none", "some", "full_batch"])
@pytest.mark.parametrize("shape", list(ATTN_SHAPES), ids=list(ATTN_SHAPES))
def test_masked_attention_masks_match_reference(
    shape: str, padding: str, causal: bool, dtype: torch.dtype
) -> None:
    case = AttnCase(*ATTN_SHAPES[shape], gate="head_zero", padding=padding, causal=causal)
    inputs = attention_inputs(case, dtype)
    _assert_same_forward_and_grads(_cpp_ops.masked_attention, reference.masked_attention, inputs, dtype, 3)


def test_masked_attention_long_sequence_spans_query_blocks() -> None:
    """Sequences longer than the kernel's query block (128 rows) are split and reassembled."""
    case = AttnCase(1, 2, 1, 300, 8, gate="head", padding="some", causal=True)
    inputs = attention_inputs(case, torch.float64)
    _assert_same_forward_and_grads(
        _cpp_ops.masked_attention, reference.masked_attention, inputs, torch.float64, 3
    )


def test_masked_attention_explicit_scale_and_keys_longer_than_queries() -> None:
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, 2, 3, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 1, 9, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 1, 9, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, 9, generator=gen) > 0.3
    want = reference.masked_attention(q, k, v, key_padding_mask=mask, scale=0.3)
    got = _cpp_ops.masked_attention(q, k, v, key_padding_mask=mask, scale=0.3)
    torch.testing.assert_close(got, want, **TOLERANCE[torch.float64])


@pytest.mark.parametrize("seed", range(30))
def test_masked_attention_random_configurations(seed: int) -> None:
    rng = random.Random(1000 + seed)
    kv_heads = rng.choice([1, 2, 3])
    case = AttnCase(
        batch=rng.randint(1, 3),
        heads=kv_heads * rng.choice([1, 2, 4]),
        kv_heads=kv_heads,
        seq=rng.randint(1, 40),
        head_dim=rng.choice([1, 4, 8, 16, 32]),
        gate=rng.choice(["none", "head", "head_zero", "all_zero", "batch_head", "batch_head_zero"]),
        padding=rng.choice(["none", "some", "full_batch"]),
        causal=rng.random() < 0.5,
    )
    dtype = rng.choice([torch.float32, torch.float64])
    inputs = attention_inputs(case, dtype, seed)
    _assert_same_forward_and_grads(_cpp_ops.masked_attention, reference.masked_attention, inputs, dtype, seed)


@pytest.mark.parametrize(
    "case",
    [
        AttnCase(2, 4, 2, 5, 4, gate="head", padding="some", causal=True),
        AttnCase(2, 2, 1, 6, 3, gate="batch_head", padding="full_batch", causal=False),
        AttnCase(1, 2, 2, 4, 4, gate="none", padding="none", causal=True),
    ],
    ids=["gqa_causal_padded", "mqa_batch_gate_full_pad", "mha_plain"],
)
def test_masked_attention_gradcheck(case: AttnCase) -> None:
    inputs = attention_inputs(case, torch.float64)
    names = [n for n, t in inputs.items() if isinstance(t, torch.Tensor) and t.requires_grad]

    def fn(*tensors: torch.Tensor) -> torch.Tensor:
        return _cpp_ops.masked_attention(**{**inputs, **dict(zip(names, tensors))})

    assert torch.autograd.gradcheck(fn, [inputs[n] for n in names])


def test_masked_attention_skips_removed_heads() -> None:
    """A head with gate 0 is never computed: NaN queries there change nothing, grads are 0."""
    case = AttnCase(2, 4, 2, 7, 8, gate="head_zero", padding="some", causal=True)
    inputs = attention_inputs(case, torch.float32)
    dead = (inputs["head_gate"] == 0).nonzero().flatten()
    with torch.no_grad():
        inputs["q"][:, dead] = math.nan
    out = _cpp_ops.masked_attention(**inputs)
    assert (out[:, dead] == 0).all() and torch.isfinite(out).all()
    out.sum().backward()
    assert (inputs["head_gate"].grad[dead] == 0).all()
    assert (inputs["q"].grad[:, dead] == 0).all()
    for name in ("q", "k", "v", "head_gate"):
        assert torch.isfinite(inputs[name].grad).all(), name


def test_masked_attention_kv_group_of_dead_heads_gets_zero_grad() -> None:
    case = AttnCase(1, 4, 2, 5, 4, gate="head", padding="none")
    inputs = attention_inputs(case, torch.float64)
    with torch.no_grad():
        inputs["head_gate"][:2] = 0.0  # both query heads of key/value head 0
    _cpp_ops.masked_attention(**inputs).sum().backward()
    assert (inputs["k"].grad[:, 0] == 0).all() and (inputs["v"].grad[:, 0] == 0).all()
    assert (inputs["k"].grad[:, 1] != 0).any()


def test_masked_attention_errors_name_the_problem() -> None:
    q, k = torch.zeros(1, 3, 4, 8), torch.zeros(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match=r"query heads \(3\) must be a multiple of key/value heads \(2\)"):
        _cpp_ops.masked_attention(q, k, k)
    with pytest.raises(RuntimeError, match=r"head_gate has shape \[2\]"):
        _cpp_ops.masked_attention(q, q, q, head_gate=torch.ones(2))
    with pytest.raises(RuntimeError, match=r"key_padding_mask has shape \[1, 5\]"):
        _cpp_ops.masked_attention(q, q, q, key_padding_mask=torch.ones(1, 5, dtype=torch.bool))


# ------------------------------------------------------------------ registration, dispatch


def _opcheck_cases() -> list[tuple[object, tuple]]:
    ffn = ffn_inputs(FfnCase((2, 3), 4, 6, 5, gated=True, gate="zeros"), torch.float32)
    ffn_plain = ffn_inputs(FfnCase((3,), 4, 6, 5, bias=False, gate="none"), torch.float64)
    attn = attention_inputs(AttnCase(2, 4, 2, 5, 8, gate="batch_head_zero", causal=True), torch.float32)
    attn_plain = attention_inputs(AttnCase(1, 2, 2, 3, 4, gate="none", padding="none"), torch.float64)

    def ffn_args(d: dict) -> tuple:
        return (
            d["x"],
            d["w_up"],
            d["b_up"],
            d["w_down"],
            d["b_down"],
            d["neuron_gate"],
            d["activation"],
            d["w_gate"],
        )

    def attn_args(d: dict) -> tuple:
        return (d["q"], d["k"], d["v"], d["head_gate"], d["key_padding_mask"], d["causal"], 0.5)

    fwd_ffn, fwd_attn = (
        torch.ops.structprune.gated_ffn_fwd.default,
        torch.ops.structprune.masked_attention_fwd.default,
    )
    return [
        (fwd_ffn, ffn_args(ffn)),
        (fwd_ffn, ffn_args(ffn_plain)),
        (fwd_attn, attn_args(attn)),
        (fwd_attn, attn_args(attn_plain)),
    ]


@pytest.mark.parametrize("index", range(4), ids=["ffn_swiglu", "ffn_plain", "attn_gqa", "attn_plain"])
def test_forward_ops_pass_opcheck(index: int) -> None:
    op, args = _opcheck_cases()[index]
    torch.library.opcheck(op, args)


def test_backward_ops_pass_opcheck() -> None:
    ffn = ffn_inputs(FfnCase((2, 3), 4, 6, 5, gated=True, gate="zeros"), torch.float32)
    ffn = {n: t.detach() if isinstance(t, torch.Tensor) else t for n, t in ffn.items()}
    grad = torch.randn(2, 3, 5)
    args = (ffn["x"], ffn["w_up"], ffn["b_up"], ffn["w_down"], ffn["b_down"], ffn["neuron_gate"], "gelu", ffn["w_gate"])
    _y, up_pre, gate_pre = torch.ops.structprune.gated_ffn_fwd(*args)
    for mask in ([True] * 7, [True, False, True, False, False, True, True]):
        torch.library.opcheck(
            torch.ops.structprune.gated_ffn_bwd.default,
            (
                grad,
                ffn["x"],
                ffn["w_up"],
                ffn["b_up"],
                ffn["w_down"],
                ffn["b_down"],
                ffn["neuron_gate"],
                "gelu",
                ffn["w_gate"],
                up_pre,
                gate_pre,
                mask,
            ),
        )
    attn = attention_inputs(AttnCase(2, 4, 2, 5, 8, gate="head_zero", causal=True), torch.float32)
    q, k, v, gate = (attn[n].detach() for n in ("q", "k", "v", "head_gate"))
    out, lse = torch.ops.structprune.masked_attention_fwd(q, k, v, gate, attn["key_padding_mask"], True, 0.5)
    torch.library.opcheck(
        torch.ops.structprune.masked_attention_bwd.default,
        (torch.randn_like(out), q, k, v, gate, attn["key_padding_mask"], True, 0.5, out, lse),
    )


def test_ops_trace_under_torch_compile() -> None:
    ffn = ffn_inputs(FfnCase((2, 3), 4, 6, 5, gated=True, gate="zeros"), torch.float32)
    attn = attention_inputs(AttnCase(2, 4, 2, 5, 8, gate="head_zero", causal=True), torch.float32)

    def block(ffn: dict, attn: dict) -> torch.Tensor:
        return _cpp_ops.gated_ffn(**ffn).sum() + _cpp_ops.masked_attention(**attn).sum()

    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(ffn, attn), block(ffn, attn))
    compiled(ffn, attn).backward()
    assert ffn["w_up"].grad is not None and attn["head_gate"].grad is not None


def test_supports_float32_and_float64_on_cpu_only() -> None:
    assert _cpp_ops.supports("gated_ffn", torch.zeros(1))
    assert _cpp_ops.supports("masked_attention", torch.zeros(1, dtype=torch.float64))
    assert not _cpp_ops.supports("gated_ffn", torch.zeros(1, dtype=torch.float16))
    assert not _cpp_ops.supports("masked_attention", torch.zeros(1, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="unknown op 'conv'"):
        _cpp_ops.supports("conv", torch.zeros(1))


def test_dispatch_uses_cpp_for_cpu_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STRUCTPRUNE_BACKEND", raising=False)
    assert ops.backend_for(torch.zeros(1), "gated_ffn") == "cpp"
    assert ops.backend_for(torch.zeros(1), "masked_attention") == "cpp"
    assert ops.backend_for(torch.zeros(1, dtype=torch.bfloat16), "gated_ffn") == "reference"
    attn = attention_inputs(AttnCase(2, 4, 2, 5, 8, gate="head_zero", causal=True), torch.float32)
    torch.testing.assert_close(ops.masked_attention(**attn), reference.masked_attention(**attn))
    ffn = ffn_inputs(FfnCase((3,), 4, 6, 5, gated=True), torch.float32)
    torch.testing.assert_close(ops.gated_ffn(**ffn), reference.gated_ffn(**ffn))


def test_reference_backend_can_be_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STRUCTPRUNE_BACKEND", "reference")
    assert ops.backend_for(torch.zeros(1), "gated_ffn") == "reference"
    assert ops.backend_for(torch.zeros(1), "masked_attention") == "reference"

    def fail(*args: object, **kwargs: object) -> torch.Tensor:
        raise AssertionError("the C++ kernel ran although the reference backend was forced")

    monkeypatch.setattr(_cpp_ops, "gated_ffn", fail)
    monkeypatch.setattr(_cpp_ops, "masked_attention", fail)
    ffn = ffn_inputs(FfnCase((3,), 4, 6, 5), torch.float32)
    torch.testing.assert_close(ops.gated_ffn(**ffn), reference.gated_ffn(**ffn))
    attn = attention_inputs(AttnCase(1, 2, 2, 3, 4), torch.float32)
    torch.testing.assert_close(ops.masked_attention(**attn), reference.masked_attention(**attn))
