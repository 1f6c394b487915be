"""Gated FFN: structprune's kernels vs the dense FFN, at 0/25/50/75% dead neurons.

CPU (``--device cpu``, 2 pinned threads, fp32): the C++ op ``structprune._C``; CUDA
(``--device cuda``, bf16 by default): the Triton op. Both are compared side by side with the
dense FFN in plain torch (every neuron, no gate: the time a pruning run starts from) and with
eager torch multiplying the hidden layer by the gate (the reference). Rows give the median time
of forward, backward and forward+backward, the ratio to the dense FFN, and TFLOP/s over alive
neurons (forward ``2*tokens*D*F_alive`` per projection, backward 2x forward).

Usage::

    python benchmarks/bench_ffn.py                  # CPU grid (~3 min on 2 idle cores)
    python benchmarks/bench_ffn.py --device cuda    # GPU grid
    python benchmarks/bench_ffn.py --quick          # one small shape, not written to the CSV
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch
from kernel_timing import (
    MODES,
    RESULTS,
    add_device_options,
    dead_gate,
    dtype_of,
    mode_callables,
    prepare,
    time_all,
    write_rows,
)

from structprune import ops
from structprune.ops import reference

DEAD = (0.0, 0.25, 0.5, 0.75)
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.0, "fwd+bwd": 3.0}
BASELINE = "dense"


def shapes(device: str, quick: bool) -> list[tuple[int, int, int, str, bool]]:
    """(tokens, hidden, ffn, activation, swiglu): MiniLM and BERT-base FFNs, and a Llama-style SwiGLU."""
    if quick:
        return [(1024, 384, 1536, "gelu", False)]
    if device == "cpu":
        return [(1024, 384, 1536, "gelu", False), (1024, 768, 3072, "gelu", False), (1024, 512, 1376, "silu", True)]
    return [(16384, 768, 3072, "gelu", False), (16384, 4096, 11008, "silu", True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_options(parser)
    parser.add_argument("--quick", action="store_true", help="one small shape; nothing written")
    parser.add_argument("--csv", default=str(RESULTS / "ffn.csv"))
    args = parser.parse_args()
    machine = prepare(args.device)
    dtype_name, dtype = dtype_of(args)
    kernel = "cpp" if args.device == "cpu" else "triton"
    rows: list[dict[str, object]] = []
    print(f"gated FFN, {args.device} ({machine['gpu'] or machine['cpu']}), {dtype_name}; "
          f"ms (ratio to the dense FFN), TFLOP/s over alive neurons")
    for tokens, hidden, n_ff, activation, swiglu in shapes(args.device, args.quick):
        g = torch.Generator().manual_seed(0)

        def param(*shape: int) -> torch.Tensor:
            return (torch.randn(*shape, generator=g) * shape[-1] ** -0.5).to(args.device, dtype).requires_grad_()

        x = torch.randn(tokens, hidden, generator=g).to(args.device, dtype).requires_grad_()
        w_up, w_down = param(n_ff, hidden), param(hidden, n_ff)
        b_up, b_down = (None, None) if swiglu else (param(n_ff), param(hidden))
        w_gate = param(n_ff, hidden) if swiglu else None
        leaves = [t for t in (x, w_up, b_up, w_down, b_down, w_gate) if t is not None]
        for dead in DEAD:
            gate = dead_gate(n_ff, dead, args.device).to(dtype)
            alive = int((gate != 0).sum())
            fns: dict[str, Callable[[], torch.Tensor]] = {
                kernel: lambda gate=gate: ops.gated_ffn(x, w_up, b_up, w_down, b_down, gate, activation, w_gate),
                BASELINE: lambda: reference.gated_ffn(x, w_up, b_up, w_down, b_down, None, activation, w_gate),
                "eager+gate": lambda gate=gate: reference.gated_ffn(x, w_up, b_up, w_down, b_down, gate, activation,
                                                                    w_gate),
            }
            timed = {f"{name}|{mode}": fn for name, run in fns.items()
                     for mode, fn in mode_callables(run, leaves).items()}
            ms = time_all(timed, args.device)
            fwd_flops = 2 * tokens * hidden * alive * (3 if swiglu else 2)
            print(f"tokens {tokens} D{hidden} F{n_ff} {activation}{' swiglu' if swiglu else ''} dead {dead:.0%}:")
            for mode in MODES:
                base = ms[f"{BASELINE}|{mode}"]
                cells = []
                for name in fns:
                    value = ms[f"{name}|{mode}"]
                    flops = (fwd_flops if name != BASELINE else fwd_flops * n_ff / max(alive, 1))
                    tflops = flops * FLOP_FACTOR[mode] / (value * 1e-3) / 1e12
                    rows.append({**machine, "device": args.device, "dtype": dtype_name, "tokens": tokens,
                                 "hidden": hidden, "ffn": n_ff, "activation": activation, "swiglu": swiglu,
                                 "dead_fraction": dead, "alive_neurons": alive, "variant": name, "mode": mode,
                                 "ms": round(value, 4), "ratio_to_dense": round(value / base, 4),
                                 "tflops_alive": round(tflops, 2)})
                    cells.append(f"{name} {value:.2f} ({value / base:.2f}x, {tflops:.1f})")
                print(f"   {mode:8s} " + " | ".join(cells))
    if not args.quick:
        write_rows(Path(args.csv), rows)


if __name__ == "__main__":
    main()
