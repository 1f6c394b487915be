"""Tests of structprune.data: the task registry, loaders, seeded splits, VADER fetching, encoding.

Tests that read the benchmark files skip when the data folder (``../shared/data`` beside the
repository, or ``$STRUCTPRUNE_DATA_DIR``) is absent. The VADER download test skips when pip cannot
reach the package index.
"""

from __future__ import annotations

import functools
import itertools
import json
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import torch

from structprune import data as sdata
from structprune.data import (
    TASKS,
    TaskData,
    TaskSpec,
    batches,
    encode,
    fetch_vader,
    get_task,
    list_tasks,
    load_file,
    load_task,
    load_vader,
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
    reason=f"benchmark data folder absent ({sdata.default_data_dir()}, or ${sdata.DATA_DIR_ENV}); "
    "place ../shared/data beside the repository to run these tests",
)

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

# Rows in the whole file(s) of datasets the loader splits itself.
POOL_SIZES = {"mr": 10662, "cr": 3775, "subj": 10000, "mpqa": 10606, "qqp": 23497}

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


@functools.cache
def _load(name: str, split: str = "train") -> TaskData:
    """load_task, read once per test session (the tests below do not modify what it returns)."""
    return load_task(name, split)


def _all_splits(name: str) -> list[TaskData]:
    return [_load(name, split) for split in get_task(name).splits]


@needs_data
@pytest.mark.parametrize(("name", "split"), sorted(SIZES))
def test_split_sizes_match_the_data_readme(name: str, split: str) -> None:
    assert len(_load(name, split)) == SIZES[(name, split)]


@needs_data
@pytest.mark.parametrize("name", sorted(POOL_SIZES))
def test_carved_splits_cover_the_whole_file(name: str) -> None:
    assert sum(len(part) for part in _all_splits(name)) == POOL_SIZES[name]


@needs_data
def test_agnews_train_and_dev_come_from_its_10001_row_sample() -> None:
    assert len(_load("agnews", "train")) + len(_load("agnews", "dev")) == 10001


@needs_data
@pytest.mark.parametrize(("name", "split"), sorted(CLASS_COUNTS, key=str))
def test_class_counts_match_the_source_files(name: str, split: str | None) -> None:
    parts = _all_splits(name) if split is None else [_load(name, split)]
    spec = get_task(name)
    counts = Counter(spec.label_names[y] for part in parts for y in part.labels)
    for label_name, expected in CLASS_COUNTS[(name, split)].items():
        assert counts[label_name] == expected


@needs_data
@pytest.mark.parametrize("name", [n for n in list_tasks() if not n.startswith("vader")])
def test_labels_texts_and_shape_of_every_task(name: str) -> None:
    spec = get_task(name)
    for part in _all_splits(name):
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
def test_encodings_and_oddities_of_the_files() -> None:
    mr = [t for part in _all_splits("mr") for t in part.text_a]
    assert any("\u2026" in t for t in mr)  # cp1252 0x85 is an ellipsis, not a line break
    assert not any("\x85" in t for t in mr)
    assert any("sister\u00f0city" in t for t in _load("trec").text_a)  # the one Latin-1 byte
    mrpc = _load("mrpc")
    assert mrpc.text_a[0].startswith("Amrozi accused")  # header (with BOM) skipped
    rte = _load("rte")
    assert any('"' in t for t in rte.text_a)  # quotes kept verbatim (quoting disabled)


@needs_data
def test_malformed_qqp_row_is_repaired() -> None:
    rows = [
        (a, b, y)
        for part in _all_splits("qqp")
        for a, b, y in zip(part.text_a, part.text_b, part.labels, strict=True)
        if a.startswith("How is the life of a math student?")
    ]
    assert rows == [
        (
            "How is the life of a math student? Could you describe your own experiences?",
            "Which level of prepration is enough for the exam jlpt5?",
            0,
        )
    ]


@needs_data
@pytest.mark.parametrize("name", ["mr", "cr", "subj", "mpqa", "qqp", "agnews"])
def test_carved_splits_are_deterministic_disjoint_and_seed_independent(name: str) -> None:
    spec = get_task(name)
    carved = [s for s in spec.splits if not (name == "agnews" and s == "test")]
    keyed = {}
    for split in carved:
        first = _load(name, split)
        again = load_task(name, split, seed=7)
        assert first.text_a == again.text_a and first.labels == again.labels
        keyed[split] = set(zip(first.text_a, first.text_b or [None] * len(first), strict=True))
    for i, a in enumerate(carved):
        for b in carved[i + 1 :]:
            assert not keyed[a] & keyed[b], f"{name}: {a} and {b} share inputs"


@needs_data
def test_carved_split_sizes() -> None:
    cr = {s: len(_load("cr", s)) for s in ("train", "dev", "test")}
    assert cr["train"] >= 1000 and cr["dev"] >= 500 and cr["test"] >= 500
    # The split is frozen: results reported on it must stay comparable, so change it deliberately.
    assert _load("cr", "dev").text_a[0] == "will never purchase apex again ."
    assert Counter(_load("cr", "dev").labels) == {1: 304, 0: 196}
    assert Counter(_load("cr", "test").labels) == {1: 331, 0: 169}
    mr = {s: len(_load("mr", s)) for s in ("train", "dev", "test")}
    assert 1067 <= mr["dev"] <= 1080 and 1067 <= mr["test"] <= 1080  # 10%, duplicates kept together


@needs_data
def test_train_size_takes_a_seeded_nested_subset() -> None:
    full = _load("sst2")
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


def _fake_data_dir(root: Path, train_lines: list[str]) -> Path:
    """A data folder holding only an SST-2 train.tsv with the given lines."""
    (root / "SST-2").mkdir(parents=True)
    (root / "SST-2" / "train.tsv").write_text("\n".join(train_lines) + "\n", encoding="utf-8")
    return root


def test_data_dir_resolution_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    explicit = _fake_data_dir(tmp_path / "explicit", ["sentence\tlabel", "good\t1", "bad\t0"])
    env = _fake_data_dir(tmp_path / "env", ["sentence\tlabel", "fine\t1"])
    monkeypatch.setenv(sdata.DATA_DIR_ENV, str(env))
    assert len(load_task("sst2", data_dir=explicit)) == 2
    assert load_task("sst2").text_a == ["fine"]
    monkeypatch.delenv(sdata.DATA_DIR_ENV)
    assert sdata.default_data_dir() == Path(sdata.__file__).resolve().parents[2] / "shared" / "data"
    monkeypatch.setattr(sdata, "default_data_dir", lambda: tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError) as err:
        load_task("sst2")
    message = str(err.value)
    assert "data_dir" in message and sdata.DATA_DIR_ENV in message and "nowhere" in message
    with pytest.raises(FileNotFoundError, match=r"missing.*data_dir argument"):
        load_task("sst2", data_dir=tmp_path / "missing")


def test_missing_dataset_folder_and_file(tmp_path: Path) -> None:
    root = _fake_data_dir(tmp_path, ["sentence\tlabel", "good\t1"])
    with pytest.raises(FileNotFoundError, match=r"RTE.*reads the RTE/ folder"):
        load_task("rte", data_dir=root)
    with pytest.raises(FileNotFoundError, match=r"dev\.tsv not found"):
        load_task("sst2", "dev", data_dir=root)


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (["sentence\tlabel"], "no examples"),
        ([], "empty: expected a header row"),
        (["sentence\tlabel", "good\t1", "odd\t7"], r"train\.tsv:3: label '7' is not one of"),
        (["sentence\tlabel", "good\t"], r"train\.tsv:2: label missing"),
        (["sentence\tlabel", "no tab here"], r"train\.tsv:2: expected at least 2 fields"),
        (["text\tlabel", "good\t1"], r"column\(s\) \['sentence'\] not in its header"),
    ],
)
def test_bad_task_files_raise_with_file_and_line(
    tmp_path: Path, lines: list[str], message: str
) -> None:
    root = _fake_data_dir(tmp_path, lines)
    with pytest.raises(ValueError, match=message):
        load_task("sst2", data_dir=root)


def test_undecodable_file_names_the_encoding(tmp_path: Path) -> None:
    root = _fake_data_dir(tmp_path, [])
    (root / "SST-2" / "train.tsv").write_bytes(b"sentence\tlabel\ncaf\xe9\t1\n")
    with pytest.raises(ValueError, match=r"not valid utf-8.*encoding="):
        load_task("sst2", data_dir=root)


def test_seeded_split_keeps_duplicates_together() -> None:
    rows = [sdata._Row(f"text {i % 700}", None, "0", f"f:{i}") for i in range(2000)]
    parts = sdata._carve(rows, ("dev", "test"))
    assert sum(len(p) for p in parts.values()) == 2000
    assert len(parts["dev"]) >= 500 and len(parts["test"]) >= 500
    texts = {name: {r.text_a for r in part} for name, part in parts.items()}
    assert not texts["train"] & texts["dev"] and not texts["dev"] & texts["test"]
    assert not texts["train"] & texts["test"]
    assert sdata._carve(rows, ("dev", "test")) == parts
    shuffled = sdata._carve(rows[::-1], ("dev", "test"))  # the order of the rows does not matter
    assert {name: {r.where for r in part} for name, part in shuffled.items()} == {
        name: {r.where for r in part} for name, part in parts.items()
    }


# ---------------------------------------------------------------------------------------------
# load_file


def test_load_csv_with_header_quotes_and_string_labels(tmp_path: Path) -> None:
    path = tmp_path / "reviews.csv"
    path.write_text(
        'text,label\n"good, really",pos\n"said ""bad""",neg\nok,pos\n', encoding="utf-8"
    )
    data = load_file(path, text_columns=["text"], label_column="label")
    assert data.text_a == ["good, really", 'said "bad"', "ok"]
    assert data.task.label_names == ("neg", "pos") and data.labels == [1, 0, 1]
    assert data.task.name == "reviews" and data.split == "train" and not data.task.pair


def test_load_headerless_tsv_pair_with_given_label_names(tmp_path: Path) -> None:
    path = tmp_path / "pairs.tsv"
    path.write_text('7\t"quoted\tsecond\t1\n8\tthird\tfourth\tyes\n', encoding="utf-8")
    data = load_file(path, text_columns=[1, 2], label_column=3, label_names=["no", "yes"])
    assert data.text_a == ['"quoted', "third"]  # TSV: quotes are plain characters
    assert data.text_b == ["second", "fourth"]
    assert data.labels == [1, 1]  # "1" is taken as a class id, "yes" by name
    assert data.task.pair and data.task.num_labels == 2


def test_load_jsonl_regression_and_unlabelled(tmp_path: Path) -> None:
    path = tmp_path / "scores.jsonl"
    rows = [{"a": "x", "b": "y", "score": 1.5}, {"a": "p", "b": "q", "score": "4"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    data = load_file(path, text_columns=["a", "b"], label_column="score", kind="regression")
    assert data.labels == [1.5, 4.0] and data.task.kind == "regression"
    assert data.task.metrics == ("pearson", "spearman")
    plain = load_file(path, text_columns=["a"], label_names=["neg", "pos"], split="unlabelled")
    assert plain.labels is None and plain.split == "unlabelled"


def test_load_file_infers_integer_label_names(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("t,y\na,0\nb,2\n", encoding="utf-8")
    data = load_file(path, text_columns=["t"], label_column="y")
    assert data.task.label_names == ("0", "1", "2") and data.labels == [0, 2]


@pytest.mark.parametrize(
    ("name", "content", "kwargs", "error", "message"),
    [
        ("d.txt", "x", {"text_columns": ["t"]}, ValueError, "format='csv'"),
        ("d.csv", "t,y\na,1\n", {"text_columns": ["t", "u"], "label_column": "y"}, ValueError,
         r"\['u'\] not in its header"),
        ("d.csv", "t,y\na,1\n", {"text_columns": ["t"]}, ValueError, "needs label_names"),
        ("d.csv", "t,y\na,pos\nb,pos\n", {"text_columns": ["t"], "label_column": "y"}, ValueError,
         "only the label"),
        ("d.csv", "t,y\na,1\n", {"text_columns": ["t", 1], "label_column": "y"}, ValueError,
         "all header names"),
        ("d.csv", "t,y\na,b\n", {"text_columns": ["t"], "label_column": "y", "kind": "regression"},
         ValueError, r"d\.csv:2: label 'b' is not a number"),
        ("d.jsonl", '{"t": "a", "y": 1}\n{"t": "b"\n', {"text_columns": ["t"], "label_column": "y"},
         ValueError, r"d\.jsonl:2: not valid JSON"),
        ("d.jsonl", '{"t": "a", "y": 1}\n{"y": 0}\n', {"text_columns": ["t"], "label_column": "y"},
         ValueError, r"d\.jsonl:2: no text under key 't'"),
        ("d.jsonl", '{"t": "a", "y": 1}\n{"t": "b"}\n', {"text_columns": ["t"], "label_column": "y",
         "label_names": ["n", "p"]}, ValueError, r"d\.jsonl:2: label missing"),
        ("d.tsv", "t\ty\n", {"text_columns": ["t"], "label_column": "y"}, ValueError,
         "no examples"),
        ("d.csv", "t,y\na,1\n", {"text_columns": ["t", "t", "t"]}, ValueError, "1 or 2 columns"),
        ("d.csv", "t,y\na,1\n", {"text_columns": ["t"], "kind": "ranking"}, ValueError, "kind"),
    ],
)  # fmt: skip
def test_load_file_errors(
    tmp_path: Path, name: str, content: str, kwargs: dict, error: type, message: str
) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(error, match=message):
        load_file(path, **kwargs)


def test_load_file_missing_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.csv"):
        load_file(tmp_path / "nope.csv", text_columns=["t"], label_column="y")


# ---------------------------------------------------------------------------------------------
# encode and batches

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "good", "bad", "film", "is", "the"]


@pytest.fixture
def tokenizer(tmp_path: Path):
    from transformers import BertTokenizer

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    return BertTokenizer(str(vocab))


def test_encode_single_sentences(tokenizer) -> None:
    spec = get_task("sst2")
    data = TaskData(
        spec, "train", ["a good film", "bad", "the film is a good film"], None, [1, 0, 1]
    )
    enc = encode(data, tokenizer, max_length=6)
    assert set(enc) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert enc["input_ids"].shape == (3, 6)  # longest (8 tokens) truncated to 6
    assert enc["attention_mask"].tolist()[1] == [1, 1, 1, 0, 0, 0]
    assert enc["labels"].dtype == torch.long and enc["labels"].tolist() == [1, 0, 1]


def test_encode_pairs_regression_and_unlabelled(tokenizer) -> None:
    spec = get_task("stsb")
    data = TaskData(spec, "dev", ["a film", "bad"], ["the film", "good"], [4.5, 1.0])
    enc = encode(data, tokenizer)
    assert enc["input_ids"].shape == (2, 7)  # [CLS] a film [SEP] the film [SEP]
    assert enc["token_type_ids"][0].tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert enc["labels"].dtype == torch.float32
    unlabelled = TaskData(spec, "dev", ["a"], ["b"], None)
    assert "labels" not in encode(unlabelled, tokenizer)


def test_encode_errors(tokenizer) -> None:
    data = TaskData(get_task("sst2"), "train", ["a"], None, [1])
    tokenizer.model_max_length = 16
    with pytest.raises(ValueError, match="model_max_length=16"):
        encode(data, tokenizer, max_length=32)
    with pytest.raises(ValueError, match="max_length must be"):
        encode(data, tokenizer, max_length=0)

    class NoPad:
        pad_token = None
        model_max_length = 512

    with pytest.raises(ValueError, match="no padding token"):
        encode(data, NoPad())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no examples"):
        encode(TaskData(get_task("sst2"), "train", [], None, []), tokenizer)


def test_batches_sizes_order_and_seed() -> None:
    encoded = {"input_ids": torch.arange(20).view(10, 2), "labels": torch.arange(10)}
    plain = list(batches(encoded, 4))
    assert [len(b["labels"]) for b in plain] == [4, 4, 2]
    assert torch.cat([b["labels"] for b in plain]).tolist() == list(range(10))
    assert plain[1]["input_ids"].tolist() == [[8, 9], [10, 11], [12, 13], [14, 15]]
    shuffled = [b["labels"].tolist() for b in batches(encoded, 4, shuffle=True, seed=3)]
    assert shuffled == [b["labels"].tolist() for b in batches(encoded, 4, shuffle=True, seed=3)]
    assert shuffled != [b["labels"].tolist() for b in batches(encoded, 4, shuffle=True, seed=4)]
    assert sorted(itertools.chain(*shuffled)) == list(range(10))
    for b in batches(encoded, 4, shuffle=True, seed=3):  # rows stay aligned across tensors
        assert (b["input_ids"][:, 0] == 2 * b["labels"]).all()
    with pytest.raises(ValueError, match="same number of rows"):
        batches({"a": torch.zeros(3), "b": torch.zeros(4)}, 2)
    with pytest.raises(ValueError, match="positive integer"):
        batches(encoded, 0)


# ---------------------------------------------------------------------------------------------
# VADER (downloaded from PyPI once per test session into a temporary cache)

VADER_ROWS = {"tweets": 4200, "movies": 10605, "amazon": 3708, "nyt": 5190}


@pytest.fixture(scope="module")
def vader_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("structprune-cache")
    try:
        fetch_vader(root / "vader")
    except sdata.VaderDownloadError as err:
        pytest.skip(f"cannot download {sdata.VADER_REQUIREMENT} from the package index: {err}")
    return root


@pytest.fixture
def vader_env(vader_root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point $STRUCTPRUNE_CACHE at the session's downloaded corpus and forbid further downloads."""
    monkeypatch.setenv(sdata.CACHE_ENV, str(vader_root))

    def no_network(*args, **kwargs):
        raise AssertionError("the cached corpus must not be downloaded again")

    monkeypatch.setattr(subprocess, "run", no_network)
    return vader_root


def test_fetch_vader_downloads_verifies_and_caches(vader_env: Path) -> None:
    folder = fetch_vader()
    assert folder == vader_env / "vader"
    assert sorted(p.name for p in folder.iterdir()) == sorted(sdata.VADER_FILES.values())
    assert not [p for p in vader_env.iterdir() if p.name.startswith(".")]  # no staging left
    raw = (folder / sdata.VADER_FILES["tweets"]).read_bytes()
    assert b"\r\n" in raw and not raw.endswith(b"\n")


@pytest.mark.parametrize("corpus", sorted(VADER_ROWS))
def test_vader_row_counts_and_threshold(vader_env: Path, corpus: str) -> None:
    splits = ("train", "dev", "test")
    rated = {split: load_task(f"vader-{corpus}-regression", split) for split in splits}
    assert sum(len(part) for part in rated.values()) == VADER_ROWS[corpus]
    for split, part in rated.items():
        assert all(-4 <= r <= 4 for r in part.labels)
        kept = [(t, r) for t, r in zip(part.text_a, part.labels, strict=True) if abs(r) > 0.5]
        polar = load_task(f"vader-{corpus}", split)
        assert polar.text_a == [t for t, _ in kept]  # same split, near-zero ratings dropped
        assert polar.labels == [int(r > 0) for _, r in kept]
    assert not set(rated["train"].text_a) & set(rated["test"].text_a)


def test_load_vader_threshold_and_subset(vader_env: Path) -> None:
    default = load_vader("tweets")
    strict = load_vader("tweets", threshold=2.0)
    assert len(strict) < len(default)
    assert set(strict.text_a) <= set(default.text_a)
    assert len(load_vader("amazon", "dev", train_size=100, seed=3)) == 100
    with pytest.raises(ValueError, match="threshold"):
        load_vader("tweets", threshold=5)
    with pytest.raises(ValueError, match="unknown VADER corpus 'imdb'"):
        load_vader("imdb")


def test_fetch_vader_rejects_a_wrong_archive(tmp_path: Path) -> None:
    fake = tmp_path / sdata.VADER_SDIST
    fake.write_bytes(b"not the real archive")
    target = tmp_path / "cache" / "vader"
    with pytest.raises(ValueError, match="sha256"):
        fetch_vader(target, archive=fake)
    assert not target.exists()
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_fetch_vader_reports_pip_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_pip(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and sdata.VADER_REQUIREMENT in cmd
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="No matching distribution")

    monkeypatch.setattr(subprocess, "run", failing_pip)
    with pytest.raises(sdata.VaderDownloadError, match=r"(?s)No matching distribution.*archive="):
        fetch_vader(tmp_path / "vader")
    assert not (tmp_path / "vader").exists()


def test_fetch_vader_installs_from_a_local_archive(vader_root: Path, tmp_path: Path) -> None:
    """A partly filled cache folder is completed by moving files in, not by replacing the folder."""
    target = tmp_path / "vader"
    target.mkdir()
    keep = target / "notes.txt"
    keep.write_text("user file")
    shutil.copy(vader_root / "vader" / sdata.VADER_FILES["nyt"], target)
    sdist = _download_sdist_or_skip(tmp_path)
    fetch_vader(target, archive=sdist)
    assert keep.read_text() == "user file"
    assert all((target / f).is_file() for f in sdata.VADER_FILES.values())


def _download_sdist_or_skip(tmp_path: Path) -> Path:
    """The real sdist, downloaded again (the session fixture keeps only the extracted files)."""
    try:
        return sdata._pip_download(tmp_path)
    except sdata.VaderDownloadError as err:
        pytest.skip(f"cannot download {sdata.VADER_REQUIREMENT}: {err}")
