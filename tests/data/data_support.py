"""Helpers shared by the tests of structprune.data: the benchmark data folder and fake ones.

Tests that read the benchmark files skip when the data folder (``../shared/data`` relative to the
working directory, i.e. beside the checkout pytest runs in, or ``$STRUCTPRUNE_DATA_DIR``) is
absent.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from structprune.data import (
    DATA_DIR_ENV,
    TaskData,
    default_data_dir,
    get_task,
    load_task,
    resolve_data_dir,
)


def _data_root() -> Path | None:
    try:
        return resolve_data_dir()
    except FileNotFoundError:
        return None


ROOT = _data_root()
needs_data = pytest.mark.skipif(
    ROOT is None,
    reason=f"benchmark data folder absent ({default_data_dir()}, or ${DATA_DIR_ENV}); "
    "run pytest from a checkout that has ../shared/data beside it to run these tests",
)


@functools.cache
def load(name: str, split: str = "train") -> TaskData:
    """load_task, read once per test session (the tests do not modify what it returns)."""
    return load_task(name, split)


def all_splits(name: str) -> list[TaskData]:
    return [load(name, split) for split in get_task(name).splits]


def fake_data_dir(root: Path, train_lines: list[str]) -> Path:
    """A data folder holding only an SST-2 train.tsv with the given lines."""
    (root / "SST-2").mkdir(parents=True)
    (root / "SST-2" / "train.tsv").write_text("\n".join(train_lines) + "\n", encoding="utf-8")
    return root
