"""Measuring per-layer latency tables (:class:`structprune.costs.LatencyTable`) for latency budgets.

:func:`measure_table` builds one on ONNX Runtime CPU through the project's own path: for each
head count (every layer keeping that many heads and no FFN) and each FFN width (no attention),
``compact()`` -> ``export()`` -> ``export.session(threads=2)``, all sessions timed side by side
with :func:`structprune.bench.time_interleaved` (medians). A sublayer's cost is the difference to
the all-removed model, divided by the layer count. The measured curves are made non-decreasing
(a running maximum: timing noise must not make a smaller layer look slower) and then strictly
increasing by :data:`structprune.costs.TIE_MS` per unit, so that removing any unit has a positive cost.

A :class:`~structprune.budget.Budget` of kind ``"latency"`` names a table file; its target is the
fraction of the predicted latency to remove (``0.5``: 2x faster).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from structprune import bench
from structprune.arch.structure import ModelStructure
from structprune.compaction import compact
from structprune.costs import LatencyTable
from structprune.export import example_inputs, export, session
from structprune.maskset import MaskSet, mask_shapes
from structprune.modeling_structprune import StructpruneForSequenceClassification


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


def measure_table(model: StructpruneForSequenceClassification, batch: int = 8, seq_len: int = 128,
                  ffn_points: int = 8, threads: int = bench.CPU_THREADS, timing: dict | None = None,
                  progress: bool = True) -> LatencyTable:
    """Measure a table for the dense ``model`` on ONNX Runtime CPU (see the module docstring).

    ``ffn_points`` FFN widths are measured, evenly spaced up to the full width (plus 0).
    """
    structure = ModelStructure.from_spec(model.spec)
    MaskSet.ones(structure).validate(structure)
    if ffn_points < 1:
        raise ValueError(f"ffn_points must be >= 1, got {ffn_points}")
    H, F, L = structure.max_heads, structure.max_ffn, structure.num_layers
    widths = sorted({round(F * i / ffn_points) for i in range(ffn_points + 1)})
    configs = {("attn", h): (h, 0) for h in range(H + 1)} | {("ffn", w): (0, w) for w in widths if w > 0}
    inputs = example_inputs(model, batch, seq_len, padded=False)
    calls = {}
    with tempfile.TemporaryDirectory(prefix="structprune-latency-") as tmp:
        for n, (key, (heads, width)) in enumerate(configs.items()):
            if progress:
                print(f"latency table: exporting {n + 1}/{len(configs)} ({key[0]} {key[1]})", flush=True)
            folder = Path(tmp) / f"{key[0]}-{key[1]}"
            export(compact(model, _masks(structure, heads, width)), folder, threads=threads)
            calls[key] = bench.ort_forward(session(folder, threads=threads), inputs)
        stats = bench.time_interleaved(calls, **(timing or bench.TIMING))
    base = stats[("attn", 0)].median_ms
    attn = _running_max([max(0.0, (stats[("attn", h)].median_ms - base) / L) for h in range(H + 1)])
    ffn = _running_max([max(0.0, (stats[("ffn", w)].median_ms - base) / L) if w else 0.0 for w in widths])
    return LatencyTable("onnxruntime-cpu", batch, seq_len, threads, LatencyTable.signature(structure), base, attn,
                        tuple(widths), ffn, bench.machine_info())
