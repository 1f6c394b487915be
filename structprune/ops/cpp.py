"""Python side of the C++ CPU kernels in :mod:`structprune._C`.

Importing this module loads the extension, which registers ``torch.ops.structprune.*``
(forward and backward ops of ``gated_ffn`` and ``masked_attention``). Here they get

* fake implementations (output shapes and dtypes only), so ``torch.compile`` and
  ``torch.library.opcheck`` can trace them without running the kernels;
* autograd formulas that call the backward ops, so the forward ops are differentiable;
* the wrappers :func:`gated_ffn` and :func:`masked_attention` with the signatures of
  :mod:`structprune.ops.reference`, which :mod:`structprune.ops` dispatches to;
* :func:`supports`, which tells :mod:`structprune.ops` which tensors the kernels handle.

Raises ``ImportError`` when the extension was not built (pure-Python install).
"""

from __future__ import annotations

from typing import Any

import torch

from structprune import _C  # noqa: F401  (loading the library registers the ops)
from structprune.ops.reference import activation_code

OPS = ("masked_attention", "gated_ffn")
DTYPES = (torch.float32, torch.float64)

_ops = torch.ops.structprune


def supports(op: str, tensor: torch.Tensor) -> bool:
    """Whether the C++ kernel of ``op`` handles tensors like ``tensor`` (float32/64 on CPU)."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; the C++ kernels implement {OPS}")
    return tensor.device.type == "cpu" and tensor.dtype in DTYPES


# ---------------------------------------------------------------------------- gated_ffn


@torch.library.register_fake("structprune::gated_ffn_fwd")
def _gated_ffn_fwd_fake(
    x: torch.Tensor,
    w_up: torch.Tensor,
    b_up: torch.Tensor | None,
    w_down: torch.Tensor,
    b_down: torch.Tensor | None,
    neuron_gate: torch.Tensor | None,
    activation: str,
    w_gate: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # The saved pre-activations cover the alive neurons only, a data-dependent count.
    alive = torch.library.get_ctx().new_dynamic_size() if neuron_gate is not None else w_up.shape[0]
    tokens = x.numel() // x.shape[-1]
    gate_pre = x.new_empty((tokens, alive)) if w_gate is not None else x.new_empty(0)
    return x.new_empty((*x.shape[:-1], w_down.shape[0])), x.new_empty((tokens, alive)), gate_pre


@torch.library.register_fake("structprune::gated_ffn_bwd")
def _gated_ffn_bwd_fake(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    w_up: torch.Tensor,
    b_up: torch.Tensor | None,
    w_down: torch.Tensor,
    b_down: torch.Tensor | None,
    neuron_gate: torch.Tensor | None,
    activation: str,
    w_gate: torch.Tensor | None,
    up_pre: torch.Tensor,
    gate_pre: torch.Tensor,
    output_mask: list[bool],
) -> tuple[torch.Tensor, ...]:
    # A gradient that is not requested (or whose input is absent) is an empty [0] tensor.
    inputs = (x, w_up, b_up, w_down, b_down, neuron_gate, w_gate)
    return tuple(
        t.new_empty(t.shape) if t is not None and needed else x.new_empty(0)
        for t, needed in zip(inputs, output_mask)
    )


def _gated_ffn_setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    x, w_up, b_up, w_down, b_down, neuron_gate, activation, w_gate = inputs
    _y, up_pre, gate_pre = output
    ctx.activation = activation
    # The pre-activations of the alive neurons are by-products for the backward pass.
    ctx.mark_non_differentiable(up_pre, gate_pre)
    ctx.save_for_backward(x, w_up, b_up, w_down, b_down, neuron_gate, w_gate, up_pre, gate_pre)


def _gated_ffn_backward(
    ctx: Any, grad_out: torch.Tensor, _grad_up_pre: torch.Tensor | None, _grad_gate_pre: torch.Tensor | None
) -> tuple[torch.Tensor | None, ...]:
    x, w_up, b_up, w_down, b_down, neuron_gate, w_gate, up_pre, gate_pre = ctx.saved_tensors
    needs = ctx.needs_input_grad
    mask = [needs[0], needs[1], needs[2], needs[3], needs[4], needs[5], needs[7]]
    grads = _ops.gated_ffn_bwd(
        grad_out, x, w_up, b_up, w_down, b_down, neuron_gate, ctx.activation, w_gate, up_pre, gate_pre, mask
    )
    dx, dw_up, db_up, dw_down, db_down, dgate, dw_gate = (g if m else None for g, m in zip(grads, mask))
    return dx, dw_up, db_up, dw_down, db_down, dgate, None, dw_gate


torch.library.register_autograd(
    "structprune::gated_ffn_fwd", _gated_ffn_backward, setup_context=_gated_ffn_setup_context
)


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
    """FFN with a per-neuron gate on the C++ kernel; see :func:`structprune.ops.reference.gated_ffn`."""
    activation_code(activation)
    out, _up_pre, _gate_pre = _ops.gated_ffn_fwd(x, w_up, b_up, w_down, b_down, neuron_gate, activation, w_gate)
    return out


# --------------------------------------------------------------------- masked_attention


@torch.library.register_fake("structprune::masked_attention_fwd")
def _masked_attention_fwd_fake(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    head_gate: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return q.new_empty(q.shape), q.new_empty(q.shape[:3])


@torch.library.register_fake("structprune::masked_attention_bwd")
def _masked_attention_bwd_fake(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    head_gate: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    causal: bool,
    scale: float,
    out: torch.Tensor,
    lse: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    dgate = head_gate.new_empty(head_gate.shape) if head_gate is not None else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dgate


def _masked_attention_setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    q, k, v, head_gate, key_padding_mask, causal, scale = inputs
    out, lse = output
    ctx.causal = causal
    ctx.scale = scale
    # The log-sum-exp is a by-product for the backward pass, not a differentiable output.
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, head_gate, key_padding_mask, out, lse)


def _masked_attention_backward(
    ctx: Any, grad_out: torch.Tensor, _grad_lse: torch.Tensor | None
) -> tuple[torch.Tensor | None, ...]:
    q, k, v, head_gate, key_padding_mask, out, lse = ctx.saved_tensors
    dq, dk, dv, dgate = _ops.masked_attention_bwd(
        grad_out, q, k, v, head_gate, key_padding_mask, ctx.causal, ctx.scale, out, lse
    )
    return dq, dk, dv, (dgate if head_gate is not None else None), None, None, None


torch.library.register_autograd(
    "structprune::masked_attention_fwd",
    _masked_attention_backward,
    setup_context=_masked_attention_setup_context,
)


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    head_gate: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Gated attention on the C++ kernel; see :func:`structprune.ops.reference.masked_attention`."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out, _lse = _ops.masked_attention_fwd(q, k, v, head_gate, key_padding_mask, causal, scale)
    return out
