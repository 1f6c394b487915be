"""Public masked ops: ``masked_attention`` and ``gated_ffn``, with backend dispatch.

Dispatch order: the Triton kernels (:mod:`structprune.kernels`) for CUDA tensors, the C++
extension ``structprune._C`` for CPU tensors, the plain-torch reference otherwise (other
devices, dtypes or head dims the kernels do not cover). The environment variable
``STRUCTPRUNE_BACKEND=reference|cpp|triton`` forces one backend; forcing a backend that is not
available, or that cannot take the given tensors, raises an error that says what to do.

Semantics (shapes, gates, padding) are documented in :mod:`structprune.ops.reference`.
"""

from __future__ import annotations

import os

import torch

from structprune.ops import reference

BACKENDS = ("reference", "cpp", "triton")


def _cpp_available() -> bool:
    try:
        from structprune import _C  # noqa: F401
    except ImportError:
        return False
    return True


def _triton_module(op: str):
    """The Triton kernel module of ``op``, or ``None`` when Triton is not installed."""
    try:
        if op == "masked_attention":
            from structprune.kernels import masked_attention as module
        else:
            from structprune.kernels import gated_ffn as module
    except ImportError:
        return None
    return module


def _cpp_supports(op: str, t: torch.Tensor) -> bool:
    from structprune.ops import cpp as _cpp_ops

    return _cpp_ops.supports(op, t)


def backend_for(t: torch.Tensor, op: str) -> str:
    """The backend that ``op`` would run on for tensors like ``t`` (queries, or the FFN input)."""
    if op not in ("masked_attention", "gated_ffn"):
        raise ValueError(f"unknown op {op!r}; expected 'masked_attention' or 'gated_ffn'")
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
            module = _triton_module(op)
            if module is None:
                raise RuntimeError("STRUCTPRUNE_BACKEND=triton but Triton is not installed; `pip install triton`")
            if not module.supports(t):
                raise RuntimeError(
                    f"STRUCTPRUNE_BACKEND=triton: the Triton {op} kernel cannot take a {t.dtype} tensor on "
                    f"{t.device}{' with head dim ' + str(t.shape[-1]) if op == 'masked_attention' else ''}; it "
                    "needs CUDA tensors (fp32/fp16/bf16, head dim 16/32/64/128), or TRITON_INTERPRET=1 for CPU "
                    "tensors (fp32/fp16), set before Triton is imported"
                )
        return forced
    if t.is_cuda:
        module = _triton_module(op)
        if module is not None and module.supports(t):
            return "triton"
    if t.device.type == "cpu" and _cpp_available() and _cpp_supports(op, t):
        return "cpp"
    return "reference"


def _check_gate(gate: torch.Tensor | None, name: str) -> None:
    if gate is not None and not bool(torch.isfinite(gate).all()):
        raise ValueError(f"{name} holds NaN or infinite values; a gate multiplies a unit's output and must be finite "
                         "(0 removes the unit)")


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    head_gate: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Softmax attention with a per-head output gate; see :func:`structprune.ops.reference.masked_attention`."""
    _check_gate(head_gate, "head_gate")
    backend = backend_for(q, "masked_attention")
    if backend == "triton":
        return _triton_module("masked_attention").masked_attention(q, k, v, head_gate, key_padding_mask, causal, scale)
    if backend == "cpp":
        from structprune.ops import cpp as _cpp_ops

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
    """FFN with a per-neuron gate; see :func:`structprune.ops.reference.gated_ffn`."""
    _check_gate(neuron_gate, "neuron_gate")
    backend = backend_for(x, "gated_ffn")
    if backend == "triton":
        return _triton_module("gated_ffn").gated_ffn(x, w_up, b_up, w_down, b_down, neuron_gate, activation, w_gate)
    if backend == "cpp":
        from structprune.ops import cpp as _cpp_ops

        return _cpp_ops.gated_ffn(x, w_up, b_up, w_down, b_down, neuron_gate, activation, w_gate)
    return reference.gated_ffn(x, w_up, b_up, w_down, b_down, neuron_gate, activation, w_gate)
