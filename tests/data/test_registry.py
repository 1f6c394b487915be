"""Tests of structprune.data.registry: the task table, task lookup, and load_task on the benchmark
files (sizes, labels and shapes from the data README).

Tests that read the benchmark files skip when the data folder is absent (see data_support).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from structprune.data import TASKS, get_task, list_tasks, load_task
from tests.data.data_support import all_splits, fake_data_dir, load, needs_data

# ---------------------------------------------------------------------------------------------
# Sizes and labels of the benchmark tasks (the data README's numbers)

SIZES = {
    ("sst2", "train"): 1000,
    ("sst2", "dev"): 872,
    ("sst2", "test"): 1821,
    ("sst2-full", "train"): 67349,
    ("sst-binary", "train"): 6920,
    ("sst-binary", "dev"): 872,
    ("sst-binary", "test"): 1821,
    ("sst-fine", "train"): 8544,
    ("sst-fine", "dev"): 1101,
    ("sst-fine", "test"): 2210,
    ("trec", "train"): 5452,
    ("trec", "test"): 500,
    ("cola", "train"): 8551,
    ("cola", "dev"): 527,
    ("cola", "dev-ood"): 516,
    ("mrpc", "train"): 3668,
    ("mrpc", "dev"): 408,
    ("mrpc", "test"): 1725,
    ("stsb", "train"): 5749,
    ("stsb", "dev"): 1500,
    ("stsb", "test"): 1379,
    ("rte", "train"): 2490,
    ("rte", "dev"): 277,
    ("mnli", "dev"): 9815,
    ("snli", "dev"): 9842,
    ("snli", "test"): 9824,
    ("sick", "train"): 4500,
    ("sick", "dev"): 500,
    ("sick", "test"): 4927,
    ("sick-relatedness", "train"): 4500,
    ("sick-relatedness", "dev"): 500,
    ("sick-relatedness", "test"): 4927,
    ("qnli", "dev"): 5463,
    ("wnli", "train"): 518 + 117,
    ("wnli", "dev"): 71,
    ("agnews", "test"): 7600,
}

# Class counts stated in the data SOURCE files (label name -> count over the whole dataset/split).
CLASS_COUNTS = {
    ("mr", None): {"negative": 5331, "positive": 5331},
    ("cr", None): {"negative": 1368, "positive": 2407},
    ("subj", None): {"subjective": 5000, "objective": 5000},
    ("mpqa", None): {"negative": 7294, "positive": 3312},
    ("qqp", None): {"not_duplicate": 14749 + 1, "duplicate": 8747},  # + the repaired row
    ("qnli", "dev"): {"entailment": 2702, "not_entailment": 2761},
    ("agnews", "test"): {"World": 1900, "Sports": 1900, "Business": 1900, "Sci/Tech": 1900},
    ("trec", "train"): {"ABBR": 86},
    ("trec", "test"): {"ABBR": 9},
    ("sst2-full", "train"): {"negative": 29780, "positive": 37569},
}


@needs_data
@pytest.mark.parametrize(("name", "split"), sorted(SIZES))
def test_split_sizes_match_the_data_readme(name: str, split: str) -> None:
    assert len(load(name, split)) == SIZES[(name, split)]


@needs_data
@pytest.mark.parametrize(("name", "split"), sorted(CLASS_COUNTS, key=str))
def test_class_counts_match_the_source_files(name: str, split: str | None) -> None:
    parts = all_splits(name) if split is None else [load(name, split)]
    spec = get_task(name)
    counts = Counter(spec.label_names[y] for part in parts for y in part.labels)
    for label_name, expected in CLASS_COUNTS[(name, split)].items():
        assert counts[label_name] == expected


@needs_data
@pytest.mark.parametrize("name", [n for n in list_tasks() if not n.startswith("vader")])
def test_labels_texts_and_shape_of_every_task(name: str) -> None:
    spec = get_task(name)
    for part in all_splits(name):
        assert part.task is spec
        assert (part.text_b is not None) == spec.pair
        texts = part.text_a + (part.text_b or [])
        assert all(isinstance(t, str) and "\t" not in t and "\r" not in t for t in texts)
        assert sum(bool(t) for t in texts) >= len(texts) - 4  # CR has 4 empty texts, MPQA 3
        if spec.kind == "classification":
            # every class occurs in every split, and nothing else does
            assert set(part.labels) == set(range(spec.num_labels)), part.split
        else:
            assert all(isinstance(y, float) for y in part.labels)
            low, high = (0.0, 5.0) if name == "stsb" else (1.0, 5.0)
            assert low <= min(part.labels) and max(part.labels) <= high


@needs_data
def test_missing_split_lists_the_available_ones() -> None:
    with pytest.raises(ValueError, match=r"no split 'train'; available: \['dev'\]"):
        load_task("mnli", "train")
    with pytest.raises(ValueError, match=r"available: \['train', 'dev'\]"):
        load_task("rte", "validation")


# ---------------------------------------------------------------------------------------------
# Registry and errors that need no benchmark files


def test_registry_covers_every_dataset() -> None:
    expected = {
        "sst2", "sst2-full", "sst-binary", "sst-fine", "mr", "cr", "subj", "mpqa", "trec",
        "cola", "mrpc", "stsb", "qqp", "rte", "mnli", "snli", "sick", "sick-relatedness",
        "qnli", "wnli", "agnews", "vader-tweets", "vader-movies", "vader-amazon", "vader-nyt",
    }  # fmt: skip
    assert expected <= set(list_tasks())
    assert list_tasks() == list(TASKS)
    for name, spec in TASKS.items():
        assert name == spec.name == name.lower()
        assert spec.main_metric in spec.metrics
        assert spec.num_labels == (len(spec.label_names) if spec.kind == "classification" else 1)
    assert get_task("cola").metrics == ("mcc",)
    assert get_task("mrpc").metrics == ("accuracy", "f1")
    assert get_task("stsb").kind == "regression" and get_task("stsb").num_labels == 1
    assert get_task("trec").label_names == ("DESC", "ENTY", "ABBR", "HUM", "LOC", "NUM")
    assert get_task("subj").label_names == ("subjective", "objective")
    assert get_task("RTE") is get_task("rte")


def test_unknown_task_suggests_close_names() -> None:
    with pytest.raises(ValueError, match=r"unknown task 'sst-2'.*'sst2'"):
        load_task("sst-2")
    with pytest.raises(ValueError, match="Did you mean 'rte'"):
        get_task("rtee")


def test_missing_dataset_folder_and_file(tmp_path: Path) -> None:
    root = fake_data_dir(tmp_path, ["sentence\tlabel", "good\t1"])
    with pytest.raises(FileNotFoundError, match=r"RTE.*reads the RTE/ folder"):
        load_task("rte", data_dir=root)
    with pytest.raises(FileNotFoundError, match=r"dev\.tsv not found"):
        load_task("sst2", "dev", data_dir=root)
