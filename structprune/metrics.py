"""Task metrics: accuracy, binary F1, Matthews correlation, Pearson and Spearman correlation.

Every metric is returned in percent (0-100; -100..100 for the correlations and MCC) so that
tables and logs read like the GLUE leaderboard. :func:`compute_metrics` picks the metrics a task
reports (GLUE conventions, recorded in :attr:`structprune.data.TaskSpec.metrics`): CoLA -> MCC;
MRPC, QQP -> accuracy and F1; STS-B, SICK relatedness and other regression tasks -> Pearson and
Spearman; every other classification task -> accuracy.

Inputs may be lists, NumPy arrays or tensors. Classification predictions are class ids, or logits
of shape ``(n, num_classes)`` (the argmax is taken). Regression predictions may have shape ``(n,)``
or ``(n, 1)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import numpy as np
from scipy import stats

from structprune.data import KIND_METRICS, KINDS, TaskSpec, get_task


def _array(values: Any, what: str) -> np.ndarray:
    """``values`` as a NumPy array (tensors are detached and moved to the CPU)."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    array = np.asarray(values)
    if array.size == 0:
        raise ValueError(f"{what} are empty: a metric needs at least one example")
    return array


def _class_ids(predictions: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Integer class ids of equal length from class-id or logit predictions and labels."""
    pred = _array(predictions, "predictions")
    gold = _array(labels, "labels")
    if pred.ndim == 2:
        pred = pred.argmax(axis=1)
    for array, what in ((pred, "predictions"), (gold, "labels")):
        if array.ndim != 1:
            raise ValueError(
                f"{what} must be class ids of shape (n,) (or logits (n, num_classes) for "
                f"predictions), got shape {array.shape}"
            )
        if not np.all(np.mod(array, 1) == 0):
            raise ValueError(
                f"{what} must be integer class ids, got non-integer values such as "
                f"{array[np.mod(array, 1) != 0][0]!r}; pass argmax class ids or 2-D logits"
            )
    if len(pred) != len(gold):
        raise ValueError(f"{len(pred)} predictions but {len(gold)} labels")
    return pred.astype(np.int64), gold.astype(np.int64)


def _scores(predictions: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Float vectors of equal length (at least 2) for the correlation metrics."""
    pred = _array(predictions, "predictions").astype(np.float64)
    gold = _array(labels, "labels").astype(np.float64)
    if pred.ndim == 2 and pred.shape[1] == 1:
        pred = pred[:, 0]
    if pred.ndim != 1 or gold.ndim != 1:
        raise ValueError(
            f"regression predictions and labels must have shape (n,) or (n, 1), got "
            f"{pred.shape} and {gold.shape}"
        )
    if len(pred) != len(gold):
        raise ValueError(f"{len(pred)} predictions but {len(gold)} labels")
    if len(pred) < 2:
        raise ValueError("a correlation needs at least 2 examples")
    if not (np.isfinite(pred).all() and np.isfinite(gold).all()):
        raise ValueError("predictions or labels contain NaN or infinity (did training diverge?)")
    return pred, gold


def accuracy(predictions: Any, labels: Any) -> float:
    """Percentage of examples whose predicted class equals the label."""
    pred, gold = _class_ids(predictions, labels)
    return float(np.mean(pred == gold) * 100)


def f1(predictions: Any, labels: Any) -> float:
    """Binary F1 of the positive class 1, in percent (0 when there is no true positive).

    Labels and predictions must be 0/1: F1 here is the MRPC/QQP metric, not a multi-class average.
    """
    pred, gold = _class_ids(predictions, labels)
    outside = set(np.unique(np.concatenate([pred, gold])).tolist()) - {0, 1}
    if outside:
        raise ValueError(f"binary F1 needs classes 0/1, found {sorted(outside)}")
    tp = int(np.sum((pred == 1) & (gold == 1)))
    fp = int(np.sum((pred == 1) & (gold == 0)))
    fn = int(np.sum((pred == 0) & (gold == 1)))
    return 200.0 * tp / (2 * tp + fp + fn) if tp else 0.0


def matthews_corrcoef(predictions: Any, labels: Any) -> float:
    """Matthews correlation coefficient in percent (-100..100), for any number of classes.

    Uses the multi-class form (Gorodkin 2004) on the confusion matrix; it is 0 when either the
    predictions or the labels hold a single class (the correlation is undefined there), as in
    scikit-learn.
    """
    pred, gold = _class_ids(predictions, labels)
    classes = np.union1d(pred, gold)
    confusion = np.zeros((len(classes), len(classes)), dtype=np.float64)
    np.add.at(confusion, (np.searchsorted(classes, gold), np.searchsorted(classes, pred)), 1)
    n = confusion.sum()
    correct = np.trace(confusion)
    predicted = confusion.sum(axis=0)
    true = confusion.sum(axis=1)
    numerator = correct * n - predicted @ true
    denominator = np.sqrt((n**2 - predicted @ predicted) * (n**2 - true @ true))
    return float(100 * numerator / denominator) if denominator else 0.0


def pearson(predictions: Any, labels: Any) -> float:
    """Pearson correlation in percent; 0 when either side is constant (undefined correlation)."""
    pred, gold = _scores(predictions, labels)
    if np.ptp(pred) == 0 or np.ptp(gold) == 0:
        return 0.0
    return float(stats.pearsonr(pred, gold)[0] * 100)


def spearman(predictions: Any, labels: Any) -> float:
    """Spearman rank correlation in percent; 0 when either side is constant."""
    pred, gold = _scores(predictions, labels)
    if np.ptp(pred) == 0 or np.ptp(gold) == 0:
        return 0.0
    return float(stats.spearmanr(pred, gold)[0] * 100)


METRICS: Mapping[str, Callable[[Any, Any], float]] = MappingProxyType(
    {
        "accuracy": accuracy,
        "f1": f1,
        "mcc": matthews_corrcoef,
        "pearson": pearson,
        "spearman": spearman,
    }
)
"""Every metric by the name used in :attr:`TaskSpec.metrics`."""


def compute_metrics(
    task_or_kind: str | TaskSpec, predictions: Any, labels: Any
) -> dict[str, float]:
    """The metrics of a task, in percent, as ``{name: value}``.

    ``task_or_kind`` is a :class:`TaskSpec`, a built-in task name (``"cola"``, ``"stsb"``, ...) or
    a kind (``"classification"`` -> accuracy, ``"regression"`` -> Pearson and Spearman).
    """
    if isinstance(task_or_kind, TaskSpec):
        names = task_or_kind.metrics
    elif task_or_kind in KINDS:
        names = KIND_METRICS[task_or_kind]
    else:
        names = get_task(task_or_kind).metrics
    return {name: METRICS[name](predictions, labels) for name in names}


def paired_bootstrap(task_or_kind: str | TaskSpec, predictions: Any, baseline: Any, labels: Any,
                     metric: str | None = None, resamples: int = 1000, seed: int = 0) -> float:
    """How sure one can be that ``predictions`` beat ``baseline`` on data like ``labels``, in [0, 1].

    The paired bootstrap (Koehn 2004): draw ``resamples`` resamples of the rows with replacement, the same rows
    for both, and count those in which ``predictions`` score higher than ``baseline`` on ``metric`` (default: the
    task's main metric; a kind's first metric), ties counting half. Near 0.5 the two are not told apart by this
    data; a score gap of a point on 200 rows often is not.
    """
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    task = task_or_kind if isinstance(task_or_kind, TaskSpec) else (
        None if task_or_kind in KINDS else get_task(task_or_kind))
    name = metric or (task.main_metric if task is not None else KIND_METRICS[task_or_kind][0])
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; choose from {', '.join(METRICS)}")
    ours, theirs, truth = _array(predictions, "predictions"), _array(baseline, "baseline"), _array(labels, "labels")
    if not len(ours) == len(theirs) == len(truth) > 0:
        raise ValueError(f"predictions, baseline and labels need the same number of rows (> 0), got {len(ours)}, "
                         f"{len(theirs)} and {len(truth)}")
    rows = np.random.default_rng(seed).integers(0, len(truth), size=(resamples, len(truth)))
    score = METRICS[name]
    gaps = np.array([score(ours[r], truth[r]) - score(theirs[r], truth[r]) for r in rows])
    return float(np.mean(gaps > 0) + 0.5 * np.mean(gaps == 0))
