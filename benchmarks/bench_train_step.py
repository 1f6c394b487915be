"""One training step of ``MaskedModel`` with half of the heads and neurons dead vs none dead.

A step is what learned pruning repeats: forward with differentiable gates (a ``[layers, heads]``
and a ``[layers, ffn]`` tensor that require grad, dead units at exactly 0, as clamped
hard-concrete samples are), cross-entropy loss, backward, AdamW step over weights and gates.
Variants, timed side by side:

* ``hf-dense``: the Hugging Face model (SDPA attention), no gates: plain fine-tuning;
* ``masked-0``: ``MaskedModel`` with every gate alive;
* ``masked-50``: ``MaskedModel`` with half of the heads and half of the neurons of every layer at 0.

Models: all-MiniLM-L6-v2's shape and BERT-base's shape (random weights; time does not depend on
them), batch 16, sequence 128. CPU: fp32, 2 pinned threads, ops on the C++ kernels. CUDA: bf16
autocast, ops on the Triton kernels.

Peak memory: on CUDA ``max_memory_allocated`` over a step; on the CPU each variant runs a few
steps in a child process that reports its peak resident memory and the resident memory before
the first step (the difference is the step's working memory: activations, gradients, optimizer
state).

Usage::

    python benchmarks/bench_train_step.py                 # CPU (~5 min on 2 idle cores)
    python benchmarks/bench_train_step.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from kernel_timing import RESULTS, prepare, time_all, write_rows
from transformers import BertConfig, BertForSequenceClassification

from structprune import bench
from structprune.masked_model import MaskedModel

BATCH, SEQ = 16, 128
MODELS = {
    "all-MiniLM-L6-v2": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}
VARIANTS = ("hf-dense", "masked-0", "masked-50")


def build(model_name: str, variant: str, device: str) -> Callable[[], object]:
    """A zero-argument callable doing one training step of ``variant``."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, num_labels=2, attn_implementation="sdpa", **MODELS[model_name])
    hf = BertForSequenceClassification(config).to(device).train()
    g = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(1000, 30000, (BATCH, SEQ), generator=g).to(device),
              "attention_mask": torch.ones(BATCH, SEQ, dtype=torch.long, device=device),
              "labels": torch.randint(0, 2, (BATCH,), generator=g).to(device)}
    if variant == "hf-dense":
        model, gates, params = hf, None, list(hf.parameters())
    else:
        model = MaskedModel(hf).to(device).train()
        layers, heads, ffn = config.num_hidden_layers, config.num_attention_heads, config.intermediate_size
        head, neuron = torch.ones(layers, heads), torch.ones(layers, ffn)
        if variant == "masked-50":
            for layer in range(layers):  # half of each layer, at seeded random places
                head[layer, torch.randperm(heads, generator=g)[: heads // 2]] = 0.0
                neuron[layer, torch.randperm(ffn, generator=g)[: ffn // 2]] = 0.0
        gates = {"head": head.to(device).requires_grad_(), "neuron": neuron.to(device).requires_grad_()}
        params = list(model.parameters()) + list(gates.values())
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")

    def step() -> object:
        with autocast:
            out = model(**inputs) if gates is None else model(**inputs, gates=gates)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out.loss

    return step


def cpu_peak_memory(model_name: str, variant: str) -> dict[str, float]:
    """Resident memory (MiB) of a child process before and at the peak of 3 training steps."""
    code = (f"import sys; sys.path.insert(0, {str(RESULTS.parent)!r}); import bench_train_step as b; "
            f"b.child_memory({model_name!r}, {variant!r})")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def child_memory(model_name: str, variant: str) -> None:
    torch.set_num_threads(2)
    step = build(model_name, variant, "cpu")
    before = bench.memory_mb()
    bench.reset_peak_memory()
    for _ in range(3):
        step()
    print(json.dumps({"rss_before_mib": round(before, 1), "rss_peak_mib": round(bench.memory_mb("VmHWM"), 1)}))


def cuda_peak_memory(step: Callable[[], object]) -> dict[str, float]:
    step()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return {"rss_before_mib": round(base / 2**20, 1), "rss_peak_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--csv", default=str(RESULTS / "train_step.csv"))
    args = parser.parse_args()
    machine = prepare(args.device)
    rows = []
    print(f"training step, batch {BATCH}, seq {SEQ}, {args.device} ({machine['gpu'] or machine['cpu']})")
    for model_name in args.models:
        steps = {variant: build(model_name, variant, args.device) for variant in VARIANTS}
        ms = time_all(steps, args.device)
        print(f"{model_name}:")
        for variant in VARIANTS:
            memory = (cuda_peak_memory(steps[variant]) if args.device == "cuda"
                      else cpu_peak_memory(model_name, variant))
            ratio = ms[variant] / ms["masked-0"]
            rows.append({**machine, "device": args.device, "model": model_name, "batch": BATCH, "seq": SEQ,
                         "variant": variant, "ms": round(ms[variant], 3), "ratio_to_masked_0": round(ratio, 4),
                         **memory})
            print(f"   {variant:10s} {ms[variant]:9.1f} ms ({ratio:.2f}x masked-0)  memory before "
                  f"{memory['rss_before_mib']:.0f} MiB, peak {memory['rss_peak_mib']:.0f} MiB")
        del steps
    write_rows(Path(args.csv), rows)


if __name__ == "__main__":
    main()
