"""The Triton gated FFN (``structprune.kernels.gated_ffn``) against the reference.

Runs under ``TRITON_INTERPRET=1`` on a CPU (set in conftest), compiled on a CUDA machine
(bf16 too). Outputs and every gradient are compared with the fp64 reference; low-precision
tolerances are relative to the error of the reference computed in the same precision.
"""

from __future__ import annotations

import random

import pytest
import torch

from structprune import ops
from structprune.ops import reference
from structprune.ops.reference import ACTIVATIONS

pytest.importorskip("triton", reason="Triton is not installed")
from structprune.kernels import gated_ffn as kf  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
DTYPE_IDS = ["fp32", "fp16"] + (["bf16"] if CUDA else [])
NAMES = ("x", "w_up", "b_up", "w_down", "b_down", "neuron_gate", "w_gate")


def make_inputs(lead: tuple[int, ...], d_in: int, n_ff: int, d_out: int, *, gated: bool, bias: bool,
                gate: str, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE)

    neuron_gate = None
    if gate != "none":
        neuron_gate = torch.rand(n_ff, generator=g) + 0.1
        if gate == "some_zero":
            neuron_gate[::3] = 0.0
        elif gate == "all_zero":
            neuron_gate.zero_()
        neuron_gate = neuron_gate.to(DEVICE)
    return {
        "x": randn(*lead, d_in),
        "w_up": randn(n_ff, d_in, scale=d_in**-0.5),
        "b_up": randn(n_ff) if bias else None,
        "w_down": randn(d_out, n_ff, scale=n_ff**-0.5),
        "b_down": randn(d_out) if bias else None,
        "neuron_gate": neuron_gate,
        "w_gate": randn(n_ff, d_in, scale=d_in**-0.5) if gated else None,
    }


def _run(fn, inputs: dict, activation: str, grad_out: torch.Tensor, dtype: torch.dtype):
    names = [n for n in NAMES if inputs[n] is not None]
    leaves = {n: inputs[n].detach().to(dtype).requires_grad_() for n in names}
    out = fn(**leaves, **{n: None for n in NAMES if n not in leaves}, activation=activation)
    grads = torch.autograd.grad(out, list(leaves.values()), grad_out.to(out.dtype))
    return dict(zip(["out", *names], [out.double()] + [g_.double() for g_ in grads]))


SHAPES = [((3, 7), 16, 40, 12), ((23,), 32, 64, 32)] + ([((4, 300), 256, 1024, 256)] if CUDA else [])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "swiglu"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(shape, gated: bool, activation: str, dtype: torch.dtype) -> None:
    lead, d_in, n_ff, d_out = shape
    inputs = make_inputs(lead, d_in, n_ff, d_out, gated=gated, bias=not gated, gate="some_zero")
    grad_out = torch.randn(*lead, d_out, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    want = _run(reference.gated_ffn, inputs, activation, grad_out, torch.float64)
    got = _run(kf.gated_ffn, inputs, activation, grad_out, dtype)
    low = _run(reference.gated_ffn, inputs, activation, grad_out, dtype) if dtype != torch.float32 else None
    for name, w in want.items():
        scale = max(1.0, w.abs().max().item())
        err = (got[name] - w).abs().max().item()
        if low is None:
            assert err <= 1e-4 * scale, f"{name}: max error {err:.2e}"
        else:
            base = (low[name] - w).abs().max().item()
            assert err <= 2 * base + 1e-3 * scale, f"{name}: error {err:.2e} vs torch {dtype} {base:.2e}"


@pytest.mark.parametrize("gate", ["none", "all_zero"])
def test_gate_edge_cases(gate: str) -> None:
    inputs = make_inputs((2, 5), 16, 24, 8, gated=False, bias=True, gate=gate)
    grad_out = torch.randn(2, 5, 8, device=DEVICE)
    want = _run(reference.gated_ffn, inputs, "gelu", grad_out, torch.float64)
    got = _run(kf.gated_ffn, inputs, "gelu", grad_out, torch.float32)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)


def test_dead_neurons_are_never_computed() -> None:
    """NaN weights of dead neurons would poison the output if they were multiplied by zero."""
    inputs = make_inputs((3, 4), 16, 30, 10, gated=True, bias=False, gate="some_zero")
    dead = inputs["neuron_gate"] == 0
    poisoned = dict(inputs)
    for name, dim in (("w_up", 0), ("w_gate", 0), ("w_down", 1)):
        w = inputs[name].clone()
        w.index_fill_(dim, torch.nonzero(dead).flatten(), float("nan"))
        poisoned[name] = w
    grad_out = torch.randn(3, 4, 10, device=DEVICE)
    got = _run(kf.gated_ffn, poisoned, "silu", grad_out, torch.float32)
    want = _run(reference.gated_ffn, inputs, "silu", grad_out, torch.float64)
    for name, g_ in got.items():
        assert torch.isfinite(g_).all(), f"{name} is not finite: a dead neuron was read"
    torch.testing.assert_close(got["out"], want["out"], atol=1e-5, rtol=1e-4)
    assert torch.equal(got["w_up"][dead], torch.zeros_like(got["w_up"][dead]))
    assert torch.equal(got["neuron_gate"][dead], torch.zeros_like(got["neuron_gate"][dead]))


def test_random_shapes() -> None:
    rng = random.Random(0)
    for seed in range(8):
        lead = tuple(rng.randint(1, 9) for _ in range(rng.randint(1, 2)))
        d_in, n_ff, d_out = rng.randint(1, 40), rng.randint(1, 70), rng.randint(1, 40)
        inputs = make_inputs(lead, d_in, n_ff, d_out, gated=rng.random() < 0.5, bias=rng.random() < 0.5,
                             gate=rng.choice(["none", "some", "some_zero"]), seed=seed)
        activation = rng.choice(ACTIVATIONS)
        grad_out = torch.randn(*lead, d_out, device=DEVICE)
        want = _run(reference.gated_ffn, inputs, activation, grad_out, torch.float64)
        got = _run(kf.gated_ffn, inputs, activation, grad_out, torch.float32)
        for name in want:
            torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=f"{name} seed {seed}")


def test_bad_inputs_name_the_problem() -> None:
    inputs = make_inputs((2,), 8, 12, 4, gated=False, bias=True, gate="some")
    with pytest.raises(ValueError, match="unknown activation 'gelu2'"):
        kf.gated_ffn(**inputs, activation="gelu2")
    with pytest.raises(ValueError, match=r"neuron_gate has shape \(5,\)"):
        kf.gated_ffn(**{**inputs, "neuron_gate": torch.ones(5, device=DEVICE)})
    with pytest.raises(ValueError, match="shapes do not chain"):
        kf.gated_ffn(**{**inputs, "w_down": torch.ones(4, 7, device=DEVICE)})


def test_ops_dispatch_to_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    inputs = make_inputs((2, 3), 16, 20, 16, gated=True, bias=False, gate="some_zero")
    monkeypatch.setenv("STRUCTPRUNE_BACKEND", "triton")
    assert ops.backend_for(inputs["x"], "gated_ffn") == "triton"
    calls = []
    real = kf.gated_ffn
    monkeypatch.setattr(kf, "gated_ffn", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = ops.gated_ffn(**inputs, activation="silu")
    assert calls, "ops.gated_ffn did not run the Triton kernel"
    torch.testing.assert_close(got, reference.gated_ffn(**inputs, activation="silu"), atol=1e-5, rtol=1e-4)
