"""How similar are a target's and an auxiliary task's gradients? The evidence behind the transfer guard.

The ``transfer`` method's cosine guard (:mod:`structprune.transfer`) compares, at every pruning step,
the gradient of the target loss with that of each auxiliary loss on the last encoder layer. This script
measures those cosines at the start of pruning (the dense target model, the gates at their initial logits),
over ``--batches`` pairs of mini-batches, for each auxiliary source:

* ``fresh head``: the auxiliary head as the method initialises it;
* ``fitted head``: the same head after ``--probe-epochs`` epochs on the frozen encoder's states of 768
  auxiliary rows (what the head has learnt after some steps of a run);
* ``target vs target``: two target mini-batches against each other, the scale of a same-task cosine.

For each it prints the mean and standard deviation of the per-batch cosine and their ratio (the guard's trust
once its running averages have settled), and appends the rows to ``benchmarks/results/guard_cosines.csv``::

    python benchmarks/bench_guard_cosines.py --target cr --aux sst2-full,agnews
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_transfer import TransferRunner

from structprune import bench
from structprune.budget import Budget
from structprune.data.encoding import model_inputs, trim_padding
from structprune.methods import l0
from structprune.transfer import TransferConfig
from structprune.transfer.guard import cosine, flat_gradient
from structprune.transfer.objective import TransferObjective

HERE = Path(__file__).resolve().parent
CSV = HERE / "results" / "guard_cosines.csv"
PROBE_BATCHES = 24
"""Mini-batches of auxiliary rows (32 each) the fitted head learns from."""


def objective_for(target: str, aux: str, args: argparse.Namespace) -> tuple[TransferObjective, dict]:
    """The pruning objective of ``target`` with auxiliary source ``aux`` at step 0, and the target's encoded rows."""
    config = l0.L0Config(prune_epochs=6, finetune_epochs=3)
    runner = TransferRunner(target, argparse.Namespace(device="cpu", train_size=args.train_size), args.seed, config,
                            aux)
    dense, _ = runner.dense()
    setup = l0.learned_setup(dense, runner.train_enc, Budget(0.8, seq_len=128), config, None)
    student, gates, layers = setup.parts(config)
    guarded = TransferConfig(l0=config, coupling="separate-masks")  # the coupling whose guard this measures
    objective = TransferObjective(student, setup.teacher, layers, guarded, gates, setup.budget,
                                  setup.warmup_steps(config), setup.prune_steps, runner.aux)
    return objective, runner.train_enc


def fit_head(objective: TransferObjective, epochs: int) -> None:
    """Fit auxiliary head 0 on the frozen encoder's states of ``PROBE_BATCHES`` auxiliary batches."""
    head, source = objective.aux_heads[0], objective.aux[0]
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3)
    states = []
    with torch.no_grad():
        for i in range(PROBE_BATCHES):
            batch = trim_padding(source.draw(torch.Generator().manual_seed(10_000 + i), 32))
            inputs = model_inputs(batch)
            hidden, _ = objective.student.model.backbone(**inputs)
            states.append((hidden, inputs["input_ids"], batch["labels"]))
    for _ in range(epochs):
        for hidden, ids, labels in states:
            loss = F.cross_entropy(head(hidden, ids), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def target_loss(objective: TransferObjective, data: dict, rows: torch.Tensor, step: int) -> torch.Tensor:
    """The target loss (task + prediction + layer distillation) of ``rows`` under the gates of ``step``."""
    return objective.distill_loss({name: t[rows] for name, t in data.items()}, objective.sample_gates(step, 0))[0]


def cosines(objective: TransferObjective, data: dict, batches: int, seed: int) -> dict[str, list[float]]:
    """Per batch: the cosine of the target gradient with the auxiliary gradient and with a second target batch."""
    params = [p for p in objective.student.model.layers[-1].parameters() if p.requires_grad]
    order = torch.randperm(len(data["input_ids"]), generator=torch.Generator().manual_seed(seed))
    found: dict[str, list[float]] = {"aux": [], "target": []}
    for step in range(batches):
        first, second = order[64 * step:64 * step + 32], order[64 * step + 32:64 * step + 64]
        mine = flat_gradient(target_loss(objective, data, first, step), params)
        aux, _ = objective.aux_loss(0, step, 0, objective.aux_gates.sample(torch.Generator().manual_seed(step)))
        found["aux"].append(cosine(mine, flat_gradient(aux, params)))
        found["target"].append(cosine(mine, flat_gradient(target_loss(objective, data, second, step), params)))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="cr")
    parser.add_argument("--aux", default="sst2-full,agnews", help="comma-separated sources (default: %(default)s)")
    parser.add_argument("--train-size", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batches", type=int, default=12, help="mini-batch pairs (default: %(default)s)")
    parser.add_argument("--probe-epochs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=bench.CPU_THREADS)
    parser.add_argument("--csv", default=str(CSV))
    args = parser.parse_args(argv)
    if 64 * args.batches > args.train_size:
        parser.error(f"--batches {args.batches} needs {64 * args.batches} target rows; --train-size is "
                     f"{args.train_size}")
    if "mlm" in args.aux.split(","):
        parser.error("--aux: labelled sources only (the fitted head is a classification head)")
    torch.set_num_threads(args.threads)
    rows = []
    for aux in args.aux.split(","):
        objective, data = objective_for(args.target, aux, args)
        for head in ("fresh", "fitted"):  # measuring takes gradients only, so the fresh head is left as it was
            if head == "fitted":
                fit_head(objective, args.probe_epochs)
            found = cosines(objective, data, args.batches, args.seed)
            pairs = [(f"{aux} ({head} head)", found["aux"])]
            if head == "fresh" and not any(r["pair"] == "target vs target" for r in rows):
                pairs.append(("target vs target", found["target"]))
            for pair, values in pairs:
                mean, spread = statistics.mean(values), statistics.stdev(values)
                rows.append({"target": args.target, "pair": pair, "batches": len(values), "mean": round(mean, 4),
                             "std": round(spread, 4), "mean_over_rms": round(mean / (mean ** 2 + spread ** 2) ** 0.5, 3),
                             "train_size": args.train_size, "seed": args.seed, "probe_epochs": args.probe_epochs,
                             "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())} | bench.machine_info())
                print(f"{args.target} | {pair} | mean {mean:+.4f} | std {spread:.4f}", flush=True)
    bench.append_csv(args.csv, rows)
    print("| target | gradient pair | batches | mean cosine | std | mean / rms |\n|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['target']} | {r['pair']} | {r['batches']} | {r['mean']:+.4f} | {r['std']:.4f} | "
              f"{r['mean_over_rms']:+.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
