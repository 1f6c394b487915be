"""Users' own CSV / TSV files: real CSV parsing (quoted newlines, tabs and commas, doubled quotes, CRLF, BOM),
never a silently damaged text, errors that name the row, and held-out files in deduplication."""

from __future__ import annotations

import warnings

import pytest

from structprune.data import load_file


def _write(tmp_path, name: str, text: str, encoding: str = "utf-8"):
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    return path


def _texts(path, **kwargs) -> list[str]:
    return load_file(path, text_columns=["sentence"], label_column="label", **kwargs).text_a


def test_quoted_newline_stays_in_its_text(tmp_path):
    path = _write(tmp_path, "train.tsv", 'sentence\tlabel\n"first line\nsecond line"\t1\nplain\t0\n')
    assert _texts(path) == ["first line\nsecond line", "plain"]


def test_quoted_tab_stays_in_its_text(tmp_path):
    path = _write(tmp_path, "train.tsv", 'sentence\tlabel\n"left\tright"\t1\nplain\t0\n')
    data = load_file(path, text_columns=["sentence"], label_column="label")
    assert data.text_a == ["left\tright", "plain"] and list(data.labels) == [1, 0]


def test_doubled_quotes_become_one(tmp_path):
    path = _write(tmp_path, "train.tsv", 'sentence\tlabel\n"he said ""great"" twice"\t1\nplain\t0\n')
    assert _texts(path) == ['he said "great" twice', "plain"]


def test_crlf_line_ends_leave_no_carriage_return(tmp_path):
    path = _write(tmp_path, "train.tsv", 'sentence\tlabel\r\ngood film\t1\r\n"two\r\nlines"\t0\r\n')
    data = load_file(path, text_columns=["sentence"], label_column="label")
    assert data.text_a == ["good film", "two\r\nlines"] and list(data.labels) == [1, 0]
    assert not any(text.endswith("\r") for text in data.text_a)


def test_byte_order_mark_does_not_hide_the_header(tmp_path):
    path = _write(tmp_path, "train.csv", "\ufeffsentence,label\ngood,1\nbad,0\n")
    assert _texts(path) == ["good", "bad"]


def test_csv_with_commas_and_newlines_in_quotes(tmp_path):
    path = _write(tmp_path, "train.csv", 'sentence,label\n"fine, really\nfine",1\n"bad, ""awful""",0\n')
    assert _texts(path) == ["fine, really\nfine", 'bad, "awful"']


def test_bare_quotes_of_an_unquoted_file_are_kept(tmp_path):
    # A quote mark opening an unquoted field is not CSV quoting: the file is read with quoting disabled.
    path = _write(tmp_path, "train.tsv", 'sentence\tlabel\n"Great" movie, said nobody\t1\nhe said "no"\t0\n')
    assert _texts(path) == ['"Great" movie, said nobody', 'he said "no"']


def test_a_text_still_carrying_csv_quoting_is_refused_with_its_row(tmp_path):
    # Row 2 cannot be parsed with quoting, so the file is read without it, and row 3 keeps its CSV escaping.
    path = _write(tmp_path, "train.tsv", 'sentence\tlabel\n"Great" movie\t1\n"he said ""hi"""\t0\nplain\t1\n')
    with pytest.raises(ValueError, match=r"still carry CSV quoting.*train\.tsv:3"):
        _texts(path)


def test_a_text_wrapped_in_quote_marks_is_kept_with_a_warning(tmp_path):
    path = _write(tmp_path, "train.tsv", 'sentence\tlabel\n"""a quotation"""\t1\nplain\t0\n')
    with pytest.warns(UserWarning, match=r"begin and end with a quote mark.*train\.tsv:2"):
        assert _texts(path) == ['"a quotation"', "plain"]


def test_plain_files_load_without_warnings(tmp_path):
    path = _write(tmp_path, "train.tsv", "sentence\tlabel\ngood\t1\nbad\t0\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _texts(path) == ["good", "bad"]


def test_an_unclosed_quote_is_an_error_naming_the_row(tmp_path):
    path = _write(tmp_path, "train.tsv", 'sentence\tlabel\ngood\t1\n"never closed\t0\nnext\trow\tmore\n')
    with pytest.raises(ValueError, match=r"train\.tsv: malformed TSV at line 4"):
        _texts(path)


def test_a_row_short_of_fields_is_an_error_naming_its_line(tmp_path):
    path = _write(tmp_path, "train.tsv", 'sentence\tlabel\ngood\t1\n"two\nlines"\n')
    with pytest.raises(ValueError, match=r"train\.tsv:3: expected at least 2 fields, found 1"):
        _texts(path)


def test_the_issue_file_loads_through_the_cli_and_held_out_rows_are_scored(tmp_path):
    from tests.cli.test_cli import make_model, ok

    model = make_model(tmp_path / "model")
    train = _write(tmp_path, "train.tsv", "sentence\tlabel\r\n" + "".join(
        f'"the film was\n{"good" if i % 2 else "bad"}\tfun ""{i}"""\t{i % 2}\r\n' for i in range(12)))
    held = _write(tmp_path, "held.tsv", "sentence\tlabel\r\n" + "".join(
        f'"the movie\twas {"great" if i % 2 else "awful"}"\t{i % 2}\r\n' for i in range(6)))
    out = ok("finetune", "--model", model, "--task", train, "--eval", held, "--epochs", 1, "--max-length", 16,
             "--out", tmp_path / "dense")
    assert "train (12 examples)" not in out and "held.tsv (6 examples): accuracy" in out


def test_auxiliary_rows_found_in_the_held_out_file_are_removed(tmp_path):
    from transformers import AutoTokenizer

    from structprune.cli.common import TaskArgs
    from structprune.transfer.sources import AuxSource, load_auxiliary
    from tests.cli.test_cli import make_model

    tokenizer = AutoTokenizer.from_pretrained(make_model(tmp_path / "model"))
    train = _write(tmp_path, "train.tsv", "sentence\tlabel\ngood\t1\nbad\t0\n")
    held = _write(tmp_path, "held.tsv", "sentence\tlabel\nfine\t1\nawful\t0\n")
    task = TaskArgs(str(train), "train", eval_file=str(held))
    (evaluation,) = task.other_splits()
    assert evaluation.text_a == ["fine", "awful"] and evaluation.task.label_names == ("0", "1")
    aux = _write(tmp_path, "aux.tsv", "sentence\tlabel\nfine\t1\nnew text\t0\nawful\t0\n")
    source = AuxSource("aux.tsv", data=load_file(aux, text_columns=["sentence"], label_column="label", name="aux"))
    loaded, report = load_auxiliary([source], task.load(), task.other_splits(), tokenizer, max_length=16)
    assert report["aux.tsv"]["removed"] == 2 and report["aux.tsv"]["kept"] == 1 and len(loaded) == 1


def test_a_file_task_holds_out_a_seeded_share_with_duplicates_kept_together(tmp_path):
    from structprune.data import hold_out

    lines = [f"text {i % 30}\t{i % 2}" for i in range(60)]  # every text twice
    data = load_file(_write(tmp_path, "t.tsv", "sentence\tlabel\n" + "\n".join(lines) + "\n"),
                     text_columns=["sentence"], label_column="label")
    train, held = hold_out(data)
    again = hold_out(data)
    assert (train.text_a, held.text_a) == (again[0].text_a, again[1].text_a)  # seeded: the same every run
    assert held.split == "held-out" and 12 <= len(held) <= 14 and len(train) + len(held) == 60
    assert not set(train.text_a) & set(held.text_a)  # a duplicated text never sits on both sides


def test_without_eval_a_file_task_is_scored_on_held_out_rows_and_eval_names_the_file(tmp_path):
    from tests.cli.test_cli import make_model, ok, write_task

    model, task = make_model(tmp_path / "model"), write_task(tmp_path / "reviews.tsv", rows=40)
    out = ok("finetune", "--model", model, "--task", task, "--epochs", 1, "--max-length", 16, "--out",
             tmp_path / "dense")
    assert "held-out (" in out and "train (" not in out.split("written to")[1]
    ok("prune", "--method", "l0", "--model", tmp_path / "dense", "--task", task, "--target-sparsity", 0.3,
       "--batch-size", 16, "--max-steps", 2, "--seq-len", 16, "--max-length", 16, "--out", tmp_path / "l0")
    report = (tmp_path / "l0" / "report.md").read_text()
    assert "evaluated on held-out (" in report and "**held-out rows**: 20% of" in report
    scored = ok("eval", tmp_path / "l0" / "pruned", "--task", task, "--max-length", 16)
    assert scored.startswith("reviews reviews.tsv (40 examples): accuracy")
