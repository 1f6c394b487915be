"""Transfer learning for structured pruning under limited data: does an auxiliary task help ``l0``?

For every target task, training size and seed, the dense baseline of :mod:`bench_l0` is fine-tuned on
the target's training subset (cached; it is also the teacher and the starting point). Then, for every
target sparsity, each method prunes it and the compact model is scored on the target's evaluation split:

* ``l0``: learned masks on the target data only (:mod:`structprune.methods.l0`);
* ``joint``, ``separate-masks``, ``sequential``, ``intermediate``: :mod:`structprune.transfer` with that
  coupling, the auxiliary sources of ``AUX`` (or ``--aux``), and the transfer / schedule / guard settings given
  (``intermediate`` rows also score their teacher, column ``teacher_accuracy``).

Each cell appends a CSV row to ``benchmarks/results/transfer.csv`` (the columns of ``bench_l0`` plus the
auxiliary sources, how many auxiliary rows deduplication removed, coupling, transfer, schedule and guard).
A cell already there is skipped, and running cells checkpoint under ``benchmarks/cache/l0/``, so an
interrupted run resumes. Examples::

    python benchmarks/bench_transfer.py --targets cr --sizes 1000 --sparsities 0.8 --methods l0,joint
    python benchmarks/bench_transfer.py --targets cr=agnews --methods joint         # negative control
    python benchmarks/bench_transfer.py --table --plot     # table of the CSV, and the plot for BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import sys
from pathlib import Path

import torch
from bench_l0 import FLOPS_SEQ, MAX_LENGTH, Runner, _cell, _done, _settings_key

from structprune import bench, transfer
from structprune.budget import Budget
from structprune.data import load_task
from structprune.methods import l0
from structprune.transfer.sources import load_auxiliary, parse_aux

HERE = Path(__file__).resolve().parent
CSV = HERE / "results" / "transfer.csv"
PLOT = HERE / "results" / "transfer.png"
AUX = {"rte": "mnli", "cr": "sst2-full", "mrpc": "qqp", "vader-tweets": "vader-movies"}
"""The auxiliary source of each target (the natural pairs of the data README)."""
COUPLINGS = transfer.COUPLINGS
REVISION = 4
"""Revision of the transfer method a row measured, part of its settings key (empty in old rows: 1).
1: the cosine guard scaled only the auxiliary losses; 2: it scales the separate-masks tie penalty too; 3: the
auxiliary forwards draw dropout from their own stream and the auxiliary heads are out of the clipped norm, so a
rejected source leaves the run ``l0``'s exactly; 4: the guard's weight is the running mean of the cosine over its
running root mean square (was the step's ``max(0, cos)``), and the auxiliary heads learn whatever the guard
lets through."""


class TransferRunner(Runner):
    """bench_l0's runner (dense baseline, ``l0`` cells) plus the transfer cells of one target and seed."""

    def __init__(self, name: str, args: argparse.Namespace, seed: int, config: l0.L0Config, aux: str):
        super().__init__(name, args, seed, config)
        self.aux_spec = aux
        evaluations = [load_task(self.train.task.name, split) for split in self.train.task.splits if split != "train"]
        self.aux, self.dedup = load_auxiliary(parse_aux(aux), self.train, evaluations, self.tokenizer, MAX_LENGTH,
                                              seed)

    def transfer_key(self, config: transfer.TransferConfig) -> str:
        """The settings key of a transfer cell."""
        return _settings_key({"transfer": self.settings(config)})

    def settings(self, config: transfer.TransferConfig) -> dict:
        return dataclasses.asdict(config) | {"aux": self.aux_spec, "revision": REVISION}

    def transferred(self, dense, target: float, config: transfer.TransferConfig) -> dict:
        settings = self.settings(config)
        key = self.transfer_key(config)
        extra = {"aux": self.aux_spec, "aux_rows": sum(len(a.encoded["input_ids"]) for a in self.aux),
                 "aux_removed": sum(v["removed"] for v in self.dedup.values()), "coupling": config.coupling,
                 "transfer": config.transfer, "schedule": config.schedule, "guard": config.guard,
                 "revision": REVISION}
        folder = []

        def run(checkpoint: Path):
            folder.append(checkpoint)
            if config.coupling == "intermediate":  # one auxiliary and retarget phase for every sparsity
                for phase in ("aux", "retarget"):
                    shared, link = checkpoint.parent / phase, checkpoint / phase
                    shared.mkdir(parents=True, exist_ok=True)
                    if not link.exists():
                        checkpoint.mkdir(parents=True, exist_ok=True)
                        link.symlink_to(shared, target_is_directory=True)
            return transfer.prune(dense, self.train_enc, Budget(target, seq_len=FLOPS_SEQ), aux=self.aux,
                                  config=config, checkpoint_dir=checkpoint, progress=True)

        row = self.measure(dense, config.coupling, target, key, settings, run, extra)
        if config.coupling == "intermediate":
            row["teacher_accuracy"] = round(self.retargeted_accuracy(dense, folder[0] / "retarget"), 2)
        return row

    def retargeted_accuracy(self, dense, retarget: Path) -> float:
        """The evaluation score of an ``intermediate`` run's teacher: the dense model after the auxiliary and
        retarget phases, read from the retarget phase's final checkpoint."""
        model = copy.deepcopy(dense)
        state = torch.load(retarget / "checkpoint.pt", map_location="cpu", weights_only=False)["objective"]
        model.load_state_dict({name.removeprefix("model."): t for name, t in state.items()})
        return self._accuracy(model.eval())


def _revision(row: dict) -> int:
    return int(row.get("revision") or 1)


def _controller(row: dict) -> str:
    """The sparsity controller a row's ``l0`` ran (rows from before the setting existed ran the Lagrangian)."""
    settings = json.loads(row.get("settings") or "{}")
    return settings.get("l0", settings).get("controller", "lagrangian")


def _l0_label(row: dict) -> str:
    """``l0``, with its controller when that is not the default."""
    controller = _controller(row)
    return "l0" if controller == l0.L0Config.controller else f"l0 ({controller})"


def _label(row: dict, revision: bool = True) -> str:
    """``coupling (aux; the settings that differ from the defaults)`` of a transfer row; with ``revision``, an
    older revision of the method is one of those settings."""
    default = transfer.TransferConfig(coupling=row["method"])
    changed = [f"{name} {row[name]}" for name in ("transfer", "schedule", "guard")
               if row[name] != getattr(default, name) and not (name == "transfer" and row["method"] == "joint")]
    if revision and _revision(row) != REVISION:
        changed.append(f"revision {_revision(row)}")
    if _controller(row) != default.l0.controller:
        changed.append(f"controller {_controller(row)}")
    return f"{row['method']} ({'; '.join([row['aux'], *changed])})"


def table(path: Path) -> str:
    """Markdown: per target, size and sparsity, mean ± spread of every method, and its gain over ``l0`` run with
    the same controller."""
    import csv

    if not path.is_file():
        return f"(no results yet in {path})"
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    cells: dict[tuple, dict[str, list[float]]] = {}
    base_of: dict[str, str] = {}
    for r in rows:
        label = "dense" if r["method"] == "dense" else _l0_label(r) if r["method"] == "l0" else _label(r)
        base_of[label] = _l0_label(r)
        cells.setdefault((r["task"], r["train_size"], r["device"]), {}).setdefault(
            (label, r["target"]), []).append(float(r["accuracy"]))

    def stats(values: list[float]) -> str:
        if len(values) == 1:
            return f"{values[0]:.1f}"
        return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"

    lines = ["| target | train | device | sparsity | method | seeds | accuracy | vs l0 |", "|---|---:|---|---:|---|---:|---:|---:|"]
    for (task, size, device), methods in sorted(cells.items()):
        dense = methods.get(("dense", "0"))
        if dense:
            lines.append(f"| {task} | {size} | {device} | 0% | dense | {len(dense)} | {stats(dense)} | |")
        for (label, target), values in sorted(methods.items(), key=lambda kv: (kv[0][1], kv[0][0] != base_of[kv[0][0]],
                                                                               kv[0][0])):
            if label == "dense":
                continue
            base = methods.get((base_of[label], target))
            gain = f"{statistics.mean(values) - statistics.mean(base):+.1f}" if base and label != base_of[label] else ""
            lines.append(f"| {task} | {size} | {device} | {float(target):.0%} | {label} | {len(values)} | "
                         f"{stats(values)} | {gain} |")
    return "\n".join(lines)


def plot(path: Path, out: Path, device: str = "cuda") -> Path:
    """Accuracy gain over ``l0`` (mean over seeds) of each coupling with its defaults and natural source, per
    target and sparsity, from the rows of ``device``; a coupling measured in several revisions shows its newest."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with path.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["train_size"] == "1000" and r["device"] == device and (
            r["method"] == "l0" or r["method"] in COUPLINGS
            and _label(r, revision=False) == f"{r['method']} ({AUX[r['task']]})")]
    newest: dict[tuple, int] = {}
    for r in rows:
        cell = (r["task"], r["target"], r["method"])
        newest[cell] = max(newest.get(cell, 0), _revision(r))
    rows = [r for r in rows if r["method"] == "l0" or _revision(r) == newest[(r["task"], r["target"], r["method"])]]
    groups = sorted({(r["task"], r["target"]) for r in rows if r["method"] != "dense"})
    means = {}
    for r in rows:
        means.setdefault((r["task"], r["target"], r["method"], r.get("aux", "")), []).append(float(r["accuracy"]))
    fig, ax = plt.subplots(figsize=(8, 3.5))
    width = 0.8 / len(COUPLINGS)
    for i, coupling in enumerate(COUPLINGS):
        gains = []
        for task, target in groups:
            base = means.get((task, target, "l0", ""))
            mine = [v for (t, s, m, _), v in means.items() if (t, s, m) == (task, target, coupling)]
            gains.append(statistics.mean(mine[0]) - statistics.mean(base) if base and mine else float("nan"))
        revisions = sorted({rev for (t, s, m), rev in newest.items() if m == coupling})
        ax.bar([g + i * width for g in range(len(groups))], gains, width,
               label=f"{coupling} (revision {'/'.join(map(str, revisions))})")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks([g + width for g in range(len(groups))],
                  [f"{t.removeprefix('vader-')}\n{float(s):.0%}" for t, s in groups])
    ax.set_ylabel("accuracy - l0 (points)")
    ax.set_title(f"Transfer (default settings) vs target-only l0, all-MiniLM-L6-v2, 1,000 target examples, {device}",
                 fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="rte,cr,mrpc,vader-tweets",
                        help="comma-separated; TARGET=AUX gives one target its own auxiliary sources, e.g. cr=agnews "
                             "(default: %(default)s)")
    parser.add_argument("--sizes", default="1000", help="target training sizes (default: %(default)s)")
    parser.add_argument("--sparsities", default="0.8,0.6",
                        help="target parameter sparsities; empty: dense baselines only (default: %(default)s)")
    parser.add_argument("--seeds", default="0,1", help="comma-separated (default: %(default)s)")
    parser.add_argument("--methods", default="l0,joint,separate-masks,sequential,intermediate",
                        help="l0 and/or couplings (default: %(default)s)")
    parser.add_argument("--aux", default=None, help="auxiliary sources for every target, e.g. agnews or mnli:1,mlm "
                        "(default: the natural source of each target)")
    parser.add_argument("--transfer", default=transfer.TransferConfig.transfer)
    parser.add_argument("--schedule", default=transfer.TransferConfig.schedule)
    parser.add_argument("--guard", default=transfer.TransferConfig.guard)
    parser.add_argument("--aux-weight", type=float, default=transfer.TransferConfig.aux_weight)
    parser.add_argument("--prune-epochs", type=float, default=l0.L0Config.prune_epochs)
    parser.add_argument("--finetune-epochs", type=float, default=l0.L0Config.finetune_epochs)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=bench.CPU_THREADS, help="torch threads on CPU (default: 2)")
    parser.add_argument("--csv", default=str(CSV), help="results file (default: benchmarks/results/transfer.csv)")
    parser.add_argument("--table", action="store_true", help="only print the table of the CSV")
    parser.add_argument("--plot", action="store_true", help="with --table: also draw benchmarks/results/transfer.png")
    args = parser.parse_args(argv)
    if args.table:
        print(table(Path(args.csv)))
        if args.plot:
            print(f"plot: {plot(Path(args.csv), PLOT)}")
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here")
    methods = args.methods.split(",")
    unknown = set(methods) - {"l0", *COUPLINGS}
    if unknown:
        parser.error(f"--methods: unknown {sorted(unknown)}; choose from l0, {', '.join(COUPLINGS)}")
    torch.set_num_threads(args.threads)
    config = l0.L0Config(prune_epochs=args.prune_epochs, finetune_epochs=args.finetune_epochs)
    for size in (int(n) for n in args.sizes.split(",")):
        for seed in (int(s) for s in args.seeds.split(",")):
            for entry in args.targets.split(","):
                name, _, aux = entry.partition("=")
                runner = TransferRunner(name, argparse.Namespace(**vars(args) | {"train_size": size}), seed, config,
                                        aux or args.aux or AUX[name])
                print(f"{name}: auxiliary {runner.aux_spec}, deduplication {runner.dedup}", flush=True)
                dense, record = runner.dense()
                done = _done(Path(args.csv))
                if _cell(name, len(runner.train), seed, "dense", 0.0, args.device, runner.dense_key) not in done:
                    bench.append_csv(args.csv, [record])
                for target in (float(t) for t in args.sparsities.split(",") if t):
                    for method in methods:
                        if method == "l0":
                            if _cell(name, len(runner.train), seed, "l0", target, args.device, runner.key) in done:
                                continue
                            row = runner.pruned(dense, target)
                        else:
                            options = transfer.TransferConfig(
                                l0=config, coupling=method,
                                transfer="both" if method == "joint" else args.transfer,
                                schedule="start" if method in ("sequential", "intermediate") else args.schedule,
                                guard=args.guard, aux_weight=args.aux_weight)
                            if _cell(name, len(runner.train), seed, method, target, args.device,
                                     runner.transfer_key(options)) in done:
                                continue
                            row = runner.transferred(dense, target, options)
                        bench.append_csv(args.csv, [row])
                        print(f"{name} n={size} seed {seed} {method} at {target:.0%}: accuracy {row['accuracy']:.2f} "
                              f"(dense {record['accuracy']:.2f}, {row['seconds'] / 60:.1f} min)", flush=True)
    print(table(Path(args.csv)))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
