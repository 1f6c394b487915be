"""The one output pipeline: dense teacher -> pruning method -> compact model -> save, export, evaluate, time,
compare and report, into one folder.

:func:`run` serves ``structprune prune`` for methods that train weights (``l0``, ``transfer``) and the demo
(:mod:`structprune.demo`, a configuration of it with ``fisher`` and a recovery fine-tune):

1. the dense teacher: the given ``teacher``, else ``model`` itself when its config says it was fine-tuned on
   the task, else a copy of ``model`` fine-tuned here (:func:`dense_teacher`, resumable);
2. the pruning method of the registry (:mod:`structprune.methods`), on the teacher, with its options;
   the compact model takes the weights the method trained, if any;
3. an optional recovery fine-tune of the compact model;
4. both models are evaluated (PyTorch and ONNX Runtime), exported through the same path and timed side by
   side (:func:`measure_latency`), and ``out`` receives ``masks/``, ``pruned/`` (and ``dense/`` when the
   teacher was trained here), ``onnx-dense/``, ``onnx-pruned/``, ``{method}-log.json`` and the report
   (:mod:`structprune.report`). ``out`` appears only when everything succeeded;
5. with ``Run.quantize``, the pruned export is also quantized (``onnx-pruned-{mode}/``), scored and timed with the
   other ONNX models: the report's pruned + int8 row.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from structprune import bench
from structprune.arch.structure import ModelStructure
from structprune.budget import Budget
from structprune.compaction import compact, save
from structprune.costs import count_flops, count_params
from structprune.data import TaskData, encode
from structprune.evaluation import evaluate
from structprune.export import example_inputs, export, session
from structprune.finetune import FinetuneConfig, dense_teacher, finetune, mark_task
from structprune.io import atomic_dir, atomic_write_text, check_output_dir
from structprune.methods import get_method, is_learned
from structprune.methods.distill import check_teacher
from structprune.modeling_structprune import StructpruneForSequenceClassification
from structprune.quantize import quantize
from structprune.report import Comparison, ModelResult, QuantizedResult, write_report

LOG_FILE = "{method}-log.json"
QUANTIZED = "pruned-quantized"
CALIBRATION_EXAMPLES = 256


class AccuracyFloorError(RuntimeError):
    """A model scored below the floor its run promised (see :class:`Floors`)."""


@dataclass(frozen=True)
class Latency:
    """How both models are timed: input shape, threads and the :data:`structprune.bench.TIMING` protocol."""

    batch: int = 8
    seq: int = 128
    threads: int = bench.CPU_THREADS
    timing: tuple[tuple[str, float], ...] = tuple(bench.TIMING.items())

    def describe(self) -> str:
        t = dict(self.timing)
        return (f"batch {self.batch}, sequence {self.seq}, {self.threads} threads; median of interleaved timed "
                f"calls after {t['warmup']:g} warm-up call(s), at least {t['repeats']:g} calls and "
                f"{t['min_time']:g} s of timed calls per model (protocol of structprune.bench)")


@dataclass(frozen=True)
class Floors:
    """Accuracies (%) the dense and the pruned model must reach, checked as soon as each is known."""

    dense: float | None = None
    pruned: float | None = None


class Stopwatch:
    """Wall time of each stage of a run; a stage is announced when it starts."""

    def __init__(self, tag: str) -> None:
        self.tag, self.seconds = tag, {}
        self._stage: str | None = None
        self._since = time.perf_counter()

    def say(self, message: str) -> None:
        print(f"[{self.tag}] {message}", flush=True)

    def start(self, stage: str, message: str) -> None:
        self.stop()
        self._stage, self._since = stage, time.perf_counter()
        self.say(message)

    def stop(self) -> dict[str, float]:
        """End the current stage; the seconds of every stage so far."""
        if self._stage is not None:
            self.seconds[self._stage] = time.perf_counter() - self._since
            self._stage = None
        return dict(self.seconds)


def measure_latency(onnx: Mapping[str, Path], dense: StructpruneForSequenceClassification,
                    pruned: StructpruneForSequenceClassification, latency: Latency,
                    seed: int = 0) -> dict[str, float | None]:
    """Median latency (ms) of the ONNX folders ``onnx`` (by name: ``dense``, ``pruned``, ...) on ONNX Runtime and of
    both models on torch eager, interleaved per backend; keys ``ort_{name}`` and ``torch_{dense,pruned}``.

    ``other_cores`` is how many cores other processes kept busy meanwhile (``None``: unknown).
    """
    inputs = example_inputs(dense, latency.batch, latency.seq, seed=seed, padded=False)
    timing = dict(latency.timing)
    sessions = {name: session(path, threads=latency.threads) for name, path in onnx.items()}
    with bench.OtherCpuLoad() as load:
        ort = bench.time_interleaved({name: bench.ort_forward(s, inputs) for name, s in sessions.items()}, **timing)
        with bench.torch_threads(latency.threads):
            eager = bench.time_interleaved({"dense": bench.torch_forward(dense, inputs),
                                            "pruned": bench.torch_forward(pruned, inputs)}, **timing)
    medians = {f"{backend}_{name}": stats[name].median_ms for backend, stats in (("ort", ort), ("torch", eager))
               for name in stats}
    return medians | {"other_cores": load.cores}


def _first(encoded: Mapping[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    return {k: v[:n] for k, v in encoded.items()}


def _check_floor(model: str, value: float, floor: float | None, metric: str) -> None:
    if floor is not None and value < floor:
        raise AccuracyFloorError(
            f"the {model} model reached only {value:.2f}% {metric}, below this run's floor of {floor}%: something "
            "in fine-tuning or pruning went wrong (check data, settings, seed)")


def _load_note(cores: float | None) -> str:
    if cores is None:
        return "unknown (this platform cannot tell)"
    return bench.load_warning(cores) or f"{cores:.2f} cores (a quiet machine)"


def _json_value(value: object) -> object:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return float(value)


@dataclass
class Run:
    """What :func:`run` does, besides the model and the data: the method and everything around it."""

    budget: Budget
    method: str
    options: Mapping[str, object] = field(default_factory=dict)
    """Keyword options of the method (see its ``prune``)."""
    teacher: StructpruneForSequenceClassification | None = None
    dense_config: FinetuneConfig = FinetuneConfig(epochs=3, lr=1e-4)
    recovery: FinetuneConfig | None = None
    """Fine-tuning of the compact model after pruning (``None``: none)."""
    floors: Floors = Floors()
    max_length: int = 128
    checkpoint_dir: str | os.PathLike | None = None
    latency: Latency = Latency()
    seed: int = 0
    title: str | None = None
    describe_pruning: Callable[[dict], str] | None = None
    """Text of the report's ``pruning`` entry from the method's log (default: method, budget, achieved)."""
    setup: Mapping[str, str] = field(default_factory=dict)
    """Further report entries (e.g. the auxiliary sources)."""
    log: Mapping[str, object] = field(default_factory=dict)
    """Further entries of the method's log (e.g. how many auxiliary examples were removed as duplicates)."""
    quantize: str | None = None
    """Also quantize the pruned export with this mode of :data:`structprune.quantize.MODES` (``int8-static``
    calibrates on up to :data:`CALIBRATION_EXAMPLES` training examples), score and time it (``None``: no)."""


def _finetune_text(c: FinetuneConfig) -> str:
    steps = "" if c.max_steps is None else f", at most {c.max_steps} steps"
    return (f"fine-tuned here: {c.epochs} epochs, batch {c.batch_size}, AdamW lr {c.lr:g} (weight decay "
            f"{c.weight_decay:g}), linear warm-up over {c.warmup_ratio:.0%} then decay, seed {c.seed}{steps}")


def _pruning_text(run: Run, log: dict) -> str:
    if run.describe_pruning is not None:
        return run.describe_pruning(log)
    return (f"{run.method}, target {run.budget.kind} sparsity {run.budget.target:.0%}, "
            f"reached {run.budget.achieved(log['summary']):.1%}")


def run(model: StructpruneForSequenceClassification, tokenizer, train: TaskData, evaluation: TaskData,
        out: str | os.PathLike, config: Run, *, model_name: str = "model", overwrite: bool = False,
        progress: bool = True) -> Comparison:
    """Prune ``model`` for ``train.task`` as ``config`` says and write the output folder (module docstring)."""
    check_output_dir(out, overwrite)
    task, method, budget = train.task, config.method, config.budget
    if config.teacher is not None:
        check_teacher(config.teacher, model, task.name, task.label_names)
    clock = Stopwatch(method)
    clock.start("data", f"encoding {len(train)} training and {len(evaluation)} {evaluation.split} examples")
    train_enc, eval_enc = encode(train, tokenizer, config.max_length), encode(evaluation, tokenizer, config.max_length)
    directory = None if config.checkpoint_dir is None else Path(config.checkpoint_dir)

    clock.start("dense fine-tune", f"dense teacher for {task.name}")
    if config.teacher is None:
        dense, trained_here = dense_teacher(model, train_enc, task, config.dense_config, directory, progress,
                                            model_name, method)
        reference = dense
    else:  # prune the model as given; the teacher is the dense side of the comparison
        dense, trained_here, reference = model, False, config.teacher
    dense_acc = evaluate(reference, eval_enc, task)[task.main_metric]
    clock.say(f"dense {evaluation.split} {task.main_metric}: {dense_acc:.2f}%")
    _check_floor("dense", dense_acc, config.floors.dense, task.main_metric)

    clock.start(f"{method} pruning", f"{method} pruning to {budget.kind} sparsity {budget.target:.0%}")
    extra = {"progress": progress}
    if is_learned(method):  # learned methods distil from a teacher and checkpoint their phases
        extra |= {"teacher": config.teacher, "checkpoint_dir": None if directory is None else directory / method}
    result = get_method(method)(dense, train_enc, budget, **config.options, **extra)
    result.log.update(config.log)
    source = dense
    if result.weights is not None and not is_learned(method):  # full-size weights the method changed (sprint, refit)
        source = copy.deepcopy(dense)
        source.load_state_dict(result.weights)
    pruned = compact(source, result.masks)
    if result.weights is not None and is_learned(method):  # the learned methods' are the compact model's
        pruned.load_state_dict(result.weights)
    mark_task(pruned, task)
    pruned.eval()
    if config.recovery is not None:
        before = evaluate(pruned, eval_enc, task)[task.main_metric]
        clock.start("recovery fine-tune", f"pruned {evaluation.split} {task.main_metric} before recovery: "
                                          f"{before:.2f}%; recovery fine-tuning ({config.recovery.epochs} epochs)")
        result.log["accuracy_before_recovery"] = before
        finetune(pruned, train_enc, config.recovery, progress=progress, description="recovery fine-tune")
    pruned_acc = evaluate(pruned, eval_enc, task)[task.main_metric]
    clock.say(f"pruned {evaluation.split} {task.main_metric}: {pruned_acc:.2f}% at {budget.kind} sparsity "
              f"{budget.achieved(result.log['summary']):.3f} (target {budget.target})")
    _check_floor("pruned", pruned_acc, config.floors.pruned, task.main_metric)

    with atomic_dir(out, overwrite=overwrite) as tmp:
        clock.start("save and export", "saving the models and masks, exporting both models to ONNX")
        if trained_here:
            save(dense, tmp / "dense", tokenizer)
        result.masks.save(tmp / "masks", ModelStructure.from_spec(dense.spec), dense.spec)
        save(pruned, tmp / "pruned", tokenizer)
        onnx = {name: tmp / f"onnx-{name}" for name in ("dense", "pruned")}
        for name, m in (("dense", reference), ("pruned", pruned)):
            export(m, onnx[name], tokenizer, threads=config.latency.threads)
        if config.quantize is not None:
            clock.start("quantize", f"quantizing the pruned export ({config.quantize})")
            onnx[QUANTIZED] = quantize(onnx["pruned"], tmp / f"onnx-pruned-{config.quantize}", config.quantize,
                                       calibration=_first(train_enc, CALIBRATION_EXAMPLES)).directory
        clock.start("evaluate ONNX", f"scoring the ONNX Runtime models on {evaluation.split}")
        onnx_acc = {name: evaluate(session(path, config.latency.threads), eval_enc, task)[task.main_metric]
                    for name, path in onnx.items()}
        clock.start("latency", "timing the models side by side (ONNX Runtime, then torch eager)")
        latency = measure_latency(onnx, reference, pruned, config.latency, config.seed)
        seconds = clock.stop()
        log_file = LOG_FILE.format(method=method)
        atomic_write_text(tmp / log_file, json.dumps(dict(result.log) | {"seconds": seconds}, indent=2,
                                                     default=_json_value))
        comparison = _comparison(config, train, evaluation, reference, pruned, trained_here, result.log,
                                 (dense_acc, pruned_acc), onnx_acc, latency, seconds, model_name, log_file)
        write_report(tmp, comparison)
    clock.say(f"done in {sum(seconds.values()):.0f} s; report: {Path(out) / 'report.md'}")
    return comparison


def _comparison(config: Run, train: TaskData, evaluation: TaskData, dense, pruned, trained_here: bool, log: dict,
                accuracy: tuple[float, float], onnx_acc: dict, latency: dict, seconds: dict, model_name: str,
                log_file: str) -> Comparison:
    task, seq = train.task, config.latency.seq
    structure, pruned_structure = ModelStructure.from_spec(dense.spec), ModelStructure.from_spec(pruned.spec)
    before = log.get("accuracy_before_recovery")
    recovery = "none" if config.recovery is None else (
        f"{config.recovery.epochs} epochs fine-tuning of the compact model ({task.main_metric} before it: "
        f"{before:.2f}%)")
    floors = config.floors
    setup = {
        "task": f"{task.name}, {len(train)} training examples (seed {config.seed}), evaluated on {evaluation.split} "
                f"({len(evaluation)} examples)",
        "model": f"{model_name}, max length {config.max_length}",
        "teacher": _finetune_text(config.dense_config) if trained_here else "given (fine-tuned on the task)",
        "pruning": _pruning_text(config, log),
        **config.setup,
        "recovery": recovery,
        "latency": config.latency.describe(),
        "outside load while timing": _load_note(latency["other_cores"]),
        **({} if floors.dense is None and floors.pruned is None else
           {"accuracy floors": f"dense {floors.dense}%, pruned {floors.pruned}% (both met)"}),
    }
    return Comparison(
        title=config.title or f"structprune {config.method}: {model_name} on {task.name}",
        metric=task.main_metric,
        setup=setup,
        dense=ModelResult(accuracy[0], onnx_acc["dense"], count_params(structure, dense.spec),
                          count_flops(structure, dense.spec, seq), latency["ort_dense"], latency["torch_dense"]),
        pruned=ModelResult(accuracy[1], onnx_acc["pruned"], count_params(pruned_structure, pruned.spec),
                           count_flops(pruned_structure, pruned.spec, seq), latency["ort_pruned"],
                           latency["torch_pruned"]),
        quantized=None if config.quantize is None else QuantizedResult(
            config.quantize, onnx_acc[QUANTIZED], latency[f"ort_{QUANTIZED}"]),
        dense_layer={"heads": structure.max_heads, "ffn": structure.max_ffn},
        layers=[{"heads": layer.heads, "ffn": layer.ffn} for layer in pruned_structure.layers],
        machine={k: v for k, v in bench.machine_info().items() if v not in ("", None)},
        seconds=seconds,
        notes=[f"Hidden dimensions kept: {pruned_structure.hidden_size} of {structure.hidden_size}.",
               "The dense model is exported and timed through the same path as the pruned one.",
               f"Method log (settings, losses, summary, timings): {log_file}."],
        sparsity_trace=log.get("sparsity_trace"),
    )
