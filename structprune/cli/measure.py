"""``structprune bench`` and ``structprune eval``: latency side by side (classifiers; causal LMs per
prefill and decode phase), and task metrics."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from structprune.cli.common import (
    THREADS,
    CliError,
    TaskArgs,
    add_task_options,
)
from structprune.methods.options import non_negative_int, positive_int


def run_bench(args: argparse.Namespace) -> None:
    from structprune.compaction import empty_model

    _check_device(args)
    if args.backend == "torch":
        args.dtype = args.dtype or "fp32"  # ort: the graphs' own, read beside the sessions
    pruned = empty_model(Path(args.pruned))
    if pruned.spec.get("task") == "causal_lm":
        _check_causal_lm(args)
        _bench_causal_lm(args, pruned.spec)
        return
    lm_only = [flag for flag, given in (("--prompt", args.prompt), ("--context", args.context)) if given]
    if lm_only or (args.batch is not None and len(args.batch) > 1):
        raise CliError(f"{', '.join(lm_only) or 'several --batch values'}: only for causal LMs; "
                       f"{args.pruned} is a classifier (time it with one --batch and --seq)")
    if args.backend == "torch" and args.device == "cpu" and args.dtype == "fp16":
        raise CliError("--dtype fp16 on the CPU: CPUs have no fp16 arithmetic for torch to use, so the time would "
                       "be of conversions, not of the model; time fp16 with --device cuda, and bf16 or fp32 on the "
                       "CPU")
    _bench_classifier(args, args.batch[0] if args.batch else 8, args.seq or 128)


def _check_device(args: argparse.Namespace) -> None:
    """Refuse device, dtype and backend combinations that cannot run, before any model is read."""
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise CliError("--device cuda needs a CUDA GPU, and torch sees none (torch.cuda.is_available() is False); "
                           "run on a machine with an NVIDIA GPU and a CUDA build of torch, or use --device cpu")
        if args.backend == "ort":
            from structprune.export import check_provider

            try:
                check_provider("cuda")
            except ValueError as err:
                raise CliError(f"--backend ort --device cuda: {err}") from None
    torch_only = [flag for flag, given in (("--compile", args.compile), ("--cuda-graphs", args.cuda_graphs)) if given]
    if torch_only and args.backend == "ort":
        raise CliError(f"{', '.join(torch_only)}: torch only (ONNX Runtime runs the graph as exported); drop it or "
                       "use --backend torch")
    if torch_only and args.device != "cuda":
        raise CliError(f"{', '.join(torch_only)}: timed on CUDA only; add --device cuda (CPU figures are eager torch "
                       "and ONNX Runtime)")
    if args.backend == "ort" and args.dtype == "bf16":
        raise CliError("--dtype bf16: an ONNX graph's dtype is fixed when it is exported (fp32, or fp16 with "
                       "`structprune export --quantize fp16`); use --backend torch to time bf16")


def _check_causal_lm(args: argparse.Namespace) -> None:
    """Refuse the settings classifiers take but causal LMs do not (their config is read, no weights)."""
    if args.backend == "ort" and args.device == "cuda":
        raise CliError(f"--backend ort --device cuda times classifiers only; {args.pruned} is a causal LM, whose "
                       "decode steps feed the key/value cache to ONNX Runtime as host arrays, so a CUDA time would be "
                       "of the copies: time causal LMs on CUDA with --backend torch")
    if args.cuda_graphs:
        raise CliError(f"--cuda-graphs times classifiers only; {args.pruned} is a causal LM, whose key/value cache "
                       "changes between decode steps, which a captured graph cannot replay: drop --cuda-graphs")


def _graph_dtype(folder: Path) -> str:
    """``fp16`` for an export whose float weights are mostly fp16 (``structprune export --quantize fp16``), else
    ``fp32`` (int8 exports too: their scales are fp32)."""
    import onnx

    from structprune.export import ONNX_FILE

    graph = onnx.load(str(folder / ONNX_FILE), load_external_data=False).graph
    kinds = [t.data_type for t in graph.initializer]
    return "fp16" if kinds.count(onnx.TensorProto.FLOAT16) > kinds.count(onnx.TensorProto.FLOAT) else "fp32"


def _ort_sessions(args: argparse.Namespace) -> dict:
    """ONNX Runtime sessions of --dense and --pruned on --device; sets ``args.dtype`` to their graphs' dtype,
    which a given --dtype must match."""
    from structprune.export import session

    paths = {"dense": Path(args.dense), "pruned": Path(args.pruned)}
    sessions = {name: session(path, threads=args.threads, device=args.device) for name, path in paths.items()}
    dtypes = {name: _graph_dtype(path) for name, path in paths.items()}  # the sessions said the files are sound
    if dtypes["dense"] != dtypes["pruned"]:
        raise CliError(f"{args.dense} is an {dtypes['dense']} graph and {args.pruned} an {dtypes['pruned']} one; "
                       "compare graphs of one dtype (export both with the same --quantize)")
    if args.dtype not in (None, dtypes["pruned"]):
        raise CliError(f"--dtype {args.dtype}: {args.pruned} is an {dtypes['pruned']} graph, and an ONNX graph's "
                       "dtype is fixed when it is exported (fp16 with `structprune export --quantize fp16`); drop "
                       "--dtype, or use --backend torch to time other dtypes")
    args.dtype = dtypes["pruned"]
    return sessions


def _torch_calls(args: argparse.Namespace, models: dict, inputs: dict) -> dict:
    """Each classifier's timed forward on --device and --dtype: eager or ``torch.compile``-d, and with
    --cuda-graphs the replay of a CUDA graph captured from it."""
    import torch

    from structprune import bench

    inputs = {name: tensor.to(args.device) for name, tensor in inputs.items()}
    calls = {}
    for name, model in models.items():
        model = model.to(device=args.device, dtype=bench.DTYPES[args.dtype])
        call = bench.torch_forward(torch.compile(model) if args.compile else model, inputs)
        calls[name] = bench.cuda_graph(call) if args.cuda_graphs else call
    return calls


def _bench_classifier(args: argparse.Namespace, batch: int, seq: int) -> None:
    from structprune import bench
    from structprune.arch import ModelStructure
    from structprune.compaction import empty_model
    from structprune.costs import flops_ideal_speedup
    from structprune.export import example_inputs
    from structprune.loading import load_model

    paths = {"dense": Path(args.dense), "pruned": Path(args.pruned)}
    if args.backend == "ort":
        models = {name: empty_model(path) for name, path in paths.items()}
    else:
        models = {name: load_model(str(path)) for name, path in paths.items()}
    max_positions = models["dense"].spec.get("max_position_embeddings")
    if max_positions is not None and seq > max_positions:
        raise CliError(f"--seq {seq} exceeds the {max_positions} positions the model has")
    inputs = example_inputs(models["dense"], batch, seq, padded=False)
    if args.backend == "ort":
        calls = {name: bench.ort_forward(s, inputs) for name, s in _ort_sessions(args).items()}
    else:
        calls = _torch_calls(args, models, inputs)
    cuda_events = args.backend == "torch" and args.device == "cuda"
    mode = "".join(f", {flag}" for flag, given in (("compiled", args.compile), ("CUDA graphs", args.cuda_graphs))
                   if given)
    print(f"timing {args.backend} on {args.device} ({args.dtype}{mode}): dense and pruned in interleaved turns",
          file=sys.stderr, flush=True)
    with bench.torch_threads(args.threads), bench.OtherCpuLoad() as load:
        if cuda_events:
            stats = bench.cuda_stats(calls)
        else:
            stats = bench.time_interleaved(calls, **(bench.TIMING | {"warmup": args.warmup, "repeats": args.repeats}))
    structures = {name: ModelStructure.from_spec(m.spec) for name, m in models.items()}
    ideal = flops_ideal_speedup(structures["dense"], structures["pruned"], models["dense"].spec, seq)
    how = (f"median of {stats['dense'].n} rounds of CUDA-event timing (each a median after warm-up)" if cuda_events
           else f"median of {stats['dense'].n} timed calls in interleaved turns after {args.warmup} warm-up calls")
    print(bench.speedup_table(stats, ideal, f"backend {args.backend} on {args.device} ({args.dtype}{mode}), batch "
                                            f"{batch}, sequence {seq}, {args.threads} threads, {how}"))
    warning = bench.load_warning(load.cores)
    if warning:
        print(warning)
    if args.csv:
        settings = {"backend": args.backend, "device": args.device, "dtype": args.dtype, "compile": args.compile,
                    "cuda_graphs": args.cuda_graphs, "timer": "cuda-events" if cuda_events else "wall-clock",
                    "batch": batch, "seq": seq, "threads": args.threads, "dense": args.dense, "pruned": args.pruned,
                    "flops_ideal_speedup": ideal,
                    "measured_speedup": stats["dense"].median_ms / stats["pruned"].median_ms,
                    "other_cores_busy": load.cores}
        bench.append_csv(args.csv, bench.csv_rows(stats, settings, args.device))
        print(f"rows appended to {args.csv}")


def _lm_runners(args: argparse.Namespace) -> dict:
    """The dense and pruned causal LMs on the chosen backend, device and dtype."""
    from structprune import bench, decode_bench
    from structprune.loading import load_model

    if args.backend == "ort":
        return {(args.backend, name): decode_bench.OrtLM(s) for name, s in _ort_sessions(args).items()}
    dtype = bench.DTYPES[args.dtype]
    return {(args.backend, name): decode_bench.TorchLM(load_model(path, causal=True), args.device, dtype, args.compile)
            for name, path in (("dense", args.dense), ("pruned", args.pruned))}


def _bench_causal_lm(args: argparse.Namespace, spec: dict) -> None:
    from structprune import bench, decode_bench
    from structprune.arch import ModelStructure
    from structprune.compaction import empty_model

    if args.seq is not None:
        raise CliError(f"--seq is for classifiers; {args.pruned} is a causal LM: time prefill at --prompt lengths "
                       "and decoding at --context tokens")
    prompts, context, batches = args.prompt or [128, 512], args.context or 512, args.batch or [1]
    phases = ([decode_bench.Phase("prefill", 1, p) for p in prompts]
              + [decode_bench.Phase("decode", b, context) for b in batches])
    try:
        decode_bench.check_positions(phases, spec.get("max_position_embeddings"))
    except ValueError as err:
        raise CliError(str(err)) from None
    runners = _lm_runners(args)
    # torch: the dense model may be the Hugging Face folder it was pruned from; ORT folders carry the section
    dense = runners[(args.backend, "dense")]
    dense_spec = dense.model.spec if args.backend == "torch" else empty_model(Path(args.dense)).spec
    if dense_spec.get("task") != "causal_lm":
        raise CliError(f"{args.pruned} is a causal LM but {args.dense} is not; compare two causal LMs")
    structures = {"dense": ModelStructure.from_spec(dense_spec), "pruned": ModelStructure.from_spec(spec)}
    timing = bench.TIMING | {"warmup": args.warmup, "repeats": args.repeats}

    def timer(calls: dict) -> dict:
        if args.device == "cuda":
            return bench.cuda_stats(calls)
        return bench.time_interleaved(calls, **timing)

    print(f"timing {args.backend} on {args.device} ({args.dtype}): dense and pruned in interleaved turns",
          file=sys.stderr, flush=True)
    results = []
    with bench.torch_threads(args.threads):
        for phase in phases:
            ideal = phase.ideal_speedup(structures["dense"], structures["pruned"], dense_spec)
            results += decode_bench.measure_phase(runners, phase, dense_spec["vocab_size"], ideal, timer)
    how = "medians of CUDA-event rounds" if args.device == "cuda" else "medians of interleaved turns"
    print(f"causal LM, backend {args.backend}, device {args.device}, {args.dtype}{', compiled' * args.compile}, "
          f"{args.threads} threads; {how}")
    print(decode_bench.results_table(results))
    warning = bench.load_warning(max((r.other_cores or 0.0) for r in results))
    if warning:
        print(warning)
    if args.csv:
        settings = {"dense": args.dense, "pruned": args.pruned, "device": args.device, "dtype": args.dtype,
                    "compile": args.compile, "threads": args.threads}
        machine = bench.machine_info(args.device)
        bench.append_csv(args.csv, [machine | settings | r.row() for r in results])
        print(f"rows appended to {args.csv}")


DEFAULT_SPLIT = "dev"


def run_eval(args: argparse.Namespace) -> None:
    from structprune.compaction import empty_model
    from structprune.data import encode
    from structprune.evaluation import evaluate
    from structprune.export import ONNX_FILE, session
    from structprune.loading import check_outputs, load_model, load_tokenizer

    task = TaskArgs.from_args(args)
    if task.is_lm:
        _eval_lm(args, task)
        return
    data = task.load()
    path = Path(args.model)
    print(f"scoring {args.model} on {data.task.name} {data.split} ({len(data)} examples)", file=sys.stderr, flush=True)
    if (path / ONNX_FILE).is_file():
        spec = empty_model(path).spec
        check_outputs(args.model, spec["num_labels"], data.task.num_labels)
        model = session(path, threads=args.threads)
    else:
        model = load_model(args.model, data.task.num_labels, causal=False)
        spec = model.spec
    encoded = encode(data, load_tokenizer(args.model, spec["vocab_size"]), task.max_length)
    metrics = evaluate(model, encoded, data.task, args.batch_size or 64)
    values = ", ".join(f"{name} {value:.2f}" for name, value in metrics.items())
    print(f"{data.task.name} {data.split} ({len(data)} examples): {values}")


def _eval_lm(args: argparse.Namespace, task: TaskArgs) -> None:
    from structprune import bench
    from structprune.data.lm import get_lm_task
    from structprune.export import ONNX_FILE
    from structprune.likelihood import evaluate_lm
    from structprune.loading import load_model, load_tokenizer

    if (Path(args.model) / ONNX_FILE).is_file():
        raise CliError(f"{args.model} is an ONNX export; score the model folder it was exported from (the generation "
                       "graph returns the last position's logits only)")
    lm = get_lm_task(task.task)
    split = None if args.split == DEFAULT_SPLIT else args.split
    model = load_model(args.model, causal=True)
    tokenizer = load_tokenizer(args.model, model.spec["vocab_size"])
    print(f"scoring {args.model} on {lm.name}: {lm.description}", file=sys.stderr, flush=True)
    with bench.torch_threads(args.threads):
        result = evaluate_lm(model, tokenizer, task.task, split=split, limit=args.limit,
                             batch_size=args.batch_size, window=args.window, stride=args.stride or args.window,
                             data_dir=task.data_dir)
    metrics = result.metrics()
    values = ", ".join(f"{name} {value:.2f}" if isinstance(value, float) else f"{name} {value}"
                       for name, value in metrics.items())
    print(f"{lm.name} {split or lm.splits[0]}: {values}")


def register(sub) -> None:
    p = sub.add_parser("bench", help="latency of a dense and a pruned model side by side",
                       description="Time the dense and the pruned model round-robin on the same random inputs "
                                   "(median after warm-up) and print the measured and the ideal speedup. Causal LMs "
                                   "are timed per phase: prefill (time to first token) at --prompt lengths against "
                                   "the FLOPs-ideal speedup, and one decoding step at each --batch with --context "
                                   "tokens already cached against the bytes-ideal speedup. On --device cuda, torch "
                                   "is timed with CUDA events (rounds of triton's do_bench, dense and pruned "
                                   "alternating; --warmup and --repeats are for the wall clock) and ONNX Runtime "
                                   "with the wall clock (its run returns host arrays, so it waits for the GPU).")
    p.add_argument("--dense", required=True,
                   help="dense model: an ONNX folder from `structprune export` (--backend ort) or a model folder "
                        "(--backend torch)")
    p.add_argument("--pruned", required=True, help="pruned model, of the same kind as --dense")
    p.add_argument("--backend", choices=("ort", "torch"), default="ort",
                   help="ort: ONNX Runtime on `structprune export` folders; torch: PyTorch (eager, or --compile) under "
                        "inference_mode on model folders (default: ort)")
    p.add_argument("--batch", type=positive_int, nargs="+", default=None,
                   help="examples per call: one value for a classifier (default: 8); causal LMs: decoding batch "
                        "sizes, each timed (default: 1)")
    p.add_argument("--seq", type=positive_int, default=None,
                   help="classifiers: tokens per example, no padding (default: 128)")
    p.add_argument("--prompt", type=positive_int, nargs="+", default=None,
                   help="causal LMs: prompt lengths of the timed prefills, batch 1 (default: 128 512)")
    p.add_argument("--context", type=positive_int, default=None,
                   help="causal LMs: tokens already in the key/value cache at each timed decoding step (default: 512)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where to run (default: cpu); cuda: torch on any model, ONNX Runtime on classifiers with "
                        "its CUDAExecutionProvider (needs onnxruntime-gpu)")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None,
                   help="torch: weights, activations and cache dtype (default: fp32; classifiers on the CPU: fp32 "
                        "or bf16, which is fast only on CPUs with bf16 instructions); ort: the graphs' own dtype, "
                        "fp16 for `structprune export --quantize fp16` folders (default: theirs)")
    p.add_argument("--compile", action="store_true",
                   help="--backend torch on --device cuda: time torch.compile-d models instead of eager")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="classifiers, --backend torch on --device cuda: capture the forward in a CUDA graph and "
                        "time its replay (with --compile: of the compiled forward)")
    p.add_argument("--threads", type=positive_int, default=THREADS,
                   help=f"intra-op threads of both backends (default: {THREADS})")
    p.add_argument("--warmup", type=non_negative_int, default=3, help="untimed calls per model first (default: 3)")
    p.add_argument("--repeats", type=positive_int, default=20,
                   help="at least this many timed calls per model, in interleaved turns (default: 20)")
    p.add_argument("--csv", default=None, help="also append the results, machine and settings to this CSV file")
    p.set_defaults(run=run_bench)

    p = sub.add_parser("eval", help="task metrics of a model or an ONNX folder",
                       description="Score MODEL (a model folder, hub name, or an ONNX folder from `structprune "
                                   "export`) on a task split with the task's metrics, in percent. A causal LM is "
                                   "scored on a language-model task: perplexity over windows of --window tokens every "
                                   "--stride tokens, zero-shot multiple choice (acc, acc_norm as lm-evaluation-harness "
                                   "defines them) or LAMBADA's last word.")
    p.add_argument("model", help="model folder, hub name, .gguf file (causal LMs) or ONNX folder (with tokenizer "
                                 "files)")
    add_task_options(p, split=DEFAULT_SPLIT, subset="score a random subset of this many examples", held_out=False)
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="examples per forward call (default: 64; language-model tasks: 4 windows or 16 choices)")
    lm = p.add_argument_group("language-model tasks")
    lm.add_argument("--limit", type=positive_int, default=None,
                    help="score only the first N windows (perplexity) or items (the others), for a quick run")
    lm.add_argument("--window", type=positive_int, default=512, help="tokens per perplexity window (default: 512)")
    lm.add_argument("--stride", type=positive_int, default=None,
                    help="tokens between window starts; smaller than --window gives each window context that is "
                         "not scored (default: --window)")
    p.add_argument("--threads", type=positive_int, default=THREADS,
                   help=f"ONNX Runtime threads for an ONNX folder (default: {THREADS})")
    p.set_defaults(run=run_eval)
