"""Gradient scoring over several processes (``torchrun``): each process takes every world-th calibration batch,
and the per-batch results are gathered back into batch order, so every process ends with exactly the scores one
process would compute, from its share of the passes.

Without a process group (a plain run) the functions are the identity. ``torchrun --nproc-per-node N -m
structprune prune ...`` joins the group (gloo on CPU, NCCL on CUDA) through :func:`structprune.train.init_distributed`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import torch.distributed as dist

from structprune.train import init_distributed

T = TypeVar("T")


def my_share(items: Sequence[T]) -> list[tuple[int, T]]:
    """``(index, item)`` of the items this process handles: those whose index is its rank modulo the world size."""
    rank, world = init_distributed()
    return [(j, item) for j, item in enumerate(items) if j % world == rank]


def gathered(results: dict[int, T], count: int) -> list[T]:
    """Every process's ``index -> result`` merged, in index order (``count`` results in all)."""
    _, world = init_distributed()
    if world > 1:
        parts: list[dict[int, T] | None] = [None] * world
        dist.all_gather_object(parts, results)
        results = {j: value for part in parts for j, value in part.items()}
    if sorted(results) != list(range(count)):
        raise RuntimeError(f"scoring gathered results for batches {sorted(results)[:8]}..., expected 0..{count - 1}: "
                           "the processes disagree on the calibration batches (same data and seed on every one?)")
    return [results[j] for j in range(count)]


def is_writer() -> bool:
    """Whether this process writes the outputs (rank 0, or a plain run)."""
    return init_distributed()[0] == 0
