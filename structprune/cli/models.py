"""``structprune finetune``, ``compact``, ``export`` and ``latency-table``: commands that make model files."""

from __future__ import annotations

import argparse
import copy
import dataclasses
from pathlib import Path

from structprune.cli.common import (
    QUANTIZE_MODES,
    THREADS,
    CliError,
    TaskArgs,
    add_output_options,
    add_task_options,
    refuse_existing_file,
)
from structprune.methods.options import positive_int

LM_EVAL_WINDOWS = 32
"""Text windows a quantized causal LM's perplexity is measured on, by default (scored one decode step at a time)."""


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
    from structprune.compaction import compact, compact_to_folder, save
    from structprune.io import check_output_dir
    from structprune.loading import is_causal_lm, load_model, load_tokenizer
    from structprune.maskset import MaskSet, tuned_weights

    check_output_dir(args.out, args.overwrite, inputs=(args.masks, args.model))
    masks = MaskSet.load(args.masks)
    tuned = tuned_weights(args.masks)
    if args.stream:
        from structprune.streaming import streamed_model

        if args.recover is not None or tuned is not None:
            raise CliError("--stream cuts the weights from the files one layer at a time; "
                           + ("--recover trains the whole compact model" if tuned is None else
                              f"{args.masks} carries weights its method changed, held in memory")
                           + ": compact without --stream")
        try:
            model = streamed_model(args.model, causal=is_causal_lm(args.model))
        except (ValueError, OSError) as err:
            raise CliError(f"--stream: {err}") from None
    else:
        model = load_model(args.model, masks.meta.get("num_labels"))
    masks.validate(ModelStructure.from_spec(model.spec))  # masks of another shape: say so first
    made_for = masks.meta.get("model")
    if made_for is not None and not args.force and _identity(str(made_for)) != _identity(args.model):
        raise CliError(f"{args.masks} was made for the model {made_for}, not for {args.model}; compact the model the "
                       "masks came from, or pass --force if it is the same model under another path")
    tokenizer = load_tokenizer(args.model, model.spec["vocab_size"], required=args.recover is not None)
    source = model
    if tuned is not None:  # the method changed the weights along with the masks: compact those (the dense stays)
        source = copy.deepcopy(model)
        source.load_state_dict(tuned)
        print(f"compacting the weights {masks.meta.get('method', 'the method')} changed with the masks", flush=True)
    if args.recover is None:
        compact_to_folder(source, masks, args.out, tokenizer, overwrite=args.overwrite)
    else:
        pruned = compact(source, masks)
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
    if args.task is not None and args.quantize is None:
        raise CliError("--task scores a quantized export against its fp32 one; pass --quantize MODE with it (a plain "
                       "export is checked against PyTorch already)")
    if args.quantize == "int8-static" and args.task is None:
        raise CliError("--quantize int8-static needs calibration examples: pass --task (a task name or file for a "
                       "classifier, a perplexity task such as text:FILE for a causal LM), or use int8-dynamic")
    model = load_model(args.model)
    tokenizer = load_tokenizer(args.model, model.spec["vocab_size"], required=args.task is not None)
    causal = model.spec.get("task") == "causal_lm"
    if args.all_logits and not causal:
        raise CliError("--all-logits is for causal LMs; a classifier's graph returns its logits already")
    if args.quantize is not None:
        _quantized_export(args, model, tokenizer, causal)
        return
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


def _quantization_data(args: argparse.Namespace, model, tokenizer, causal: bool) -> tuple:
    """(calibration inputs or None, evaluation inputs, task or None, what was scored) for ``--task``."""
    from structprune.data import encode
    from structprune.loading import check_outputs

    task = TaskArgs(args.task, "train", args.calib_examples if causal else None, args.data_dir,
                    max_length=args.max_length)
    static = args.quantize == "int8-static"
    if task.is_lm != causal:
        raise CliError(f"{args.model} is a {'causal LM' if causal else 'classifier'} but --task {args.task} is "
                       f"{'a language-model' if task.is_lm else 'a classification'} task; pass a "
                       f"{'perplexity task (wikitext2, text:FILE, ...)' if causal else 'task name or file'}")
    if causal:
        from structprune.data.lm import PERPLEXITY, get_lm_task, load_text
        from structprune.likelihood import text_windows

        lm = get_lm_task(args.task)
        if lm.kind != PERPLEXITY:
            raise CliError(f"{args.task} is a {lm.kind} task; a quantized causal LM is checked by perplexity: pass a "
                           "perplexity task (wikitext2, text:FILE, ...)")
        split = args.eval_split or lm.splits[0]
        windows = text_windows(tokenizer, load_text(args.task, split, data_dir=args.data_dir), args.max_length,
                               args.eval_examples or LM_EVAL_WINDOWS, seed=1)
        where = f"{lm.name} {split}, {len(windows['input_ids'])} windows of {args.max_length} tokens"
        return task.lm_calibration(tokenizer) if static else None, windows, None, where
    held = task.held_out(args.eval_split or "dev")
    check_outputs(args.model, model.spec["num_labels"], held.task.num_labels)
    if args.eval_examples is not None and args.eval_examples < len(held):
        held = held.subset(args.eval_examples, task.seed)
    calibration = None
    if static:
        train = task.load()
        calibration = encode(train.subset(min(args.calib_examples, len(train)), task.seed), tokenizer, args.max_length)
    where = f"{held.task.name} {held.split} ({len(held)} examples)"
    return calibration, encode(held, tokenizer, args.max_length), held.task, where


def _quantized_export(args: argparse.Namespace, model, tokenizer, causal: bool) -> None:
    import warnings

    from structprune.export import ONNX_FILE
    from structprune.quantize import FP16_ON_CPU, Fp16OnCpuWarning, export_quantized

    calibration, evaluation, task, where = (_quantization_data(args, model, tokenizer, causal) if args.task
                                            else (None, None, None, None))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Fp16OnCpuWarning)  # said below, once
        result = export_quantized(model, args.out, args.quantize, tokenizer, calibration, evaluation, task,
                                  overwrite=args.overwrite, threads=args.threads, all_logits=args.all_logits)
    mb = 1024**2
    print(f"{args.quantize} ONNX model written to {result.directory / ONNX_FILE}: "
          f"{result.quantized_bytes / mb:.2f} MiB (fp32 export {result.fp32_bytes / mb:.2f} MiB, "
          f"x{result.quantized_bytes / result.fp32_bytes:.2f}); made "
          "from an fp32 export that passed its parity check with PyTorch (not kept: export without --quantize for it)")
    if result.metric is None:
        print("no accuracy check was run: pass --task TASK (a task name or file; a perplexity task for a causal LM) "
              "to score the fp32 and the quantized model on held-out examples")
    elif causal:
        print(f"perplexity on {where}: fp32 {result.fp32:.3f}, {args.quantize} {result.quantized:.3f} "
              f"({result.change:+.3f}, {100 * result.change / result.fp32:+.2f}%)")
    else:
        print(f"{result.metric} on {where}: fp32 {result.fp32:.2f}, {args.quantize} {result.quantized:.2f} "
              f"({result.change:+.2f} points)")
    if args.quantize == "fp16":
        print(f"note: {FP16_ON_CPU}")


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
    p.add_argument("--stream", action="store_true",
                   help="cut the weights from --model's safetensors files one layer at a time and write the output in "
                        "shards, for a model larger than memory (a local folder; not with --recover)")
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
    _register_export(sub)


def _register_export(sub) -> None:
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
    quant = p.add_argument_group("quantized export", "With --quantize, the fp32 export (checked against PyTorch) "
                                 "is made in a temporary folder and quantized with ONNX Runtime's tools into --out; "
                                 "with --task, both are scored on held-out examples (accuracy, or perplexity for a "
                                 "causal LM) and the change is printed.")
    quant.add_argument("--quantize", choices=QUANTIZE_MODES, default=None,
                       help="int8-dynamic: int8 weights, activations quantized at run time; int8-static: activation "
                            "ranges calibrated on --task examples (needs --task); fp16: half-size weights, for GPUs "
                            "(ONNX Runtime's CPU provider runs fp16 no faster than fp32)")
    quant.add_argument("--task", default=None,
                       help="a built-in task or a .csv/.tsv/.jsonl task file (classifiers), or a perplexity task "
                            "such as wikitext2 or text:FILE (causal LMs): calibration and evaluation examples")
    quant.add_argument("--eval-split", default=None,
                       help="split scored (default: dev; perplexity tasks: the task's reported split); a task file's "
                            "held-out 20%% is always used")
    quant.add_argument("--calib-examples", type=positive_int, default=128,
                       help="int8-static: training examples (causal LMs: windows of the calibration text) that fix "
                            "the activation ranges (default: 128)")
    quant.add_argument("--eval-examples", type=positive_int, default=None,
                       help=f"score at most this many examples (default: all; causal LMs: {LM_EVAL_WINDOWS} windows)")
    quant.add_argument("--max-length", type=positive_int, default=128,
                       help="tokens per example or text window (default: 128)")
    quant.add_argument("--data-dir", default=None,
                       help="folder of the benchmark data sets (default: $STRUCTPRUNE_DATA_DIR, else ../shared/data)")
    add_output_options(p, "ONNX folder to write")
    p.set_defaults(run=run_export)
