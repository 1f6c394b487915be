"""Learned pruning end to end into one output folder (``structprune prune --method l0`` or ``transfer``).

:func:`run_l0` takes a model, a task's training and evaluation data and a budget, and:

1. gets the dense teacher (:func:`dense_teacher`): a given ``teacher`` (checked against the task and
   its labels), else the model itself when its config says it was fine-tuned on this task, else the
   model fine-tuned here (:func:`structprune.finetune.finetune`, resumable);
2. runs :func:`structprune.methods.l0.prune`, or with ``transfer`` options
   :func:`structprune.methods.transfer.prune` on the auxiliary sources
   (:func:`structprune.auxiliary.load_auxiliary`, loaded and deduplicated first, so bad sources fail
   before any training) (pruning, mask extraction, fine-tuning of the compact model; resumable
   under ``checkpoint_dir``);
3. evaluates dense and pruned models on the evaluation data (PyTorch and ONNX Runtime), exports
   both through the same path and times them side by side (:func:`structprune.demo.measure_latency`);
4. writes ``masks/``, ``pruned/`` (and ``dense/`` when the teacher was trained here),
   ``onnx-dense/``, ``onnx-pruned/``, ``l0-log.json`` (``transfer-log.json``) and the report
   (:mod:`structprune.report`; with transfer it lists the auxiliary sources and how many of their
   examples were removed as duplicates of the target's data) into ``out``, which appears only when
   everything succeeded.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from structprune import bench
from structprune.arch.structure import ModelStructure
from structprune.auxiliary import AuxSource, load_auxiliary
from structprune.compact import compact, save
from structprune.data import TaskData, TaskSpec, encode
from structprune.demo import measure_latency
from structprune.export import export, session
from structprune.finetune import FinetuneConfig, evaluate, finetune, mark_task
from structprune.io import atomic_dir, atomic_write_text, check_output_dir
from structprune.costs import count_flops, count_params
from structprune.budget import Budget
from structprune.methods import l0, transfer
from structprune.methods.l0 import L0Config, check_teacher
from structprune.methods.transfer import TransferConfig
from structprune.modeling_structprune import StructpruneForSequenceClassification
from structprune.report import Comparison, ModelResult, write_report
from structprune.train import digest

LOG_FILE = "{method}-log.json"


@dataclass(frozen=True)
class TransferOptions:
    """What ``prune --method transfer`` adds to the l0 pipeline: the auxiliary sources, the settings
    (``config.l0`` takes the place of :func:`run_l0`'s ``config``), every evaluation split of the target
    (auxiliary examples occurring there are removed) and where the benchmark data sets are."""

    sources: tuple[AuxSource, ...]
    config: TransferConfig = TransferConfig()
    target_eval: tuple[TaskData, ...] = ()
    data_dir: str | None = None


def _fine_tuned_for(model: StructpruneForSequenceClassification, task_name: str) -> bool:
    return getattr(model.config, "finetuned_task", None) == task_name


def dense_teacher(model: StructpruneForSequenceClassification, train_enc: Mapping[str, torch.Tensor], task: TaskSpec,
                  dense_config: FinetuneConfig, checkpoint_dir: Path | None, progress: bool = True,
                  model_name: str = "model", tag: str = "l0") -> tuple[StructpruneForSequenceClassification, bool]:
    """(the dense teacher, whether it was fine-tuned here): ``model`` itself when its config says it was
    fine-tuned on ``task``, else a copy fine-tuned on ``train_enc`` (resumable under ``checkpoint_dir/dense``)."""
    if _fine_tuned_for(model, task.name):
        return model, False
    dense = copy.deepcopy(model)
    print(f"[{tag}] {model_name} is not fine-tuned on {task.name}: fine-tuning the dense teacher first", flush=True)
    finetune(dense, train_enc, dense_config, progress=progress, description="dense fine-tune",
             checkpoint_dir=None if checkpoint_dir is None else checkpoint_dir / "dense",
             fingerprint={"task": task.name, "data": digest(train_enc), "model": digest(model.state_dict()),
                          "config": dataclasses.asdict(dense_config)})
    mark_task(dense, task)
    return dense, True


def _aux_summary(report: Mapping[str, Mapping], options: TransferOptions) -> str:
    sources = "; ".join(f"{source.name} (weight {source.weight:g}, {report[source.name]['split']} split: "
                        f"{report[source.name]['kept']} examples used, {report[source.name]['removed']} removed as "
                        "duplicates of target sentences)" for source in options.sources)
    c = options.config
    return (f"{sources}. Coupling {c.coupling}, transfer {c.transfer}, schedule {c.schedule}, aux weight "
            f"{c.aux_weight:g}, guard {c.guard}")


def run_l0(model: StructpruneForSequenceClassification, tokenizer, train: TaskData, evaluation: TaskData,
           out: str | os.PathLike, budget: Budget, config: L0Config = L0Config(), *,
           teacher: StructpruneForSequenceClassification | None = None,
           dense_config: FinetuneConfig = FinetuneConfig(epochs=3, lr=1e-4), max_length: int = 128,
           checkpoint_dir: str | os.PathLike | None = None, threads: int = bench.CPU_THREADS,
           latency_batch: int = 8, latency_seq: int = 128, timing: dict | None = None, model_name: str = "model",
           overwrite: bool = False, progress: bool = True, transfer_options: TransferOptions | None = None
           ) -> Comparison:
    """Prune ``model`` with ``l0`` (or ``transfer`` when ``transfer_options`` are given) for ``train.task``
    and write the output folder (see the module docstring)."""
    check_output_dir(out, overwrite)
    method = "l0" if transfer_options is None else "transfer"
    if transfer_options is not None:
        config = transfer_options.config.l0
    task = train.task
    if teacher is not None:
        check_teacher(teacher, model, task.name, task.label_names)
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    aux, dedup = [], {}
    if transfer_options is not None:
        aux, dedup = load_auxiliary(transfer_options.sources, train, transfer_options.target_eval, tokenizer,
                                    max_length, config.seed, transfer_options.data_dir)
        for name, counts in dedup.items():
            print(f"[transfer] {name}: {counts['kept']} examples from {counts['split']}, {counts['removed']} "
                  "removed as duplicates of the target's data", flush=True)
    train_enc = encode(train, tokenizer, max_length)
    eval_enc = encode(evaluation, tokenizer, max_length)
    directory = None if checkpoint_dir is None else Path(checkpoint_dir)

    given = teacher  # without one, each method picks its own (intermediate: the model after the auxiliary task)
    trained_here = False
    if teacher is None:
        dense, trained_here = dense_teacher(model, train_enc, task, dense_config, directory, progress, model_name,
                                            method)
        if trained_here:
            seconds["dense fine-tune"] = time.perf_counter() - started
    else:
        dense = model
    teacher = teacher if teacher is not None else dense
    dense_acc = evaluate(teacher, eval_enc, task)[task.main_metric]
    print(f"[{method}] dense {evaluation.split} {task.main_metric}: {dense_acc:.2f}%", flush=True)

    stage = time.perf_counter()
    where = None if directory is None else directory / method
    if transfer_options is None:
        result = l0.prune(dense, train_enc, budget, config=config, teacher=given, checkpoint_dir=where,
                          progress=progress)
    else:
        result = transfer.prune(dense, train_enc, budget, aux=aux, config=transfer_options.config, teacher=given,
                                checkpoint_dir=where, progress=progress)
        result.log["aux_dedup"] = dedup
    pruned = compact(dense, result.masks)
    pruned.load_state_dict(result.weights)
    mark_task(pruned, task)
    pruned.eval()
    seconds[f"{method} prune + fine-tune"] = time.perf_counter() - stage
    pruned_acc = evaluate(pruned, eval_enc, task)[task.main_metric]
    summary = result.log["summary"]
    print(f"[{method}] pruned {evaluation.split} {task.main_metric}: {pruned_acc:.2f}% at {budget.kind} sparsity "
          f"{budget.achieved(summary):.3f} (target {budget.target})", flush=True)

    structure, pruned_structure = ModelStructure.from_spec(teacher.spec), ModelStructure.from_spec(pruned.spec)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        stage = time.perf_counter()
        if trained_here:
            save(dense, tmp / "dense", tokenizer)
        result.masks.save(tmp / "masks", ModelStructure.from_spec(dense.spec), dense.spec)
        save(pruned, tmp / "pruned", tokenizer)
        export(teacher, tmp / "onnx-dense", tokenizer, threads=threads)
        export(pruned, tmp / "onnx-pruned", tokenizer, threads=threads)
        onnx_acc = {name: evaluate(session(tmp / f"onnx-{name}", threads), eval_enc, task)[task.main_metric]
                    for name in ("dense", "pruned")}
        seconds["save and export"] = time.perf_counter() - stage
        stage = time.perf_counter()
        latency = measure_latency(tmp / "onnx-dense", tmp / "onnx-pruned", teacher, pruned, latency_batch, latency_seq,
                                  threads, timing or dict(bench.TIMING), config.seed)
        seconds["latency"] = time.perf_counter() - stage
        log = {k: v for k, v in result.log.items()} | {"seconds": seconds}
        log_file = LOG_FILE.format(method=method)
        atomic_write_text(tmp / log_file, json.dumps(log, indent=2, default=float))
        comparison = Comparison(
            title=f"structprune {method}: {model_name} on {task.name}",
            metric=task.main_metric,
            setup={
                "task": f"{task.name}, {len(train)} training examples, evaluated on {evaluation.split} "
                        f"({len(evaluation)} examples)",
                "model": f"{model_name}, max length {max_length}",
                "teacher": "fine-tuned here: " + json.dumps(dataclasses.asdict(dense_config)) if trained_here
                else "given (fine-tuned on the task)",
                "pruning": f"{method} (hard-concrete gates on {', '.join(config.granularities)}), target {budget.kind} "
                           f"sparsity {budget.target:.0%}, reached {budget.achieved(summary):.1%}; "
                           f"{result.log['prune_steps']} pruning + {result.log['finetune_steps']} fine-tuning steps",
                "settings": json.dumps({k: v for k, v in dataclasses.asdict(config).items() if k != "granularities"}),
                **({} if transfer_options is None else {"auxiliary": _aux_summary(dedup, transfer_options)}),
                "latency": f"batch {latency_batch}, sequence {latency_seq}, {threads} threads, median of interleaved "
                           "timed calls, protocol of structprune.bench",
            },
            dense=ModelResult(dense_acc, onnx_acc["dense"], count_params(structure, teacher.spec),
                              count_flops(structure, teacher.spec, latency_seq), latency["ort_dense"],
                              latency["torch_dense"]),
            pruned=ModelResult(pruned_acc, onnx_acc["pruned"], count_params(pruned_structure, pruned.spec),
                               count_flops(pruned_structure, pruned.spec, latency_seq), latency["ort_pruned"],
                               latency["torch_pruned"]),
            dense_layer={"heads": structure.max_heads, "ffn": structure.max_ffn},
            layers=[{"heads": layer.heads, "ffn": layer.ffn} for layer in pruned_structure.layers],
            machine=bench.machine_info() | {"cores used by other processes while timing": "unknown"
                                            if latency["other_cores"] is None else f"{latency['other_cores']:.2f}"},
            seconds=seconds,
            notes=[f"Hidden dimensions kept: {pruned_structure.hidden_size} of {structure.hidden_size}.",
                   "The dense model is exported and timed through the same path as the pruned one.",
                   f"Training log (losses, sparsity, multipliers, timings): {log_file}."],
        )
        write_report(tmp, comparison)
    return comparison
