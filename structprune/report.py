"""Dense-vs-pruned reports: ``report.md`` with a table and a plot, and ``results.json``.

:func:`write_report` takes a :class:`Comparison` (what was measured, for the dense and the pruned
model, and how) and writes three files into a folder:

* ``results.json``: every number, machine and settings included, for scripts;
* ``report.png``: accuracy, latency and kept units per layer, dense vs pruned (and a learned method's
  expected sparsity against its target, step by step);
* ``report.md``: the setup, a side-by-side table and the plot, for people.

Each file is written to a temporary name and renamed, so a report is never half-written.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from structprune.io import atomic_write_text

JSON_FILE = "results.json"
PLOT_FILE = "report.png"
MARKDOWN_FILE = "report.md"


@dataclass(frozen=True)
class ModelResult:
    """Measurements of one model: task metric (percent), size, FLOPs and latency (ms, median)."""

    accuracy: float
    accuracy_onnx: float
    params: int
    flops: int
    ort_ms: float
    torch_ms: float


@dataclass(frozen=True)
class QuantizedResult:
    """The pruned model's quantized ONNX export: its mode, task metric (percent) and latency (ms, median)."""

    mode: str
    accuracy_onnx: float
    ort_ms: float


@dataclass(frozen=True)
class Comparison:
    """A dense model and its pruned form, measured side by side in one run.

    ``setup`` lists the settings a reader needs to reproduce or judge the numbers (task, train
    size, seed, sparsity, latency protocol...), in display order. ``layers`` holds the kept
    ``heads`` / ``ffn`` of each pruned layer; ``dense_layer`` the dense counts. ``seconds`` is the
    wall time of each stage of the run that produced the comparison.
    """

    title: str
    metric: str
    setup: dict[str, str]
    dense: ModelResult
    pruned: ModelResult
    dense_layer: dict[str, int]
    layers: list[dict[str, int]]
    machine: dict[str, str | int]
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    sparsity_trace: dict[str, list[float]] | None = None
    """A learned method's pruning phase: per step, the ``target`` and the gates' expected ``sparsity``."""
    quantized: QuantizedResult | None = None

    @property
    def ort_speedup(self) -> float:
        return self.dense.ort_ms / self.pruned.ort_ms

    @property
    def torch_speedup(self) -> float:
        return self.dense.torch_ms / self.pruned.torch_ms

    @property
    def flops_speedup(self) -> float:
        return self.dense.flops / self.pruned.flops

    @property
    def param_sparsity(self) -> float:
        return 1.0 - self.pruned.params / self.dense.params


def _table(c: Comparison) -> str:
    d, p = c.dense, c.pruned
    rows = [
        ("", "dense", "pruned", "pruned / dense"),
        ("---", "---:", "---:", "---:"),
        (f"{c.metric} (PyTorch, %)", f"{d.accuracy:.2f}", f"{p.accuracy:.2f}", f"{p.accuracy - d.accuracy:+.2f} pts"),
        (f"{c.metric} (ONNX Runtime, %)", f"{d.accuracy_onnx:.2f}", f"{p.accuracy_onnx:.2f}",
         f"{p.accuracy_onnx - d.accuracy_onnx:+.2f} pts"),
        ("parameters (attention + FFN)", f"{d.params:,}", f"{p.params:,}", f"{p.params / d.params:.3f}"),
        ("FLOPs per example", f"{d.flops:,}", f"{p.flops:,}", f"{c.flops_speedup:.2f}x fewer"),
        ("latency, ONNX Runtime (ms)", f"{d.ort_ms:.2f}", f"{p.ort_ms:.2f}", f"{c.ort_speedup:.2f}x faster"),
        ("latency, torch eager (ms)", f"{d.torch_ms:.2f}", f"{p.torch_ms:.2f}", f"{c.torch_speedup:.2f}x faster"),
    ]
    q = c.quantized
    if q is not None:
        rows += [(f"{c.metric}, pruned + {q.mode} (ONNX Runtime, %)", "", f"{q.accuracy_onnx:.2f}",
                  f"{q.accuracy_onnx - d.accuracy_onnx:+.2f} pts ({q.accuracy_onnx - p.accuracy_onnx:+.2f} vs fp32)"),
                 (f"latency, pruned + {q.mode}, ONNX Runtime (ms)", "", f"{q.ort_ms:.2f}",
                  f"{d.ort_ms / q.ort_ms:.2f}x faster")]
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def _markdown(c: Comparison) -> str:
    setup = "\n".join(f"- **{key}**: {value}" for key, value in c.setup.items())
    machine = ", ".join(f"{key} {value}" for key, value in c.machine.items())
    kept = ", ".join(f"{layer['heads']}/{layer['ffn']}" for layer in c.layers)
    notes = "".join(f"\n- {note}" for note in c.notes)
    stages = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in c.seconds.items())
    trace = c.sparsity_trace
    control = "" if trace is None else (
        f"Expected sparsity of the gates at the end of pruning: {trace['sparsity'][-1]:.3f} (target "
        f"{trace['target'][-1]:.3f}); the last panel of the plot follows it step by step.\n\n")
    timing = f"\n## Wall time\n\n{sum(c.seconds.values()):.0f} s in all: {stages}.\n" if c.seconds else ""
    return (
        f"# {c.title}\n\n## Setup\n\n{setup}\n\n## Results\n\n{_table(c)}\n\n"
        f"FLOPs-ideal speedup {c.flops_speedup:.2f}x; measured {c.ort_speedup:.2f}x (ONNX Runtime) and "
        f"{c.torch_speedup:.2f}x (torch eager). Parameter sparsity {c.param_sparsity:.1%}.\n\n"
        f"Kept heads/neurons per layer (dense {c.dense_layer['heads']}/{c.dense_layer['ffn']}): {kept}.\n\n{control}"
        f"![dense vs pruned]({PLOT_FILE})\n{timing}\n## Machine\n\n{machine}\n"
        + (f"\n## Notes\n{notes}\n" if notes else "")
    )


def _plot(c: Comparison, path: Path) -> None:
    """Draw the three-panel figure and write it atomically to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    trace = c.sparsity_trace
    fig, axes = plt.subplots(1, 3 if trace is None else 4, figsize=(13 if trace is None else 17, 3.8))
    names, colors = ["dense", "pruned"], ["#4c72b0", "#dd8452", "#55a868"]
    accuracy, latency = [c.dense.accuracy, c.pruned.accuracy], [c.dense.ort_ms, c.pruned.ort_ms]
    if c.quantized is not None:  # ONNX Runtime's accuracy: the quantized model has no PyTorch form
        names, accuracy, latency = (names + [f"pruned {c.quantized.mode}"], accuracy + [c.quantized.accuracy_onnx],
                                    latency + [c.quantized.ort_ms])
    acc, ort = axes[0], axes[1]
    acc.bar(names, accuracy, color=colors[:len(names)])
    acc.set_ylabel(f"{c.metric} (%)")
    acc.set_ylim(max(0.0, min(accuracy) - 15), 100)
    acc.set_title("held-out accuracy")
    ort.bar(names, latency, color=colors[:len(names)])
    ort.set_ylabel("median latency (ms)")
    ort.set_title(f"ONNX Runtime: {c.ort_speedup:.2f}x (FLOPs ideal {c.flops_speedup:.2f}x)")
    for ax, values in ((acc, accuracy), (ort, latency)):
        for x, value in enumerate(values):
            ax.annotate(f"{value:.1f}", (x, value), ha="center", va="bottom")
    layers = axes[2]
    index = list(range(len(c.layers)))
    layers.plot(index, [layer["heads"] / c.dense_layer["heads"] for layer in c.layers], "o-", label="heads")
    layers.plot(index, [layer["ffn"] / c.dense_layer["ffn"] for layer in c.layers], "s-", label="FFN neurons")
    layers.set_ylim(0, 1.05)
    layers.set_xlabel("layer")
    layers.set_ylabel("fraction kept")
    layers.set_title("kept units per layer")
    layers.legend()
    if trace is not None:
        steps = range(1, len(trace["target"]) + 1)
        control = axes[3]
        control.plot(steps, trace["target"], "--", color="gray", label="target")
        control.plot(steps, trace["sparsity"], color="#c44e52", label="expected (gates)")
        control.set_xlabel("pruning step")
        control.set_ylabel("sparsity")
        control.set_title("sparsity during pruning")
        control.legend()
    fig.tight_layout()
    save_figure(fig, path)


def save_figure(fig, path: Path) -> None:
    """Write a matplotlib figure as PNG to ``path`` atomically (its folder made if missing; readable by all, as any
    other output), and close it."""
    from matplotlib import pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=110)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_report(directory: str | os.PathLike, comparison: Comparison) -> Path:
    """Write ``results.json``, ``report.png`` and ``report.md`` into ``directory``; its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    numbers = asdict(comparison) | {
        "ort_speedup": comparison.ort_speedup,
        "torch_speedup": comparison.torch_speedup,
        "flops_speedup": comparison.flops_speedup,
        "param_sparsity": comparison.param_sparsity,
    }
    atomic_write_text(directory / JSON_FILE, json.dumps(numbers, indent=2))
    _plot(comparison, directory / PLOT_FILE)
    atomic_write_text(directory / MARKDOWN_FILE, _markdown(comparison))
    return directory / MARKDOWN_FILE
