"""Latency of causal LMs, prefill and decode, on torch and ONNX Runtime: the timing protocol.

Two phases, timed apart because they are bound by different things:

* ``prefill`` (time to first token): one timed call runs a ``[batch, prompt]`` prompt from an empty
  key/value cache and picks the next token from the last position's logits (torch computes only those,
  ``logits_to_keep=1``, as ``generate()`` does; an ONNX graph computes what it was exported to). Its
  ideal speedup is the ratio of :func:`structprune.costs.prefill_flops`.
* ``decode`` (time per output token): the cache already holds ``context`` tokens when timing starts.
  One prompt is prefilled once, untimed, and its cache copied to every row of the batch; one timed call
  is one step of one new token per row, and the step's token is dropped from the cache again (torch:
  ``DynamicCache.crop``; ONNX Runtime: the same past arrays are fed to every call), so every timed step
  reads ``context`` tokens. Its ideal speedup is the ratio of :func:`structprune.costs.decode_bytes`.

Both backends go through the code that generates: the model's forward with a transformers
``DynamicCache`` (torch, under ``inference_mode``) and :func:`structprune.ort_generation.step` (ONNX
Runtime). Dense and pruned models (and backends) are timed in alternating turns
(:func:`structprune.bench.time_interleaved`) with the threads of :data:`structprune.bench.CPU_THREADS`;
on CUDA with CUDA events (:func:`structprune.bench.cuda_stats`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from transformers import DynamicCache

from structprune import bench, ort_generation
from structprune.arch.structure import ModelStructure
from structprune.costs import decode_ideal_speedup, prefill_ideal_speedup

PHASES = ("prefill", "decode")


@dataclass(frozen=True)
class Phase:
    """What one timed call does: a prefill of ``batch`` prompts of ``tokens`` tokens, or one decoding step
    of ``batch`` sequences with ``tokens`` tokens already in the cache."""

    kind: str
    batch: int
    tokens: int

    def __post_init__(self) -> None:
        if self.kind not in PHASES:
            raise ValueError(f"phase {self.kind!r} is not one of {PHASES}")
        if self.batch < 1 or self.tokens < 1:
            raise ValueError(f"a {self.kind} phase needs batch and tokens >= 1, got {self.batch} and {self.tokens}")

    @property
    def positions(self) -> int:
        """Positions the phase uses (the decoded token included)."""
        return self.tokens + (self.kind == "decode")

    def label(self) -> str:
        what = "prompt" if self.kind == "prefill" else "context"
        return f"{self.kind} batch {self.batch} {what} {self.tokens}"

    def ideal_speedup(self, dense: ModelStructure, pruned: ModelStructure, spec: dict) -> float:
        """FLOPs-ideal (prefill) or bytes-ideal (decode) speedup of ``pruned`` over ``dense``."""
        if self.kind == "prefill":
            return prefill_ideal_speedup(dense, pruned, spec, self.tokens)
        return decode_ideal_speedup(dense, pruned, spec, self.tokens, self.batch)


def check_positions(phases: list[Phase], limit: int | None) -> None:
    """Refuse phases longer than the model's ``limit`` positions (``None``: no limit), naming the longest."""
    longest = max(phases, key=lambda p: p.positions, default=None)
    if limit is not None and longest is not None and longest.positions > limit:
        raise ValueError(f"{longest.label()} needs {longest.positions} positions, more than the {limit} the model "
                         "has; time shorter prompts or contexts")


def token_ids(vocab: int, batch: int, tokens: int, seed: int = 0) -> torch.Tensor:
    """Random token ids ``[batch, tokens]`` (latency does not depend on which tokens)."""
    return torch.randint(0, vocab, (batch, tokens), generator=torch.Generator().manual_seed(seed))


class Runner(Protocol):
    """A model on a backend that builds the zero-argument calls of a phase."""

    def prefill(self, ids: torch.Tensor) -> Callable[[], object]: ...

    def decode(self, context: torch.Tensor, new: torch.Tensor) -> Callable[[], object]: ...


class TorchLM:
    """A structprune causal LM in torch: eager or ``torch.compile``-d, moved (in place) to ``device`` and ``dtype``."""

    def __init__(self, model: torch.nn.Module, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 compile: bool = False):
        self.model = model.to(device=device, dtype=dtype).eval()
        self.device = torch.device(device)
        self.forward = torch.compile(self.model) if compile else self.model

    def _run(self, ids: torch.Tensor, past: int, cache: DynamicCache):
        batch, new = ids.shape
        mask = torch.ones(batch, past + new, dtype=torch.long, device=self.device)
        positions = torch.arange(past, past + new, device=self.device).expand(batch, new)
        return self.forward(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                            logits_to_keep=1)

    def prefill(self, ids: torch.Tensor) -> Callable[[], torch.Tensor]:
        ids = ids.to(self.device)

        def call() -> torch.Tensor:
            with torch.inference_mode():
                return self._run(ids, 0, DynamicCache()).logits[:, -1].argmax(-1)

        return call

    def decode(self, context: torch.Tensor, new: torch.Tensor) -> Callable[[], torch.Tensor]:
        """``context [1, C]`` is prefilled once and copied to the ``new [B, 1]`` rows; a call is one step."""
        cache, past, new = DynamicCache(), context.shape[1], new.to(self.device)
        with torch.inference_mode():
            self._run(context.to(self.device), 0, cache)
            cache.batch_repeat_interleave(new.shape[0])

        def call() -> torch.Tensor:
            with torch.inference_mode():
                logits = self._run(new, past, cache).logits
                cache.crop(-1)  # back to ``past`` tokens: every step reads the same context
            return logits

        return call


class OrtLM:
    """An exported decoder served by ONNX Runtime, stepped by :func:`structprune.ort_generation.step`."""

    def __init__(self, session):
        self.session = session

    def prefill(self, ids: torch.Tensor) -> Callable[[], np.ndarray]:
        ids = ids.numpy().astype(np.int64)
        mask, past = np.ones_like(ids), ort_generation.empty_past(self.session, ids.shape[0])
        return lambda: ort_generation.step(self.session, ids, mask, past)[0][:, -1].argmax(-1)

    def decode(self, context: torch.Tensor, new: torch.Tensor) -> Callable[[], np.ndarray]:
        """As :meth:`TorchLM.decode`; every call feeds the same past arrays."""
        ids = context.numpy().astype(np.int64)
        _, past = ort_generation.step(self.session, ids, np.ones_like(ids), ort_generation.empty_past(self.session, 1))
        batch = new.shape[0]
        past = {name: np.ascontiguousarray(np.repeat(value, batch, axis=0)) for name, value in past.items()}
        new = new.numpy().astype(np.int64)
        mask = np.ones((batch, ids.shape[1] + 1), dtype=np.int64)
        return lambda: ort_generation.step(self.session, new, mask, past)[0]


def phase_call(runner: Runner, phase: Phase, vocab: int, seed: int = 0) -> Callable[[], object]:
    """The timed call of ``phase`` on ``runner`` (a decode call's cache is filled here, untimed)."""
    if phase.kind == "prefill":
        return runner.prefill(token_ids(vocab, phase.batch, phase.tokens, seed))
    return runner.decode(token_ids(vocab, 1, phase.tokens, seed), token_ids(vocab, phase.batch, 1, seed + 1))


@dataclass(frozen=True)
class PhaseResult:
    """Dense and pruned latency of one phase on one backend, beside the ideal speedup."""

    phase: Phase
    backend: str
    dense: bench.LatencyStats
    pruned: bench.LatencyStats
    ideal: float
    other_cores: float | None

    @property
    def speedup(self) -> float:
        return self.dense.median_ms / self.pruned.median_ms

    @property
    def ratio(self) -> float:
        """Measured speedup as a fraction of the ideal one."""
        return self.speedup / self.ideal

    def row(self) -> dict[str, object]:
        """The CSV fields of this result (settings and machine are added by the caller)."""
        ideal_kind = "flops" if self.phase.kind == "prefill" else "bytes"
        fields = {"phase": self.phase.kind, "batch": self.phase.batch, "tokens": self.phase.tokens,
                  "backend": self.backend}
        for name, s in (("dense", self.dense), ("pruned", self.pruned)):
            fields |= {f"{name}_median_ms": round(s.median_ms, 4), f"{name}_p10_ms": round(s.p10_ms, 4),
                       f"{name}_p90_ms": round(s.p90_ms, 4), f"{name}_n": s.n}
        return fields | {"speedup": round(self.speedup, 4), "ideal_kind": ideal_kind,
                         "ideal_speedup": round(self.ideal, 4), "ratio": round(self.ratio, 4),
                         "other_cpu_cores": None if self.other_cores is None else round(self.other_cores, 3)}


def measure_phase(runners: Mapping[tuple[str, str], Runner], phase: Phase, vocab: int, ideal: float,
                  timer: Callable[[dict], dict]) -> list[PhaseResult]:
    """Time ``phase`` on every ``(backend, "dense" | "pruned")`` runner in one interleaved block; one result
    per backend. ``timer`` maps the calls to their :class:`~structprune.bench.LatencyStats` (e.g.
    ``lambda calls: bench.time_interleaved(calls, **bench.TIMING)``, or :func:`structprune.bench.cuda_stats`)."""
    backends = list(dict.fromkeys(backend for backend, _ in runners))
    missing = [(b, v) for b in backends for v in ("dense", "pruned") if (b, v) not in runners]
    if missing:
        raise ValueError(f"no runner for {missing}: every backend needs a dense and a pruned model")
    calls = {key: phase_call(runner, phase, vocab) for key, runner in runners.items()}
    with bench.OtherCpuLoad() as load:
        stats = timer(calls)
    return [PhaseResult(phase, b, stats[(b, "dense")], stats[(b, "pruned")], ideal, load.cores) for b in backends]


def results_table(results: list[PhaseResult]) -> str:
    """One line per phase and backend: dense and pruned medians, measured and ideal speedup, their ratio."""
    lines = [(f"{'phase':<8} {'batch':>5} {'tokens':>6} {'backend':<11} {'dense ms':>10} {'pruned ms':>10} "
              f"{'speedup':>8} {'ideal':>7} {'ratio':>6}")]
    for r in results:
        ideal = f"{r.ideal:.2f}{'F' if r.phase.kind == 'prefill' else 'B'}"
        lines.append(f"{r.phase.kind:<8} {r.phase.batch:>5} {r.phase.tokens:>6} {r.backend:<11} "
                     f"{r.dense.median_ms:>10.2f} {r.pruned.median_ms:>10.2f} {r.speedup:>7.2f}x {ideal:>7} "
                     f"{r.ratio:>6.2f}")
    lines.append("ideal: F = FLOPs-ideal (prefill_flops), B = bytes-ideal (decode_bytes); ratio = speedup / ideal; "
                 "prefill tokens = prompt, decode tokens = context already cached, ms per step")
    return "\n".join(lines)
