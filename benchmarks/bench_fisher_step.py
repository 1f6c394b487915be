"""Wall time of the ``fisher`` pruning step (gradients, mask search, mask tuning) on a task's training rows.

Timing only: the step's cost does not depend on the weights, so the pre-trained all-MiniLM-L6-v2 with a fresh
classification head is pruned (no fine-tuning needed). Prints the phases and appends a row to
``benchmarks/results/fisher_step.csv``. Example (the sentence-pair case of the training-free issue)::

    python benchmarks/bench_fisher_step.py --task rte --examples 2048 --threads 2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from structprune import bench
from structprune.budget import Budget
from structprune.data import encode, load_task
from structprune.demo import minilm_dir
from structprune.methods import fisher

CSV = Path(__file__).resolve().parent / "results" / "fisher_step.csv"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="rte")
    parser.add_argument("--examples", type=int, default=2048, help="calibration examples (default: %(default)s)")
    parser.add_argument("--flops-reduction", type=float, default=0.4, help="FLOPs budget (default: %(default)s)")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=bench.CPU_THREADS)
    parser.add_argument("--csv", default=str(CSV))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    train = load_task(args.task, "train")
    model = AutoModelForSequenceClassification.from_pretrained(str(minilm_dir()),
                                                               num_labels=train.task.num_labels).eval()
    data = encode(train, AutoTokenizer.from_pretrained(str(minilm_dir())), args.max_length)
    start = time.perf_counter()
    with bench.OtherCpuLoad() as load:
        result = fisher.prune(model, data, Budget(args.flops_reduction, "flops", seq_len=args.max_length),
                              max_examples=args.examples)
    wall = time.perf_counter() - start
    phases = result.log["seconds"]
    row = {"task": args.task, "examples": min(args.examples, len(train)), "max_length": args.max_length,
           "threads": args.threads, "wall_s": round(wall, 1), "gradients_s": round(phases["gradients"], 1),
           "search_s": round(phases["search"], 1),
           "tuning_s": round(phases["total"] - phases["gradients"] - phases["search"], 1),
           "other_cores": round(load.cores, 2), "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    row |= bench.machine_info()
    bench.append_csv(args.csv, [row])
    print("| task | examples | threads | wall | gradients | search | tuning |\n|---|---:|---:|---:|---:|---:|---:|\n"
          f"| {row['task']} | {row['examples']} | {row['threads']} | {row['wall_s']} s | {row['gradients_s']} s | "
          f"{row['search_s']} s | {row['tuning_s']} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
