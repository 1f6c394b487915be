"""``structprune bench`` and ``structprune eval``: latency side by side, and task metrics."""

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
    from structprune import bench
    from structprune.arch import ModelStructure
    from structprune.compaction import empty_model
    from structprune.costs import flops_ideal_speedup
    from structprune.export import example_inputs, session
    from structprune.loading import load_model

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
    print(f"timing {args.backend}: dense and pruned in interleaved turns", file=sys.stderr, flush=True)
    with bench.torch_threads(args.threads), bench.OtherCpuLoad() as load:
        stats = bench.time_interleaved(calls, **(bench.TIMING | {"warmup": args.warmup, "repeats": args.repeats}))
    structures = {name: ModelStructure.from_spec(m.spec) for name, m in models.items()}
    ideal = flops_ideal_speedup(structures["dense"], structures["pruned"], models["dense"].spec, args.seq)
    print(bench.speedup_table(stats, ideal, f"backend {args.backend}, batch {args.batch}, sequence {args.seq}, "
                                            f"{args.threads} threads, median of {stats['dense'].n} timed calls in "
                                            f"interleaved turns after {args.warmup} warm-up calls"))
    warning = bench.load_warning(load.cores)
    if warning:
        print(warning)
    if args.csv:
        settings = {"backend": args.backend, "batch": args.batch, "seq": args.seq, "threads": args.threads,
                    "dense": args.dense, "pruned": args.pruned, "flops_ideal_speedup": ideal,
                    "measured_speedup": stats["dense"].median_ms / stats["pruned"].median_ms,
                    "other_cores_busy": load.cores}
        bench.append_csv(args.csv, bench.csv_rows(stats, settings))
        print(f"rows appended to {args.csv}")


def run_eval(args: argparse.Namespace) -> None:
    from structprune.compaction import empty_model
    from structprune.data import encode
    from structprune.evaluation import evaluate
    from structprune.export import ONNX_FILE, session
    from structprune.loading import check_outputs, load_model, load_tokenizer

    task = TaskArgs.from_args(args)
    data = task.load()
    path = Path(args.model)
    print(f"scoring {args.model} on {data.task.name} {data.split} ({len(data)} examples)", file=sys.stderr, flush=True)
    if (path / ONNX_FILE).is_file():
        spec = empty_model(path).spec
        check_outputs(args.model, spec["num_labels"], data.task.num_labels)
        model = session(path, threads=args.threads)
    else:
        model = load_model(args.model, data.task.num_labels)
        spec = model.spec
    encoded = encode(data, load_tokenizer(args.model, spec["vocab_size"]), task.max_length)
    metrics = evaluate(model, encoded, data.task, args.batch_size)
    values = ", ".join(f"{name} {value:.2f}" for name, value in metrics.items())
    print(f"{data.task.name} {data.split} ({len(data)} examples): {values}")


def register(sub) -> None:
    p = sub.add_parser("bench", help="latency of a dense and a pruned model side by side",
                       description="Time the dense and the pruned model round-robin on the same random inputs "
                                   "(median after warm-up) and print the measured and the FLOPs-ideal speedup.")
    p.add_argument("--dense", required=True,
                   help="dense model: an ONNX folder from `structprune export` (--backend ort) or a model folder "
                        "(--backend torch)")
    p.add_argument("--pruned", required=True, help="pruned model, of the same kind as --dense")
    p.add_argument("--backend", choices=("ort", "torch"), default="ort",
                   help="ort: ONNX Runtime on `structprune export` folders; torch: eager PyTorch under "
                        "inference_mode on model folders (default: ort)")
    p.add_argument("--batch", type=positive_int, default=8, help="examples per call (default: 8)")
    p.add_argument("--seq", type=positive_int, default=128, help="tokens per example, no padding (default: 128)")
    p.add_argument("--threads", type=positive_int, default=THREADS,
                   help=f"intra-op threads of both backends (default: {THREADS})")
    p.add_argument("--warmup", type=non_negative_int, default=3, help="untimed calls per model first (default: 3)")
    p.add_argument("--repeats", type=positive_int, default=20,
                   help="at least this many timed calls per model, in interleaved turns (default: 20)")
    p.add_argument("--csv", default=None, help="also append the results, machine and settings to this CSV file")
    p.set_defaults(run=run_bench)

    p = sub.add_parser("eval", help="task metrics of a model or an ONNX folder",
                       description="Score MODEL (a model folder, hub name, or an ONNX folder from `structprune "
                                   "export`) on a task split with the task's metrics, in percent.")
    p.add_argument("model", help="model folder, hub name or ONNX folder (with tokenizer files)")
    add_task_options(p, split="dev", subset="score a random subset of this many examples", held_out=False)
    p.add_argument("--batch-size", type=positive_int, default=64, help="examples per forward call (default: 64)")
    p.add_argument("--threads", type=positive_int, default=THREADS,
                   help=f"ONNX Runtime threads for an ONNX folder (default: {THREADS})")
    p.set_defaults(run=run_eval)
