"""Multi-task mask bank on real tasks: one fine-tuned all-MiniLM-L6-v2 encoder, a Fisher mask per task.

One :class:`~structprune.multitask.model.MultiTaskModel` (shared encoder, a head per task) is fine-tuned
on all tasks together with :func:`~structprune.multitask.model.finetune_multitask` (the dense baselines'
settings, ``dense_cache.FINETUNE``, and their data: ``dense_cache.SETUPS``) and cached with a JSON
record (unpruned scores, seconds, date) under ``benchmarks/cache/maskbank/<tasks>/`` (ignored by
git), so a rerun loads it. For every FLOPs reduction, :func:`~structprune.multitask.maskbank.build_bank`
makes a ``fisher`` mask per task from that task's training rows (one call per task, timed), the bank
is saved next to the model (``<model folder>/maskbank/``) and read back, and the read-back bank is
scored: every task with its own mask (compacted with :meth:`MaskBank.compact`) against the unpruned
multi-task model, and with every other task's mask on its head (the cross-task matrix: are the
masks task-specific?), with the Jaccard overlap of the kept heads and neurons of the two masks.

One row per (scored task, mask task, reduction) is appended to ``benchmarks/results/maskbank.csv``
with the machine, versions and date; a reduction whose rows are all there already is skipped, so an
interrupted run resumes.

    python benchmarks/bench_maskbank.py --tasks sst2,cr,trec --reductions 0.4 --threads 1
    python benchmarks/bench_maskbank.py --markdown     # print the tables of the CSV and exit
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dense_cache import FINETUNE, MAX_LENGTH, SETUPS, eval_data, tokenizer, train_data  # noqa: E402

from structprune import bench  # noqa: E402
from structprune.arch import from_hf  # noqa: E402
from structprune.arch.structure import ModelStructure  # noqa: E402
from structprune.budget import Budget
from structprune.compaction import compact  # noqa: E402
from structprune.data import TaskSpec, encode  # noqa: E402
from structprune.demo import minilm_dir  # noqa: E402
from structprune.evaluation import evaluate
from structprune.io import atomic_write_text  # noqa: E402
from structprune.maskset import MaskSet  # noqa: E402
from structprune.multitask.maskbank import MaskBank, build_bank  # noqa: E402
from structprune.multitask.model import MultiTaskModel, finetune_multitask  # noqa: E402

CACHE = Path(__file__).resolve().parent / "cache" / "maskbank"
CSV = Path(__file__).resolve().parent / "results" / "maskbank.csv"
RECORD_FILE = "finetune.json"
METHOD = "fisher"
KEY = ("model", "task", "mask_task", "reduction")


@dataclass(frozen=True)
class Task:
    """One task's encoded data: training rows (fine-tuning and calibration) and evaluation split."""

    spec: TaskSpec
    train: dict[str, torch.Tensor]
    eval_split: str
    evaluation: dict[str, torch.Tensor]


def load_tasks(names: list[str]) -> dict[str, Task]:
    """The tasks' data as the dense baselines use it (``dense_cache.SETUPS``), encoded at ``MAX_LENGTH``."""
    tok = tokenizer()
    tasks = {}
    for name in names:
        setup = SETUPS[name]
        train = train_data(setup)
        tasks[name] = Task(train.task, encode(train, tok, MAX_LENGTH), setup.eval_split,
                           encode(eval_data(setup), tok, MAX_LENGTH))
    return tasks


def model_folder(names: Iterable[str]) -> Path:
    """Where the multi-task model of these tasks (in this order: it sets the head order) is cached."""
    return CACHE / "+".join(names)


def multitask_model(tasks: Mapping[str, Task]) -> tuple[MultiTaskModel, dict]:
    """The cached multi-task model of ``tasks`` and its record (unpruned metrics, settings), training it if absent.

    The record is written last, so a folder without it (an interrupted save) is trained again.
    """
    path = model_folder(tasks)
    record_path = path / RECORD_FILE
    if record_path.is_file():
        return MultiTaskModel.load(path), json.loads(record_path.read_text())
    torch.manual_seed(FINETUNE.seed)
    first = next(iter(tasks.values())).spec
    hf = AutoModelForSequenceClassification.from_pretrained(str(minilm_dir()), num_labels=first.num_labels)
    model = MultiTaskModel(from_hf(hf), {name: task.spec.num_labels for name, task in tasks.items()})
    start = time.perf_counter()
    finetune_multitask(model, {name: task.train for name, task in tasks.items()}, FINETUNE)
    seconds = time.perf_counter() - start
    metrics = {name: evaluate(model.task_model(name), task.evaluation, task.spec) for name, task in tasks.items()}
    record = {"tasks": list(tasks), "train_size": {name: len(task.train["input_ids"]) for name, task in tasks.items()},
              "eval_split": {name: task.eval_split for name, task in tasks.items()}, "max_length": MAX_LENGTH,
              "metrics": metrics, "finetune": asdict(FINETUNE), "finetune_seconds": seconds,
              "torch_threads": torch.get_num_threads(),
              "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    model.save(path, tokenizer(), overwrite=True)
    atomic_write_text(record_path, json.dumps(record, indent=2))
    return model, record


def build_timed_bank(model: MultiTaskModel, tasks: Mapping[str, Task], budget: Budget) -> MaskBank:
    """A ``fisher`` mask per task from its training rows, built one task at a time so each is timed alone.

    The wall seconds and the cores other processes kept busy meanwhile go into the bank's info
    (``build_seconds``, ``build_other_cpu_cores``) beside the budget, and so into ``bank.json``.
    """
    bank = MaskBank({})
    for name, task in tasks.items():
        start = time.perf_counter()
        with bench.OtherCpuLoad() as load:
            part = build_bank(model, {name: task.train}, budget, method=METHOD)
        part.info[name] |= {"budget": asdict(budget), "build_seconds": time.perf_counter() - start,
                            "build_other_cpu_cores": load.cores}
        bank.masks |= part.masks
        bank.info |= part.info
    return bank


def same_masks(a: MaskSet, b: MaskSet) -> bool:
    """Whether two mask sets hold the same masks and scales (names and values)."""
    return all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
               for x, y in ((a.masks, b.masks), (a.scales, b.scales)))


def saved_bank(model_dir: Path, bank: MaskBank) -> MaskBank:
    """Save ``bank`` next to the model in ``model_dir`` (replacing its tasks' masks) and return it read back.

    Raises ``RuntimeError`` if the read-back masks differ from the saved ones.
    """
    bank.save(model_dir, overwrite=True)
    loaded = MaskBank.load(model_dir)
    changed = [task for task, masks in bank.masks.items() if not same_masks(masks, loaded.masks[task])]
    if changed:
        raise RuntimeError(f"the mask bank saved in {model_dir} reads back different masks for {changed}")
    return loaded


def kept_units(masks: MaskSet, structure: ModelStructure) -> tuple[set[tuple[int, int]], set[tuple[int, int]]]:
    """The kept (layer, head) and (layer, neuron) pairs, after the removed-sublayer rules."""
    layers, _ = masks.kept(structure)
    return ({(i, h) for i, layer in enumerate(layers) for h in layer.heads},
            {(i, n) for i, layer in enumerate(layers) for n in layer.neurons})


def jaccard(a: set, b: set) -> float:
    """``|a & b| / |a | b|`` (1.0 for two empty sets: they agree)."""
    return len(a & b) / len(a | b) if a | b else 1.0


def task_rows(model: MultiTaskModel, bank: MaskBank, tasks: Mapping[str, Task], unpruned: Mapping[str, float],
              reduction: float, model_name: str) -> Iterator[dict]:
    """One row per (scored task, mask task): each task's head with every task's mask, compacted and scored.

    A task's own mask goes through :meth:`MaskBank.compact`; another task's mask is applied to this
    task's view with :func:`~structprune.compaction.compact` (the bank refuses a mask under another
    task's name on purpose). Jaccard overlaps are against the scored task's own mask. Rows are
    yielded as they are scored so that the caller can save each at once.
    """
    structure = ModelStructure.from_spec(model.encoder.spec)
    kept = {name: kept_units(bank.masks[name], structure) for name in tasks}
    for name, task in tasks.items():
        metric = task.spec.main_metric
        for mask_task in tasks:
            small = (bank.compact(model, name) if mask_task == name
                     else compact(model.task_model(name), bank.masks[mask_task])).eval()
            score = evaluate(small, task.evaluation, task.spec)[metric]
            info = bank.info[mask_task]
            summary = info["summary"]
            yield {"model": model_name, "task": name, "mask_task": mask_task, "reduction": f"{reduction:g}",
                   "method": info["method"], "seq_len": summary["seq_len"], "metric": metric,
                   "calibration_examples": len(tasks[mask_task].train["input_ids"]),
                   "eval_split": task.eval_split, "eval_examples": len(task.evaluation["input_ids"]),
                   "flops_reduction": summary["flops_reduction"], "param_sparsity": summary["param_sparsity"],
                   "unpruned_accuracy": unpruned[name], "accuracy": score, "delta": score - unpruned[name],
                   "build_seconds": info["build_seconds"], "build_other_cpu_cores": info["build_other_cpu_cores"],
                   "kept_heads": len(kept[mask_task][0]), "kept_neurons": len(kept[mask_task][1]),
                   "kept": " ".join(f"{layer['heads']}/{layer['ffn']}" for layer in summary["layers"]),
                   "jaccard_heads": jaccard(kept[mask_task][0], kept[name][0]),
                   "jaccard_neurons": jaccard(kept[mask_task][1], kept[name][1]),
                   "torch_threads": torch.get_num_threads()}


def latest_rows(path: Path) -> dict[tuple[str, ...], dict[str, str]]:
    """The CSV's rows by cell (``KEY``), the latest row of a cell winning; empty when there is no CSV."""
    if not path.is_file():
        return {}
    with path.open(newline="") as f:
        return {tuple(row[k] for k in KEY): row for row in csv.DictReader(f)}


def markdown(path: Path) -> str:
    """Two Markdown tables of the CSV: own mask vs unpruned per task, and the cross-task matrices."""
    rows = list(latest_rows(path).values())
    lines = [("| model | task | FLOPs target | FLOPs removed | unpruned acc | own-mask acc | delta | bank build s | "
              "kept heads | kept neurons | kept heads/neurons per layer |"), "|---" * 11 + "|"]
    for r in sorted((r for r in rows if r["task"] == r["mask_task"]),
                    key=lambda r: (r["model"], float(r["reduction"]), r["task"])):
        lines.append(f"| {r['model']} | {r['task']} | {r['reduction']} | {float(r['flops_reduction']):.1%} | "
                     f"{float(r['unpruned_accuracy']):.1f} | {float(r['accuracy']):.1f} | {float(r['delta']):+.1f} | "
                     f"{float(r['build_seconds']):.0f} | {r['kept_heads']} | {r['kept_neurons']} | {r['kept']} |")
    groups: dict[tuple[str, str], dict[tuple[str, str], dict[str, str]]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["reduction"]), {})[(r["task"], r["mask_task"])] = r
    for (model, reduction), cells in sorted(groups.items(), key=lambda item: (item[0][0], float(item[0][1]))):
        tasks = list(dict.fromkeys(task for task, _ in cells))
        masks = list(dict.fromkeys(mask for _, mask in cells))
        lines += ["", (f"Cross-task, {model}, FLOPs reduction {reduction}: row = task scored, column = whose mask; "
                       "cell = accuracy (change vs unpruned), Jaccard of kept heads / neurons with the row task's "
                       "own mask."),
                  "", "| task \\ mask | " + " | ".join(masks) + " |", "|---|" + "---|" * len(masks)]
        for task in tasks:
            cell_texts = []
            for mask in masks:
                r = cells.get((task, mask))
                if r is None:
                    cell_texts.append("-")
                    continue
                accuracy = f"{float(r['accuracy']):.1f}"
                cell_texts.append(f"{f'**{accuracy}**' if task == mask else accuracy} ({float(r['delta']):+.1f}), "
                                  f"J {float(r['jaccard_heads']):.2f}/{float(r['jaccard_neurons']):.2f}")
            lines.append(f"| {task} | " + " | ".join(cell_texts) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="sst2,cr,trec", help=f"comma-separated, of {sorted(SETUPS)}")
    parser.add_argument("--reductions", default="0.4", help="FLOPs reductions, comma-separated")
    parser.add_argument("--threads", type=int, default=bench.CPU_THREADS, help="torch threads")
    parser.add_argument("--csv", type=Path, default=CSV)
    parser.add_argument("--markdown", action="store_true", help="print the tables of the CSV and exit")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown(args.csv))
        return 0
    names = args.tasks.split(",")
    unknown = sorted(set(names) - set(SETUPS))
    if unknown:
        parser.error(f"unknown tasks {unknown}; choose from {sorted(SETUPS)}")
    folder = model_folder(names)
    done = set(latest_rows(args.csv))
    reductions = []
    for reduction in (float(r) for r in args.reductions.split(",")):
        if {(folder.name, task, mask, f"{reduction:g}") for task in names for mask in names} <= done:
            print(f"skip reduction {reduction:g}: all its rows are in {args.csv}", flush=True)
        else:
            reductions.append(reduction)
    if not reductions:
        return 0
    torch.set_num_threads(args.threads)
    tasks = load_tasks(names)
    model, record = multitask_model(tasks)
    unpruned = {name: record["metrics"][name][task.spec.main_metric] for name, task in tasks.items()}
    print(f"multi-task model {folder.name}: unpruned {unpruned} (fine-tuned in {record['finetune_seconds']:.0f} s)",
          flush=True)
    for reduction in reductions:
        bank = build_timed_bank(model, tasks, Budget(reduction, "flops", seq_len=MAX_LENGTH))
        bank = saved_bank(folder, bank)
        for row in task_rows(model, bank, tasks, unpruned, reduction, folder.name):
            bench.append_csv(args.csv, [bench.machine_info() | row])
            print(f"{row['task']} with {row['mask_task']}'s mask, FLOPs -{row['flops_reduction']:.1%}: accuracy "
                  f"{row['accuracy']:.2f} (unpruned {row['unpruned_accuracy']:.2f}, {row['delta']:+.2f}), "
                  f"Jaccard heads {row['jaccard_heads']:.2f} neurons {row['jaccard_neurons']:.2f}, "
                  f"bank build {row['build_seconds']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
