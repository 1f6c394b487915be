"""Zero-shot evaluation of a causal LM: perplexity, multiple choice and LAMBADA through structprune's forward.

The model is a Hugging Face causal-LM folder (converted with ``from_hf``) or a saved structprune folder.
Perplexity tasks run through structprune's forward and, with ``--compare-hf`` (Hugging Face folders only),
through the Hugging Face model on the same windows, and the difference is reported (the target: within
0.01). A row per (model, task, forward) is appended to ``benchmarks/results/eval_lm.csv`` with the machine,
versions, date, every setting, the metrics and the wall time. ``--limit`` caps items per zero-shot task and
``--windows`` the perplexity windows (unset: all of them).

    python benchmarks/eval_lm.py --model /tmp/smollm2 --compare-hf --windows 20 --limit 100
    python benchmarks/eval_lm.py --model pruned/ --tasks wikitext2,piqa --limit 200
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from structprune import bench
from structprune.data.lm import LM_TASKS, PERPLEXITY, get_lm_task
from structprune.likelihood import evaluate_lm
from structprune.loading import load_model, load_tokenizer

CSV = Path(__file__).resolve().parent / "results" / "eval_lm.csv"
TASKS = ("wikitext2", "hellaswag", "piqa", "arc_easy", "arc_challenge", "boolq", "winogrande", "openbookqa",
         "lambada")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="Hugging Face causal-LM folder or structprune folder")
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, of {', '.join(LM_TASKS)}, text:FILE")
    parser.add_argument("--limit", type=int, default=None, help="first N items per zero-shot task (default: all)")
    parser.add_argument("--windows", type=int, default=None, help="first N perplexity windows (default: all)")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--stride", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=None, help="default: 4 windows / 16 requests")
    parser.add_argument("--compare-hf", action="store_true", help="perplexity through the HF model too")
    parser.add_argument("--threads", type=int, default=bench.CPU_THREADS, help="torch threads (CPU)")
    parser.add_argument("--out", type=Path, default=CSV)
    return parser.parse_args(argv)


def _hf_model(name: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32).eval()


def _run(model, tokenizer, task: str, args: argparse.Namespace) -> tuple[dict[str, float], float]:
    """The task's own metrics (WinoGrande and BoolQ report no acc_norm), their standard errors and counts."""
    spec = get_lm_task(task)
    start = time.perf_counter()
    result = evaluate_lm(model, tokenizer, task, limit=args.windows if spec.kind == PERPLEXITY else args.limit,
                         batch_size=args.batch_size, window=args.window, stride=args.stride, progress=False)
    keep = {*spec.metrics, *(f"{m}_stderr" for m in spec.metrics), "items", "tokens", "windows"}
    return {k: v for k, v in result.metrics().items() if k in keep}, time.perf_counter() - start


def _line(name: str, forward: str, metrics: dict[str, float], seconds: float) -> str:
    shown = " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
    return f"{name:<14} {forward:<11} {shown}  ({seconds:.0f} s)"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(args.model, causal=True).to(device)
    tokenizer = load_tokenizer(args.model, model.config.vocab_size)
    hf = _hf_model(args.model).to(device) if args.compare_hf else None
    info, rows = bench.machine_info(), []
    settings = {"model": args.model, "window": args.window, "stride": args.stride, "limit": args.limit,
                "windows_limit": args.windows, "batch_size": args.batch_size, "threads": args.threads, "device": device}
    print(f"{args.model} on {info['gpu'] or info['cpu']} ({args.threads} threads), torch {info['torch']}")
    for task in args.tasks.split(","):
        forwards = [("structprune", model)]
        if hf is not None and get_lm_task(task).kind == PERPLEXITY:
            forwards.append(("hf", hf))
        results = {}
        for forward, m in forwards:
            metrics, seconds = _run(m, tokenizer, task, args)
            results[forward] = metrics
            print(_line(task, forward, metrics, seconds), flush=True)
            row = {**info, **settings, "task": task, "forward": forward, **metrics, "seconds": round(seconds, 1)}
            bench.append_csv(args.out, [row])  # row by row: an interrupted run keeps what it measured
            rows.append(row)
        if len(results) == 2:
            diff = abs(results["structprune"]["perplexity"] - results["hf"]["perplexity"])
            print(f"{task:<14} |structprune - hf| perplexity = {diff:.6f} ({'within' if diff <= 0.01 else 'OVER'} 0.01)")
    print(f"appended {len(rows)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
