"""Masked attention: structprune's kernels vs SDPA-plus-gate, at 0/25/50/75% dead heads.

CPU (``--device cpu``, 2 pinned threads, fp32): the C++ op ``structprune._C`` vs
``scaled_dot_product_attention`` with the gate multiplied after it, and vs eager torch (the
reference). CUDA (``--device cuda``, bf16 by default): the Triton kernel vs SDPA with the flash
backend plus the gate, and vs compiled FlexAttention plus the gate. The baselines compute every
head whatever its gate, so their time does not depend on the dead fraction; they are timed at
each dead fraction anyway, side by side with the kernel.

Each row has the median time of forward, backward and forward+backward, the ratio to the
SDPA-plus-gate baseline, and TFLOP/s counted over alive heads (forward ``4*B*H_alive*S^2*D``,
halved when causal; backward 2.5x forward).

Usage::

    python benchmarks/bench_attention.py                  # CPU grid (~4 min on 2 idle cores)
    python benchmarks/bench_attention.py --device cuda    # GPU grid, seq 1k-8k, head dim 64 and 128
    python benchmarks/bench_attention.py --quick          # one small shape, not written to the CSV
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
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
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
BASELINE = {"cpu": "sdpa+gate", "cuda": "sdpa-flash+gate"}
FLEX_SEQS = (1024, 4096)


def cpu_shapes(quick: bool) -> list[tuple[int, int, int, int]]:
    """(batch, heads, seq, head_dim): the issue's CPU targets, batch 8 and 12 heads."""
    if quick:
        return [(8, 12, 128, 32)]
    return [(8, 12, s, d) for d in (32, 64) for s in (128, 256, 512)]


def cuda_shapes(quick: bool) -> list[tuple[int, int, int, int]]:
    """(batch, heads, seq, head_dim) with 16k tokens per batch and 2048 channels."""
    if quick:
        return [(4, 16, 1024, 128)]
    return [(16384 // s, 2048 // d, s, d) for d in (64, 128) for s in (1024, 2048, 4096, 8192)]


def _gated(attn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def run(q, k, v, gate, causal):
        return attn(q, k, v, causal) * gate[None, :, None, None].to(q.dtype)

    return run


def variants(device: str) -> dict[str, Callable[..., torch.Tensor]]:
    """name -> f(q, k, v, gate, causal)."""
    if device == "cpu":
        return {
            "cpp": lambda q, k, v, gate, causal: ops.masked_attention(q, k, v, gate, causal=causal),
            "sdpa+gate": _gated(lambda q, k, v, causal: F.scaled_dot_product_attention(q, k, v, is_causal=causal)),
            "eager": lambda q, k, v, gate, causal: reference.masked_attention(q, k, v, gate, causal=causal),
        }
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import flex_attention

    from structprune.kernels import masked_attention as triton_attention

    def flash(q, k, v, causal):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    # Backward is timed with retain_graph, which compiled graphs with donated buffers refuse.
    torch._functorch.config.donated_buffer = False
    flex = torch.compile(flex_attention)

    def flex_attn(q, k, v, causal):
        if causal:
            raise NotImplementedError("causal FlexAttention needs a block mask; run without --causal")
        if q.shape[2] not in FLEX_SEQS:
            raise NotImplementedError(f"FlexAttention is compiled for seq {FLEX_SEQS} only, to bound compile time")
        return flex(q, k, v)

    return {
        "triton": lambda q, k, v, gate, causal: triton_attention.masked_attention(q, k, v, gate, causal=causal),
        "sdpa-flash+gate": _gated(flash),
        "flex+gate": _gated(flex_attn),
    }


def relative_error(attn: Callable[..., torch.Tensor], q, k, v, gate, causal: bool) -> float:
    """Largest ||kernel - ref|| / ||ref|| over the output and the q, k, v gradients, against
    the fp32 reference on the same inputs (the timed configuration's correctness check), on
    the first batch element and 8 heads, so that the reference's S x S scores fit in memory."""
    q, k, v = (t.detach()[:1, :8].requires_grad_() for t in (q, k, v))
    gate = gate[:8]
    grad_out = torch.randn_like(q)
    got = [attn(q, k, v, gate, causal)]
    got += torch.autograd.grad(got[0], [q, k, v], grad_out)
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    want = [reference.masked_attention(*leaves, gate, causal=causal)]
    want += torch.autograd.grad(want[0], leaves, grad_out.float())
    return max(((a.float() - b).norm() / b.norm().clamp_min(1e-30)).item() for a, b in zip(got, want))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_options(parser)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--head-dims", type=int, nargs="+", default=None, help="only these head dims")
    parser.add_argument("--seqs", type=int, nargs="+", default=None, help="only these sequence lengths")
    parser.add_argument("--quick", action="store_true", help="one small shape; nothing written")
    parser.add_argument("--csv", default=str(RESULTS / "attention.csv"))
    args = parser.parse_args()
    machine = prepare(args.device)
    dtype_name, dtype = dtype_of(args)
    fns = variants(args.device)
    baseline = BASELINE[args.device]
    shapes = cpu_shapes(args.quick) if args.device == "cpu" else cuda_shapes(args.quick)
    shapes = [shape for shape in shapes if (args.head_dims is None or shape[3] in args.head_dims)
              and (args.seqs is None or shape[2] in args.seqs)]
    rows: list[dict[str, object]] = []
    print(f"masked attention, {args.device} ({machine['gpu'] or machine['cpu']}), {dtype_name}, "
          f"causal={args.causal}; ms (ratio to {baseline}), TFLOP/s over alive heads")
    for batch, heads, seq, head_dim in shapes:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(batch, heads, seq, head_dim, generator=g).to(args.device, dtype).requires_grad_()
                   for _ in range(3))
        for dead in DEAD:
            gate = dead_gate(heads, dead, args.device)
            alive = int((gate != 0).sum())
            timed: dict[str, Callable[[], object]] = {}
            for name, attn in fns.items():
                try:
                    calls = mode_callables(lambda attn=attn: attn(q, k, v, gate, args.causal), [q, k, v])
                except (NotImplementedError, RuntimeError) as exc:  # a baseline that cannot run this case
                    print(f"  skipped {name}: {exc}")
                    continue
                timed.update({f"{name}|{mode}": fn for mode, fn in calls.items()})
            ms = time_all(timed, args.device)
            kernel = next(iter(fns))
            error = relative_error(fns[kernel], q, k, v, gate, args.causal)
            fwd_flops = 4 * batch * alive * seq * seq * head_dim * (0.5 if args.causal else 1.0)
            cells = []
            for key, value in ms.items():
                name, mode = key.split("|")
                base = ms.get(f"{baseline}|{mode}")
                tflops = fwd_flops * FLOP_FACTOR[mode] / (value * 1e-3) / 1e12
                rows.append({**machine, "device": args.device, "dtype": dtype_name, "batch": batch, "heads": heads,
                             "seq": seq, "head_dim": head_dim, "causal": args.causal, "dead_fraction": dead,
                             "alive_heads": alive, "variant": name, "mode": mode, "ms": round(value, 4),
                             "ratio_to_baseline": round(value / base, 4) if base else "",
                             "tflops_alive": round(tflops, 2),
                             "rel_error_vs_fp32": f"{error:.2e}" if name == kernel else ""})
                cells.append(f"{name} {mode} {value:.2f} ({value / base:.2f}x, {tflops:.1f})" if base else
                             f"{name} {mode} {value:.2f}")
            print(f"B{batch} H{heads} S{seq} D{head_dim} dead {dead:.0%} ({kernel} error vs fp32 {error:.1e}):")
            for mode in MODES:
                print("   " + " | ".join(c for c in cells if f" {mode} " in c))
        del q, k, v
    if not args.quick:
        write_rows(Path(args.csv), rows)


if __name__ == "__main__":
    main()
