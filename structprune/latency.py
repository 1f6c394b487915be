"""Per-layer latency lookup tables measured on the deployment backend, for latency budgets.

A :class:`LatencyTable` predicts the latency of any pruned structure of one model at one input
shape: ``base_ms`` (embeddings, norms and classifier: the model with every sublayer removed) plus,
for every layer, ``attn_ms[h]`` (an attention sublayer with ``h`` heads) and ``ffn_ms`` at the
measured FFN widths, interpolated linearly in between (Kwon et al., 2022 fit the same
piecewise-linear shape).

:func:`measure_table` builds it on ONNX Runtime CPU through the project's own path: for each
head count (every layer keeping that many heads and no FFN) and each FFN width (no attention),
``compact()`` -> ``export()`` -> ``export.session(threads=2)``, all sessions timed side by side
with :func:`structprune.bench.time_interleaved` (medians). A sublayer's cost is the difference to
the all-removed model, divided by the layer count. The measured curves are made non-decreasing
(a running maximum: timing noise must not make a smaller layer look slower) and then strictly
increasing by :data:`TIE_MS` per unit, so that removing any unit has a positive cost.

A :class:`~structprune.methods.Budget` of kind ``"latency"`` names a table file; its target is the
fraction of the predicted latency to remove (``0.5``: 2x faster).
"""

from __future__ import annotations

import bisect
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch

from structprune import bench
from structprune.arch.structure import ModelStructure
from structprune.compact import compact
from structprune.export import example_inputs, export, session
from structprune.io import atomic_write_text
from structprune.masks import MaskSet, mask_shapes
from structprune.modeling_compact import StructpruneForSequenceClassification

TIE_MS = 1e-6
"""Slope added per head / neuron so that every unit has a positive latency cost."""
FORMAT_VERSION = 1


@dataclass(frozen=True)
class LatencyTable:
    """Measured latency (ms) of one model's sublayers at one input shape on one backend."""

    backend: str
    batch: int
    seq_len: int
    threads: int
    model: dict
    base_ms: float
    attn_ms: tuple[float, ...]
    ffn_widths: tuple[int, ...]
    ffn_ms: tuple[float, ...]
    machine: dict

    def check(self, structure: ModelStructure) -> None:
        """Raise ``ValueError`` when the table was measured for a model of another shape."""
        if self.model != _signature(structure):
            raise ValueError(f"the latency table was measured for {self.model}, not for this model "
                             f"({_signature(structure)}); measure a table for this model (structprune latency-table)")

    def attention(self, heads: int) -> float:
        return self.attn_ms[heads] + TIE_MS * heads

    def ffn(self, width: int) -> float:
        widths, values = self.ffn_widths, self.ffn_ms
        if not 0 <= width <= widths[-1]:
            raise ValueError(f"FFN width {width} is outside the table's range 0..{widths[-1]}")
        j = min(max(bisect.bisect_right(widths, width) - 1, 0), len(widths) - 2)
        frac = (width - widths[j]) / (widths[j + 1] - widths[j])
        return values[j] + frac * (values[j + 1] - values[j]) + TIE_MS * width

    def layer(self, heads: int, width: int) -> float:
        """Predicted latency of one layer with ``heads`` heads and ``width`` FFN neurons."""
        return self.attention(heads) + self.ffn(width)

    def estimate(self, structure: ModelStructure) -> float:
        """Predicted latency (ms) of a (pruned) structure of the table's model."""
        return self.base_ms + sum(self.layer(layer.heads, layer.ffn) for layer in structure.layers)

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({"format_version": FORMAT_VERSION, **asdict(self)}, indent=2))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> LatencyTable:
        """Read a table file (cached per path and modification time, so a re-measured file is read again)."""
        path = Path(path).resolve()
        return _load(str(path), path.stat().st_mtime_ns if path.is_file() else None)


@lru_cache(maxsize=8)
def _load(path: str, mtime: int | None) -> LatencyTable:
    try:
        info = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"latency table {path} does not exist; measure one first "
                         "(structprune.latency.measure_table or `structprune latency-table`)") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"latency table {path} is not valid JSON ({err}); measure it again") from None
    if info.pop("format_version", None) != FORMAT_VERSION:
        raise ValueError(f"{path} is not a structprune latency table (format {FORMAT_VERSION})")
    for key in ("attn_ms", "ffn_widths", "ffn_ms"):
        info[key] = tuple(info[key])
    return LatencyTable(**info)


def _signature(structure: ModelStructure) -> dict:
    return {"arch": structure.arch, "layers": structure.num_layers, "heads": structure.max_heads,
            "ffn": structure.max_ffn, "hidden": structure.hidden_size}


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
    return LatencyTable("onnxruntime-cpu", batch, seq_len, threads, _signature(structure), base, attn,
                        tuple(widths), ffn, bench.machine_info())
