"""Learned structured pruning (``l0``) of all-MiniLM-L6-v2 under limited data: accuracy vs the dense model.

For every task and seed, a dense baseline is fine-tuned on the same training subset (it is also the
teacher and the starting point), then for every target sparsity ``l0`` learns masks, compacts and
fine-tunes the compact model. Each cell (dense or pruned) appends one CSV row to
``benchmarks/results/l0.csv`` with the task, train size, seed, target and reached sparsity
(parameters; FLOPs at sequence 128), accuracy, wall time, the settings, machine and versions. A cell
already in the CSV (same task, train size, seed, target, device and settings) is skipped, the dense
models are cached and a running cell checkpoints under ``benchmarks/cache/l0/``, so an interrupted
run picks up where it stopped. Examples::

    python benchmarks/bench_l0.py --tasks sst2,cr,mrpc,rte --sparsities 0.5 --seeds 0
    python benchmarks/bench_l0.py --tasks rte-full --sparsities 0.5,0.7,0.9 --seeds 0,1 --device cuda
    python benchmarks/bench_l0.py --table          # print the table of what the CSV holds

Tasks: ``sst2`` (1,000-example train.tsv, dev), ``cr`` (seeded split, test), ``mrpc`` (dev) and ``rte``
(dev), each with ``--train-size`` examples drawn with the seed; ``rte-full``: all 2,490 RTE examples.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from structprune import bench
from structprune.arch import from_hf
from structprune.arch.structure import ModelStructure
from structprune.budget import Budget
from structprune.compaction import compact, from_pretrained, save
from structprune.data import encode, load_task
from structprune.demo import minilm_dir
from structprune.evaluation import evaluate
from structprune.finetune import FinetuneConfig, finetune, mark_task
from structprune.io import atomic_write_text
from structprune.methods import l0
from structprune.methods.options import CONTROLLERS, WARMUP
from structprune.methods.result import PruneResult
from structprune.report import save_figure

HERE = Path(__file__).resolve().parent
CSV = HERE / "results" / "l0.csv"
CACHE = HERE / "cache" / "l0"
MAX_LENGTH = 128
FLOPS_SEQ = 128
EVAL_SPLIT = {"sst2": "dev", "cr": "test", "mrpc": "dev", "rte": "dev", "vader-tweets": "test"}
DENSE = FinetuneConfig(epochs=3, batch_size=32, lr=1e-4)
"""Dense fine-tuning (baseline and teacher), the same settings as the training-free benchmark's."""


def _task(name: str) -> tuple[str, bool]:
    """(registered task, whether the whole training split is used)."""
    return (name.removesuffix("-full"), True) if name.endswith("-full") else (name, False)


def _settings_key(settings: dict) -> str:
    text = json.dumps(settings | {"dense": dataclasses.asdict(DENSE), "max_length": MAX_LENGTH}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _done(path: Path) -> set[tuple[str, ...]]:
    import csv

    if not path.is_file():
        return set()
    with path.open(newline="") as f:
        return {(r["task"], r["train_size"], r["seed"], r["method"], r["target"], r["device"], r["settings_key"])
                for r in csv.DictReader(f)}


def _cell(task: str, train_size: int, seed: int, method: str, target: float, device: str, key: str) -> tuple:
    return (task, str(train_size), str(seed), method, f"{target:g}", device, key)


class Runner:
    """Runs the cells of one (task, seed): the dense baseline first, then each target sparsity."""

    def __init__(self, name: str, args: argparse.Namespace, seed: int, config: l0.L0Config):
        self.name, self.args, self.seed, self.config = name, args, seed, config
        task, full = _task(name)
        self.tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()))
        self.train = load_task(task, "train", train_size=None if full else args.train_size, seed=seed)
        self.evaluation = load_task(task, EVAL_SPLIT[task])
        self.train_enc = encode(self.train, self.tokenizer, MAX_LENGTH)
        self.eval_enc = encode(self.evaluation, self.tokenizer, MAX_LENGTH)
        self.key = _settings_key({"l0": dataclasses.asdict(config)})
        self.dense_key = _settings_key({})
        self.prefix = CACHE / f"{name}-{len(self.train)}-s{seed}-{args.device}"
        self.dense_folder = Path(f"{self.prefix}-dense-{self.dense_key}")

    def row(self, method: str, target: float, accuracy: float, seconds: float, summary: dict, extra: dict,
            key: str) -> dict:
        return {"task": self.name, "train_size": len(self.train), "eval_split": self.evaluation.split,
                "eval_size": len(self.evaluation), "seed": self.seed, "method": method, "target": f"{target:g}",
                "param_sparsity": round(summary["param_sparsity"], 4),
                "flops_reduction": round(summary["flops_reduction"], 4), "flops_seq": FLOPS_SEQ,
                "accuracy": round(accuracy, 2), "seconds": round(seconds, 1), "device": self.args.device,
                "settings_key": key, "load_average": bench.load_average(),
                "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())} | extra | bench.machine_info()

    def dense(self):
        """The fine-tuned dense model (cached on disk) and its CSV row."""
        path = self.dense_folder / "model"
        record_path = self.dense_folder / "dense.json"
        if record_path.is_file():
            return from_pretrained(path).to(self.args.device).eval(), json.loads(record_path.read_text())
        torch.manual_seed(self.seed)
        model = from_hf(AutoModelForSequenceClassification.from_pretrained(
            str(minilm_dir()), num_labels=self.train.task.num_labels)).to(self.args.device)
        start = time.perf_counter()
        finetune(model, self.train_enc, dataclasses.replace(DENSE, seed=self.seed),
                 description=f"dense {self.name} s{self.seed}", checkpoint_dir=self.dense_folder / "checkpoints",
                 fingerprint={"task": self.name, "seed": self.seed, "rows": len(self.train)})
        seconds = time.perf_counter() - start
        mark_task(model, self.train.task)
        accuracy = self._accuracy(model)
        structure = ModelStructure.from_spec(model.spec)
        summary = {"param_sparsity": 0.0, "flops_reduction": 0.0, "layers": [], "hidden": structure.hidden_size}
        record = self.row("dense", 0.0, accuracy, seconds, summary, {"settings": json.dumps(dataclasses.asdict(DENSE))},
                          self.dense_key)
        save(model.cpu(), path, self.tokenizer, overwrite=True)
        atomic_write_text(record_path, json.dumps(record, indent=2))
        return model.to(self.args.device), record

    def _accuracy(self, model) -> float:
        return evaluate(model, self.eval_enc, self.train.task)[self.train.task.main_metric]

    def pruned(self, dense, target: float) -> dict:
        """Prune ``dense`` with ``l0`` at ``target`` and measure the compact model: the cell's CSV row."""
        return self.measure(dense, "l0", target, self.key, dataclasses.asdict(self.config),
                            lambda checkpoint: l0.prune(dense, self.train_enc, Budget(target, seq_len=FLOPS_SEQ),
                                                        config=self.config, checkpoint_dir=checkpoint, progress=True))

    def measure(self, dense, method: str, target: float, key: str, settings: dict,
                run: Callable[[Path], PruneResult], extra: dict | None = None) -> dict:
        """Run ``run(checkpoint_dir)``, rebuild its compact model from ``dense`` and score it: the CSV row."""
        start = time.perf_counter()
        result = run(Path(f"{self.prefix}-{method}-{key}") / f"{target:g}")
        seconds = time.perf_counter() - start
        model = compact(dense, result.masks)
        model.load_state_dict(result.weights)
        summary = result.log["summary"]
        accuracy = self._accuracy(model.eval())
        trace = result.log["sparsity_trace"]
        hold = [abs(s - t) for s, t in zip(trace["sparsity"], trace["target"]) if t == trace["target"][-1]]
        extra = {"expected_sparsity_end": round(result.log["expected_sparsity_end"], 4),
                 "rounded_sparsity": round(result.log["rounded_sparsity"], 4),
                 "hold_steps": len(hold), "hold_gap_max": round(max(hold, default=float("nan")), 4),
                 "prune_steps": result.log["prune_steps"], "finetune_steps": result.log["finetune_steps"],
                 "kept_heads": " ".join(str(x["heads"]) for x in summary["layers"]),
                 "kept_ffn": " ".join(str(x["ffn"]) for x in summary["layers"]), "kept_hidden": summary["hidden"],
                 "settings": json.dumps(settings)} | (extra or {})
        return self.row(method, target, accuracy, seconds, summary, extra, key)


COLORS = {"hold": "#c44e52", "lagrangian": "#dd8452", "projection": "#4c72b0", "priced": "#55a868"}
"""Line colour of each controller in the plot (others: matplotlib's cycle)."""


def _recipe(row: dict) -> str:
    """The controller of an ``l0`` row (rows from before the setting existed ran the Lagrangian alone), with the
    target's warm-up share when it is not the controller's default (rows from before that default ran 0.5), and the
    weights' learning rate and the epochs when they are not ``L0Config``'s."""
    settings = json.loads(row["settings"])
    name = settings.get("controller", "lagrangian")
    warmup = settings.get("sparsity_warmup", 0.5)
    label = name if warmup in (None, WARMUP.get(name, 0.5)) else f"{name}, warm-up {warmup:g}"
    default = l0.L0Config()
    if settings.get("lr", default.lr) != default.lr:
        label += f", lr {settings['lr']:g}"
    epochs = (settings.get("prune_epochs", default.prune_epochs),
              settings.get("finetune_epochs", default.finetune_epochs))
    if epochs != (default.prune_epochs, default.finetune_epochs):
        label += f", {epochs[0]:g} + {epochs[1]:g} epochs"
    return label


def table(path: Path) -> str:
    """Markdown: per task and target, mean accuracy (and spread over seeds), dense on the same data, the gap."""
    import csv

    if not path.is_file():
        return f"(no results yet in {path})"
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        controller = "" if r["method"] == "dense" else _recipe(r)
        groups.setdefault((r["task"], r["train_size"], r["device"], r["method"], r["target"], controller),
                          []).append(r)

    def stats(values: list[float]) -> str:
        if len(values) == 1:
            return f"{values[0]:.1f}"
        return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"

    lines = [("| task | train | target | controller | seeds | expected sparsity at the end of pruning | reached "
              "params / FLOPs | l0 accuracy | dense accuracy | gap | wall time per run | device |"),
             "|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for (task, size, device, method, target, controller), cell in sorted(groups.items()):
        if method != "l0":
            continue  # dense rows are matched to the l0 rows of the same task, size, device and seeds
        seeds = sorted({r["seed"] for r in cell})
        dense = [float(r["accuracy"]) for r in groups.get((task, size, device, "dense", "0", ""), [])
                 if r["seed"] in seeds]
        expected = " / ".join(f"{float(r['expected_sparsity_end']):.3f}" for r in cell if r.get("expected_sparsity_end"))
        acc = [float(r["accuracy"]) for r in cell]
        gap = f"{statistics.mean(acc) - statistics.mean(dense):+.1f}" if dense else "n/a"
        reached = (f"{statistics.mean(float(r['param_sparsity']) for r in cell):.1%} / "
                   f"{statistics.mean(float(r['flops_reduction']) for r in cell):.1%}")
        minutes = statistics.mean(float(r["seconds"]) for r in cell) / 60
        lines.append(f"| {task} | {size} | {float(target):.0%} | {controller} | {','.join(seeds)} | {expected or 'n/a'} | "
                     f"{reached} | {stats(acc)} | {stats(dense) if dense else 'n/a'} | {gap} | {minutes:.1f} min | "
                     f"{device} |")
    return "\n".join(lines)


def plot_controller(path: Path, out: Path) -> Path:
    """Expected vs target sparsity per pruning step of every ``l0`` cell of the CSV whose run log is still in
    the cache: one panel per task and target, one line per controller and seed."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    with path.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["method"] == "l0"]
    panels: dict[tuple[str, str], list[tuple[str, list[dict]]]] = {}
    for r in rows:
        log = (CACHE / f"{r['task']}-{r['train_size']}-s{r['seed']}-{r['device']}-l0-{r['settings_key']}"
               / r["target"] / "prune" / "log.jsonl")
        if log.is_file():
            label = f"{_recipe(r)} s{r['seed']}"
            steps = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
            panels.setdefault((r["task"], r["target"]), []).append((label, steps))
    if not panels:
        raise SystemExit(f"no run logs of {path}'s l0 cells under {CACHE}: run the cells first")
    keys = sorted(panels)
    columns = min(3, len(keys))
    rows = -(-len(keys) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(keys):]:
        ax.set_visible(False)
    for ax, key in zip(axes.flat, keys):
        for label, steps in panels[key]:
            ax.plot([s["step"] for s in steps], [s["sparsity"] for s in steps], label=label,
                    color=COLORS.get(label.split()[0].rstrip(",")))
        first = panels[key][0][1]
        ax.plot([s["step"] for s in first], [s["target"] for s in first], "--", color="gray", label="target")
        ax.set_title(f"{key[0]}, target {float(key[1]):.0%}")
        ax.set_xlabel("pruning step")
        ax.set_ylabel("expected sparsity")
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="sst2,cr,mrpc,rte", help="comma-separated (default: %(default)s)")
    parser.add_argument("--sparsities", default="0.5,0.7,0.9",
                        help="target parameter sparsities; empty: dense baselines only (default: %(default)s)")
    parser.add_argument("--seeds", default="0,1", help="comma-separated (default: %(default)s)")
    parser.add_argument("--train-size", type=int, default=1000, help="training examples (default: %(default)s)")
    parser.add_argument("--prune-epochs", type=float, default=l0.L0Config.prune_epochs)
    parser.add_argument("--finetune-epochs", type=float, default=l0.L0Config.finetune_epochs)
    parser.add_argument("--lr", type=float, default=l0.L0Config.lr, help="weights' learning rate, both phases")
    parser.add_argument("--gate-lr", type=float, default=l0.L0Config.gate_lr)
    parser.add_argument("--lambda-lr", type=float, default=l0.L0Config.lambda_lr)
    parser.add_argument("--controller", default=l0.L0Config.controller, choices=CONTROLLERS)
    parser.add_argument("--sparsity-warmup", type=float, default=None,
                        help="share of the pruning phase over which the target rises (default: the controller's, "
                             f"{WARMUP})")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=bench.CPU_THREADS, help="torch threads on CPU (default: 2)")
    parser.add_argument("--csv", default=str(CSV), help="results file (default: benchmarks/results/l0.csv)")
    parser.add_argument("--table", action="store_true", help="only print the table of the CSV")
    parser.add_argument("--plot", type=Path, default=None, metavar="PNG",
                        help="only draw expected vs target sparsity per step of the CSV's cells (from their run logs)")
    args = parser.parse_args(argv)
    if args.table:
        print(table(Path(args.csv)))
        return 0
    if args.plot is not None:
        print(f"plot written to {plot_controller(Path(args.csv), args.plot)}")
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here")
    torch.set_num_threads(args.threads)
    config = l0.L0Config(prune_epochs=args.prune_epochs, finetune_epochs=args.finetune_epochs, lr=args.lr,
                         gate_lr=args.gate_lr, lambda_lr=args.lambda_lr, controller=args.controller,
                         sparsity_warmup=args.sparsity_warmup)
    targets = [float(t) for t in args.sparsities.split(",") if t]  # none: only the dense baselines
    for seed in (int(s) for s in args.seeds.split(",")):
        for name in args.tasks.split(","):
            runner = Runner(name, args, seed, config)
            done = _done(Path(args.csv))
            dense, record = runner.dense()
            if _cell(name, len(runner.train), seed, "dense", 0.0, args.device, runner.dense_key) not in done:
                bench.append_csv(args.csv, [record])
            print(f"{name} seed {seed}: dense accuracy {record['accuracy']:.2f}", flush=True)
            for target in targets:
                if _cell(name, len(runner.train), seed, "l0", target, args.device, runner.key) in done:
                    continue
                row = runner.pruned(dense, target)
                bench.append_csv(args.csv, [row])
                print(f"{name} seed {seed} target {target:.0%}: accuracy {row['accuracy']:.2f} at parameter "
                      f"sparsity {row['param_sparsity']:.3f} ({row['seconds'] / 60:.1f} min)", flush=True)
    print(table(Path(args.csv)))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
