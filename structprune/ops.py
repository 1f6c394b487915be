"""Public masked ops: ``masked_attention`` and ``gated_ffn``, with backend dispatch.

Dispatch order: Triton for CUDA tensors (when available), the C++ extension
``structprune._C`` for CPU tensors, the plain-torch reference otherwise. The environment
variable ``STRUCTPRUNE_BACKEND=reference|cpp|triton`` forces one backend; forcing a backend
that is not available raises an error that says how to get it.

Semantics (shapes, gates, padding) are documented in :mod:`structprune.reference`.
"""

from __future__ import annotations

import os

import torch

from structprune import reference

BACKENDS = ("reference", "cpp", "triton")


def _cpp_available() -> bool:
    try:
        from structprune import _C  # noqa: F401
    except ImportError:
        return False
    return True


def backend_for(t: torch.Tensor, op: str) -> str:
    """The backend that ``op`` would run on for tensors like ``t``."""
    forced = os.environ.get("STRUCTPRUNE_BACKEND", "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"STRUCTPRUNE_BACKEND={forced!r} is not one of {BACKENDS}")
        if forced == "cpp" and not _cpp_available():
            raise RuntimeError(
                "STRUCTPRUNE_BACKEND=cpp but structprune._C is not built; reinstall with "
                "`pip install --no-build-isolation -e .` on a machine with a C++ compiler"
            )
        if forced == "triton":
            raise RuntimeError("STRUCTPRUNE_BACKEND=triton: the Triton kernels are not available yet")
        return forced
    if t.device.type == "cpu" and _cpp_available() and _cpp_supports(op, t):
        return "cpp"
    return "reference"


def _cpp_supports(op: str, t: torch.Tensor) -> bool:
    from structprune import _cpp_ops

    return _cpp_ops.supports(op, t)


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    head_gate: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Softmax attention with a per-head output gate; see :func:`structprune.reference.masked_attention`."""
    if backend_for(q, "masked_attention") == "cpp":
        from structprune import _cpp_ops

        return _cpp_ops.masked_attention(q, k, v, head_gate, key_padding_mask, causal, scale)
    return reference.masked_attention(q, k, v, head_gate, key_padding_mask, causal, scale)


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
    """FFN with a per-neuron gate; see :func:`structprune.reference.gated_ffn`."""
    if backend_for(x, "gated_ffn") == "cpp":
        from structprune import _cpp_ops

        return _cpp_ops.gated_ffn(x, w_up, b_up, w_down, b_down, neuron_gate, activation, w_gate)
    return reference.gated_ffn(x, w_up, b_up, w_down, b_down, neuron_gate, activation, w_gate)
