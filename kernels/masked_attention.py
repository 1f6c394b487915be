"""Triton flash attention with a per-head output gate; heads whose gate is exactly 0 cost nothing.

Semantics are those of :func:`structprune.ops.reference.masked_attention`: ``q [B, H, S, D]``,
``k, v [B, Hkv, S, D]`` (grouped-query attention when ``Hkv < H``), a gate ``[H]`` or ``[B, H]``
multiplying each head's output, an optional key padding mask ``[B, S]`` and causal masking.

How it works (after the Triton tutorial ``06-fused-attention.py``, FlashAttention-2):

* forward: one program per (query block, (batch, head) pair), an online softmax over key blocks
  in base 2, the gated output and the row's log-sum-exp saved for the backward pass;
* backward: ``delta = rowsum(out * dout)`` per row (for the gated output this equals
  ``rowsum(O * dO)`` of the ungated one, so the gate cancels), then one kernel for dK/dV with a
  program per (key block, (batch, key/value head) pair) that walks the query heads of its group,
  and one for dQ per (query block, pair); no atomics;
* the gate gradient is ``sum_rows(delta) / gate``: the backward pass computes ``delta`` anyway;
* dead heads: a program whose gate is exactly 0 reads one scalar, writes zeros and ends, so a
  dead head costs no arithmetic and no reads of q, k, v. The grid is not shrunk to the alive
  heads: sizing it would need the alive count on the host, a device sync per call that left the
  GPU idle through the host's launch overhead, which cost more than the dead programs do
  (BENCHMARKS.md). Without syncs the ops also run under CUDA graphs.

A query row that sees no key at all (a padded prefix under a causal mask, or a sequence that
is all padding) gets a uniform average over every key, as in the reference and Hugging Face's
eager attention: the forward kernel writes the mean of v there (computed beforehand with
torch), and the backward pass adds its share of dV with torch; such rows give no dQ or dK.

Autotuning covers block sizes, warps and pipeline stages; sequence lengths share results within
a power of two. ``STRUCTPRUNE_TRITON_AUTOTUNE=0`` (read at import) keeps one config, for tests.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from structprune.ops.reference import live_gate

HEAD_DIMS = (16, 32, 64, 128)
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_AUTOTUNE = os.environ.get("STRUCTPRUNE_TRITON_AUTOTUNE", "1") != "0"
_LOG2E = 1.4426950408889634


def _configs(space: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    """Autotuning space on a GPU, as (BLOCK_M, BLOCK_N, warps, stages), the first entry alone
    without autotuning; a single small config under the interpreter, whose Triton 3.9 fails with several
    ("0 active drivers")."""
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    space = space if _AUTOTUNE else space[:1]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in space]


def _even(args: dict) -> bool:
    """Whether the sequence splits into whole blocks, so that no bounds mask is needed."""
    return args["S"] % args["BLOCK_M"] == 0 and args["S"] % args["BLOCK_N"] == 0


_FWD_SPACE = [(64, 64, 4, 2), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 4, 3), (64, 128, 4, 2)]
_DKDV_SPACE = [(32, 64, 4, 2), (32, 128, 4, 2), (64, 128, 8, 2), (32, 64, 4, 3), (64, 64, 4, 2), (16, 128, 4, 2)]
_DQ_SPACE = [(64, 32, 4, 2), (128, 32, 4, 2), (64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 3), (128, 128, 8, 2)]
_KEY = ["S_KEY", "HEAD_DIM", "CAUSAL", "HAS_KPM"]


@triton.jit
def _mask_scores(x, offs_q, offs_k, kpm_row, S, fill, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr,
                 EVEN: tl.constexpr, KEYS_ON_ROWS: tl.constexpr):
    """``x`` with ``fill`` where a query may not see a key. ``x`` is [queries, keys], or
    [keys, queries] with KEYS_ON_ROWS (the transposed tiles of the dK/dV kernel)."""
    if CAUSAL or HAS_KPM or not EVEN:
        if KEYS_ON_ROWS:
            q_idx = offs_q[None, :]
            k_idx = offs_k[:, None]
        else:
            q_idx = offs_q[:, None]
            k_idx = offs_k[None, :]
        valid = (k_idx < S) & (q_idx < S)
        if HAS_KPM:
            kp = tl.load(kpm_row + k_idx, mask=k_idx < S, other=0)
            valid = valid & (kp != 0)
        if CAUSAL:
            valid = valid & (q_idx >= k_idx)
        x = tl.where(valid, x, fill)
    return x


@triton.autotune(configs=_configs(_FWD_SPACE), key=_KEY)
@triton.heuristics({"EVEN": _even})
@triton.jit
def _fwd_kernel(
    Q, K, V, Out, Lse, Gate, Kpm, MeanV,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    H, GROUP, S, S_KEY, qk_scale,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN: tl.constexpr,
):
    start_m = tl.program_id(0)
    pair = tl.program_id(1)
    b = pair // H
    h = pair % H
    hk = h // GROUP
    gate = tl.load(Gate + pair)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    if gate != 0:
        offs_n0 = tl.arange(0, BLOCK_N)
        q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                    mask=(offs_m < S)[:, None], other=0.0)
        k_base = K + b * stride_kb + hk * stride_kh
        v_base = V + b * stride_vb + hk * stride_vh
        kpm_row = Kpm + b * S
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        hi = tl.minimum((start_m + 1) * BLOCK_M, S) if CAUSAL else S
        for start_n in range(0, hi, BLOCK_N):
            offs_n = start_n + offs_n0
            k = tl.load(k_base + offs_n[None, :] * stride_ks + offs_d[:, None] * stride_kd,
                        mask=(offs_n < S)[None, :], other=0.0)
            qk = tl.dot(q, k, input_precision=PRECISION) * qk_scale
            qk = _mask_scores(qk, offs_m, offs_n, kpm_row, S, float("-inf"), HAS_KPM, CAUSAL, EVEN, False)
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw no key yet
            alpha = tl.math.exp2(m_i - m_safe)
            p = tl.math.exp2(qk - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                        mask=(offs_n < S)[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        sees_key = l_i > 0
        out = acc / tl.where(sees_key, l_i, 1.0)[:, None]
        if HAS_KPM:  # a row that sees no key: the uniform average over every key
            mean_v = tl.load(MeanV + (pair // GROUP) * HEAD_DIM + offs_d)
            out = tl.where(sees_key[:, None], out, mean_v[None, :])
        out = out * gate
        # +inf marks a row that sees no key: exp2(x - lse) is then 0 in the backward pass.
        lse = tl.where(sees_key, m_i + tl.math.log2(tl.where(sees_key, l_i, 1.0)), float("inf"))
    else:
        out = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        lse = tl.full([BLOCK_M], float("inf"), tl.float32)
    tl.store(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od,
             out.to(Out.dtype.element_ty), mask=(offs_m < S)[:, None])
    tl.store(Lse + pair * S + offs_m, lse, mask=offs_m < S)


@triton.jit
def _delta_kernel(Out, dOut, Delta, Gate,
                  stride_ob, stride_oh, stride_os, stride_od,
                  stride_gb, stride_gh, stride_gs, stride_gd,
                  H, S, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    pair = tl.program_id(1)
    b = pair // H
    h = pair % H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    mask = (offs_m < S)[:, None]
    delta = tl.zeros([BLOCK_M], tl.float32)
    if tl.load(Gate + pair) != 0:
        o = tl.load(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od,
                    mask=mask, other=0.0).to(tl.float32)
        do = tl.load(dOut + b * stride_gb + h * stride_gh + offs_m[:, None] * stride_gs + offs_d[None, :] * stride_gd,
                     mask=mask, other=0.0).to(tl.float32)
        delta = tl.sum(o * do, 1)
    tl.store(Delta + pair * S + offs_m, delta, mask=offs_m < S)


@triton.autotune(configs=_configs(_DKDV_SPACE), key=_KEY)
@triton.heuristics({"EVEN": _even})
@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, dOut, dK, dV, Lse, Delta, Gate, Kpm,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_gb, stride_gh, stride_gs, stride_gd,
    H, HKV, GROUP, S, S_KEY, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK_N
    kv_pair = tl.program_id(1)
    b = kv_pair // HKV
    hk = kv_pair % HKV
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    kv_mask = (offs_n < S)[:, None]
    k = tl.load(K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd,
                mask=kv_mask, other=0.0)
    v = tl.load(V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                mask=kv_mask, other=0.0)
    kpm_row = Kpm + b * S
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    lo = (start_n // BLOCK_M) * BLOCK_M if CAUSAL else 0
    for j in range(0, GROUP):
        h = hk * GROUP + j
        pair = b * H + h
        gate = tl.load(Gate + pair)
        if gate != 0:
            q_base = Q + b * stride_qb + h * stride_qh
            do_base = dOut + b * stride_gb + h * stride_gh
            for start_m in range(lo, S, BLOCK_M):
                offs_m = start_m + offs_m0
                row_mask = (offs_m < S)[:, None]
                q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd, mask=row_mask, other=0.0)
                # dO of the ungated output: gate * dOut.
                do = (tl.load(do_base + offs_m[:, None] * stride_gs + offs_d[None, :] * stride_gd,
                              mask=row_mask, other=0.0) * gate).to(q.dtype)
                lse = tl.load(Lse + pair * S + offs_m, mask=offs_m < S, other=float("inf"))
                delta = tl.load(Delta + pair * S + offs_m, mask=offs_m < S, other=0.0)
                qk_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # [BLOCK_N, BLOCK_M]
                p_t = _mask_scores(tl.math.exp2(qk_t - lse[None, :]), offs_m, offs_n, kpm_row, S, 0.0,
                                   HAS_KPM, CAUSAL, EVEN, True)
                dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
                dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
                ds_t = p_t * (dp_t - delta[None, :])
                dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    out_off = b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd
    tl.store(dK + out_off, (dk * sm_scale).to(dK.dtype.element_ty), mask=kv_mask)
    out_off = b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd
    tl.store(dV + out_off, dv.to(dV.dtype.element_ty), mask=kv_mask)


@triton.autotune(configs=_configs(_DQ_SPACE), key=_KEY)
@triton.heuristics({"EVEN": _even})
@triton.jit
def _bwd_dq_kernel(
    Q, K, V, dOut, dQ, Lse, Delta, Gate, Kpm,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_gb, stride_gh, stride_gs, stride_gd,
    H, GROUP, S, S_KEY, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN: tl.constexpr,
):
    start_m = tl.program_id(0)
    pair = tl.program_id(1)
    b = pair // H
    h = pair % H
    hk = h // GROUP
    gate = tl.load(Gate + pair)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_mask = (offs_m < S)[:, None]
    q_off = b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if gate != 0:
        q = tl.load(Q + q_off, mask=row_mask, other=0.0)
        do = (tl.load(dOut + b * stride_gb + h * stride_gh + offs_m[:, None] * stride_gs + offs_d[None, :] * stride_gd,
                      mask=row_mask, other=0.0) * gate).to(q.dtype)
        lse = tl.load(Lse + pair * S + offs_m, mask=offs_m < S, other=float("inf"))
        delta = tl.load(Delta + pair * S + offs_m, mask=offs_m < S, other=0.0)
        k_base = K + b * stride_kb + hk * stride_kh
        v_base = V + b * stride_vb + hk * stride_vh
        kpm_row = Kpm + b * S
        hi = tl.minimum((start_m + 1) * BLOCK_M, S) if CAUSAL else S
        for start_n in range(0, hi, BLOCK_N):
            offs_n = start_n + offs_n0
            col_mask = (offs_n < S)[None, :]
            k_t = tl.load(k_base + offs_n[None, :] * stride_ks + offs_d[:, None] * stride_kd, mask=col_mask, other=0.0)
            v_t = tl.load(v_base + offs_n[None, :] * stride_vs + offs_d[:, None] * stride_vd, mask=col_mask, other=0.0)
            qk = tl.dot(q, k_t, input_precision=PRECISION) * qk_scale
            p = _mask_scores(tl.math.exp2(qk - lse[:, None]), offs_m, offs_n, kpm_row, S, 0.0, HAS_KPM, CAUSAL,
                             EVEN, False)
            dp = tl.dot(do, v_t, input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k_t.dtype), tl.trans(k_t), input_precision=PRECISION)
    tl.store(dQ + q_off, (dq * sm_scale).to(dQ.dtype.element_ty), mask=row_mask)


def _strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def _precision(dtype: torch.dtype) -> str:
    """fp32 inputs get IEEE products (torch's default for fp32 matmuls); fp16/bf16 use the tensor cores."""
    return "ieee" if dtype == torch.float32 else "tf32"


def supports(q: torch.Tensor) -> bool:
    """Whether the kernels handle queries like ``q`` (CUDA, or CPU under ``TRITON_INTERPRET=1``)."""
    dtypes = (torch.float32, torch.float16) if _INTERPRET else (torch.float32, torch.float16, torch.bfloat16)
    return (q.is_cuda or _INTERPRET) and q.dtype in dtypes and q.shape[-1] in HEAD_DIMS


def _s_key(S: int) -> int:
    """Sequence lengths share autotuning results within a power of two."""
    return triton.next_power_of_2(S)


class _MaskedAttention(torch.autograd.Function):
    """Kernel forward/backward. Inputs are checked; the gate is a contiguous float32 ``[B, H]``
    with exact zeros for dead heads; ``no_key`` ([B, S] bool, rows that see no key) comes with a
    key padding mask ``kpm`` (int8)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, q, k, v, gate_bh, kpm, no_key, causal: bool, scale: float):
        B, H, S, D = q.shape
        Hkv = k.shape[1]
        out = torch.empty_like(q)
        lse = torch.empty((B, H, S), device=q.device, dtype=torch.float32)
        # Rows that see no key get the mean of v over every key (the reference's uniform row).
        mean_v = v.float().mean(dim=2).contiguous() if kpm is not None else lse
        grid = lambda meta: (triton.cdiv(S, meta["BLOCK_M"]), B * H)  # noqa: E731
        _fwd_kernel[grid](
            q, k, v, out, lse, gate_bh, kpm if kpm is not None else lse, mean_v,
            *_strides(q), *_strides(k), *_strides(v), *_strides(out),
            H, H // Hkv, S, _s_key(S), scale * _LOG2E,
            HEAD_DIM=D, CAUSAL=causal, HAS_KPM=kpm is not None, PRECISION=_precision(q.dtype),
        )
        ctx.save_for_backward(q, k, v, gate_bh, kpm, no_key, out, lse)
        ctx.causal, ctx.scale = causal, scale
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dout):
        q, k, v, gate_bh, kpm, no_key, out, lse = ctx.saved_tensors
        B, H, S, D = q.shape
        Hkv = k.shape[1]
        group = H // Hkv
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        delta = torch.empty((B, H, S), device=q.device, dtype=torch.float32)
        kpm_arg = kpm if kpm is not None else lse
        common = dict(HEAD_DIM=D, CAUSAL=ctx.causal, HAS_KPM=kpm is not None, PRECISION=_precision(q.dtype))
        block = 16 if _INTERPRET else 64
        _delta_kernel[(triton.cdiv(S, block), B * H)](
            out, dout, delta, gate_bh, *_strides(out), *_strides(dout), H, S, HEAD_DIM=D, BLOCK_M=block,
        )
        grid_kv = lambda meta: (triton.cdiv(S, meta["BLOCK_N"]), B * Hkv)  # noqa: E731
        _bwd_dkdv_kernel[grid_kv](
            q, k, v, dout, dk, dv, lse, delta, gate_bh, kpm_arg,
            *_strides(q), *_strides(k), *_strides(v), *_strides(dout),
            H, Hkv, group, S, _s_key(S), ctx.scale * _LOG2E, ctx.scale, **common,
        )
        grid_q = lambda meta: (triton.cdiv(S, meta["BLOCK_M"]), B * H)  # noqa: E731
        _bwd_dq_kernel[grid_q](
            q, k, v, dout, dq, lse, delta, gate_bh, kpm_arg,
            *_strides(q), *_strides(k), *_strides(v), *_strides(dout),
            H, group, S, _s_key(S), ctx.scale * _LOG2E, ctx.scale, **common,
        )
        if kpm is not None:
            # The rows that see no key average v over every key: dV gets their gated dO / S.
            weight = gate_bh[:, :, None] * no_key[:, None, :].float()  # [B, H, S]
            d_mean = torch.einsum("bhs,bhsd->bhd", weight, dout.float()).view(B, Hkv, group, D).sum(2)
            dv += (d_mean / S)[:, :, None, :].to(dv.dtype)
        # dL/dgate = sum(dOut * O_ungated) = sum_rows(delta) / gate on alive pairs.
        alive = gate_bh != 0
        dgate = torch.where(alive, delta.sum(-1) / torch.where(alive, gate_bh, 1.0), 0.0)
        return dq, dk, dv, dgate, None, None, None, None


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_gate, key_padding_mask, causal: bool) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"masked_attention: q, k, v must be 4-d [B, heads, S, D], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, H, S, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[2] != S or k.shape[3] != D:
        raise ValueError(f"masked_attention (Triton): k {tuple(k.shape)} and v {tuple(v.shape)} must be "
                         f"[{B}, Hkv, {S}, {D}] for q {tuple(q.shape)} (self-attention, same length)")
    if H % k.shape[1]:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({k.shape[1]})")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"masked_attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); cast them to one")
    if D not in HEAD_DIMS:
        raise ValueError(f"masked_attention (Triton): head dim {D} is not one of {HEAD_DIMS}")
    if head_gate is not None and tuple(head_gate.shape) not in ((H,), (B, H)):
        raise ValueError(f"head_gate has shape {tuple(head_gate.shape)}, expected [{H}] or [{B}, {H}]")
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (B, S):
        raise ValueError(f"key_padding_mask has shape {tuple(key_padding_mask.shape)}, expected [{B}, {S}]")


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    head_gate: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Gated attention on the Triton kernels; see :func:`structprune.ops.reference.masked_attention`."""
    _check(q, k, v, head_gate, key_padding_mask, causal)
    B, H, S, D = q.shape
    scale = D**-0.5 if scale is None else float(scale)
    gate = live_gate(head_gate) if head_gate is not None else torch.ones(H, device=q.device)
    gate_bh = gate.float().expand(B, H)
    kpm = no_key = None
    if key_padding_mask is not None:
        sees = key_padding_mask.bool()
        kpm = sees.to(torch.int8).contiguous()
        no_key = ~(sees.cumsum(-1) > 0) if causal else ~sees.any(-1, keepdim=True).expand(B, S)
    return _MaskedAttention.apply(q, k, v, gate_bh.contiguous(), kpm, no_key, causal, scale)


__all__ = ["HEAD_DIMS", "masked_attention", "supports"]
