"""``structprune finetune``, ``compact``, ``export`` and ``latency-table``: commands that make model files."""

from __future__ import annotations

import argparse
import copy
import dataclasses
from pathlib import Path

from structprune.cli.common import (
    THREADS,
    CliError,
    TaskArgs,
    add_output_options,
    add_task_options,
    refuse_existing_file,
)
from structprune.methods.options import positive_int


def run_finetune(args: argparse.Namespace) -> None:
    from structprune.compaction import save
    from structprune.data import encode
    from structprune.evaluation import evaluate
    from structprune.finetune import FinetuneConfig, finetune, mark_task
    from structprune.io import check_output_dir
    from structprune.loading import load_model, load_tokenizer

    check_output_dir(args.out, args.overwrite, inputs=(args.model, args.task))
    task = TaskArgs.from_args(args)
    train = task.load()
    model = load_model(args.model, train.task.num_labels, trained=False, causal=False)
    tokenizer = load_tokenizer(args.model, model.spec["vocab_size"])
    config = FinetuneConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=task.seed)
    log = finetune(model, encode(train, tokenizer, task.max_length), config, checkpoint_dir=args.checkpoint_dir,
                   fingerprint={"model": args.model, "task": train.task.name, "rows": len(train),
                                "config": dataclasses.asdict(config), "max_length": task.max_length})
    mark_task(model, train.task)
    save(model, args.out, tokenizer, overwrite=args.overwrite)
    print(f"fine-tuned on {len(train)} {train.task.name} examples in {log.seconds:.0f} s "
          f"({log.steps} steps, final loss {log.losses[-1]:.4f}); written to {args.out}")
    evaluation = task.held_out(args.eval_split) if args.eval_split else None
    if evaluation is not None:
        metrics = evaluate(model, encode(evaluation, tokenizer, task.max_length), train.task)
        print(f"{train.task.name} {evaluation.split} ({len(evaluation)} examples): "
              + ", ".join(f"{name} {value:.2f}" for name, value in metrics.items()))


def _identity(model: str) -> str:
    """A model folder by its resolved path; a hub name as it is."""
    return str(Path(model).resolve()) if Path(model).exists() else model


def run_compact(args: argparse.Namespace) -> None:
    from structprune.arch import ModelStructure
    from structprune.compaction import compact, save
    from structprune.io import check_output_dir
    from structprune.loading import load_model, load_tokenizer
    from structprune.maskset import MaskSet, tuned_weights

    check_output_dir(args.out, args.overwrite, inputs=(args.masks, args.model))
    masks = MaskSet.load(args.masks)
    model = load_model(args.model, masks.meta.get("num_labels"))
    masks.validate(ModelStructure.from_spec(model.spec))  # masks of another shape: say so first
    made_for = masks.meta.get("model")
    if made_for is not None and not args.force and _identity(str(made_for)) != _identity(args.model):
        raise CliError(f"{args.masks} was made for the model {made_for}, not for {args.model}; compact the model the "
                       "masks came from, or pass --force if it is the same model under another path")
    tuned = tuned_weights(args.masks)
    if tuned is not None:  # the method tuned the weights along with the masks: compact those (the dense stays)
        source = copy.deepcopy(model)
        source.load_state_dict(tuned)
        print(f"compacting the weights {masks.meta.get('method', 'the method')} tuned with the masks", flush=True)
    pruned = compact(model if tuned is None else source, masks)
    tokenizer = load_tokenizer(args.model, model.spec["vocab_size"], required=args.recover is not None)
    if args.recover is not None:
        _recover(args, masks.meta, model, pruned, tokenizer)
    save(pruned, args.out, tokenizer, overwrite=args.overwrite)
    summary = masks.summary(ModelStructure.from_spec(model.spec), model.spec)
    print(f"compact model written to {args.out}: {summary['params_kept']:,} of {summary['params_dense']:,} "
          f"attention + FFN parameters kept (sparsity {summary['param_sparsity']:.3f})")


def _recover(args: argparse.Namespace, meta: dict, dense, pruned, tokenizer) -> None:
    """Distil the compact causal LM from ``dense`` on the calibration text its masks were made from."""
    from structprune.recovery import recover

    task = TaskArgs(str(meta.get("task", "")), "train", data_dir=args.data_dir,
                    max_length=int(meta.get("max_length", 128)), seed=int(meta.get("seed", 0)))
    if dense.spec.get("task") != "causal_lm" or not task.is_lm:
        raise CliError("--recover distils a causal LM pruned on a language-model task; recover a classifier with "
                       "structprune finetune on its task")
    windows = task.lm_calibration(tokenizer)
    result = recover(pruned, dense, windows, args.recover, lr=args.recover_lr)
    print(f"recovery: {result.steps} steps of {min(4, len(windows['input_ids']))} windows of {task.max_length} "
          f"tokens of {task.task} in {result.seconds:.0f} s, distillation loss {result.losses[0]:.3f} -> "
          f"{result.losses[-1]:.3f}")


def run_latency_table(args: argparse.Namespace) -> None:
    from structprune.latency import measure_table
    from structprune.loading import load_model

    if args.batch < 1 or args.seq < 1:
        raise CliError(f"--batch and --seq must be >= 1, got {args.batch} and {args.seq}")
    refuse_existing_file(args.out, args.overwrite)
    model = load_model(args.model, trained=False)  # causal=None: a causal LM folder loads as one
    causal = model.spec.get("task") == "causal_lm"
    if args.phase is not None and not causal:
        raise CliError(f"--phase is for causal LMs; {args.model} is a classifier, whose table times one forward "
                       "pass of --batch examples of --seq tokens (leave --phase out)")
    table = measure_table(model, args.batch, args.seq, args.ffn_points, args.threads, phase=args.phase)
    table.save(args.out)
    shape = {"forward": f"forward, batch {args.batch}, sequence {args.seq}",
             "prefill": f"prefill, batch {args.batch}, prompt {args.seq}",
             "decode": f"decode (one step), batch {args.batch}, context {args.seq}"}[table.phase]
    print(f"latency table written to {args.out}: ONNX Runtime CPU, {shape}, "
          f"{args.threads} threads; all sublayers removed {table.base_ms:.2f} ms, per layer: "
          f"{len(table.attn_ms) - 1} heads {table.attn_ms[-1]:.2f} ms, {table.ffn_widths[-1]} neurons "
          f"{table.ffn_ms[-1]:.2f} ms")
    print(f"use it: structprune prune ... --budget-kind latency --latency-table {args.out} --target-sparsity 0.5")


def run_export(args: argparse.Namespace) -> None:
    from structprune.export import ONNX_FILE, export
    from structprune.io import check_output_dir
    from structprune.loading import load_model, load_tokenizer

    check_output_dir(args.out, args.overwrite, inputs=(args.model,))
    model = load_model(args.model)
    tokenizer = load_tokenizer(args.model, model.spec["vocab_size"], required=False)
    causal = model.spec.get("task") == "causal_lm"
    if args.all_logits and not causal:
        raise CliError("--all-logits is for causal LMs; a classifier's graph returns its logits already")
    result = export(model, args.out, tokenizer, overwrite=args.overwrite, threads=args.threads,
                    all_logits=args.all_logits)
    checked = "prefill + 8 decode steps, tolerance 5e-4 x the largest |logit|" if causal else "tolerance 1e-4"
    print(f"ONNX model written to {result.directory / ONNX_FILE}: parity with PyTorch max |diff| "
          f"{result.max_abs_diff:.2e} on shapes {result.checked_shapes} ({checked}), {result.fused_attention} fused "
          "attention nodes" + ("" if tokenizer is not None else "; no tokenizer found, so none was saved"))
    if causal:
        from structprune.export_decoder import (
            OptimumIncompatibleError,
            check_optimum_compatible,
        )

        try:
            check_optimum_compatible(args.out)
            print("optimum's ORTModelForCausalLM can load it; structprune.ort_generation.generate serves it too")
        except OptimumIncompatibleError as err:
            print(f"note: {err}")


def register(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a dense model on a task (baseline and teacher)",
                       description="Fine-tune MODEL on a task (all of it, or --train-size examples) and save it as a "
                                   "structprune folder that records the task and labels, ready to be a teacher.")
    p.add_argument("--model", required=True, help="model folder (structprune or Hugging Face) or hub name")
    add_task_options(p, split="train")
    p.add_argument("--epochs", type=positive_int, default=3, help="training epochs (default: 3)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="examples per step (default: 32)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default: 1e-4)")
    p.add_argument("--eval-split", default="dev", help="split to score after training ('' to skip; default: dev)")
    p.add_argument("--checkpoint-dir", default=None, help="checkpoint here and resume from it (default: none)")
    add_output_options(p, "model folder to write")
    p.set_defaults(run=run_finetune)

    p = sub.add_parser("compact", help="apply a masks folder to a model and save the smaller model",
                       description="Remove the masked heads and neurons from MODEL for real and save the smaller "
                                   "dense model (loadable with structprune.from_pretrained). MODEL must be the model "
                                   "the masks were made for (e.g. the fine-tuned one).")
    p.add_argument("masks", help="masks folder written by `structprune prune`")
    p.add_argument("--model", required=True, help="the model the masks were made for (folder or hub name)")
    p.add_argument("--force", action="store_true",
                   help="compact even though --model is not the model the masks record (the same model moved)")
    recovery = p.add_argument_group("recovery (causal LMs)")
    recovery.add_argument("--recover", type=positive_int, default=None, metavar="STEPS",
                          help="distil the compact model from --model for STEPS steps of 4 windows of the calibration "
                               "text the masks were made from (logits KL; default: no recovery)")
    recovery.add_argument("--recover-lr", type=float, default=5e-5, help="peak learning rate of recovery "
                                                                        "(default: 5e-5)")
    recovery.add_argument("--data-dir", default=None, help="folder of the benchmark data sets, for the calibration "
                                                           "text (default: $STRUCTPRUNE_DATA_DIR, else ../shared/data)")
    add_output_options(p, "model folder to write")
    p.set_defaults(run=run_compact)

    p = sub.add_parser("latency-table", help="measure a per-layer latency table for latency budgets",
                       description="Measure how long MODEL's attention (per head count) and FFN (per width) "
                                   "sublayers take on ONNX Runtime CPU, for `prune --budget-kind latency`. A "
                                   "classifier is timed in one forward pass of --batch examples of --seq tokens; a "
                                   "causal LM in one --phase: prefill (--batch prompts of --seq tokens, to the first "
                                   "token) or decode (one step of --batch sequences with --seq tokens already in the "
                                   "key/value cache).")
    p.add_argument("--model", required=True, help="the dense model (folder or hub name)")
    p.add_argument("--phase", choices=("prefill", "decode"), default=None,
                   help="causal LMs: the phase to time, prefill or decode (default: decode); not for classifiers")
    p.add_argument("--batch", type=positive_int, default=8,
                   help="examples per call: classifier inputs, prompts (prefill) or sequences decoded (default: 8)")
    p.add_argument("--seq", type=positive_int, default=128,
                   help="tokens per example: classifier input length, prompt length (prefill) or tokens already "
                        "in the cache (decode) (default: 128)")
    p.add_argument("--ffn-points", type=positive_int, default=8, help="FFN widths measured besides 0 (default: 8)")
    p.add_argument("--threads", type=positive_int, default=THREADS, help=f"ONNX Runtime intra-op threads (default: {THREADS})")
    add_output_options(p, "table file (JSON) to write")
    p.set_defaults(run=run_latency_table)

    p = sub.add_parser("export", help="export a model to ONNX (with a PyTorch parity check)",
                       description="Export MODEL to an ONNX folder (model.onnx, config.json, tokenizer) that "
                                   "optimum's ORTModelForSequenceClassification reads; a causal LM with its key/value "
                                   "cache in the layout of optimum's ORTModelForCausalLM (text-generation-with-past). "
                                   "Fails if ONNX Runtime disagrees with PyTorch.")
    p.add_argument("model", help="model folder (structprune or Hugging Face), hub name or .gguf file")
    p.add_argument("--all-logits", action="store_true",
                   help="causal LMs: return the logits of every position (to score text), not only the last one's "
                        "(what generation reads; faster prefill)")
    p.add_argument("--threads", type=positive_int, default=THREADS,
                   help=f"ONNX Runtime threads of the parity check (default: {THREADS})")
    add_output_options(p, "ONNX folder to write")
    p.set_defaults(run=run_export)
