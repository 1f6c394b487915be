"""Plain-torch reference implementations of the masked ops.

These are the ground truth every kernel (C++, Triton) is tested against, and the fallback
backend of :mod:`structprune.ops`. They favour clarity over speed.

Gate convention shared by every backend: a unit whose gate is exactly 0 is *removed*. It
contributes nothing to the output and receives no gradient (its weights' gradients and its
gate's gradient are 0), which is what lets kernels skip dead units entirely. With a
hard-concrete gate clamped at 0 the upstream gradient is 0 anyway, so skipping is exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from structprune.modeling_structprune import ACTIVATIONS as _TABLE
from structprune.modeling_structprune import activation as activation_fn

ACTIVATIONS = tuple(_TABLE)
"""The activation names every backend implements, in the order of their kernel codes (the table is the model's)."""


def activation_code(name: str) -> int:
    """The kernels' code of activation ``name`` (its index in :data:`ACTIVATIONS`); ``ValueError`` if unknown."""
    activation_fn(name)
    return ACTIVATIONS.index(name)


def live_gate(gate: torch.Tensor) -> torch.Tensor:
    """The gate with exact zeros detached, so removed units get no gradient."""
    return torch.where(gate != 0, gate, torch.zeros_like(gate))


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    head_gate: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Softmax attention with a per-head output gate.

    Args:
        q: ``[B, H, S, D]`` queries.
        k, v: ``[B, Hkv, S, D]`` keys and values; ``H`` must be a multiple of ``Hkv`` (GQA).
        head_gate: ``[H]`` or ``[B, H]``; multiplies each head's output. ``None`` means all ones.
        key_padding_mask: ``[B, S]`` bool, ``True`` for real tokens, ``False`` for padding.
        causal: mask keys after each query.
        scale: softmax scale, default ``D ** -0.5``.

    Returns:
        ``[B, H, S, D]``. Masked scores use the dtype's most negative finite value, so a query
        that sees no key at all (left padding with a causal mask) gets a uniform average
        instead of NaN, as Hugging Face's eager attention does.
    """
    B, H, S, D = q.shape
    Hkv = k.shape[1]
    if H % Hkv:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({Hkv})")
    if Hkv != H:
        k = k.repeat_interleave(H // Hkv, dim=1)
        v = v.repeat_interleave(H // Hkv, dim=1)
    scale = D**-0.5 if scale is None else scale
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    neg = torch.finfo(scores.dtype).min
    if key_padding_mask is not None:
        scores = scores.masked_fill(~key_padding_mask.bool()[:, None, None, :], neg)
    if causal:
        future = torch.ones(S, S, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, neg)
    out = torch.matmul(torch.softmax(scores, dim=-1), v)
    if head_gate is not None:
        gate = live_gate(head_gate)
        gate = gate[None, :] if gate.dim() == 1 else gate
        out = out * gate[:, :, None, None].to(out.dtype)
    return out


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
    """Feed-forward block with a per-neuron gate.

    ``down(act(up(x)) * gate)`` for a plain FFN (BERT), or
    ``down(act(x @ w_gate.T) * up(x) * gate)`` when ``w_gate`` is given (SwiGLU, Llama).

    Args:
        x: ``[..., D]``.
        w_up: ``[F, D]``; b_up: ``[F]`` or ``None``.
        w_down: ``[D_out, F]``; b_down: ``[D_out]`` or ``None``.
        neuron_gate: ``[F]``; ``None`` means all ones.
        activation: one of :data:`ACTIVATIONS`.
        w_gate: ``[F, D]`` for gated FFNs (no bias, as in Llama/Qwen2/Mistral).
    """
    h = F.linear(x, w_up, b_up)
    if w_gate is not None:
        h = activation_fn(activation)(F.linear(x, w_gate)) * h
    else:
        h = activation_fn(activation)(h)
    if neuron_gate is not None:
        h = h * live_gate(neuron_gate).to(h.dtype)
    return F.linear(h, w_down, b_down)
