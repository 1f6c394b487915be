"""Gated feed-forward block on the GPU with work proportional to the alive neurons.

Semantics are those of :func:`structprune.ops.reference.gated_ffn`: ``down(act(up(x)) * gate)``, or
``down(act(x @ w_gate.T) * up(x) * gate)`` for SwiGLU.

The neurons whose gate is exactly 0 are dropped before any arithmetic: their rows of ``w_up`` /
``w_gate`` and columns of ``w_down`` are gathered away (one ``nonzero``, a host sync), the three
(four with SwiGLU) projections run as cuBLAS GEMMs on the alive slices only, and the weight
gradients are scattered back with exact zeros for the dead units. What Triton fuses is the
pointwise part between the GEMMs, in one pass each way, as Liger-Kernel does for SwiGLU/GEGLU:

* forward: ``h = act(u) * gate`` (or ``act(z) * u * gate``), reading the saved pre-activations;
* backward: from ``dh = dy @ w_down``: ``du``, ``dz``, the gated hidden ``h`` for ``dW_down``,
  and per-block column sums of ``dh * act`` (the gate gradient) and ``du`` (the up-bias
  gradient), reduced afterwards without atomics, so results are deterministic.

Only the pre-activations of the alive neurons are kept for the backward pass.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from structprune.ops.reference import activation_code

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _activate(z, ACT: tl.constexpr):
    """(act(z), act'(z)) in float32; ACT is structprune.ops.reference.activation_code (gelu, gelu_tanh, relu, silu)."""
    if ACT == 0:  # exact GELU
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        pdf = 0.3989422804014327 * tl.exp(-0.5 * z * z)
        return z * cdf, cdf + z * pdf
    elif ACT == 1:  # tanh GELU
        inner = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        t = 2.0 * tl.sigmoid(2.0 * inner) - 1.0
        d_inner = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z * z)
        return 0.5 * z * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * d_inner
    elif ACT == 2:  # ReLU
        return tl.where(z > 0, z, 0.0), tl.where(z > 0, 1.0, 0.0)
    else:  # SiLU
        s = tl.sigmoid(z)
        return z * s, s * (1.0 + z * (1.0 - s))


@triton.jit
def _forward_kernel(U, Z, Gate, H, M, F, ACT: tl.constexpr, GATED: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (offs_m < M)[:, None] & (offs_f < F)[None, :]
    idx = offs_m[:, None] * F + offs_f[None, :]
    g = tl.load(Gate + offs_f, mask=offs_f < F, other=0.0).to(tl.float32)
    u = tl.load(U + idx, mask=mask, other=0.0).to(tl.float32)
    if GATED:
        a, _ = _activate(tl.load(Z + idx, mask=mask, other=0.0).to(tl.float32), ACT)
        h = a * u
    else:
        h, _ = _activate(u, ACT)
    tl.store(H + idx, (h * g[None, :]).to(H.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(U, Z, dH, Gate, H, dZ, Sums, M, F, ACT: tl.constexpr, GATED: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr):
    """dH becomes dL/du in place; H gets the gated hidden; Sums[block] the column sums."""
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    fmask = offs_f < F
    mask = (offs_m < M)[:, None] & fmask[None, :]
    idx = offs_m[:, None] * F + offs_f[None, :]
    g = tl.load(Gate + offs_f, mask=fmask, other=0.0).to(tl.float32)[None, :]
    u = tl.load(U + idx, mask=mask, other=0.0).to(tl.float32)
    d = tl.load(dH + idx, mask=mask, other=0.0).to(tl.float32)
    if GATED:
        s, ds = _activate(tl.load(Z + idx, mask=mask, other=0.0).to(tl.float32), ACT)
        a = s * u
        du = d * g * s
        tl.store(dZ + idx, (d * g * u * ds).to(dZ.dtype.element_ty), mask=mask)
    else:
        a, da = _activate(u, ACT)
        du = d * g * da
    tl.store(dH + idx, du.to(dH.dtype.element_ty), mask=mask)
    tl.store(H + idx, (a * g).to(H.dtype.element_ty), mask=mask)
    tl.store(Sums + pid_m * 2 * F + offs_f, tl.sum(tl.where(mask, d * a, 0.0), 0), mask=fmask)
    tl.store(Sums + pid_m * 2 * F + F + offs_f, tl.sum(tl.where(mask, du, 0.0), 0), mask=fmask)


def _blocks() -> tuple[int, int]:
    return (16, 16) if _INTERPRET else (64, 128)


def _grid(m: int, f: int) -> tuple[int, int]:
    bm, bf = _blocks()
    return triton.cdiv(m, bm), triton.cdiv(f, bf)


class _AliveFfn(torch.autograd.Function):
    """The block over the alive neurons only; weights here are already the alive slices."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x2, w_up, b_up, w_down, b_down, gate, w_gate, activation: str):
        up = torch.addmm(b_up, x2, w_up.t()) if b_up is not None else x2 @ w_up.t()
        z = x2 @ w_gate.t() if w_gate is not None else None
        m, f = up.shape
        h = torch.empty_like(up)
        bm, bf = _blocks()
        _forward_kernel[_grid(m, f)](up, z if z is not None else up, gate, h, m, f,
                                     ACT=activation_code(activation), GATED=z is not None, BLOCK_M=bm, BLOCK_F=bf)
        y = torch.addmm(b_down, h, w_down.t()) if b_down is not None else h @ w_down.t()
        ctx.save_for_backward(x2, w_up, w_down, gate, w_gate, up, z)
        ctx.activation, ctx.has_b_up, ctx.has_b_down = activation, b_up is not None, b_down is not None
        return y

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dy):
        x2, w_up, w_down, gate, w_gate, up, z = ctx.saved_tensors
        m, f = up.shape
        dh = dy @ w_down  # becomes dL/du in the kernel
        h = torch.empty_like(up)
        dz = torch.empty_like(z) if z is not None else None
        bm, bf = _blocks()
        grid = _grid(m, f)
        sums = torch.empty((grid[0], 2, f), device=up.device, dtype=torch.float32)
        _backward_kernel[grid](up, z if z is not None else up, dh, gate, h, dz if dz is not None else h, sums, m, f,
                               ACT=activation_code(ctx.activation), GATED=z is not None, BLOCK_M=bm, BLOCK_F=bf)
        sums = sums.sum(0)
        dx = dh @ w_up
        if dz is not None:
            dx = dx.addmm_(dz, w_gate)
        return (
            dx,
            dh.t() @ x2,
            sums[1].to(up.dtype) if ctx.has_b_up else None,
            dy.t() @ h,
            dy.sum(0) if ctx.has_b_down else None,
            sums[0].to(gate.dtype),
            dz.t() @ x2 if dz is not None else None,
            None,
        )


def supports(x: torch.Tensor) -> bool:
    """Whether the kernels handle inputs like ``x`` (CUDA, or CPU under ``TRITON_INTERPRET=1``)."""
    dtypes = (torch.float32, torch.float16) if _INTERPRET else (torch.float32, torch.float16, torch.bfloat16)
    return (x.is_cuda or _INTERPRET) and x.dtype in dtypes


def gated_ffn(
    x: torch.Tensor,
    w_up: torch.Tensor,
    b_up: torch.Tensor | None,
    w_down: torch.Tensor,
    b_down: torch.Tensor | None,
    neuron_gate: torch.Tensor | None = None,
    activation: str = "gelu",
    w_gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """FFN with a per-neuron gate on the Triton kernels; see :func:`structprune.ops.reference.gated_ffn`."""
    activation_code(activation)
    if w_up.dim() != 2 or w_up.shape[1] != x.shape[-1] or w_down.dim() != 2 or w_down.shape[1] != w_up.shape[0]:
        raise ValueError(f"gated_ffn: shapes do not chain: x {tuple(x.shape)}, w_up {tuple(w_up.shape)}, "
                         f"w_down {tuple(w_down.shape)}; expected w_up [F, D] and w_down [D_out, F]")
    n_ff = w_up.shape[0]
    if neuron_gate is not None and tuple(neuron_gate.shape) != (n_ff,):
        raise ValueError(f"neuron_gate has shape {tuple(neuron_gate.shape)}, expected [{n_ff}]")
    gate = neuron_gate if neuron_gate is not None else torch.ones(n_ff, device=x.device, dtype=x.dtype)
    alive = torch.nonzero(gate != 0).flatten()
    x2 = x.reshape(-1, x.shape[-1])
    if alive.numel() < n_ff:  # gathers are differentiable: gradients scatter back with zeros elsewhere
        w_up, w_down, gate = w_up.index_select(0, alive), w_down.index_select(1, alive), gate.index_select(0, alive)
        b_up = b_up.index_select(0, alive) if b_up is not None else None
        w_gate = w_gate.index_select(0, alive) if w_gate is not None else None
    if alive.numel() == 0:
        # Every neuron removed: only the output bias is left. The empty products keep every
        # input in the graph, so each gets a zero gradient as with the reference.
        y = (x2 @ w_up.t()) @ w_down.t()
        for empty in (gate, b_up, w_gate):
            if empty is not None:
                y = y + empty.sum()
        if b_down is not None:
            y = y + b_down
        return y.view(*x.shape[:-1], w_down.shape[0])
    y = _AliveFfn.apply(x2, w_up, b_up, w_down, b_down, gate.to(x.dtype), w_gate, activation)
    return y.view(*x.shape[:-1], w_down.shape[0])


__all__ = ["gated_ffn", "supports"]
