"""``structprune prune`` and ``structprune transfer-search``.

``prune`` reads the method's options from the registry (:mod:`structprune.methods`): every method declares
its own keywords and flags, and whether it trains weights. A method that does runs the whole output pipeline
(:mod:`structprune.pipeline`: compact model, ONNX exports, report); the others write a masks folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from structprune.cli.common import (
    QUANTIZE_MODES,
    CliError,
    TaskArgs,
    add_output_options,
    add_task_options,
    refuse_existing_file,
)
from structprune.methods import METHODS, list_methods, method, method_options
from structprune.methods.options import positive_int

PRUNE_DESCRIPTION = (
    "Prune MODEL for a task. Methods that train weights (l0, transfer) write one folder with the masks, the compact "
    "model, both ONNX exports and a report; the others write frozen masks (masks.safetensors + masks.json) for "
    "`structprune compact`. Each method's options are listed under its name.")


def _method_options(args: argparse.Namespace, name: str) -> dict[str, object]:
    """The keywords of method ``name`` the user set (unset flags leave the method's defaults)."""
    return {keyword: option.value(getattr(args, option.dest)) for keyword, option in method_options(name).items()
            if getattr(args, option.dest, None) is not None}


def _add_method_options(p: argparse.ArgumentParser, names: list[str], added: set[str]) -> None:
    """Every method's flags, grouped by the methods that read them (one group per method for its own)."""
    users: dict[str, tuple[str, ...]] = {}
    for name in names:
        for option in method_options(name).values():
            users[option.flag] = users.get(option.flag, ()) + (name,)
    groups = {}
    for name in names:
        for option in method_options(name).values():
            if option.flag in added:
                continue
            readers = users[option.flag]
            if readers not in groups:
                title = f"{name}: {METHODS[name].summary}" if len(readers) == 1 else ", ".join(readers)
                groups[readers] = p.add_argument_group(title)
            option.add_to(groups[readers])
            added.add(option.flag)


def _inputs(args: argparse.Namespace) -> tuple[str, ...]:
    """The files and folders this run reads, which its output must not replace."""
    return tuple(path for path in (args.model, args.task, getattr(args, "teacher", None), getattr(args, "eval", None),
                                   getattr(args, "latency_table", None)) if path)


def _budget(args: argparse.Namespace):
    from structprune.budget import Budget

    return Budget(args.target_sparsity, args.budget_kind, args.seq_len, getattr(args, "latency_table", None))


def _write_masks(args: argparse.Namespace, task: TaskArgs, options: dict) -> None:
    from structprune.arch import ModelStructure
    from structprune.data import encode
    from structprune.io import check_output_dir
    from structprune.loading import load_model, load_tokenizer
    from structprune.methods import get_method
    from structprune.methods.distributed import is_writer

    budget = _budget(args)
    check_output_dir(args.out, args.overwrite, inputs=_inputs(args))
    if args.stream:
        from structprune.streaming import streamed_model

        model = streamed_model(args.model, causal=task.is_lm)
    if task.is_lm:
        model = model if args.stream else load_model(args.model, causal=True)
        tokenizer = load_tokenizer(args.model, model.spec["vocab_size"])
        encoded = task.lm_calibration(tokenizer)
        options = _method_inputs(args.method, options, task, encoded, tokenizer)[0]
        what = f"{len(encoded['input_ids'])} windows of {task.max_length} tokens of {task.task}"
        meta = {"task": task.task, "max_length": task.max_length, "seed": task.seed}
    else:
        data = task.load()
        model = model if args.stream else load_model(args.model, data.task.num_labels, causal=False)
        tokenizer = load_tokenizer(args.model, model.spec["vocab_size"])
        encoded = encode(data, tokenizer, task.max_length)
        what, meta = f"{len(data)} {data.task.name} examples", {"task": data.task.name,
                                                                 "num_labels": data.task.num_labels}
    print(f"[{args.method}] pruning {args.model} on {what} to {budget.kind} sparsity {budget.target}",
          file=sys.stderr, flush=True)
    result = get_method(args.method)(model, encoded, budget, progress=True, **options)
    if not is_writer():  # under torchrun, every process scored its share; rank 0 writes
        return
    result.masks.meta |= {"model": args.model, "examples": len(encoded["input_ids"])} | meta
    result.masks.save(args.out, ModelStructure.from_spec(model.spec), model.spec, overwrite=args.overwrite,
                      weights=result.weights)
    summary = result.log["summary"]
    print(f"masks written to {args.out}: {args.method}, parameter sparsity {summary['param_sparsity']:.3f}, "
          f"FLOPs reduction {summary['flops_reduction']:.3f} at sequence {summary['seq_len']}")
    print("kept heads/neurons per layer: " + ", ".join(f"{x['heads']}/{x['ffn']}" for x in summary["layers"]))
    print(f"next: structprune compact {args.out} --model {args.model} --out PRUNED_DIR")


def _method_inputs(name: str, options: dict, task: TaskArgs, train, tokenizer) -> tuple[dict, dict, dict]:
    """(the method's keywords, report entries, log entries): its options, turned into run-time inputs by the
    inputs builder it declares (e.g. auxiliary tasks loaded and deduplicated against the target)."""
    from structprune.methods import inputs_builder

    build = inputs_builder(name)
    if build is None:
        return options, {}, {}
    return build(options, train, () if task.is_lm else task.other_splits(), tokenizer, max_length=task.max_length,
                 data_dir=task.data_dir, text_columns=task.text_columns, label_column=task.label_column)


def _run_pipeline(args: argparse.Namespace, task: TaskArgs, options: dict) -> None:
    from structprune import pipeline
    from structprune.io import check_output_dir
    from structprune.loading import load_model, load_tokenizer

    budget = _budget(args)
    check_output_dir(args.out, args.overwrite, inputs=_inputs(args))
    train = task.load()
    held_out = task.held_out(args.eval_split)
    evaluation = train if held_out is None else held_out
    model = load_model(args.model, train.task.num_labels, trained=False, causal=False)
    tokenizer = load_tokenizer(args.model, model.spec["vocab_size"])
    teacher = None if args.teacher is None else load_model(args.teacher, train.task.num_labels, causal=False)
    options, setup, log = _method_inputs(args.method, options, task, train, tokenizer)
    checkpoints = Path(args.checkpoint_dir or f"{Path(args.out).absolute()}-checkpoints")
    run = pipeline.Run(budget, args.method, options, teacher=teacher, max_length=task.max_length,
                       checkpoint_dir=checkpoints, seed=task.seed, latency=pipeline.Latency(seq=args.seq_len),
                       setup=task.describe_held_out() | setup, log=log, quantize=args.quantize)
    comparison = pipeline.run(model, tokenizer, train, evaluation, args.out, run, model_name=args.model,
                              overwrite=args.overwrite)
    print(f"written to {args.out}: masks/, pruned/, onnx-dense/, onnx-pruned/, report.md "
          f"(checkpoints in {checkpoints}; delete them once you are done)")
    print(f"{comparison.metric}: dense {comparison.dense.accuracy:.2f}%, pruned {comparison.pruned.accuracy:.2f}%; "
          f"parameter sparsity {comparison.param_sparsity:.3f}; ONNX Runtime {comparison.ort_speedup:.2f}x faster "
          f"(FLOPs-ideal {comparison.flops_speedup:.2f}x)")


def run_prune(args: argparse.Namespace) -> None:
    from structprune.methods import check_settings

    entry = method(args.method)
    task = TaskArgs.from_args(args)
    options = _method_options(args, args.method)
    check_settings(args.method, options)  # bad settings fail before any loading or training
    if entry.learned and task.is_lm:
        scorers = [name for name in list_methods() if not METHODS[name].learned]
        raise CliError(f"{args.method} trains classifiers; prune a causal LM with a training-free method: "
                       f"{', '.join(scorers)}")
    if args.quantize and not entry.learned:
        raise CliError(f"--quantize is for l0 and transfer, which export and report; {args.method} writes masks: "
                       "compact them, then `structprune export PRUNED --out DIR --quantize MODE --task TASK`")
    if args.stream and not entry.streams:
        raise CliError(f"--stream: {args.method} needs the whole model in memory; the methods that score a model "
                       f"streamed from its files are {', '.join(n for n in list_methods() if METHODS[n].streams)}")
    if entry.learned:
        _run_pipeline(args, task, options)
    else:
        _write_masks(args, task, options)


def run_transfer_search(args: argparse.Namespace) -> None:
    from structprune.budget import Budget
    from structprune.loading import load_model, load_tokenizer
    from structprune.transfer.config import config_from_options
    from structprune.transfer.search import transfer_search
    from structprune.transfer.sources import aux_sources

    if args.budget_runs < 1:
        raise CliError(f"--budget-runs must be >= 1, got {args.budget_runs}")
    if not 0.0 <= args.min_confidence <= 1.0:
        raise CliError(f"--min-confidence is a probability in [0, 1], got {args.min_confidence}")
    refuse_existing_file(args.out, args.overwrite)
    task = TaskArgs.from_args(args)
    options = _method_options(args, "transfer")
    sources = aux_sources(options.pop("aux", None), options.pop("aux_max_examples", None), task.text_columns,
                          task.label_column)
    config = config_from_options(options)
    train = task.load()
    model = load_model(args.model, train.task.num_labels, trained=False, causal=False)
    budget = Budget(args.target_sparsity, args.budget_kind, args.seq_len)
    result = transfer_search(model, load_tokenizer(args.model, model.spec["vocab_size"]), train, sources, budget, base=config,
                             budget_runs=args.budget_runs, budget_minutes=args.budget_minutes,
                             min_confidence=args.min_confidence, target_eval=task.other_splits(),
                             data_dir=task.data_dir, max_length=task.max_length, checkpoint_dir=args.checkpoint_dir,
                             model_name=args.model)
    print(result.table())
    result.save(args.out)
    choice = result.choice
    sure = "" if choice.get("confidence") is None else f", P(> l0) {choice['confidence']:.2f}"
    print(f"choice: {choice['name']} ({result.metric} {choice['score']:.2f}% on the search dev set{sure}); "
          f"all runs written to {args.out}")


def _add_budget_options(p: argparse.ArgumentParser, kinds: tuple[str, ...]) -> None:
    p.add_argument("--target-sparsity", type=float, required=True,
                   help="fraction to remove, in [0, 1): of attention + FFN parameters, or of FLOPs with "
                        "--budget-kind flops")
    p.add_argument("--budget-kind", choices=kinds, default="params",
                   help="what --target-sparsity counts (default: params)" + (
                       "; latency: the fraction of latency removed as predicted by --latency-table (0.5 = 2x "
                       "faster)" if "latency" in kinds else ""))
    p.add_argument("--seq-len", type=positive_int, default=128, help="sequence length of FLOPs counts (default: 128)")


def register(sub) -> None:
    p = sub.add_parser("prune", help="prune a model for a task (masks, or the whole pipeline for learned methods)",
                       description=PRUNE_DESCRIPTION)
    p.add_argument("--model", required=True, help="model folder (structprune or Hugging Face) or hub name")
    add_task_options(p, split="train")
    p.add_argument("--method", default="taylor", help=f"pruning method: {', '.join(list_methods())} "
                                                      "(default: taylor)")
    _add_budget_options(p, ("params", "flops", "latency"))
    p.add_argument("--latency-table", default=None,
                   help="latency table of MODEL (`structprune latency-table`), for --budget-kind latency")
    p.add_argument("--stream", action="store_true",
                   help="score MODEL (a local folder with safetensors weights) one layer at a time from its files, "
                        "never holding it whole in memory: for models larger than RAM (block_influence, expert, "
                        "flap)")
    add_output_options(p, "masks folder to write (methods that train weights: the output folder of masks, compact "
                          "model, ONNX exports and report)")
    learned = p.add_argument_group("methods that train weights (l0, transfer)")
    learned.add_argument("--teacher", default=None,
                         help="dense teacher fine-tuned on the task (default: --model when it was fine-tuned on the "
                              "task, else --model fine-tuned first)")
    learned.add_argument("--eval-split", default="dev", help="split the report scores (default: dev)")
    learned.add_argument("--checkpoint-dir", default=None,
                         help="where to checkpoint, and resume from (default: OUT-checkpoints beside --out)")
    learned.add_argument("--quantize", choices=QUANTIZE_MODES, default=None,
                         help="also quantize the pruned export (onnx-pruned-MODE/; int8-static calibrates on training "
                              "examples), score and time it: the report's pruned + int8 row (default: none)")
    _add_method_options(p, list_methods(), {"--seed"})
    p.set_defaults(run=run_prune)

    p = sub.add_parser("transfer-search", help="choose how to use auxiliary tasks by a small sweep on held-out rows",
                       description="Hold out a seeded 20% of the target's training rows as a search dev set and run "
                                   "a small sweep: target-only l0, each coupling with transfer 'both' and schedule "
                                   "'start', then the best coupling's other schedules (or transfers), until "
                                   "--budget-runs runs or --budget-minutes are spent. Prints a table and writes every "
                                   "run and the choice to --out (JSON).")
    p.add_argument("--model", required=True, help="model folder (structprune or Hugging Face) or hub name")
    add_task_options(p, split="train")
    _add_budget_options(p, ("params", "flops"))
    p.add_argument("--budget-runs", type=positive_int, required=True, help="pruning runs to try at most")
    p.add_argument("--budget-minutes", type=float, default=None,
                   help="start no further run after this many minutes (default: no limit)")
    p.add_argument("--min-confidence", type=float, default=0.0,
                   help="choose a transfer run only if the paired bootstrap on the search dev rows says it beats l0 "
                        "with at least this probability (the table's P(> l0) column); 0.9 keeps l0 unless transfer "
                        "wins clearly (default: 0, the best score)")
    p.add_argument("--checkpoint-dir", default=None, help="checkpoint every run here, and resume (default: none)")
    add_output_options(p, "JSON file to write (all runs and the choice)")
    _add_method_options(p, ["transfer"], {"--seed"})
    p.set_defaults(run=run_transfer_search)
