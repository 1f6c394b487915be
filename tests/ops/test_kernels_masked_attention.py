"""The Triton masked attention (``structprune.kernels.masked_attention``) against the reference.

On a CPU the kernels run under ``TRITON_INTERPRET=1`` (set in conftest) at small shapes, fp32
and fp16; on a CUDA machine the same tests run compiled, bf16 included, plus longer sequences.
Outputs and the gradients of q, k, v and the gate are compared with the fp64 reference;
low-precision tolerances follow flash-attention's rule: the kernel's error is at
most twice that of the reference computed in the same precision, plus a small floor.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch

from structprune import ops
from structprune.ops import reference

triton = pytest.importorskip("triton", reason="Triton is not installed")
from structprune.kernels import masked_attention as km  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
DTYPE_IDS = ["fp32", "fp16"] + (["bf16"] if CUDA else [])


@dataclass(frozen=True)
class Case:
    batch: int
    heads: int
    kv_heads: int
    seq: int
    head_dim: int
    causal: bool = False
    padding: str = "none"  # none | right | left | all (batch 0 is all padding)
    gate: str = "head_zero"  # none | head | head_zero | batch_head_zero | all_zero


CASES = [
    Case(2, 4, 4, 19, 16),
    Case(2, 4, 2, 19, 32, causal=True, padding="left", gate="batch_head_zero"),
    Case(1, 3, 1, 33, 16, padding="right", gate="none"),
    Case(2, 4, 4, 17, 64, causal=True, gate="all_zero"),
    Case(2, 2, 2, 9, 128, padding="all", gate="head"),
    Case(3, 6, 3, 40, 32, causal=True, padding="right", gate="head_zero"),
]
if CUDA:
    CASES += [
        Case(2, 8, 2, 1000, 64, causal=True, padding="left", gate="batch_head_zero"),
        Case(1, 4, 4, 777, 128, padding="right", gate="head_zero"),
    ]


def make_inputs(case: Case, dtype: torch.dtype, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    B, H, Hkv, S, D = case.batch, case.heads, case.kv_heads, case.seq, case.head_dim

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE, dtype)

    gate = None
    if case.gate != "none":
        shape = (B, H) if case.gate == "batch_head_zero" else (H,)
        gate = torch.rand(shape, generator=g) + 0.1
        if case.gate == "head_zero":
            gate[1::2] = 0.0
        elif case.gate == "batch_head_zero":
            gate[0, ::2] = 0.0
            gate[-1, 1] = 0.0
        elif case.gate == "all_zero":
            gate.zero_()
        gate = gate.to(DEVICE)
    mask = None
    if case.padding != "none":
        mask = torch.ones(B, S, dtype=torch.bool)
        if case.padding == "right":
            mask[-1, S - S // 3:] = False
        elif case.padding == "left":
            mask[0, : S // 4] = False
        else:
            mask[0] = False
        mask = mask.to(DEVICE)
    return {"q": randn(B, H, S, D), "k": randn(B, Hkv, S, D), "v": randn(B, Hkv, S, D), "head_gate": gate,
            "key_padding_mask": mask, "causal": case.causal}


def _run(fn, inputs: dict, grad_out: torch.Tensor, dtype: torch.dtype):
    """fn's output and the gradients of q, k, v (and the gate) for inputs cast to dtype."""
    leaves = {n: inputs[n].detach().to(dtype).requires_grad_() for n in ("q", "k", "v")}
    gate = inputs["head_gate"]
    if gate is not None:
        leaves["head_gate"] = gate.detach().to(torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_()
    out = fn(**{**inputs, **leaves})
    grads = torch.autograd.grad(out, list(leaves.values()), grad_out.to(out.dtype))
    return [out.double()] + [g_.double() for g_ in grads], list(leaves)


def _max_err(got: list[torch.Tensor], want: list[torch.Tensor]) -> list[float]:
    return [(a - b).abs().max().item() if a.numel() else 0.0 for a, b in zip(got, want)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference(case: Case, dtype: torch.dtype) -> None:
    inputs = make_inputs(case, dtype)
    grad_out = torch.randn(inputs["q"].shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    want, names = _run(reference.masked_attention, inputs, grad_out, torch.float64)
    got, _ = _run(km.masked_attention, inputs, grad_out, dtype)
    for name, g_ in zip(["out", *names], got):
        assert torch.isfinite(g_).all(), f"{name} has non-finite values"
    if dtype == torch.float32:
        errors = _max_err(got, want)
        for name, err, w in zip(["out", *names], errors, want):
            assert err <= 1e-4 * max(1.0, w.abs().max().item()), f"{name}: max error {err:.2e}"
        return
    # flash-attention's rule: at most 2x the error of the reference in the same precision.
    torch_low, _ = _run(reference.masked_attention, inputs, grad_out, dtype)
    for name, err, base, w in zip(["out", *names], _max_err(got, want), _max_err(torch_low, want), want):
        floor = 1e-3 * max(1.0, w.abs().max().item())
        assert err <= 2 * base + floor, f"{name}: error {err:.2e} vs torch {dtype} {base:.2e}"


def test_dead_heads_are_never_computed() -> None:
    """NaN inputs in dead heads would poison the output if the kernels touched them."""
    case = Case(2, 4, 4, 21, 32, causal=True, padding="right", gate="head_zero")
    inputs = make_inputs(case, torch.float32)
    for name in ("q", "k", "v"):
        inputs[name][:, 1::2] = float("nan")  # heads 1 and 3 are dead
    leaves = [inputs[n].clone().requires_grad_() for n in ("q", "k", "v")]
    gate = inputs["head_gate"].clone().requires_grad_()
    out = km.masked_attention(*leaves, gate, inputs["key_padding_mask"], True)
    grads = torch.autograd.grad(out, [*leaves, gate], torch.ones_like(out))
    assert torch.equal(out[:, 1::2], torch.zeros_like(out[:, 1::2]))
    for g_ in grads:
        assert torch.isfinite(g_).all()
    for g_ in grads[:3]:
        assert torch.equal(g_[:, 1::2], torch.zeros_like(g_[:, 1::2]))
    assert torch.equal(grads[3][1::2], torch.zeros(2, device=DEVICE))
    clean = make_inputs(case, torch.float32)
    want = reference.masked_attention(clean["q"], clean["k"], clean["v"], clean["head_gate"], clean["key_padding_mask"], True)
    torch.testing.assert_close(out[:, ::2], want[:, ::2], atol=1e-5, rtol=1e-4)


def test_random_shapes_and_gates() -> None:
    rng = random.Random(0)
    for seed in range(6 if not CUDA else 10):
        kv = rng.choice([1, 2, 4])
        case = Case(rng.randint(1, 3), kv * rng.choice([1, 2]), kv, rng.randint(1, 48 if not CUDA else 300),
                    rng.choice(km.HEAD_DIMS[:3] if not CUDA else km.HEAD_DIMS), causal=rng.random() < 0.5,
                    padding=rng.choice(["none", "right", "left", "all"]),
                    gate=rng.choice(["none", "head", "head_zero", "batch_head_zero"]))
        inputs = make_inputs(case, torch.float32, seed)
        grad_out = torch.randn(inputs["q"].shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
        want, _ = _run(reference.masked_attention, inputs, grad_out, torch.float64)
        got, _ = _run(km.masked_attention, inputs, grad_out, torch.float32)
        for err, w in zip(_max_err(got, want), want):
            assert err <= 1e-4 * max(1.0, w.abs().max().item()), f"{case}: error {err:.2e}"


def test_bad_inputs_name_the_problem() -> None:
    q = torch.randn(1, 4, 5, 16, device=DEVICE)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        km.masked_attention(q, torch.randn(1, 3, 5, 16, device=DEVICE), torch.randn(1, 3, 5, 16, device=DEVICE))
    with pytest.raises(ValueError, match="head dim 24"):
        x = torch.randn(1, 2, 5, 24, device=DEVICE)
        km.masked_attention(x, x, x)
    with pytest.raises(ValueError, match=r"head_gate has shape \(3,\)"):
        km.masked_attention(q, q, q, torch.ones(3, device=DEVICE))
    with pytest.raises(ValueError, match="key_padding_mask has shape"):
        km.masked_attention(q, q, q, None, torch.ones(1, 4, dtype=torch.bool, device=DEVICE))


def test_ops_dispatch_to_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    inputs = make_inputs(Case(2, 4, 2, 13, 16, causal=True, padding="left", gate="batch_head_zero"), torch.float32)
    monkeypatch.setenv("STRUCTPRUNE_BACKEND", "triton")
    assert ops.backend_for(inputs["q"], "masked_attention") == "triton"
    calls = []
    real = km.masked_attention
    monkeypatch.setattr(km, "masked_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = ops.masked_attention(**inputs)
    assert calls, "ops.masked_attention did not run the Triton kernel"
    torch.testing.assert_close(got, reference.masked_attention(**inputs), atol=1e-5, rtol=1e-4)
    with pytest.raises(RuntimeError, match="cannot take a torch.float64 tensor"):
        ops.backend_for(inputs["q"].double(), "masked_attention")
