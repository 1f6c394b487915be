"""Task types: the task kinds, :class:`TaskSpec`, :class:`TaskData`, and :class:`Row`.

A task *kind* says what a label is and which metrics a task reports by default. Every kind is one
entry of :data:`TASK_KINDS`; code whose behaviour depends on the kind reads that entry
(``TASK_KINDS[kind].classes``, ``.metrics``).

:class:`Row` is one example as a file reader returns it, its label still a string;
:func:`build_task_data` parses the labels for the task's kind and makes the :class:`TaskData`.
Class ids follow the order of ``TaskSpec.label_names``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import NamedTuple

import numpy as np

METRIC_NAMES = ("accuracy", "f1", "mcc", "pearson", "spearman")


@dataclass(frozen=True)
class TaskKind:
    """What the labels of a task of this kind are, and what it reports.

    ``classes``: labels are class ids into ``TaskSpec.label_names`` (at least 2 names); otherwise
    they are float scores and the task has no label names. ``metrics``: reported unless a spec
    names others; the first is the main one.
    """

    name: str
    classes: bool
    metrics: tuple[str, ...]


TASK_KINDS: Mapping[str, TaskKind] = MappingProxyType(
    {
        kind.name: kind
        for kind in (
            TaskKind("classification", classes=True, metrics=("accuracy",)),
            TaskKind("regression", classes=False, metrics=("pearson", "spearman")),
        )
    }
)
"""Every task kind by name."""

KINDS = tuple(TASK_KINDS)
KIND_METRICS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {name: kind.metrics for name, kind in TASK_KINDS.items()}
)
"""Metrics reported for a task of each kind unless its spec names others."""


@dataclass(frozen=True)
class TaskSpec:
    """What a task is: its kind, labels, input shape, metrics and where its data comes from.

    ``metrics`` are the metrics :func:`structprune.metrics.compute_metrics` reports for the task
    (GLUE conventions); ``main_metric`` is the one to select models by. ``source`` is the dataset
    folder under the data directory (or ``VADER_SOURCE``); ``splits`` are the splits
    ``load_task`` accepts.
    """

    name: str
    kind: str
    label_names: tuple[str, ...]
    pair: bool
    metrics: tuple[str, ...]
    main_metric: str
    splits: tuple[str, ...]
    source: str
    description: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"task {self.name!r}: kind {self.kind!r} is not one of {KINDS}")
        if not TASK_KINDS[self.kind].classes and self.label_names:
            raise ValueError(f"task {self.name!r}: a {self.kind} task has no label_names")
        if TASK_KINDS[self.kind].classes and len(self.label_names) < 2:
            raise ValueError(
                f"task {self.name!r}: a {self.kind} task needs at least 2 label names, "
                f"got {self.label_names}"
            )
        if len(set(self.label_names)) != len(self.label_names):
            raise ValueError(f"task {self.name!r}: duplicate label names in {self.label_names}")
        unknown = [m for m in self.metrics if m not in METRIC_NAMES]
        if not self.metrics or unknown:
            raise ValueError(
                f"task {self.name!r}: metrics {self.metrics} must be a non-empty subset of "
                f"{METRIC_NAMES}"
            )
        if self.main_metric not in self.metrics:
            raise ValueError(
                f"task {self.name!r}: main_metric {self.main_metric!r} is not in {self.metrics}"
            )
        if not self.splits:
            raise ValueError(f"task {self.name!r}: no splits")

    @property
    def num_labels(self) -> int:
        """Output size of a model head for this task: the class count, or 1 for regression."""
        return len(self.label_names) if TASK_KINDS[self.kind].classes else 1


@dataclass(repr=False)
class TaskData:
    """One split of one task: parallel lists of texts and labels.

    ``text_b`` holds the second sentence of each pair for pair tasks and is ``None`` otherwise.
    ``labels`` are class ids (indices into ``task.label_names``) for classification, floats for
    regression, or ``None`` for unlabelled text (see ``load_file``).
    """

    task: TaskSpec
    split: str
    text_a: list[str]
    text_b: list[str] | None
    labels: list[int] | list[float] | None

    def __post_init__(self) -> None:
        n = len(self.text_a)
        if self.task.pair != (self.text_b is not None):
            raise ValueError(
                f"{self.task.name}: text_b must be {'a list' if self.task.pair else 'None'} "
                f"because the task is {'a' if self.task.pair else 'not a'} sentence-pair task"
            )
        if self.text_b is not None and len(self.text_b) != n:
            raise ValueError(f"{self.task.name}: {n} text_a but {len(self.text_b)} text_b entries")
        if self.labels is not None and len(self.labels) != n:
            raise ValueError(f"{self.task.name}: {n} texts but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.text_a)

    def __repr__(self) -> str:
        return (
            f"TaskData(task={self.task.name!r}, split={self.split!r}, n={len(self)}, "
            f"pair={self.task.pair}, labelled={self.labels is not None})"
        )

    def select(self, indices: Sequence[int]) -> TaskData:
        """The examples at ``indices``, in that order (repeats allowed, e.g. for bootstrapping)."""
        idx = [int(i) for i in indices]
        bad = [i for i in idx if not 0 <= i < len(self)]
        if bad:
            raise IndexError(
                f"{self.task.name} {self.split}: indices {bad[:5]} are outside 0..{len(self) - 1}"
            )
        return TaskData(
            task=self.task,
            split=self.split,
            text_a=[self.text_a[i] for i in idx],
            text_b=None if self.text_b is None else [self.text_b[i] for i in idx],
            labels=None if self.labels is None else [self.labels[i] for i in idx],
        )

    def subset(self, n: int, seed: int = 0) -> TaskData:
        """``n`` examples drawn at random without replacement, kept in their original order.

        The draw takes the first ``n`` of a permutation seeded with ``seed``, so under one seed a
        smaller subset is contained in a larger one (learning curves add data, never swap it).
        """
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
            raise TypeError(f"subset size must be an integer, got {n!r}")
        if not 1 <= n <= len(self):
            raise ValueError(
                f"cannot take {n} examples from {self.task.name} {self.split}, which has "
                f"{len(self)}; choose a size between 1 and {len(self)}"
            )
        order = np.random.default_rng(seed).permutation(len(self))
        return self.select(sorted(order[:n].tolist()))


class Row(NamedTuple):
    """One example as read from a file, before its label is parsed."""

    text_a: str
    text_b: str | None
    label: str | None
    where: str  # "path:line", for error messages


def float_label(row: Row) -> float:
    """The row's label as a finite float, or an error naming the file and line."""
    try:
        value = float(row.label)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{row.where}: label {row.label!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{row.where}: label {row.label!r} is not a finite number")
    return value


def build_task_data(
    spec: TaskSpec,
    split: str,
    rows: list[Row],
    raw_labels: Mapping[str, int],
    labelled: bool = True,
) -> TaskData:
    """Parse labels (raw string -> class id, or -> float) and build the :class:`TaskData`.

    ``raw_labels`` maps a label as written in the files to its class id (classification kinds).
    """
    if not rows:
        raise ValueError(f"{spec.name} {split}: the data has no examples")
    labels: list[int] | list[float] | None = None
    if labelled:
        for row in rows:
            if not row.label:
                raise ValueError(f"{row.where}: label missing ({spec.name} needs one per example)")
        if TASK_KINDS[spec.kind].classes:
            unknown = next((row for row in rows if row.label not in raw_labels), None)
            if unknown is not None:
                raise ValueError(
                    f"{unknown.where}: label {unknown.label!r} is not one of {list(raw_labels)} "
                    f"(task {spec.name})"
                )
            labels = [raw_labels[row.label] for row in rows]  # type: ignore[index]
        else:
            labels = [float_label(row) for row in rows]
    return TaskData(
        task=spec,
        split=split,
        text_a=[row.text_a for row in rows],
        text_b=[row.text_b or "" for row in rows] if spec.pair else None,
        labels=labels,
    )
