"""Tests of structprune.data.readers: the benchmark file formats and their oddities, errors that
name the file and line, and load_file for a user's CSV / TSV / JSONL file.

Tests that read the benchmark files skip when the data folder is absent (see data_support).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from structprune.data import load_file, load_task
from tests.data.data_support import all_splits, fake_data_dir, load, needs_data


@needs_data
def test_encodings_and_oddities_of_the_files() -> None:
    mr = [t for part in all_splits("mr") for t in part.text_a]
    assert any("\u2026" in t for t in mr)  # cp1252 0x85 is an ellipsis, not a line break
    assert not any("\x85" in t for t in mr)
    assert any("sister\u00f0city" in t for t in load("trec").text_a)  # the one Latin-1 byte
    mrpc = load("mrpc")
    assert mrpc.text_a[0].startswith("Amrozi accused")  # header (with BOM) skipped
    rte = load("rte")
    assert any('"' in t for t in rte.text_a)  # quotes kept verbatim (quoting disabled)


@needs_data
def test_malformed_qqp_row_is_repaired() -> None:
    rows = [
        (a, b, y)
        for part in all_splits("qqp")
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
    root = fake_data_dir(tmp_path, lines)
    with pytest.raises(ValueError, match=message):
        load_task("sst2", data_dir=root)


def test_undecodable_file_names_the_encoding(tmp_path: Path) -> None:
    root = fake_data_dir(tmp_path, [])
    (root / "SST-2" / "train.tsv").write_bytes(b"sentence\tlabel\ncaf\xe9\t1\n")
    with pytest.raises(ValueError, match=r"not valid utf-8.*encoding="):
        load_task("sst2", data_dir=root)


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
