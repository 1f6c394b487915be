"""Tests of structprune.data.tasks: TaskSpec validation and TaskData selection."""

from __future__ import annotations

import pytest

from structprune.data import TaskData, TaskSpec, get_task


def test_taskspec_rejects_inconsistent_fields() -> None:
    good = dict(
        name="t", kind="classification", label_names=("a", "b"), pair=False,
        metrics=("accuracy",), main_metric="accuracy", splits=("train",), source="x",
        description="",
    )  # fmt: skip
    TaskSpec(**good)
    for change, message in (
        ({"kind": "ranking"}, "kind"),
        ({"label_names": ("a",)}, "at least 2"),
        ({"label_names": ("a", "a")}, "duplicate"),
        ({"kind": "regression"}, "no label_names"),
        ({"metrics": ("bleu",)}, "subset"),
        ({"main_metric": "f1"}, "main_metric"),
        ({"splits": ()}, "no splits"),
    ):
        with pytest.raises(ValueError, match=message):
            TaskSpec(**{**good, **change})


def test_taskdata_select_subset_and_validation() -> None:
    spec = get_task("rte")
    data = TaskData(spec, "train", ["a", "b", "c"], ["x", "y", "z"], [0, 1, 0])
    picked = data.select([2, 0, 2])
    assert picked.text_a == ["c", "a", "c"] and picked.text_b == ["z", "x", "z"]
    assert picked.labels == [0, 0, 0]
    assert "n=3" in repr(data)
    with pytest.raises(IndexError, match="outside"):
        data.select([3])
    with pytest.raises(ValueError, match="between 1 and 3"):
        data.subset(4)
    assert data.subset(3, seed=0).text_a == ["a", "b", "c"]  # original order kept
    with pytest.raises(ValueError, match="text_b must be a list"):
        TaskData(spec, "train", ["a"], None, [0])
    with pytest.raises(ValueError, match="labels"):
        TaskData(spec, "train", ["a"], ["b"], [0, 1])
