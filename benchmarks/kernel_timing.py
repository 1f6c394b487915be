"""What the kernel benchmarks share: forward / backward / forward+backward callables, timed on CPU or CUDA.

``forward`` runs with autograd recording (as in training), ``backward`` re-runs the backward pass
of one recorded forward (``retain_graph``), ``forward+backward`` does both. On the CPU the
callables of one configuration are timed in alternating turns with 2 threads
(:func:`structprune.bench.time_interleaved`); on CUDA with CUDA events
(:func:`structprune.bench.time_cuda`). Every figure is a median.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from structprune import bench

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("fwd", "bwd", "fwd+bwd")
CPU_TIMING = {"warmup": 2, "repeats": 5, "min_time": 0.4, "max_repeats": 200, "turn_time": 0.1, "settle": 0.0}


def mode_callables(run: Callable[[], torch.Tensor], leaves: Sequence[torch.Tensor]) -> dict[str, Callable[[], object]]:
    """The three timed callables of an op: ``run()`` computes its output from ``leaves``."""
    out = run()
    grad_out = torch.randn_like(out)

    def backward() -> object:
        return torch.autograd.grad(out, leaves, grad_out, retain_graph=True)

    def forward_backward() -> object:
        return torch.autograd.grad(run(), leaves, grad_out)

    return {"fwd": run, "bwd": backward, "fwd+bwd": forward_backward}


def time_all(fns: Mapping[str, Callable[[], object]], device: str) -> dict[str, float]:
    """Median milliseconds of each callable, timed side by side on ``device``."""
    if device == "cuda":
        return bench.time_cuda(fns)
    with bench.torch_threads(bench.CPU_THREADS):
        stats = bench.time_interleaved(fns, **CPU_TIMING)
    return {name: s.median_ms for name, s in stats.items()}


def dead_gate(units: int, dead_fraction: float, device: str, seed: int = 0) -> torch.Tensor:
    """A gate over ``units`` with ``round(units * dead_fraction)`` exact zeros at seeded random places."""
    g = torch.Generator().manual_seed(seed)
    gate = torch.rand(units, generator=g) * 0.5 + 0.5
    gate[torch.randperm(units, generator=g)[: round(units * dead_fraction)]] = 0.0
    return gate.to(device)


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def add_device_options(parser: argparse.ArgumentParser) -> None:
    """``--device`` and ``--dtype``, shared by the kernel benchmarks."""
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default: fp32 on CPU, bf16 on CUDA")


def dtype_of(args: argparse.Namespace) -> tuple[str, torch.dtype]:
    """The benchmark's dtype (name, torch dtype) from ``--dtype`` or the device's default."""
    name = args.dtype or ("fp32" if args.device == "cpu" else "bf16")
    return name, DTYPES[name]


def prepare(device: str) -> dict[str, object]:
    """Pin CPU threads (CPU runs) and return the machine description for the CSV rows."""
    if device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available here")
    else:
        bench.pin_cpus(bench.CPU_THREADS)
        os.environ.setdefault("OMP_NUM_THREADS", str(bench.CPU_THREADS))
    return bench.machine_info()


def write_rows(path: Path, rows: list[dict[str, object]]) -> None:
    bench.append_csv(path, rows)
    print(f"\nappended {len(rows)} rows to {path}")
