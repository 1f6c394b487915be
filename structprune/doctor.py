"""Why a pruned model is (or is not) as much faster as its FLOPs promise: ``structprune doctor``.

:func:`examine` measures two ONNX Runtime models side by side (interleaved median latencies, an ORT
profile of each, their optimised graphs, shapes and alignment) and :func:`diagnose` names the cause of
the gap between the measured and the FLOPs-ideal speedup from those numbers alone:

* ``overhead``: per-operator overhead and ops outside the transformer layers (embeddings, pooler,
  classifier, LM head), which pruning does not shrink; large at small shapes;
* ``normalisation``: normalisation kernels in the layers, whose cost does not shrink with heads or
  neurons (ORT's CPU ``SkipLayerNormalization`` costs several times ``LayerNormalization`` + ``Add``);
* ``misaligned``: pruned FFN widths or hidden sizes not multiples of 8 whose MatMuls shrink less
  than their FLOPs;
* ``none`` when measured / ideal >= :data:`GOOD_RATIO`, ``unexplained`` when no named cause accounts for
  :data:`EXPLAINS` of the gap.

Measuring the overhead, from the profile: per-operator overhead = kernels per call x the median duration
of the cheapest 10% of kernels (shape and index ops, whose work is nil: what launching any kernel
costs) + the run's time outside kernels (executor, feeds and fetches). Profile times are scaled by
timed latency / profiled run time before they meet the latency; at tiny shapes profiling itself adds
time outside kernels, so the overhead is overstated there. The latency at a tiny shape is no measure of it:
all-MiniLM-L6-v2 at batch 1 x 8 tokens still runs twice as fast with half its heads and neurons, since
every call reads the weights.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from structprune import bench
from structprune.io import atomic_write_text
from structprune.ort_profile import GROUP_NAMES, WARMUP, Profile, group_of, profile

GOOD_RATIO = 0.9
"""measured / FLOPs-ideal speedup from which there is no gap to explain."""
EXPLAINS = 0.25
"""Share of the gap the largest named cause must account for to be named."""
TINY_ALIGN, ALIGNMENTS = 8, (64, 16, 8)


def _ms(x: float) -> str:
    return f"{x:.2f}" if abs(x) >= 0.1 else f"{x:.4f}"


def describe_alignment(width: int) -> str:
    """Which of 64, 16, 8 divides ``width`` (the largest), in words."""
    for i, n in enumerate(ALIGNMENTS):
        if width % n == 0:
            return f"multiple of {n}" + (f", not of {ALIGNMENTS[i - 1]}" if i else "")
    return f"not a multiple of {TINY_ALIGN}"


def alignment_flags(spec: dict, multiple: int = ALIGNMENTS[0]) -> list[str]:
    """The FFN widths and hidden size of a spec that are not multiples of ``multiple``, with the layers holding them."""
    layers: dict[int, list[int]] = {}
    for i, layer in enumerate(spec["layers"]):
        if layer["ffn"]:
            layers.setdefault(int(layer["ffn"]), []).append(i)
    flags = [f"FFN {width} (layers {', '.join(map(str, where))}): {describe_alignment(width)}"
             for width, where in sorted(layers.items()) if width % multiple]
    hidden = int(spec["hidden_size"])
    return flags + ([f"hidden size {hidden}: {describe_alignment(hidden)}"] if hidden % multiple else [])


@dataclass(frozen=True)
class ModelCosts:
    """What :func:`diagnose` reads of one model: its timed latency and its profile's parts (ms per call)."""

    latency_ms: float
    run_ms: float
    """Profiled run; profile times are scaled by ``latency_ms / run_ms``."""
    kernels: int
    kernel_overhead_ms: float
    between_ms: float
    fixed_ms: float
    fixed_kernels: int
    norm_ms: float
    norm_kernels: int
    norm_op: str
    matmul_ms: float
    matmul_kernels: int
    matmul_gflop: float
    group_ms: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, latency_ms: float, p: Profile) -> ModelCosts:
        norm_op = max(p.norm_ms, key=p.norm_ms.get, default="")
        return cls(latency_ms, p.run_ms, sum(p.op_kernels.values()), p.kernel_overhead_ms, p.between_ms,
                   sum(p.fixed_ms.values()), p.fixed_kernels, sum(p.norm_ms.values()), p.norm_kernels, norm_op,
                   p.matmul_ms, p.matmul_kernels, p.matmul_gflop, p.group_ms())

    def scaled(self, ms: float) -> float:
        return ms * self.latency_ms / self.run_ms

    def net(self, ms: float, kernels: int) -> float:
        """Kernel time beyond the per-kernel overhead, scaled."""
        return self.scaled(max(0.0, ms - kernels * self.kernel_overhead_ms))

    @property
    def overhead_ms(self) -> float:
        """Per-operator overhead: kernels x the per-kernel overhead + the run's time outside kernels, scaled."""
        return self.scaled(self.kernels * self.kernel_overhead_ms + self.between_ms)

    @property
    def fixed_total_ms(self) -> float:
        """Per-operator overhead + ops outside the layers: what pruning heads and neurons cannot shrink."""
        return min(self.latency_ms, self.overhead_ms + self.net(self.fixed_ms, self.fixed_kernels))


@dataclass(frozen=True)
class Measurements:
    """The numbers a verdict is drawn from."""

    batch: int
    seq: int
    ideal: float
    dense: ModelCosts
    pruned: ModelCosts
    misaligned: tuple[str, ...] = ()
    """The pruned model's FFN widths / hidden size that are not multiples of 8."""
    suggestion: tuple[int, float] | None = None
    """(a larger batch, the speedup measured there), when timed."""
    other_cores: float | None = None
    """Cores other processes kept busy while timing."""


@dataclass(frozen=True)
class Verdict:
    """The diagnosis: the speedups, the fixed-cost bound, each cause's excess, and the paragraph saying it."""

    cause: str
    """``none``, ``overhead``, ``normalisation``, ``misaligned`` or ``unexplained``."""
    measured: float
    ideal: float
    ratio: float
    best: float
    """Best speedup to expect: dense / (fixed + (dense - fixed) / ideal)."""
    fixed_share: float
    gap_ms: float
    """Pruned latency above dense / ideal."""
    excess_ms: dict[str, float]
    """ms each named cause keeps the pruned model above dense / ideal."""
    text: str


def _excess(m: Measurements) -> dict[str, float]:
    d, p, r = m.dense, m.pruned, m.ideal
    out = {"overhead": p.fixed_total_ms - d.fixed_total_ms / r,
           "normalisation": p.net(p.norm_ms, p.norm_kernels) - d.net(d.norm_ms, d.norm_kernels) / r,
           "misaligned": 0.0}
    if m.misaligned and d.matmul_gflop > 0 and p.matmul_gflop > 0:
        out["misaligned"] = (p.net(p.matmul_ms, p.matmul_kernels)
                             - d.net(d.matmul_ms, d.matmul_kernels) * p.matmul_gflop / d.matmul_gflop)
    return out


def diagnose(m: Measurements) -> Verdict:
    """Name the dominant cause of the gap between the measured and the FLOPs-ideal speedup."""
    d, p = m.dense, m.pruned
    measured = d.latency_ms / p.latency_ms
    ratio = measured / m.ideal
    fixed = d.fixed_total_ms
    best = d.latency_ms / (fixed + (d.latency_ms - fixed) / m.ideal)
    gap = p.latency_ms - d.latency_ms / m.ideal
    excess = _excess(m)
    top = max(excess, key=excess.get)
    cause = "none" if ratio >= GOOD_RATIO else top if excess[top] >= EXPLAINS * gap else "unexplained"
    verdict = Verdict(cause, measured, m.ideal, ratio, best, fixed / d.latency_ms, gap, excess, "")
    warning = bench.load_warning(m.other_cores)
    text = _verdict_text(m, verdict) + (f" But {warning.removeprefix('warning: ')}." if warning else "")
    return dataclasses.replace(verdict, text=text)


def _remaining(cause: str, norm_op: str) -> str:
    return {"overhead": "per-operator overhead and ops outside the layers",
            "normalisation": f"the layers' {norm_op}, which does not shrink",
            "misaligned": f"MatMuls on widths not multiples of {TINY_ALIGN}"}[cause]


def _verdict_text(m: Measurements, v: Verdict) -> str:
    d, p = m.dense, m.pruned
    head = (f"Measured {v.measured:.2f}x against {v.ideal:.2f}x FLOPs-ideal (ratio {v.ratio:.3f}) at batch {m.batch} "
            f"x {m.seq} tokens: ")
    tail = f" Fixed costs bound the speedup at {v.best:.2f}x."
    share = f"{_ms(v.excess_ms.get(v.cause, 0.0))} of the {_ms(v.gap_ms)} ms the pruned model spends above ideal"
    if v.cause == "none":
        within = f"within {1 - v.ratio:.0%} of ideal" if v.ratio < 0.995 else "at or above ideal"
        top = max(v.excess_ms, key=v.excess_ms.get)
        rest = (f" What is left of the gap ({_ms(v.gap_ms)} ms) is mostly {_remaining(top, p.norm_op)} "
                f"({_ms(v.excess_ms[top])} ms above its ideal share)."
                if v.ratio < 0.995 and v.excess_ms[top] >= EXPLAINS * v.gap_ms else "")
        return head + f"no gap: the speedup is {within}." + rest + tail
    if v.cause == "overhead":
        text = (f"{v.fixed_share:.0%} of the dense time ({_ms(d.fixed_total_ms)} of {_ms(d.latency_ms)} ms) is "
                f"per-operator overhead ({_ms(d.overhead_ms)} ms) and ops outside the layers, which do not shrink: "
                f"expect at most {v.best:.2f}x ({share}).")
        if m.suggestion:
            text += f" At batch {m.suggestion[0]} the measured speedup is {m.suggestion[1]:.2f}x."
        return head + text
    if v.cause == "normalisation":
        hint = (" ORT's CPU SkipLayerNormalization costs several times LayerNormalization + Add; `structprune "
                "export` does not fuse it." if "Skip" in p.norm_op else "")
        return head + (f"the normalisation kernels in the layers ({p.norm_op}: {_ms(d.scaled(d.norm_ms))} ms dense, "
                       f"{_ms(p.scaled(p.norm_ms))} ms pruned) do not shrink with pruning: {share}.{hint}" + tail)
    if v.cause == "misaligned":
        shrink = d.scaled(d.matmul_ms) / max(p.scaled(p.matmul_ms), 1e-12)
        return head + (f"pruned widths not multiples of {TINY_ALIGN} ({'; '.join(m.misaligned[:3])}): the layers' "
                       f"MatMuls shrank {shrink:.2f}x where their FLOPs shrank "
                       f"{d.matmul_gflop / p.matmul_gflop:.2f}x: {share}. Prune to multiples of 64 (at least 8)."
                       + tail)
    named = ", ".join(f"{name} {_ms(ms)} ms" for name, ms in v.excess_ms.items())
    groups = {g: p.scaled(p.group_ms.get(g, 0.0)) - d.scaled(d.group_ms.get(g, 0.0)) / v.ideal for g in GROUP_NAMES}
    worst = max(groups, key=groups.get)
    return head + (f"no named cause accounts for a quarter of the {_ms(v.gap_ms)} ms above ideal ({named}); the "
                   f"{worst} kernels exceed their ideal share the most ({_ms(groups[worst])} ms): see the operators."
                   + tail)


@dataclass(frozen=True)
class Diagnosis:
    """Everything ``structprune doctor`` measured, and its verdict."""

    dense: str
    pruned: str
    phase: str
    """``forward`` (a classifier) or ``prefill`` (a causal LM: ``batch`` prompts of ``seq`` tokens)."""
    settings: dict[str, object]
    machine: dict[str, object]
    latency: dict[str, bench.LatencyStats]
    shapes: dict[str, dict]
    alignment: dict[str, list[str]]
    profiles: dict[str, Profile]
    measurements: Measurements
    verdict: Verdict

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    def write_json(self, path: str | Path) -> None:
        atomic_write_text(path, self.to_json() + "\n")


def _onnx_folder(path: Path, scratch: Path, threads: int) -> Path:
    """``path`` when it is an export folder; a model folder is exported into ``scratch`` first."""
    from structprune.export import ONNX_FILE, export
    from structprune.loading import load_model

    if (path / ONNX_FILE).is_file():
        return path
    if (path / "config.json").is_file():
        print(f"exporting {path} to a temporary folder", file=sys.stderr, flush=True)
        export(load_model(str(path), trained=False), scratch, threads=threads)
        return scratch
    if not path.is_dir():
        raise ValueError(f"{path} is not a folder; give an ONNX folder written by `structprune export` or a model "
                         "folder")
    raise ValueError(f"{path} holds neither {ONNX_FILE} (a `structprune export` folder) nor config.json (a model "
                     "folder)")


def _check_pair(models: dict, names: dict[str, Path], seq: int) -> None:
    """Refuse two models that are not two forms of one model, and a sequence beyond their positions."""
    d, p = models["dense"].spec, models["pruned"].spec
    for key, what in (("task", "task"), ("family", "architecture family"), ("vocab_size", "vocabulary size"),
                      ("num_labels", "number of labels")):
        if d.get(key) != p.get(key):
            raise ValueError(f"{names['dense']} and {names['pruned']} differ in {what} ({d.get(key)!r} vs "
                             f"{p.get(key)!r}); compare a pruned model with the dense model it came from")
    for name, model in models.items():
        limit = model.max_sequence_length
        if limit is not None and seq > limit:
            raise ValueError(f"--seq {seq} exceeds the {limit} positions of {names[name]}; use --seq {limit} or less")


def _ideal(structures: dict, spec: dict, seq: int, causal: bool) -> float:
    from structprune.costs import flops_ideal_speedup, prefill_ideal_speedup

    ideal = prefill_ideal_speedup if causal else flops_ideal_speedup
    return ideal(structures["dense"], structures["pruned"], spec, seq)


def examine(dense: str | Path, pruned: str | Path, batch: int = 8, seq: int = 128, threads: int = bench.CPU_THREADS,
            suggest_batch: int | None = None, timing: Mapping[str, float] | None = None,
            profile_calls: int = 5) -> Diagnosis:
    """Measure ``dense`` and ``pruned`` (export folders, or model folders exported to a temporary folder) and diagnose.

    ``timing``: arguments of :func:`structprune.bench.time_interleaved` (default :data:`structprune.bench.TIMING`);
    ``suggest_batch``: also time both at this batch size, reported when overhead dominates.
    """
    import onnxruntime

    from structprune.arch import ModelStructure
    from structprune.compaction import empty_model
    from structprune.export import session
    from structprune.latency import session_call

    if min(batch, seq, threads, profile_calls, suggest_batch or 1) < 1:
        raise ValueError("batch, seq, threads, profile calls and the suggested batch must be >= 1")
    names = {"dense": Path(dense), "pruned": Path(pruned)}
    timing = dict(bench.TIMING if timing is None else timing)
    with tempfile.TemporaryDirectory(prefix="structprune-doctor-") as tmp:
        paths = {name: _onnx_folder(path, Path(tmp) / f"{name}-onnx", threads) for name, path in names.items()}
        models = {name: empty_model(path) for name, path in paths.items()}
        _check_pair(models, names, seq)
        causal = models["dense"].spec.get("task") == "causal_lm"
        phase = "prefill" if causal else "forward"
        make_call = session_call(models["dense"], phase, batch, seq)
        sessions = {name: session(path, threads) for name, path in paths.items()}
        calls = {name: make_call(s) for name, s in sessions.items()}
        if suggest_batch:
            larger = session_call(models["dense"], phase, suggest_batch, seq)
            calls |= {f"{name} batch {suggest_batch}": larger(s) for name, s in sessions.items()}
        print("timing dense and pruned in interleaved turns, then profiling each", file=sys.stderr, flush=True)
        with bench.OtherCpuLoad() as load:
            latency = bench.time_interleaved(calls, **timing)
        profiles = {name: profile(path, make_call, threads, Path(tmp) / f"{name}-profile", profile_calls)
                    for name, path in paths.items()}
        providers = sessions["dense"].get_providers()
    specs = {name: model.spec for name, model in models.items()}
    structures = {name: ModelStructure.from_spec(spec) for name, spec in specs.items()}
    suggestion = None
    if suggest_batch:
        key = f" batch {suggest_batch}"
        suggestion = (suggest_batch, latency["dense" + key].median_ms / latency["pruned" + key].median_ms)
    measurements = Measurements(
        batch, seq, _ideal(structures, specs["dense"], seq, causal),
        *(ModelCosts.of(latency[name].median_ms, profiles[name]) for name in ("dense", "pruned")),
        tuple(alignment_flags(specs["pruned"], TINY_ALIGN)), suggestion, load.cores)
    settings = {"batch": batch, "seq": seq, "threads": threads, "suggest_batch": suggest_batch, "timing": timing,
                "profile_calls": profile_calls, "profile_warmup": WARMUP, "onnxruntime": onnxruntime.__version__,
                "providers": providers, "other_cores_busy": load.cores}
    shapes = {name: {"hidden_size": spec["hidden_size"], "head_dim": spec["head_dim"],
                     "layers": [{k: layer[k] for k in ("heads", "kv_heads", "ffn")} for layer in spec["layers"]]}
              for name, spec in specs.items()}
    return Diagnosis(str(dense), str(pruned), phase, settings, bench.machine_info(),
                     latency, shapes, {name: alignment_flags(spec) for name, spec in specs.items()}, profiles,
                     measurements, diagnose(measurements))


def _table(header: list[str], rows: list[list[object]]) -> list[str]:
    """Columns as wide as their widest cell; the first left-aligned, the others right-aligned."""
    cells = [header, *([str(c) for c in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
            for row in cells]


def _settings_text(dx: Diagnosis) -> list[str]:
    s, m = dx.settings, dx.machine
    what = "prefill of" if dx.phase == "prefill" else "forward pass of"
    lines = [f"structprune doctor: {dx.dense} (dense) vs {dx.pruned} (pruned)",
             (f"settings: {what} batch {s['batch']} x {s['seq']} tokens, {s['threads']} threads; onnxruntime "
              f"{s['onnxruntime']} ({', '.join(s['providers'])})"),
             f"machine: {m['cpu']}, {m['cores_allowed']} of {m['cores']} cores, {m['platform']}, Python {m['python']}"]
    warning = bench.load_warning(s["other_cores_busy"])
    return lines + ([warning] if warning else [])


def _latency_text(dx: Diagnosis) -> list[str]:
    rows = [[name, _ms(s.median_ms), _ms(s.p10_ms), _ms(s.p90_ms), s.n] for name, s in dx.latency.items()]
    v = dx.verdict
    return ["", "latency (median of interleaved turns)",
            *_table(["model", "median ms", "p10 ms", "p90 ms", "calls"], rows),
            f"speedup: measured {v.measured:.2f}x, FLOPs-ideal {v.ideal:.2f}x, ratio {v.ratio:.3f}"]


def _groups_text(dx: Diagnosis) -> list[str]:
    d, p = (dx.profiles[name] for name in ("dense", "pruned"))
    gd, gp = d.group_ms(), p.group_ms()
    td, tp = sum(gd.values()), sum(gp.values())
    rows = []
    for g in (*GROUP_NAMES, "all kernels"):
        a, b = (td, tp) if g == "all kernels" else (gd[g], gp[g])
        rows.append([g, _ms(a), f"{a / td:.1%}", _ms(b), f"{b / tp:.1%}", f"{a / b:.2f}x" if b > 0 else "-"])
    return ["", f"time by operator group (ORT profile: kernel ms per call, median of {d.calls} calls after warm-up)",
            *_table(["group", "dense ms", "share", "pruned ms", "share", "shrink"], rows)]


def _ops_text(dx: Diagnosis) -> list[str]:
    d, p = (dx.profiles[name] for name in ("dense", "pruned"))
    ops = sorted(set(d.op_ms) | set(p.op_ms) | set(d.graph_nodes) | set(p.graph_nodes),
                 key=lambda op: -d.op_ms.get(op, 0.0))
    rows = [[op, group_of(op), *(v for prof in (d, p) for v in (
        _ms(prof.op_ms.get(op, 0.0)), prof.op_kernels.get(op, 0), prof.graph_nodes.get(op, 0)))] for op in ops]
    return ["", "operators (kernel ms and kernels per call from the profile; nodes in the optimised graph)",
            *_table(["op type", "group", "dense ms", "kernels", "nodes", "pruned ms", "kernels", "nodes"], rows)]


def _shapes_text(dx: Diagnosis) -> list[str]:
    d, p = dx.shapes["dense"], dx.shapes["pruned"]
    rows = [[i, f"{a['heads']}/{a['kv_heads']}", a["ffn"], f"{b['heads']}/{b['kv_heads']}", b["ffn"],
             describe_alignment(b["ffn"]) if b["ffn"] else "-"]
            for i, (a, b) in enumerate(zip(d["layers"], p["layers"]))]
    lines = ["", "layer shapes (query/key-value heads, FFN width)",
             *_table(["layer", "dense heads", "dense FFN", "pruned heads", "pruned FFN", "pruned FFN alignment"], rows),
             (f"hidden size: dense {d['hidden_size']}, pruned {p['hidden_size']} "
              f"({describe_alignment(p['hidden_size'])}); head dim {p['head_dim']}")]
    return lines + [f"{name} widths not multiples of {ALIGNMENTS[0]}: {'; '.join(flags) or 'none'}"
                    for name, flags in dx.alignment.items()]


def _fixed_text(dx: Diagnosis) -> list[str]:
    m, v = dx.measurements, dx.verdict
    parts = [("per-kernel overhead (median of the cheapest 10% of kernels)", lambda c: c.scaled(c.kernel_overhead_ms)),
             ("time outside kernels (profiled run - its kernels)", lambda c: c.scaled(c.between_ms)),
             ("per-operator overhead (kernels x per-kernel + outside kernels)", lambda c: c.overhead_ms),
             ("ops outside the layers, beyond their overhead", lambda c: c.net(c.fixed_ms, c.fixed_kernels)),
             ("fixed total", lambda c: c.fixed_total_ms), ("latency", lambda c: c.latency_ms)]
    lines = ["", "fixed costs (ms per call; profile times scaled to the timed latency)",
             *_table(["", "dense ms", "pruned ms"], [[label, _ms(get(m.dense)), _ms(get(m.pruned))]
                                                     for label, get in parts]),
             (f"kernels per call: dense {m.dense.kernels}, pruned {m.pruned.kernels}; fixed share of the dense time "
              f"{v.fixed_share:.1%}"),
             (f"best expected speedup = dense / (fixed + (dense - fixed) / ideal) = {v.best:.2f}x; measured "
              f"{v.measured:.2f}x")]
    if m.suggestion:
        lines.append(f"at batch {m.suggestion[0]} x {m.seq}: measured speedup {m.suggestion[1]:.2f}x")
    excess = ", ".join(f"{name} {_ms(ms)}" for name, ms in v.excess_ms.items())
    return lines + [f"ms above ideal in the pruned model: {_ms(v.gap_ms)} in all; by cause: {excess}"]


def report(dx: Diagnosis) -> str:
    """The readable report: settings, latency, operator groups and types, shapes, fixed costs, verdict."""
    lines = [*_settings_text(dx), *_latency_text(dx), *_groups_text(dx), *_ops_text(dx), *_shapes_text(dx),
             *_fixed_text(dx), "", f"verdict ({dx.verdict.cause})", dx.verdict.text]
    return "\n".join(lines)
