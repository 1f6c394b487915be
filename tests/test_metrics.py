"""Tests of structprune.metrics against values computed by hand (all metrics are in percent)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from structprune.data import METRIC_NAMES, get_task
from structprune.metrics import (
    METRICS,
    accuracy,
    compute_metrics,
    f1,
    matthews_corrcoef,
    paired_bootstrap,
    pearson,
    spearman,
)

# pred vs gold below: TP = 2 (idx 0, 4), TN = 1 (idx 2), FP = 1 (idx 1), FN = 1 (idx 3)
PRED = [1, 1, 0, 0, 1]
GOLD = [1, 0, 0, 1, 1]


def test_accuracy() -> None:
    assert accuracy([1, 0, 1, 1], [1, 0, 0, 1]) == 75.0
    assert accuracy(PRED, GOLD) == 60.0
    logits = torch.tensor([[0.1, 0.9], [2.0, -1.0], [0.0, 3.0]])  # argmax: 1, 0, 1
    assert accuracy(logits, torch.tensor([1, 0, 0])) == pytest.approx(200 / 3)


def test_f1_binary_positive_class() -> None:
    # precision 2/3, recall 2/3 -> F1 = 2TP / (2TP + FP + FN) = 4/6
    assert f1(PRED, GOLD) == pytest.approx(400 / 6)
    assert f1([0, 0, 0], [0, 0, 0]) == 0.0  # no positive anywhere
    assert f1([1, 1, 1, 1], [1, 0, 0, 0]) == pytest.approx(40.0)  # P = 1/4, R = 1 -> 2/5
    with pytest.raises(ValueError, match="classes 0/1, found \\[2\\]"):
        f1([0, 2], [0, 1])


def test_matthews_binary_and_degenerate() -> None:
    # (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (2 - 1) / sqrt(3*3*2*2) = 1/6
    assert matthews_corrcoef(PRED, GOLD) == pytest.approx(100 / 6)
    assert matthews_corrcoef([0, 1, 1], [0, 1, 1]) == pytest.approx(100.0)
    assert matthews_corrcoef([1, 0, 0], [0, 1, 1]) == pytest.approx(-100.0)
    assert matthews_corrcoef([1, 1, 1], [0, 1, 1]) == 0.0  # constant prediction: undefined -> 0


def test_matthews_multiclass() -> None:
    # confusion (gold rows, pred cols): [[2,0,0],[0,0,1],[0,0,1]]; c=3, s=4, p=(2,0,2), t=(2,1,1)
    # (c*s - p.t) / sqrt((s^2 - p.p)(s^2 - t.t)) = (12 - 6) / sqrt(8 * 10)
    assert matthews_corrcoef([0, 2, 2, 0], [0, 1, 2, 0]) == pytest.approx(600 / math.sqrt(80))


def test_pearson() -> None:
    # x = (1,2,3), y = (1,2,4): cov-sum 3, |dx| = sqrt(2), |dy| = sqrt(42)/3 -> r = 9 / sqrt(84)
    assert pearson([1, 2, 3], [1, 2, 4]) == pytest.approx(900 / math.sqrt(84))
    assert pearson(np.array([[1.0], [2.0], [3.0]]), [3, 2, 1]) == pytest.approx(-100.0)
    assert pearson([2, 2, 2], [1, 2, 3]) == 0.0  # constant: undefined -> 0


def test_spearman() -> None:
    # ranks differ by d = (0, -1, 1, 0): 1 - 6 * 2 / (4 * (16 - 1)) = 0.8
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(80.0)
    assert spearman([10, 20, 30], [1, 5, 100]) == pytest.approx(100.0)  # monotone, not linear
    assert spearman([1, 1, 1], [1, 2, 3]) == 0.0


def test_compute_metrics_picks_the_task_metrics() -> None:
    assert compute_metrics("cola", PRED, GOLD) == {"mcc": pytest.approx(100 / 6)}
    assert compute_metrics("mrpc", PRED, GOLD) == {
        "accuracy": 60.0,
        "f1": pytest.approx(400 / 6),
    }
    assert set(compute_metrics("qqp", PRED, GOLD)) == {"accuracy", "f1"}
    assert compute_metrics("sst2", PRED, GOLD) == {"accuracy": 60.0}
    assert compute_metrics(get_task("rte"), PRED, GOLD) == {"accuracy": 60.0}
    scores = compute_metrics("stsb", [1, 2, 3, 4], [1, 3, 2, 4])
    assert scores == {"pearson": pytest.approx(80.0), "spearman": pytest.approx(80.0)}
    assert set(compute_metrics("sick-relatedness", [1, 2], [1, 2])) == {"pearson", "spearman"}
    assert compute_metrics("classification", [1, 0], [1, 1]) == {"accuracy": 50.0}
    assert set(compute_metrics("regression", [1.0, 2.0], [2.0, 1.0])) == {"pearson", "spearman"}
    with pytest.raises(ValueError, match="unknown task"):
        compute_metrics("glue", PRED, GOLD)


def test_every_metric_name_is_implemented() -> None:
    assert set(METRICS) == set(METRIC_NAMES)


@pytest.mark.parametrize("metric", sorted(METRICS))
def test_bad_inputs_raise_clear_errors(metric: str) -> None:
    fn = METRICS[metric]
    with pytest.raises(ValueError, match="empty"):
        fn([], [])
    with pytest.raises(ValueError, match="3 predictions but 2 labels"):
        fn([0, 1, 1], [0, 1])


def test_input_shape_and_value_errors() -> None:
    with pytest.raises(ValueError, match=r"integer class ids.*0\.5"):
        accuracy([0.5, 1.0], [0, 1])
    with pytest.raises(ValueError, match="shape"):
        accuracy(np.zeros((2, 2, 2)), [0, 1])
    with pytest.raises(ValueError, match="at least 2"):
        pearson([1.0], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        spearman([1.0, float("nan")], [1.0, 2.0])
    with pytest.raises(ValueError, match="shape"):
        pearson(np.zeros((3, 2)), [1, 2, 3])


def test_paired_bootstrap_one_better_row_against_the_exact_probability() -> None:
    # 10 rows, the same predictions but on row 3, which only ours gets right: ours wins in the resamples that draw
    # row 3 (probability 1 - 0.9^10) and ties in the others (counted half)
    labels = np.array([0, 1] * 5)
    ours, theirs = labels.copy(), labels.copy()
    theirs[3] = 1 - labels[3]
    drawn = 1 - 0.9 ** 10
    p = paired_bootstrap("sst2", ours, theirs, labels, resamples=20000, seed=1)
    assert p == pytest.approx(drawn + 0.5 * (1 - drawn), abs=0.01)
    assert paired_bootstrap("sst2", theirs, ours, labels, resamples=20000, seed=1) == pytest.approx(1 - p, abs=1e-12)
    assert paired_bootstrap("sst2", ours, ours, labels) == 0.5


def test_paired_bootstrap_metric_and_logits() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    good = np.where(rng.random(200) < 0.9, labels, 1 - labels)
    bad = np.where(rng.random(200) < 0.6, labels, 1 - labels)
    assert paired_bootstrap("mrpc", good, bad, labels) == 1.0  # 90% against 60% right: no resample reverses that
    logits = torch.nn.functional.one_hot(torch.as_tensor(good), 2).float()
    assert paired_bootstrap("mrpc", logits, bad, labels, metric="f1") == 1.0
    scores = rng.normal(size=200)
    assert paired_bootstrap("regression", scores + 0.1 * rng.normal(size=200), -scores, scores) == 1.0  # Pearson
    with pytest.raises(ValueError, match="same number of rows"):
        paired_bootstrap("sst2", good[:10], bad, labels)
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        paired_bootstrap("sst2", good, bad, labels, metric="bleu")
