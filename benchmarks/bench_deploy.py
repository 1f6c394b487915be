"""Prune x quantize on ONNX Runtime (CPU): accuracy and latency of dense / pruned, fp32 / int8 all-MiniLM-L6-v2.

For each task (the demo's ``vader-tweets``, CR, SST-2) the demo's recipe runs through the one output pipeline
(:func:`structprune.pipeline.run`: dense fine-tune, ``fisher`` at 50% of the attention + FFN parameters, a
recovery fine-tune, fp32 exports of both models), cached under ``benchmarks/cache/deploy/<task>-s<seed>/``.
Both exports are then quantized with ONNX Runtime's tools (:func:`structprune.quantize.quantize`): ``int8-dynamic``,
and ``int8-static`` calibrated on training examples. All six ONNX models are scored on the task's evaluation split.

Latency is measured on the demo task's six models at every batch x sequence shape, all six in one interleaved run
per shape (:func:`structprune.bench.time_interleaved`, 2 threads, after waiting for a quiet machine); every speedup
is over dense fp32 in the same run. Rows go to ``benchmarks/results/deploy.csv``, the plot to
``benchmarks/results/deploy.png``. Examples::

    python benchmarks/bench_deploy.py                      # everything (first run trains: ~30 min on 2 cores)
    python benchmarks/bench_deploy.py --shapes 8x128 --tasks vader-tweets
    python benchmarks/bench_deploy.py --quick              # smoke run into a temporary folder
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from structprune import bench, pipeline
from structprune.arch import from_hf
from structprune.arch.structure import ModelStructure
from structprune.compaction import empty_model
from structprune.costs import flops_ideal_speedup
from structprune.data import encode, load_task
from structprune.demo import TASK, DemoConfig, demo_run, minilm_dir
from structprune.export import example_inputs, session
from structprune.io import atomic_write_text
from structprune.quantize import quantize
from structprune.report import save_figure

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_compaction import Quiet, timed_block

HERE = Path(__file__).resolve().parent
CACHE, RESULTS = HERE / "cache" / "deploy", HERE / "results"
EVAL_SPLITS = {TASK: "test", "cr": "test", "sst2": "dev"}
SHAPES = ((1, 64), (1, 128), (1, 512), (8, 64), (8, 128), (8, 512), (32, 64), (32, 128), (32, 512))
MODES = ("int8-dynamic", "int8-static")
VARIANTS = tuple(f"{model}-{precision}" for precision in ("fp32", *MODES) for model in ("dense", "pruned"))
TARGET = {"shape": (8, 128), "speedup": 3.5, "points": 1.0}
"""Issue target: pruned 50% + int8 at batch 8 x 128 >= 3.5x dense fp32, within 1 point of pruned fp32."""


def task_run(task: str, seed: int, workdir: Path, quick: bool) -> Path:
    """The pipeline folder of ``task`` with the demo's recipe (cached; floors off outside the demo task)."""
    out = workdir / f"{task}-s{seed}"
    if (out / "report.md").is_file():
        return out
    config = replace(DemoConfig(seed=seed), dense_floor=None, pruned_floor=None)
    if quick:
        config = config.quick_variant()
    model_dir = minilm_dir()
    train = load_task(task, "train", train_size=config.train_size, seed=seed)
    evaluation = load_task(task, EVAL_SPLITS[task])
    if config.test_size is not None:
        evaluation = evaluation.subset(min(config.test_size, len(evaluation)), seed=seed)
    torch.manual_seed(seed)
    model = from_hf(AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=train.task.num_labels, use_safetensors=True))
    run = replace(demo_run(config), title=f"bench_deploy: all-MiniLM-L6-v2 on {task}")
    pipeline.run(model, AutoTokenizer.from_pretrained(model_dir), train, evaluation, out, run,
                 model_name="all-MiniLM-L6-v2")
    return out


def quantized(folder: Path, task: str, seed: int, calib_examples: int, quick: bool) -> dict[str, float]:
    """Quantize ``onnx-dense`` and ``onnx-pruned`` of a pipeline folder (cached) and score all six models."""
    scores_file = folder / "quantized.json"
    if scores_file.is_file():
        return json.loads(scores_file.read_text())
    config = DemoConfig(seed=seed).quick_variant() if quick else DemoConfig(seed=seed)
    tokenizer = AutoTokenizer.from_pretrained(folder / "onnx-dense")
    train = load_task(task, "train", train_size=config.train_size, seed=seed)
    evaluation = load_task(task, EVAL_SPLITS[task])
    if config.test_size is not None:
        evaluation = evaluation.subset(min(config.test_size, len(evaluation)), seed=seed)
    calibration = encode(train.subset(min(calib_examples, len(train)), seed), tokenizer, config.max_length)
    encoded = encode(evaluation, tokenizer, config.max_length)
    scores = {}
    for model in ("dense", "pruned"):
        for mode in MODES:
            result = quantize(folder / f"onnx-{model}", folder / f"onnx-{model}-{mode}", mode, calibration=calibration,
                              evaluation=encoded, task=evaluation.task, overwrite=True)
            scores[f"{model}-fp32"], scores[f"{model}-{mode}"] = result.fp32, result.quantized
    scores |= {"metric": evaluation.task.main_metric, "eval_split": evaluation.split, "eval_examples": len(evaluation)}
    atomic_write_text(scores_file, json.dumps(scores, indent=2))
    return scores


def onnx_folder(folder: Path, variant: str) -> Path:
    model, precision = variant.split("-", 1)
    return folder / (f"onnx-{model}" if precision == "fp32" else f"onnx-{variant}")


def latency_rows(folder: Path, shapes: list[tuple[int, int]], threads: int, timing: dict, quiet: Quiet) -> list[dict]:
    """All six models of ``folder`` timed in one interleaved run per shape; speedups over dense fp32, and the
    pruned model's FLOPs-ideal speedup at the shape's sequence length."""
    spec_model = empty_model(folder / "onnx-dense")
    structures = {m: ModelStructure.from_spec(empty_model(folder / f"onnx-{m}").spec) for m in ("dense", "pruned")}
    sessions = {v: session(onnx_folder(folder, v), threads=threads) for v in VARIANTS}
    rows = []
    for batch, seq in shapes:
        inputs = example_inputs(spec_model, batch, seq, padded=False)
        stats, quality = timed_block({v: bench.ort_forward(s, inputs) for v, s in sessions.items()}, threads, timing,
                                     quiet)
        dense = stats["dense-fp32"].median_ms
        ideal = flops_ideal_speedup(structures["dense"], structures["pruned"], spec_model.spec, seq)
        for v in VARIANTS:
            rows.append({"kind": "latency", "variant": v, "batch": batch, "seq": seq, "threads": threads,
                         "median_ms": round(stats[v].median_ms, 3), "p10_ms": round(stats[v].p10_ms, 3),
                         "p90_ms": round(stats[v].p90_ms, 3), "n": stats[v].n,
                         "speedup": round(dense / stats[v].median_ms, 4),
                         "pruned_flops_ideal": round(ideal, 4)} | quality)
        print(f"batch {batch:>2} x {seq:>3}: " + ", ".join(f"{r['variant']} {r['median_ms']:.1f} ms "
                                                          f"({r['speedup']:.2f}x)" for r in rows[-len(VARIANTS):]),
              flush=True)
    return rows


def accuracy_rows(task: str, scores: dict) -> list[dict]:
    return [{"kind": "accuracy", "task": task, "variant": v, "metric": scores["metric"],
             "eval_split": scores["eval_split"], "eval_examples": scores["eval_examples"], "value": round(scores[v], 2),
             "change_vs_fp32": round(scores[v] - scores[v.split("-")[0] + "-fp32"], 2)} for v in VARIANTS]


def tables(rows: list[dict]) -> str:
    """Markdown: accuracy per task and variant; latency (ms, speedup over dense fp32) per shape."""
    acc = [r for r in rows if r["kind"] == "accuracy"]
    tasks = list(dict.fromkeys(r["task"] for r in acc))
    out = ["| model | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
    for v in VARIANTS:
        cells = [next((f"{r['value']:.2f} ({r['change_vs_fp32']:+.2f})" for r in acc
                       if r["task"] == t and r["variant"] == v), "") for t in tasks]
        out.append(f"| {v} | " + " | ".join(cells) + " |")
    lat = [r for r in rows if r["kind"] == "latency"]
    shapes = list(dict.fromkeys((r["batch"], r["seq"]) for r in lat))
    if not shapes:
        return "\n".join(out)
    out += ["", "| batch x seq | " + " | ".join(VARIANTS) + " | pruned FLOPs-ideal |",
            "|---|" + "---:|" * (len(VARIANTS) + 1)]
    for shape in shapes:
        mine = {r["variant"]: r for r in lat if (r["batch"], r["seq"]) == shape}
        cells = [f"{mine[v]['median_ms']:.1f} ms ({mine[v]['speedup']:.2f}x)" for v in VARIANTS]
        out.append(f"| {shape[0]} x {shape[1]} | " + " | ".join(cells)
                   + f" | {mine[VARIANTS[0]]['pruned_flops_ideal']:.2f}x |")
    return "\n".join(out)


def target_lines(rows: list[dict]) -> list[str]:
    """The issue's target, checked on what was measured."""
    lines = []
    speed = {r["variant"]: r["speedup"] for r in rows
             if r["kind"] == "latency" and (r["batch"], r["seq"]) == TARGET["shape"]}
    for mode in MODES:
        variant = f"pruned-{mode}"
        if variant in speed:
            verdict = "met" if speed[variant] >= TARGET["speedup"] else "missed"
            lines.append(f"{variant} at batch {TARGET['shape'][0]} x {TARGET['shape'][1]}: {speed[variant]:.2f}x "
                         f"dense fp32 (target >= {TARGET['speedup']}x): {verdict}")
        changes = [(r["task"], r["change_vs_fp32"]) for r in rows if r["kind"] == "accuracy" and r["variant"] == variant]
        if changes:
            verdict = "met" if all(abs(c) <= TARGET["points"] for _, c in changes) else "missed"
            lines.append(f"{variant} vs pruned fp32: " + ", ".join(f"{t} {c:+.2f}" for t, c in changes)
                         + f" points (target within {TARGET['points']}): {verdict}")
    return lines


def plot(rows: list[dict], path: Path) -> None:
    """Left: speedup over dense fp32 per shape, one line per variant. Right: accuracy per task and variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    lat = [r for r in rows if r["kind"] == "latency"]
    shapes = list(dict.fromkeys((r["batch"], r["seq"]) for r in lat))
    for v in VARIANTS:
        ys = [next(r["speedup"] for r in lat if (r["batch"], r["seq"]) == s and r["variant"] == v) for s in shapes]
        left.plot(range(len(shapes)), ys, "o-", label=v)
    left.axhline(TARGET["speedup"], color="grey", ls=":", label=f"target {TARGET['speedup']}x (pruned int8)")
    left.set_xticks(range(len(shapes)), [f"{b}x{s}" for b, s in shapes], rotation=45)
    left.set(xlabel="batch x sequence", ylabel="speedup over dense fp32 (x)", title="ONNX Runtime CPU, 2 threads")
    acc = [r for r in rows if r["kind"] == "accuracy"]
    tasks = list(dict.fromkeys(r["task"] for r in acc))
    width = 0.8 / len(VARIANTS)
    for i, v in enumerate(VARIANTS):
        ys = [next((r["value"] for r in acc if r["task"] == t and r["variant"] == v), 0.0) for t in tasks]
        right.bar([k + i * width for k in range(len(tasks))], ys, width, label=v)
    right.set_xticks([k + 0.4 - width / 2 for k in range(len(tasks))], tasks)
    low = min((r["value"] for r in acc), default=0.0)
    right.set(ylim=(max(0.0, low - 5), 100), ylabel="accuracy (%)", title="task accuracy (ONNX Runtime)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    print(f"plot: {path}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default=f"{TASK},cr,sst2", help="comma-separated; the first one is timed")
    parser.add_argument("--shapes", default=",".join(f"{b}x{s}" for b, s in SHAPES), help="e.g. 1x64,8x128")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calib-examples", type=int, default=256, help="int8-static calibration examples")
    parser.add_argument("--threads", type=int, default=bench.CPU_THREADS)
    parser.add_argument("--no-latency", action="store_true", help="accuracy only")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny training, one shape, temporary folder")
    parser.add_argument("--csv", type=Path, default=RESULTS / "deploy.csv")
    parser.add_argument("--plot", type=Path, default=RESULTS / "deploy.png")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    bad = [t for t in tasks if t not in EVAL_SPLITS]
    if bad:
        raise SystemExit(f"unknown task(s) {', '.join(bad)}; choose from {', '.join(EVAL_SPLITS)}")
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",") if s]
    timing, quiet = bench.TIMING, Quiet(0.1, 120.0, 2)
    with tempfile.TemporaryDirectory() as scratch:
        workdir, csv_path, plot_path = CACHE, args.csv, args.plot
        if args.quick:
            workdir, csv_path, plot_path = Path(scratch), Path(scratch) / "deploy.csv", Path(scratch) / "deploy.png"
            shapes, timing, quiet = shapes[:1], timing | {"min_time": 0.2, "max_repeats": 3}, Quiet(1.0, 1.0, 0)
        rows, folders = [], {}
        for task in tasks:
            folders[task] = task_run(task, args.seed, workdir, args.quick)
            rows += accuracy_rows(task, quantized(folders[task], task, args.seed, args.calib_examples, args.quick))
        if not args.no_latency:
            rows += latency_rows(folders[tasks[0]], shapes, args.threads, timing, quiet)
        print(tables(rows))
        print("\n".join(target_lines(rows)))
        context = bench.machine_info() | {"seed": args.seed, "timed_task": tasks[0],
                                          "calib_examples": args.calib_examples}
        bench.append_csv(csv_path, [context | r for r in rows])
        print(f"rows appended to {csv_path}")
        if not args.no_latency:
            plot(rows, plot_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
