"""Seeded splits for datasets that come without one, and train-size subsetting.

MR, CR, SUBJ, MPQA, QQP and the VADER corpora come without a split, and AGNEWS's labelled
training sample has no dev part. They are carved with the fixed seed :data:`SPLIT_SEED`, which
does not depend on ``load_task(seed=...)``: each held-out part (dev and test; dev only for AGNEWS,
whose test set is official) gets 10 % of the rows but at least 500, and train gets the rest.
Identical inputs are kept together in one part, so duplicated texts (MPQA has 2,365) never sit on
both sides of a train/test boundary; a part can therefore exceed its target by a few rows. Which
part an input lands in follows a seeded hash of its text, so the split is the same on every
machine and library version. Within a part, rows keep their file order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math

import numpy as np

from structprune.data.readers import Reader
from structprune.data.tasks import Row, TaskData

SPLIT_SEED = 1234
"""Seed of the split carved for datasets without one (fixed, so every run sees the same split)."""
HELD_OUT_FRACTION = 0.1
MIN_HELD_OUT = 500
FILE_HELD_OUT_SHARE = 0.2
"""Share of a user's file held out for scoring when no held-out file is given."""

CARVED_NOTE = (
    f"No official split: seeded split (seed {SPLIT_SEED}), dev and test 10% each but at least "
    f"{MIN_HELD_OUT} rows, train the rest; duplicates kept in one part."
)
"""The sentence task descriptions use for a carved split."""


def carve_indices(keys: list[tuple[str, str | None]], held_out: tuple[str, ...],
                  target: int) -> dict[str, list[int]]:
    """Indices of the ``held_out`` parts (``target`` rows each, identical keys kept together) and ``"train"``.

    Groups of identical inputs are visited in the order of a seeded hash of their text, so the split depends on
    nothing but the data: not on the NumPy version, nor on the order of the rows. Held-out parts are filled in
    turn until each reaches its target; the rest is train.
    """
    groups: dict[tuple[str, str | None], list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)

    def rank(key: tuple[str, str | None]) -> bytes:
        text = f"{SPLIT_SEED}\x00{key[0]}\x00{'' if key[1] is None else key[1]}"
        return hashlib.sha256(text.encode("utf-8")).digest()

    parts: dict[str, list[int]] = {name: [] for name in (*held_out, "train")}
    pending = list(held_out)
    for key in sorted(groups, key=rank):
        part = pending[0] if pending else "train"
        parts[part].extend(groups[key])
        if pending and len(parts[part]) >= target:
            pending.pop(0)
    return {name: sorted(idx) for name, idx in parts.items()}


def carve(rows: list[Row], held_out: tuple[str, ...]) -> dict[str, list[Row]]:
    """Split ``rows`` into the ``held_out`` parts and ``"train"`` (see the module docstring)."""
    target = max(MIN_HELD_OUT, math.ceil(HELD_OUT_FRACTION * len(rows)))
    parts = carve_indices([(row.text_a, row.text_b) for row in rows], held_out, target)
    return {name: [rows[i] for i in idx] for name, idx in parts.items()}


def hold_out(data: TaskData, share: float = FILE_HELD_OUT_SHARE) -> tuple[TaskData, TaskData]:
    """(train, held-out) parts of a user's file: ``share`` of its rows (at least one) carved with
    :data:`SPLIT_SEED`, identical inputs kept together, so a file task is scored on rows it did not train on."""
    if len(data) < 2:
        raise ValueError(f"{data.task.name} has {len(data)} example(s): too few to hold any out; give more rows, "
                         "or held-out rows in their own file (--eval)")
    keys = list(zip(data.text_a, data.text_b if data.text_b is not None else [None] * len(data)))
    parts = carve_indices(keys, ("held-out",), max(1, math.ceil(share * len(data))))
    if not parts["train"]:
        raise ValueError(f"{data.task.name}: every row is the same text, so none can be held out; use --eval")
    train, held = data.select(parts["train"]), data.select(parts["held-out"])
    return train, dataclasses.replace(held, split="held-out")


def carved(pool: Reader, part: str, held_out: tuple[str, ...] = ("dev", "test")) -> Reader:
    """A reader for one part of the seeded split of the rows ``pool`` reads."""
    return lambda folder: carve(pool(folder), held_out)[part]


def carved_splits(pool: Reader) -> dict[str, Reader]:
    """Readers for train, dev and test of the seeded split of the rows ``pool`` reads."""
    return {part: carved(pool, part) for part in ("train", "dev", "test")}


def take_train_size(data: TaskData, train_size: int | None, seed: int) -> TaskData:
    """``data`` itself when ``train_size`` is None, else a seeded subset of that many examples."""
    if train_size is None:
        return data
    if isinstance(train_size, bool) or not isinstance(train_size, (int, np.integer)):
        raise TypeError(f"train_size must be an integer, got {train_size!r}")
    if not 1 <= train_size <= len(data):
        raise ValueError(
            f"train_size={train_size} but {data.task.name} {data.split} has {len(data)} examples; "
            f"choose 1 <= train_size <= {len(data)}"
        )
    return data.subset(train_size, seed)
