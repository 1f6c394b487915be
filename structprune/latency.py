"""Measuring per-layer latency tables (:class:`structprune.costs.LatencyTable`) for latency budgets.

:func:`measure_table` builds one on ONNX Runtime CPU through the project's own path: for each
head count (every layer keeping that many heads and no FFN) and each FFN width (no attention),
``compact()`` -> ``export()`` -> ``export.session(threads=2)``, all sessions timed side by side
with :func:`structprune.bench.time_interleaved` (medians). A sublayer's cost is the difference to
the all-removed model, divided by the layer count. The measured curves are made non-decreasing
(a running maximum: timing noise must not make a smaller layer look slower) and then strictly
increasing by :data:`structprune.costs.TIE_MS` per unit, so that removing any unit has a positive cost.

What one timed call is, is the table's ``phase``: a classifier's is one forward pass of ``batch`` x
``seq_len`` (``"forward"``); a causal LM's is a prefill of ``batch`` prompts of ``seq_len`` tokens
(``"prefill"``) or one decoding step of ``batch`` sequences with ``seq_len`` tokens in the key/value cache
(``"decode"``, the default), timed as :mod:`structprune.decode_bench` times them
(:func:`~structprune.decode_bench.phase_call` on an :class:`~structprune.decode_bench.OrtLM`). The two
phases are bound by different things (compute, memory), so a model pruned for one is measured for that one.

A :class:`~structprune.budget.Budget` of kind ``"latency"`` names a table file; its target is the
fraction of the predicted latency to remove (``0.5``: 2x faster).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from structprune import bench
from structprune.arch.structure import ModelStructure
from structprune.compaction import compact
from structprune.costs import LatencyTable
from structprune.decode_bench import PHASES, OrtLM, Phase, check_positions, phase_call
from structprune.export import example_inputs, export, session
from structprune.maskset import MaskSet, mask_shapes
from structprune.modeling_structprune import (
    StructpruneForCausalLM,
    StructpruneForSequenceClassification,
)


def _masks(structure: ModelStructure, heads: int, width: int) -> MaskSet:
    shapes = mask_shapes(structure)
    head, neuron = torch.zeros(shapes["head"]), torch.zeros(shapes["neuron"])
    head[:, :heads] = 1
    neuron[:, :width] = 1
    return MaskSet({"head": head, "neuron": neuron})


def _running_max(values: list[float]) -> tuple[float, ...]:
    out, top = [], float("-inf")
    for v in values:
        top = max(top, v)
        out.append(top)
    return tuple(out)


def _phase(model, phase: str | None) -> str:
    """The phase to measure ``model`` in: checked against its task, defaulted (causal LMs: ``"decode"``)."""
    if model.spec.get("task") != "causal_lm":
        if phase not in (None, "forward"):
            raise ValueError(f"a classifier is timed in one forward pass: phase must be None or 'forward', "
                             f"got {phase!r} (prefill and decode are phases of causal LMs)")
        return "forward"
    if phase is None:
        return "decode"
    if phase not in PHASES:
        hint = " (a causal LM has no single forward pass to time)" if phase == "forward" else ""
        raise ValueError(f"a causal LM is timed per phase: use phase 'prefill' or 'decode', not {phase!r}{hint}")
    return phase


def _check_length(model, phase: str, batch: int, seq_len: int) -> None:
    """Refuse a ``seq_len`` beyond the model's positions (a decode step needs one more than its context)."""
    limit = model.max_sequence_length
    if phase != "forward":
        check_positions([Phase(phase, batch, seq_len)], limit)
    elif limit is not None and seq_len > limit:
        raise ValueError(f"forward of sequence {seq_len} needs {seq_len} positions, more than the {limit} the model "
                         "has; measure a shorter sequence")


def session_call(model, phase: str, batch: int, seq_len: int) -> Callable[[object], Callable[[], object]]:
    """``ONNX Runtime session -> timed call`` of an export of ``model``: a forward of ``batch`` x ``seq_len``
    (``phase="forward"``, classifiers), or the phase's call as :mod:`structprune.decode_bench` times it (causal LMs)."""
    if phase == "forward":
        inputs = example_inputs(model, batch, seq_len, padded=False)
        return lambda sess: bench.ort_forward(sess, inputs)
    shape, vocab = Phase(phase, batch, seq_len), model.spec["vocab_size"]
    return lambda sess: phase_call(OrtLM(sess), shape, vocab)


def measure_table(model: StructpruneForSequenceClassification | StructpruneForCausalLM, batch: int = 8,
                  seq_len: int = 128, ffn_points: int = 8, threads: int = bench.CPU_THREADS,
                  timing: dict | None = None, progress: bool = True, phase: str | None = None) -> LatencyTable:
    """Measure a table for the dense ``model`` on ONNX Runtime CPU (see the module docstring).

    ``ffn_points`` FFN widths are measured, evenly spaced up to the full width (plus 0). ``phase``: a
    classifier's is ``"forward"`` (``None`` says the same); a causal LM's ``"prefill"`` (``seq_len``: the
    prompt) or ``"decode"`` (``seq_len``: the tokens already cached; the default).
    """
    phase = _phase(model, phase)
    structure = ModelStructure.from_spec(model.spec)
    MaskSet.ones(structure).validate(structure)
    if ffn_points < 1:
        raise ValueError(f"ffn_points must be >= 1, got {ffn_points}")
    _check_length(model, phase, batch, seq_len)
    H, F, L = structure.max_heads, structure.max_ffn, structure.num_layers
    widths = sorted({round(F * i / ffn_points) for i in range(ffn_points + 1)})
    configs = {("attn", h): (h, 0) for h in range(H + 1)} | {("ffn", w): (0, w) for w in widths if w > 0}
    call = session_call(model, phase, batch, seq_len)
    calls = {}
    with tempfile.TemporaryDirectory(prefix="structprune-latency-") as tmp:
        for n, (key, (heads, width)) in enumerate(configs.items()):
            if progress:
                print(f"latency table: exporting {n + 1}/{len(configs)} ({key[0]} {key[1]})", flush=True)
            folder = Path(tmp) / f"{key[0]}-{key[1]}"
            export(compact(model, _masks(structure, heads, width)), folder, threads=threads)
            calls[key] = call(session(folder, threads=threads))
        stats = bench.time_interleaved(calls, **(timing or bench.TIMING))
    base = stats[("attn", 0)].median_ms
    attn = _running_max([max(0.0, (stats[("attn", h)].median_ms - base) / L) for h in range(H + 1)])
    ffn = _running_max([max(0.0, (stats[("ffn", w)].median_ms - base) / L) if w else 0.0 for w in widths])
    return LatencyTable("onnxruntime-cpu", batch, seq_len, threads, LatencyTable.signature(structure), base, attn,
                        tuple(widths), ffn, bench.machine_info(), phase)
