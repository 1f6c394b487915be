"""Tests of structprune.data.splits: the seeded splits of datasets without one, and train_size.

Tests that read the benchmark files skip when the data folder is absent (see data_support).
"""

from __future__ import annotations

from collections import Counter

import pytest

from structprune.data import get_task, load_task
from structprune.data.splits import carve
from structprune.data.tasks import Row
from tests.data.data_support import all_splits, load, needs_data

# Rows in the whole file(s) of datasets the loader splits itself.
POOL_SIZES = {"mr": 10662, "cr": 3775, "subj": 10000, "mpqa": 10606, "qqp": 23497}


@needs_data
@pytest.mark.parametrize("name", sorted(POOL_SIZES))
def test_carved_splits_cover_the_whole_file(name: str) -> None:
    assert sum(len(part) for part in all_splits(name)) == POOL_SIZES[name]


@needs_data
def test_agnews_train_and_dev_come_from_its_10001_row_sample() -> None:
    assert len(load("agnews", "train")) + len(load("agnews", "dev")) == 10001


@needs_data
@pytest.mark.parametrize("name", ["mr", "cr", "subj", "mpqa", "qqp", "agnews"])
def test_carved_splits_are_deterministic_disjoint_and_seed_independent(name: str) -> None:
    spec = get_task(name)
    carved = [s for s in spec.splits if not (name == "agnews" and s == "test")]
    keyed = {}
    for split in carved:
        first = load(name, split)
        again = load_task(name, split, seed=7)
        assert first.text_a == again.text_a and first.labels == again.labels
        keyed[split] = set(zip(first.text_a, first.text_b or [None] * len(first), strict=True))
    for i, a in enumerate(carved):
        for b in carved[i + 1 :]:
            assert not keyed[a] & keyed[b], f"{name}: {a} and {b} share inputs"


@needs_data
def test_carved_split_sizes() -> None:
    cr = {s: len(load("cr", s)) for s in ("train", "dev", "test")}
    assert cr["train"] >= 1000 and cr["dev"] >= 500 and cr["test"] >= 500
    # The split is frozen: results reported on it must stay comparable, so change it deliberately.
    assert load("cr", "dev").text_a[0] == "will never purchase apex again ."
    assert Counter(load("cr", "dev").labels) == {1: 304, 0: 196}
    assert Counter(load("cr", "test").labels) == {1: 331, 0: 169}
    mr = {s: len(load("mr", s)) for s in ("train", "dev", "test")}
    assert 1067 <= mr["dev"] <= 1080 and 1067 <= mr["test"] <= 1080  # 10%, duplicates kept together


@needs_data
def test_train_size_takes_a_seeded_nested_subset() -> None:
    full = load("sst2")
    a = load_task("sst2", train_size=100, seed=1)
    assert len(a) == 100 and a.split == "train"
    assert a.text_a == load_task("sst2", train_size=100, seed=1).text_a
    assert a.text_a != load_task("sst2", train_size=100, seed=2).text_a
    pairs = set(zip(full.text_a, full.labels, strict=True))
    assert set(zip(a.text_a, a.labels, strict=True)) <= pairs
    smaller = load_task("sst2", train_size=50, seed=1)
    assert set(smaller.text_a) <= set(a.text_a)
    with pytest.raises(ValueError, match="1000"):
        load_task("sst2", train_size=1001)
    with pytest.raises(ValueError, match="train_size"):
        load_task("sst2", train_size=0)
    with pytest.raises(TypeError, match="integer"):
        load_task("sst2", train_size=0.5)  # type: ignore[arg-type]


def test_seeded_split_keeps_duplicates_together() -> None:
    rows = [Row(f"text {i % 700}", None, "0", f"f:{i}") for i in range(2000)]
    parts = carve(rows, ("dev", "test"))
    assert sum(len(p) for p in parts.values()) == 2000
    assert len(parts["dev"]) >= 500 and len(parts["test"]) >= 500
    texts = {name: {r.text_a for r in part} for name, part in parts.items()}
    assert not texts["train"] & texts["dev"] and not texts["dev"] & texts["test"]
    assert not texts["train"] & texts["test"]
    assert carve(rows, ("dev", "test")) == parts
    shuffled = carve(rows[::-1], ("dev", "test"))  # the order of the rows does not matter
    assert {name: {r.where for r in part} for name, part in shuffled.items()} == {
        name: {r.where for r in part} for name, part in parts.items()
    }
