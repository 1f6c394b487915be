"""Seeded random streams of the auxiliary side of the ``transfer`` method.

Each stream is seeded by a stable hash of a key (the same on every machine, process and run), so a resumed
run draws what an uninterrupted one does, and every DDP process draws the same auxiliary data:

* ``(seed, "aux-heads")``: the initialisation of the auxiliary heads;
* ``(seed, "aux-batch", step, micro, source)``: the rows of source ``source`` for micro-batch ``micro`` of
  step ``step``, and their MLM masking;
* ``(seed, "aux-dropout", step, micro, source)``: the dropout of that source's forward, run inside
  :func:`own_dropout`, which gives the global random state back as it was, so the target's dropout draws are
  those of a run without auxiliary data;
* ``(seed, "aux-gates", step, micro)``: the sample of separate-masks' auxiliary gates.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def key_seed(*key: object) -> int:
    """A seed from ``key`` (a stable hash: the same on every machine and run)."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, key)).encode()).digest()[:8], "little") >> 1


def key_generator(*key: object) -> torch.Generator:
    """A CPU generator seeded from ``key``."""
    return torch.Generator().manual_seed(key_seed(*key))


@contextmanager
def own_dropout(device: torch.device, *key: object) -> Iterator[None]:
    """Run the block on a dropout stream seeded from ``key`` and give the global random state back as it was."""
    seed = key_seed(*key)
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(seed)
        for index in cuda:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield
