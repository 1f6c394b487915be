"""Scoring and compacting a model held in memory against the same model streamed from its files (``structprune prune
--stream``, ``compact --stream``): peak memory, time, and whether the masks and compact weights agree.
SmolLM2-135M-Instruct (real weights), ``flap`` at 30%.

Each mode runs in a fresh process: ``memory`` loads the model (``load_model``), ``stream`` builds it on the ``meta``
device and reads each module from the safetensors file for its turn (:mod:`structprune.streaming`). Both score the
same ``--windows`` (32) windows of ``--length`` (512) tokens of WikiText-2 validation in batches of ``--batch-size``
(8; the layer-by-layer calibration runs the sequences one at a time whatever the batch). Reported per
mode: the process's resident memory after imports, tokenization and one call of torch's CPU math at toy sizes
(``base``; see :func:`warm_up`), its peak from there on (``peak``: Linux's ``VmHWM``, reset at the base so that the
tokenizer's own peak does not count), the growth between them, and the wall time of the method call; and the sizes
the growth should be compared with: all weights, one decoder layer, the embeddings (of which a streamed decoder reads
only the rows its inputs use), the activations carried between layers (each sequence's residual stream and attention
mask) and the attention scores of one batch (``batch x heads x length^2``), which an eager forward of the batch would
hold twice (calibration runs attention on the kernels, which never hold them whole).
Then each mode writes the compact model (``memory``: ``compact`` and ``save``; ``stream``: ``compact_to_folder``, cutting
tensor by tensor into shards of ``--max-shard-mb``, 64) to a temporary folder; its peak growth is measured from a
second reset, and a digest of the written weights must agree.
The children run with ``MALLOC_MMAP_THRESHOLD_=1048576``: glibc then serves every block of 1 MB or more by its own
mapping and returns it when freed, so the peak is what the program holds. With glibc's default (a threshold that
grows as blocks are freed, ``--default-malloc``) larger blocks come from the heap too, which the calibration trims
only after each sequence, so the streamed peak is higher. Rows are appended to ``benchmarks/results/streaming.csv``.

Usage::

    python benchmarks/bench_streaming.py
    python benchmarks/bench_streaming.py --windows 8 --length 128    # quicker
    python benchmarks/bench_streaming.py --default-malloc            # glibc's own threshold
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from structprune import bench

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("memory", "stream")
MMAP_THRESHOLD = 1 << 20


def one(mode: str, windows: int, length: int, threads: int, batch: int, shard_mb: float) -> dict:
    """The child process: score and compact the model one way; its memory, time and digests."""
    import tempfile

    from structprune.budget import Budget
    from structprune.compaction import compact, compact_to_folder, save
    from structprune.data.lm import load_text
    from structprune.gguf import gguf_folder, smollm2_gguf
    from structprune.likelihood import text_windows
    from structprune.loading import load_model, load_tokenizer
    from structprune.methods import get_method
    from structprune.streaming import release_freed_memory, streamed_model

    def settle() -> float:
        """Resident MB after :func:`warm_up`, with the garbage of what came before collected and the C heap's free
        pages returned, the peak reset there: the base the growth is measured from."""
        warm_up()
        gc.collect()
        release_freed_memory()
        bench.reset_peak_memory()
        return bench.memory_mb()

    torch.set_num_threads(threads)
    folder = gguf_folder(smollm2_gguf())
    tokenizer = load_tokenizer(folder)
    data = text_windows(tokenizer, load_text("wikitext2", "validation"), length, windows, seed=0)
    prune = get_method("flap")
    from transformers import AutoModelForCausalLM  # noqa: F401  (both modes import it; not part of the growth)

    base = settle()
    model = streamed_model(folder) if mode == "stream" else load_model(str(folder), causal=True)
    start = time.perf_counter()
    result = prune(model, data, Budget(0.3), batch_size=batch, max_examples=None)
    seconds = time.perf_counter() - start
    digest = hashlib.sha256()
    for name in sorted(result.masks.masks):
        digest.update(result.masks.masks[name].numpy().tobytes())
    for name in sorted(result.masks.shifts):
        digest.update(result.masks.shifts[name].round(decimals=4).numpy().tobytes())
    row = {"mode": mode, "base_mb": round(base, 1), "peak_mb": round(bench.memory_mb("VmHWM"), 1),
           "seconds": round(seconds, 1), "masks_sha256": digest.hexdigest()[:16],
           "param_sparsity": round(result.log["summary"]["param_sparsity"], 4)}
    with tempfile.TemporaryDirectory() as tmp:
        compact_base = settle()
        start = time.perf_counter()
        if mode == "stream":
            compact_to_folder(model, result.masks, Path(tmp) / "out", tokenizer, max_shard_mb=shard_mb)
        else:
            save(compact(model, result.masks), Path(tmp) / "out", tokenizer, max_shard_mb=shard_mb)
        row |= {"compact_seconds": round(time.perf_counter() - start, 1),
                "compact_growth_mb": round(bench.memory_mb("VmHWM") - compact_base, 1),
                "compact_sha256": _weights_digest(Path(tmp) / "out")}
    return row


def warm_up() -> None:
    """Call torch's CPU math once at toy sizes (a GEMM, the attention kernel, a float64 reduction): each first call
    keeps a few MB of workspace and code for the process's life whatever the sizes (about 8 MB in all here), which
    belongs to the process's base, not to the calibration's growth."""
    from structprune import ops

    x = torch.randn(8, 32)
    torch.nn.functional.linear(x, x).double().pow(2).sum(0)
    q = torch.randn(1, 2, 8, 16)
    ops.masked_attention(q, q, q, None, torch.ones(1, 8, dtype=torch.bool), True)


def _weights_digest(folder: Path) -> str:
    from structprune.streaming import WeightSource

    source, digest = WeightSource(folder), hashlib.sha256()
    for name in sorted(source.files):
        digest.update(name.encode() + source[name].numpy().tobytes())
    return digest.hexdigest()[:16]


def sizes(windows: int, length: int, batch: int) -> dict:
    """MB of all weights, one layer, the embeddings and the carried activations of SmolLM2 at this calibration."""
    from structprune.gguf import gguf_folder, smollm2_gguf
    from structprune.streaming import streamed_model

    model = streamed_model(gguf_folder(smollm2_gguf()))
    mb = lambda module: sum(p.numel() for p in module.parameters()) * 4 / 2**20  # noqa: E731
    D, H = model.spec["hidden_size"], model.layers[0].attn.heads
    stream = windows * length * D * 4  # the residual streams of every sequence
    masks = windows * length * 8  # and their attention masks (int64)
    return {"batch_size": batch, "weights_mb": round(mb(model), 1), "layer_mb": round(mb(model.layers[0]), 1),
            "embeddings_mb": round(mb(model.embeddings), 1), "activations_mb": round((stream + masks) / 2**20, 1),
            "scores_mb": round(batch * H * length * length * 4 / 2**20, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=bench.CPU_THREADS)
    parser.add_argument("--max-shard-mb", type=float, default=64.0, help="shard size of the compact folders")
    parser.add_argument("--default-malloc", action="store_true", help="leave glibc's mmap threshold as it is")
    parser.add_argument("--out", type=Path, default=RESULTS / "streaming.csv")
    parser.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._one:
        print(json.dumps(one(args._one, args.windows, args.length, args.threads, args.batch_size, args.max_shard_mb)),
              flush=True)
        return 0
    common = {"windows": args.windows, "length": args.length, "threads": args.threads, "max_shard_mb": args.max_shard_mb,
              "malloc_mmap_threshold": "glibc default" if args.default_malloc else MMAP_THRESHOLD} | sizes(
        args.windows, args.length, args.batch_size)
    rows = []
    for mode in MODES:
        command = [sys.executable, str(Path(__file__).resolve()), "--_one", mode, "--windows", str(args.windows),
                   "--length", str(args.length), "--threads", str(args.threads), "--batch-size", str(args.batch_size),
                   "--max-shard-mb", str(args.max_shard_mb)]
        env = os.environ | ({} if args.default_malloc else {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)})
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True, env=env)
        rows.append(bench.machine_info() | common | json.loads(done.stdout.strip().splitlines()[-1]))
    for row in rows:
        row["growth_mb"] = round(row["peak_mb"] - row["base_mb"], 1)
        row["growth_per_layer_plus_activations"] = round(row["growth_mb"] / (row["layer_mb"] + row["activations_mb"]),
                                                         2)
    bench.append_csv(args.out, rows)
    print(f"weights {common['weights_mb']} MB, one layer {common['layer_mb']} MB, embeddings "
          f"{common['embeddings_mb']} MB, carried activations {common['activations_mb']} MB, one batch's attention "
          f"scores {common['scores_mb']} MB")
    print("| mode | base MB | peak MB | growth MB | growth / (layer + activations) | seconds | masks | compact growth MB "
          "| compact seconds | compact weights |")
    print("|---|---:|---:|---:|---:|---:|---|---:|---:|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['base_mb']} | {r['peak_mb']} | {r['growth_mb']} | "
              f"{r['growth_per_layer_plus_activations']} | {r['seconds']} | {r['masks_sha256']} | "
              f"{r['compact_growth_mb']} | {r['compact_seconds']} | {r['compact_sha256']} |")
    same = len({r["masks_sha256"] for r in rows}) == 1 and len({r["compact_sha256"] for r in rows}) == 1
    print(f"masks, shifts and compact weights identical: {same}; rows appended to {args.out}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
