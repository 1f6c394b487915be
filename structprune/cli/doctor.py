"""``structprune doctor DENSE PRUNED``: why the pruned model is (or is not) as much faster as its FLOPs promise."""

from __future__ import annotations

import argparse
import sys

from structprune.cli.common import THREADS, refuse_existing_file
from structprune.methods.options import positive_int


def run_doctor(args: argparse.Namespace) -> None:
    from structprune.doctor import examine, report

    if args.json:
        refuse_existing_file(args.json, args.overwrite)
    diagnosis = examine(args.dense, args.pruned, batch=args.batch, seq=args.seq, threads=args.threads,
                        suggest_batch=args.suggest_batch, profile_calls=args.profile_calls)
    print(report(diagnosis))
    if args.json:
        diagnosis.write_json(args.json)
        print(f"written to {args.json}", file=sys.stderr)


def register(sub) -> None:
    p = sub.add_parser("doctor", help="explain a measured speedup, or its absence",
                       description="Time DENSE and PRUNED side by side, profile both with ONNX Runtime (time per "
                                   "operator type and group, fused nodes), compare their layer shapes and alignment, "
                                   "measure the fixed costs pruning cannot shrink (per-operator overhead, ops outside "
                                   "the layers), and name the main cause of any gap between the measured and the "
                                   "FLOPs-ideal speedup: small-shape overhead, normalisation kernels that do not "
                                   "shrink, or misaligned widths. Classifiers are timed on a forward pass, causal LMs "
                                   "on a prefill of --batch prompts of --seq tokens.")
    p.add_argument("dense", help="the dense model: an ONNX folder from `structprune export`, or a model folder "
                                 "(exported to a temporary folder first)")
    p.add_argument("pruned", help="the pruned model, of the same kind")
    p.add_argument("--batch", type=positive_int, default=8, help="examples (prompts) per call (default: 8)")
    p.add_argument("--seq", type=positive_int, default=128, help="tokens per example, no padding (default: 128)")
    p.add_argument("--threads", type=positive_int, default=THREADS,
                   help=f"ONNX Runtime intra-op threads (default: {THREADS})")
    p.add_argument("--suggest-batch", type=positive_int, default=None, metavar="N",
                   help="also time both models at batch N, to show what a larger batch gains when per-operator "
                        "overhead dominates")
    p.add_argument("--profile-calls", type=positive_int, default=5,
                   help="profiled calls per model, after 2 warm-up calls (default: 5)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write every measurement and the verdict here")
    p.add_argument("--overwrite", action="store_true", help="replace --json FILE if it exists")
    p.set_defaults(run=run_doctor)
