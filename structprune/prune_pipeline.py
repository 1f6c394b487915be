"""Learned pruning end to end into one output folder (``structprune prune --method l0``).

:func:`run_l0` takes a model, a task's training and evaluation data and a budget, and:

1. gets the dense teacher: a given ``teacher`` (checked against the task and its labels), else the
   model itself when its config says it was fine-tuned on this task, else the model fine-tuned here
   (:func:`structprune.finetune.finetune`, resumable);
2. runs :func:`structprune.methods.l0.prune` (pruning, mask extraction, fine-tuning of the compact
   model; resumable under ``checkpoint_dir``);
3. evaluates dense and pruned models on the evaluation data (PyTorch and ONNX Runtime), exports
   both through the same path and times them side by side (:func:`structprune.demo.measure_latency`);
4. writes ``masks/``, ``pruned/`` (and ``dense/`` when the teacher was trained here),
   ``onnx-dense/``, ``onnx-pruned/``, ``l0-log.json`` and the report (:mod:`structprune.report`)
   into ``out``, which appears only when everything succeeded.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from pathlib import Path

from structprune import bench
from structprune.arch.structure import ModelStructure
from structprune.compact import compact, save
from structprune.data import TaskData, encode
from structprune.demo import measure_latency
from structprune.export import export, session
from structprune.finetune import FinetuneConfig, evaluate, finetune, mark_task
from structprune.io import atomic_dir, atomic_write_text, check_output_dir
from structprune.masks import count_flops, count_params
from structprune.methods import Budget
from structprune.methods.l0 import L0Config, check_teacher, prune
from structprune.modeling_compact import StructpruneForSequenceClassification
from structprune.report import Comparison, ModelResult, write_report
from structprune.train import digest

LOG_FILE = "l0-log.json"


def _fine_tuned_for(model: StructpruneForSequenceClassification, task_name: str) -> bool:
    return getattr(model.config, "finetuned_task", None) == task_name


def run_l0(model: StructpruneForSequenceClassification, tokenizer, train: TaskData, evaluation: TaskData,
           out: str | os.PathLike, budget: Budget, config: L0Config = L0Config(), *,
           teacher: StructpruneForSequenceClassification | None = None,
           dense_config: FinetuneConfig = FinetuneConfig(epochs=3, lr=1e-4), max_length: int = 128,
           checkpoint_dir: str | os.PathLike | None = None, threads: int = bench.CPU_THREADS,
           latency_batch: int = 8, latency_seq: int = 128, timing: dict | None = None, model_name: str = "model",
           overwrite: bool = False, progress: bool = True) -> Comparison:
    """Prune ``model`` with ``l0`` for ``train.task`` and write the output folder (see the module docstring)."""
    check_output_dir(out, overwrite)
    task = train.task
    if teacher is not None:
        check_teacher(teacher, model, task.name, task.label_names)
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    train_enc = encode(train, tokenizer, max_length)
    eval_enc = encode(evaluation, tokenizer, max_length)
    directory = None if checkpoint_dir is None else Path(checkpoint_dir)

    dense, trained_here = model, False
    if teacher is None and not _fine_tuned_for(model, task.name):
        dense, trained_here = copy.deepcopy(model), True
        print(f"[l0] {model_name} is not fine-tuned on {task.name}: fine-tuning the dense teacher first", flush=True)
        finetune(dense, train_enc, dense_config, progress=progress, description="dense fine-tune",
                 checkpoint_dir=None if directory is None else directory / "dense",
                 fingerprint={"task": task.name, "data": digest(train_enc), "model": digest(model.state_dict()),
                              "config": dataclasses.asdict(dense_config)})
        mark_task(dense, task)
        seconds["dense fine-tune"] = time.perf_counter() - started
    teacher = teacher if teacher is not None else dense
    dense_acc = evaluate(teacher, eval_enc, task)[task.main_metric]
    print(f"[l0] dense {evaluation.split} {task.main_metric}: {dense_acc:.2f}%", flush=True)

    stage = time.perf_counter()
    result = prune(dense, train_enc, budget, config=config, teacher=teacher,
                   checkpoint_dir=None if directory is None else directory / "l0", progress=progress)
    pruned = compact(dense, result.masks)
    pruned.load_state_dict(result.weights)
    mark_task(pruned, task)
    pruned.eval()
    seconds["l0 prune + fine-tune"] = time.perf_counter() - stage
    pruned_acc = evaluate(pruned, eval_enc, task)[task.main_metric]
    summary = result.log["summary"]
    print(f"[l0] pruned {evaluation.split} {task.main_metric}: {pruned_acc:.2f}% at {budget.kind} sparsity "
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
        atomic_write_text(tmp / LOG_FILE, json.dumps(log, indent=2, default=float))
        comparison = Comparison(
            title=f"structprune l0: {model_name} on {task.name}",
            metric=task.main_metric,
            setup={
                "task": f"{task.name}, {len(train)} training examples, evaluated on {evaluation.split} "
                        f"({len(evaluation)} examples)",
                "model": f"{model_name}, max length {max_length}",
                "teacher": "fine-tuned here: " + json.dumps(dataclasses.asdict(dense_config)) if trained_here
                else "given (fine-tuned on the task)",
                "pruning": f"l0 (hard-concrete gates on {', '.join(config.granularities)}), target {budget.kind} "
                           f"sparsity {budget.target:.0%}, reached {budget.achieved(summary):.1%}; "
                           f"{result.log['prune_steps']} pruning + {result.log['finetune_steps']} fine-tuning steps",
                "settings": json.dumps({k: v for k, v in dataclasses.asdict(config).items() if k != "granularities"}),
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
                   f"Training log (losses, sparsity, multipliers, timings): {LOG_FILE}."],
        )
        write_report(tmp, comparison)
    return comparison
