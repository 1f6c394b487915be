"""Training-free pruning of all-MiniLM-L6-v2: accuracy, pruning time and ORT latency per task and method.

For every (task, method, FLOPs reduction, calibration set) cell: take the task's dense fine-tuned
model (cached by :mod:`dense_cache`), run the method on the calibration set, compact the result,
score it on the task's evaluation split, and time the compacted model against the dense one on
ONNX Runtime (both through ``compact()`` + ``export()`` + a 2-thread session, interleaved turns,
medians; batch 8, sequence 128, as the FLOPs are counted). Rows are appended to
``benchmarks/results/training_free.csv`` with the machine, versions, date and every setting; a cell
already in the CSV is skipped, so an interrupted run resumes where it stopped.

Calibration sets: ``2048`` (up to 2,048 training examples drawn with the seed: SST-2 and CR have
1,000 and use them all) and ``32pc`` (32 examples per class, drawn with the seed).

    python benchmarks/bench_training_free.py --tasks sst2,cr,mrpc,rte,trec --methods fisher --reductions 0.4
    python benchmarks/bench_training_free.py --markdown          # print the table of the CSV and exit
    python benchmarks/bench_training_free.py --latency-budget 0.5 --tasks sst2   # latency-target check
"""

from __future__ import annotations

import argparse
import csv
import inspect
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dense_cache import (  # noqa: E402
    MAX_LENGTH,
    SETUPS,
    dense_model,
    eval_data,
    tokenizer,
    train_data,
)

from structprune import bench  # noqa: E402
from structprune.arch.structure import ModelStructure  # noqa: E402
from structprune.budget import Budget
from structprune.compaction import compact  # noqa: E402
from structprune.costs import LatencyTable
from structprune.data import TaskData, encode  # noqa: E402
from structprune.evaluation import evaluate
from structprune.export import example_inputs, export, session  # noqa: E402
from structprune.latency import measure_table  # noqa: E402
from structprune.maskset import MaskSet  # noqa: E402
from structprune.methods import get_method  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CSV = RESULTS / "training_free.csv"
TABLE = Path(__file__).resolve().parent / "cache" / "latency" / "minilm-b8-s128.json"
SEQ_LEN = 128
LATENCY_SHAPE = (8, SEQ_LEN)
METHODS = {
    "fisher": ("fisher", {}),
    "fisher-fp32-tuneall": ("fisher", {"bf16": False, "tune_examples": None}),  # the defaults before 2026-11-23
    "fisher-tuneall": ("fisher", {"tune_examples": None}),
    "fisher-fp32": ("fisher", {"bf16": False}),
    "fisher-notune": ("fisher", {"tune": False}),
    "fisher-intermediate": ("fisher", {"teacher": "intermediate"}),
    "attribution": ("attribution", {}),
    "attribution-tuned": ("attribution", {"tune": True}),
    "attribution-pseudo": ("attribution", {"objective": "pseudo"}),
    "attribution-entropy": ("attribution", {"objective": "entropy"}),
    "attribution-total": ("attribution", {"aggregate": "total"}),
    "attribution-total-pseudo": ("attribution", {"aggregate": "total", "objective": "pseudo"}),
    "head_importance": ("head_importance", {"max_examples": 2048}),
    "taylor": ("taylor", {"calib_batches": None}),
    "magnitude": ("magnitude", {}),
}
# attribution's default batch before 2026-11-23 (the grain of its squared aggregate): the earlier rows
METHODS |= {f"{name}-b32": (method, options | {"batch_size": 32})
            for name, (method, options) in list(METHODS.items()) if method == "attribution"}
KEY = ("task", "method", "budget_kind", "target", "calibration", "seed")


def per_class(data: TaskData, k: int, seed: int) -> TaskData:
    """``k`` examples of every class (all of a class with fewer), drawn with ``seed``, in file order."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor(data.labels)
    chosen = []
    for label in labels.unique():
        rows = (labels == label).nonzero().flatten()
        chosen += rows[torch.randperm(len(rows), generator=g)[:k]].tolist()
    return data.select(sorted(chosen))


def done_keys(path: Path) -> set[tuple[str, ...]]:
    if not path.is_file():
        return set()
    with path.open(newline="") as f:
        return {tuple(row[k] for k in KEY) for row in csv.DictReader(f)}


def ort_latency(dense, pruned, tmp: Path) -> dict[str, float | None]:
    """Median ORT latency of the dense and the pruned model, interleaved, and other processes' load."""
    calls = {}
    inputs = example_inputs(dense, *LATENCY_SHAPE, padded=False)
    for name, model in (("dense", dense), ("pruned", pruned)):
        export(model, tmp / name, overwrite=True, threads=bench.CPU_THREADS)
        calls[name] = bench.ort_forward(session(tmp / name, threads=bench.CPU_THREADS), inputs)
    with bench.OtherCpuLoad() as load:
        stats = bench.time_interleaved(calls, **bench.TIMING)
    return {"ort_dense_ms": stats["dense"].median_ms, "ort_pruned_ms": stats["pruned"].median_ms,
            "ort_speedup": stats["dense"].median_ms / stats["pruned"].median_ms, "ort_n": stats["pruned"].n,
            "other_cpu_cores": load.cores}


def run_cell(task: str, method_name: str, budget: Budget, calibration: str, seed: int, latency: bool,
             cache: dict) -> dict:
    setup = SETUPS[task]
    if task not in cache:
        model, record = dense_model(setup, seed)
        tok = tokenizer()
        cache.clear()
        cache[task] = (model, record, train_data(setup, seed), encode(eval_data(setup), tok, MAX_LENGTH), tok)
    model, record, train, evaluation, tok = cache[task]
    calib = train if calibration == "2048" else per_class(train, int(calibration.removesuffix("pc")), seed)
    encoded = encode(calib, tok, MAX_LENGTH)
    method, options = METHODS[method_name]
    prune = get_method(method)
    if "seed" in inspect.signature(prune).parameters:
        options = options | {"seed": seed}
    torch.manual_seed(seed)
    start, cpu_start = time.perf_counter(), time.process_time()
    with bench.OtherCpuLoad() as load:
        result = prune(model, encoded, budget, **options)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    structure = ModelStructure.from_spec(model.spec)
    summary = result.masks.summary(structure, model.spec, SEQ_LEN)
    small = compact(model, result.masks).eval()
    accuracy = evaluate(small, evaluation, calib.task)[calib.task.main_metric]
    dense_accuracy = record["metrics"][calib.task.main_metric]
    row = {"task": task, "method": method_name, "budget_kind": budget.kind, "target": f"{budget.target:g}",
           "calibration": calibration, "seed": str(seed), "calibration_examples": min(len(calib), 2048),
           "train_size": record["train_size"], "eval_split": record["eval_split"], "eval_examples":
           len(evaluation["input_ids"]), "options": repr(options), "dense_accuracy": dense_accuracy,
           "pruned_accuracy": accuracy, "delta": accuracy - dense_accuracy,
           "flops_reduction": summary["flops_reduction"], "param_sparsity": summary["param_sparsity"],
           "prune_seconds": seconds, "prune_cpu_seconds": cpu_seconds, "prune_other_cpu_cores": load.cores, "torch_threads": torch.get_num_threads(),
           "kept": " ".join(f"{x['heads']}/{x['ffn']}" for x in summary["layers"])}
    if "latency_reduction_predicted" in result.log["summary"]:
        row["latency_reduction_predicted"] = result.log["summary"]["latency_reduction_predicted"]
    if latency:
        dense_small = compact(model, MaskSet.ones(structure, ("head", "neuron"))).eval()
        with tempfile.TemporaryDirectory(prefix="bench-training-free-") as tmp:
            row |= ort_latency(dense_small, small, Path(tmp))
        row["latency_shape"] = f"{LATENCY_SHAPE[0]}x{LATENCY_SHAPE[1]}"
    return row


def markdown(path: Path) -> str:
    """The latest row of every cell as a Markdown table."""
    with path.open(newline="") as f:
        rows = {tuple(r[k] for k in KEY): r for r in csv.DictReader(f)}
    lines = ["| task | method | calib | FLOPs removed | dense acc | pruned acc | delta | prune wall s | prune CPU s | "
             "ORT speedup | kept heads/neurons per layer |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows.values(), key=lambda r: (r["task"], r["method"], r["calibration"], r["target"])):
        fmt = (lambda key, spec: format(float(r[key]), spec) if r.get(key) else "-")  # noqa: E731
        lines.append(f"| {r['task']} | {r['method']}{' (latency)' if r['budget_kind'] == 'latency' else ''} | "
                     f"{r['calibration']} | {fmt('flops_reduction', '.1%')} | {fmt('dense_accuracy', '.1f')} | "
                     f"{fmt('pruned_accuracy', '.1f')} | {fmt('delta', '+.1f')} | {fmt('prune_seconds', '.0f')} | "
                     f"{fmt('prune_cpu_seconds', '.0f')} | {fmt('ort_speedup', '.2f')} | {r['kept']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="sst2,cr,mrpc,rte,trec")
    parser.add_argument("--methods", default="fisher,attribution,head_importance")
    parser.add_argument("--reductions", default="0.3,0.5,0.7", help="FLOPs reductions, comma-separated")
    parser.add_argument("--calibration", default="2048", help="comma-separated: 2048 and/or 32pc")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=bench.CPU_THREADS,
                        help="torch threads of the pruning step (ORT latency always uses 2)")
    parser.add_argument("--no-latency", action="store_true", help="skip the ORT latency of the compacted models")
    parser.add_argument("--latency-budget", type=float, default=None,
                        help="instead of FLOPs budgets: fisher with this latency reduction (0.5 = 2x faster), "
                             f"predicted by a table measured once and cached at {TABLE}")
    parser.add_argument("--csv", type=Path, default=CSV)
    parser.add_argument("--markdown", action="store_true", help="print the table of the CSV and exit")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown(args.csv))
        return 0
    torch.set_num_threads(args.threads)
    cache: dict = {}
    done = done_keys(args.csv)
    if args.latency_budget is not None:
        if not TABLE.is_file():
            model, _ = dense_model(SETUPS[args.tasks.split(",")[0]], args.seed)
            measure_table(model, *LATENCY_SHAPE).save(TABLE)
        budgets = [Budget(args.latency_budget, "latency", SEQ_LEN, str(TABLE))]
        methods = ["fisher"]
    else:
        budgets = [Budget(float(r), "flops", SEQ_LEN) for r in args.reductions.split(",")]
        methods = args.methods.split(",")
    for task in args.tasks.split(","):
        for method in methods:
            for calibration in args.calibration.split(","):
                for budget in budgets:
                    key = (task, method, budget.kind, f"{budget.target:g}", calibration, str(args.seed))
                    if key in done:
                        print(f"skip {key}: already in {args.csv}", flush=True)
                        continue
                    row = run_cell(task, method, budget, calibration, args.seed, not args.no_latency, cache)
                    if budget.kind == "latency":
                        row["latency_table"] = str(TABLE)
                        row["latency_table_dense_ms"] = LatencyTable.load(TABLE).estimate(
                            ModelStructure.from_spec(cache[task][0].spec))
                        if "ort_speedup" in row:
                            row["latency_reduction_measured"] = 1 - 1 / row["ort_speedup"]
                    bench.append_csv(args.csv, [bench.machine_info() | row])
                    print(f"{task} {method} {calibration} {budget.kind} {budget.target:g}: accuracy "
                          f"{row['pruned_accuracy']:.2f} (dense {row['dense_accuracy']:.2f}, {row['delta']:+.2f}), "
                          f"FLOPs -{row['flops_reduction']:.1%}, prune {row['prune_seconds']:.0f} s"
                          + (f", ORT {row['ort_speedup']:.2f}x" if "ort_speedup" in row else ""), flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
