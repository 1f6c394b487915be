"""ONNX Runtime's profile of a model: kernel time per operator type, per call, and where each kernel runs.

:func:`profile` runs a session built as the timed one (:func:`structprune.export.session`, same graph
optimisation and threads) with ``SessionOptions.enable_profiling`` and saves the optimised graph it runs;
:func:`parse_profile` reads the JSON trace (``cat == "Node"`` events named ``*_kernel_time``, their
``args.op_name``), skips the warm-up runs, and splits kernels into those inside the transformer layers and
those outside (embeddings, pooler, classifier, LM head), groups op types (:data:`GROUPS`), counts the FLOPs
of MatMul kernels from their shapes, and estimates the per-kernel overhead.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

GROUPS = {
    "MatMul": ("MatMul", "FusedMatMul", "Gemm", "FusedGemm", "MatMulInteger", "MatMulIntegerToFloat",
               "DynamicQuantizeMatMul", "MatMulNBits", "QLinearMatMul", "QGemm"),
    "attention": ("Attention", "MultiHeadAttention", "GroupQueryAttention", "QAttention", "PackedAttention",
                  "PackedMultiHeadAttention", "DecoderMaskedMultiHeadAttention", "SparseAttention", "Softmax",
                  "RotaryEmbedding"),
    "normalisation": ("LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization",
                      "SkipSimplifiedLayerNormalization", "RMSNormalization", "EmbedLayerNormalization"),
}
GROUP_NAMES = (*GROUPS, "other")
CHEAPEST = 0.1
"""Share of the nodes, the cheapest per kernel, whose median duration is the per-kernel overhead."""
WARMUP = 2
"""Calls before the profiled ones."""
LAYER_NODE = re.compile(r"/layers\.\d+/")
OUTSIDE_OPS = ("EmbedLayerNormalization",)
KERNEL = "_kernel_time"


def group_of(op: str) -> str:
    return next((name for name, ops in GROUPS.items() if op in ops), "other")


@dataclass(frozen=True)
class Profile:
    """One model's ONNX Runtime profile, per call: kernel time (ms; each node's median over the profiled calls) and
    kernel invocations."""

    calls: int
    """Profiled calls (after the warm-up)."""
    run_ms: float
    """Median profiled run."""
    between_ms: float
    """Median time of a profiled run outside its kernels (executor, feeds and fetches)."""
    op_ms: dict[str, float]
    op_kernels: dict[str, int]
    graph_nodes: dict[str, int]
    """Nodes per op type of the optimised graph ORT runs."""
    kernel_overhead_ms: float
    """Median duration of the cheapest kernels: what launching any kernel costs."""
    fixed_ms: dict[str, float]
    """Kernels outside the transformer layers, by op type."""
    fixed_kernels: int
    norm_ms: dict[str, float]
    """Normalisation kernels inside the layers, by op type."""
    norm_kernels: int
    matmul_ms: float
    matmul_kernels: int
    matmul_gflop: float
    """GFLOP per call of the layers' MatMul kernels, from their input and output shapes."""

    def group_ms(self) -> dict[str, float]:
        out = dict.fromkeys(GROUP_NAMES, 0.0)
        for op, ms in self.op_ms.items():
            out[group_of(op)] += ms
        return out


def _runs(events: list[dict], warmup: int) -> list[tuple[float, list[dict]]]:
    """(run µs, its kernel events in execution order) of each profiled run after the first ``warmup``."""
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])[warmup:]
    kernels = sorted((e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith(KERNEL)),
                     key=lambda e: e["ts"])
    out = [(run["dur"], [e for e in kernels if run["ts"] <= e["ts"] <= run["ts"] + run["dur"]]) for run in runs]
    if not out or not out[0][1]:
        raise RuntimeError(f"ONNX Runtime's profile holds no kernel of a run after {warmup} warm-up runs")
    return out


def in_layers(nodes: list[tuple[str, str]]) -> list[bool]:
    """Whether each ``(node name, op type)``, in execution order, belongs to a transformer layer.

    The exporter names nodes after their modules (``/model/layers.3/ffn/up/MatMul``); a node whose fusion
    dropped the name (``Attention_0``) is in the layers when the named node before or after it is;
    ``EmbedLayerNormalization`` is the embeddings, outside.
    """
    anchor = [bool(LAYER_NODE.search(name)) if "/" in name or op in OUTSIDE_OPS else None for name, op in nodes]
    before, after, last = [], [], False
    for flag in anchor:
        last = last if flag is None else flag
        before.append(last)
    last = False
    for flag in reversed(anchor):
        last = last if flag is None else flag
        after.append(last)
    return [b or a for b, a in zip(before, reversed(after))]


def _matmul_flops(event: dict) -> float:
    """2 x output elements x the first input's last dimension (MatMul; Gemm without transA)."""
    args = event.get("args", {})
    try:
        a = next(iter(args["input_type_shape"][0].values()))
        out = next(iter(args["output_type_shape"][0].values()))
        return 2.0 * math.prod(out) * a[-1]
    except (KeyError, IndexError, StopIteration, TypeError):
        return 0.0


@dataclass(frozen=True)
class _Node:
    op: str
    us: float
    """Median over the profiled runs of the node's kernel time in a run."""
    kernels: int
    flops: float
    inside: bool


def _nodes(runs: list[tuple[float, list[dict]]]) -> list[_Node]:
    """Every node of the runs, in the first run's execution order."""
    first = runs[0][1]
    ops, counts, flops = {}, {}, {}
    for e in first:
        name, op = e["name"], e["args"]["op_name"]
        ops[name], counts[name] = op, counts.get(name, 0) + 1
        flops[name] = flops.get(name, 0.0) + (_matmul_flops(e) if group_of(op) == "MatMul" else 0.0)
    inside = dict(zip(ops, in_layers([(name[: -len(KERNEL)], op) for name, op in ops.items()])))
    per_run = {name: [0.0] * len(runs) for name in ops}
    for r, (_, kernels) in enumerate(runs):
        for e in kernels:
            if e["name"] in per_run:
                per_run[e["name"]][r] += float(e["dur"])
    return [_Node(op, statistics.median(per_run[name]), counts[name], flops[name], inside[name])
            for name, op in ops.items()]


def _by_op(nodes: list[_Node]) -> tuple[dict[str, float], int]:
    """ms per call by op type, and kernels per call, of ``nodes``."""
    out: dict[str, float] = {}
    for node in nodes:
        out[node.op] = out.get(node.op, 0.0) + node.us / 1e3
    return out, sum(node.kernels for node in nodes)


def parse_profile(events: list[dict], warmup: int, graph_nodes: dict[str, int]) -> Profile:
    """A :class:`Profile` from ORT's JSON trace (``cat == "Node"`` events named ``*_kernel_time``): per node, the
    median over the runs after ``warmup``, so that one stalled kernel does not count."""
    runs = _runs(events, warmup)
    nodes = _nodes(runs)
    op_ms, _ = _by_op(nodes)
    op_kernels: dict[str, int] = {}
    for node in nodes:
        op_kernels[node.op] = op_kernels.get(node.op, 0) + node.kernels
    fixed_ms, fixed_kernels = _by_op([n for n in nodes if not n.inside])
    norm_ms, norm_kernels = _by_op([n for n in nodes if n.inside and group_of(n.op) == "normalisation"])
    matmul = [n for n in nodes if n.inside and group_of(n.op) == "MatMul"]
    between = statistics.median(max(0.0, dur - sum(e["dur"] for e in kernels)) for dur, kernels in runs) / 1e3
    durations = sorted(node.us / node.kernels for node in nodes)
    cheapest = durations[: max(1, int(len(durations) * CHEAPEST))]
    return Profile(len(runs), statistics.median(dur for dur, _ in runs) / 1e3, between, op_ms, op_kernels,
                   graph_nodes, statistics.median(cheapest) / 1e3, fixed_ms, fixed_kernels, norm_ms, norm_kernels,
                   sum(n.us for n in matmul) / 1e3, sum(n.kernels for n in matmul), sum(n.flops for n in matmul) / 1e9)


def profile(path: Path, make_call: Callable[[object], Callable[[], object]], threads: int, folder: Path,
            calls: int = 5, warmup: int = WARMUP) -> Profile:
    """ORT's profile of ``calls`` calls after ``warmup`` on a session built as the timed one (files in ``folder``)."""
    from structprune.export import node_counts, session

    folder.mkdir(parents=True)
    optimized = folder / "optimized.onnx"
    sess = session(path, threads, extra_options={"enable_profiling": True, "profile_file_prefix": str(folder / "trace"),
                                                 "optimized_model_filepath": str(optimized), "log_severity_level": 3})
    call = make_call(sess)
    for _ in range(warmup + calls):
        call()
    events = json.loads(Path(sess.end_profiling()).read_text())
    return parse_profile(events, warmup, node_counts(optimized))
