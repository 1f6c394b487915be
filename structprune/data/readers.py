"""File readers: lines, TSV / CSV / JSON Lines records, label-first and parallel files, QQP, and
:func:`load_file` for a user's own file.

Every reader returns :class:`~structprune.data.tasks.Row` objects whose label is still the string
in the file. Texts are stripped of surrounding whitespace and otherwise left as in the files
(several corpora are lower-cased and pre-tokenised). Rows with an empty text are kept (CR has 4,
MPQA 3), so that sizes match the data README. Errors name the file and line.
"""

from __future__ import annotations

import csv
import io
import json
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from structprune.data.tasks import (
    KIND_METRICS,
    KINDS,
    TASK_KINDS,
    Row,
    TaskData,
    TaskSpec,
    build_task_data,
)

Reader = Callable[[Path], list[Row]]
"""Dataset folder -> the rows of one split."""
Column = str | int
"""A header name, or a 0-based position in a file without a header row."""

FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl"}
"""File extension -> format understood by :func:`load_file`."""


def is_task_file(name: str | os.PathLike[str]) -> bool:
    """Whether ``name`` names a task file :func:`load_file` reads (by its extension) rather than a built-in task."""
    return Path(name).suffix.lower() in FORMATS


def read_lines(path: Path, encoding: str = "utf-8") -> list[str]:
    """The lines of a text file, split on ``\\n`` only, without ``\\r``, BOM or final empty line.

    Splitting on ``\\n`` alone matters: Latin-1 / cp1252 text may contain U+0085, which
    ``str.splitlines`` would treat as a line break.
    """
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found; the {path.parent.name}/ folder of the task data should contain it "
            "(check data_dir / $STRUCTPRUNE_DATA_DIR and the data README)"
        )
    try:
        text = path.read_bytes().decode(encoding)
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} is not valid {encoding} ({err.reason} at byte {err.start}); pass the file's "
            "encoding, e.g. encoding='cp1252' for Latin-1 text"
        ) from None
    lines = text.removeprefix("\ufeff").split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def read_records(path: Path, encoding: str = "utf-8") -> list[tuple[list[str], int]]:
    """Non-blank records of a benchmark TSV file with their line numbers, split on tabs with quoting disabled
    (RTE, QNLI and others contain bare double quotes). Users' files go through :func:`read_delimited`."""
    return [(line.split("\t"), i) for i, line in enumerate(read_lines(path, encoding), 1) if line]


DELIMITERS = {"csv": ",", "tsv": "\t"}


def _parse(text: str, delimiter: str, quoting: int) -> list[tuple[list[str], int]]:
    """Non-blank records of ``text`` with the line each starts on; ``csv.Error`` names the line it failed on."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting, strict=True)
    records, start = [], 1
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return records
        except csv.Error as err:
            raise csv.Error(f"line {reader.line_num}: {err}") from None
        if fields and any(field.strip() for field in fields):
            records.append((fields, start))
        start = reader.line_num + 1


def read_delimited(path: Path, fmt: str, encoding: str = "utf-8") -> list[tuple[list[str], int]]:
    """Non-blank records of a user's CSV or TSV file, with the line each starts on.

    A real CSV parser: quoted fields may hold delimiters, newlines and doubled quotes (``""``); CRLF line ends
    and a UTF-8 byte-order mark are handled. A file whose quoting does not parse (a bare quote opening a field,
    as in ``"Great" movie<TAB>1``) is read again with quoting disabled, when that gives every row as many
    fields as the first; otherwise the error names the row. :func:`load_file` then refuses texts that still
    carry CSV quoting.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        text = path.read_bytes().decode(encoding).removeprefix("\ufeff")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not valid {encoding} ({err.reason} at byte {err.start}); pass the file's "
                         "encoding, e.g. encoding='cp1252' for Latin-1 text") from None
    delimiter = DELIMITERS[fmt]
    try:
        return _parse(text, delimiter, csv.QUOTE_MINIMAL)
    except csv.Error as quoted_error:
        records = _parse(text, delimiter, csv.QUOTE_NONE)
        widths = {len(fields) for fields, _ in records}
        if len(widths) > 1:
            raise ValueError(f"{path}: malformed {fmt.upper()} at {quoted_error}; quote fields that contain the "
                             "delimiter, a newline or a quote mark, and double the quote marks inside them") from None
        return records


def rows_from_records(
    path: Path,
    records: list[tuple[list[str], int]],
    text_columns: Sequence[Column],
    label_column: Column | None,
) -> list[Row]:
    """Pick text and label columns; names refer to a header row, integers to positions."""
    columns = [*text_columns, *([] if label_column is None else [label_column])]
    if all(isinstance(c, str) for c in columns):
        if not records:
            raise ValueError(f"{path} is empty: expected a header row naming {columns}")
        header = [h.strip() for h in records[0][0]]
        missing = [c for c in columns if c not in header]
        if missing:
            raise ValueError(f"{path}: column(s) {missing} not in its header {header}")
        position = {c: header.index(c) for c in columns}
        records = records[1:]
    elif all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in columns):
        position = {c: c for c in columns}
    else:
        raise ValueError(
            f"columns {columns} must be all header names (file with a header row) or all "
            "0-based positions (file without one)"
        )
    width = max(position.values()) + 1
    rows = []
    for fields, line in records:
        if len(fields) < width:
            raise ValueError(
                f"{path}:{line}: expected at least {width} fields, found {len(fields)}; check "
                "the delimiter and that no field lost its separator"
            )
        texts = [fields[position[c]].strip() for c in text_columns]
        label = None if label_column is None else fields[position[label_column]].strip()
        rows.append(Row(texts[0], texts[1] if len(texts) > 1 else None, label, f"{path}:{line}"))
    return rows


def tsv(
    path: Path, text_columns: Sequence[Column], label_column: Column, encoding: str = "utf-8"
) -> list[Row]:
    """Rows of a TSV file (quoting disabled), columns as in :func:`rows_from_records`."""
    return rows_from_records(path, read_records(path, encoding), text_columns, label_column)


def jsonl(
    path: Path,
    text_keys: Sequence[Column],
    label_key: Column | None,
    encoding: str = "utf-8",
) -> list[Row]:
    """Rows of a JSON Lines file: one object per line, texts and label under the given keys."""
    if not all(
        isinstance(k, str) for k in [*text_keys, *([] if label_key is None else [label_key])]
    ):
        raise ValueError(
            f"{path}: JSONL columns are object keys (strings), got {text_keys}, {label_key}"
        )
    rows = []
    for i, line in enumerate(read_lines(path, encoding), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{i}: not valid JSON ({err.msg})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{i}: expected a JSON object, found {type(obj).__name__}")
        texts = []
        for key in text_keys:
            if obj.get(key) is None:
                raise ValueError(f"{path}:{i}: no text under key {key!r} (keys: {sorted(obj)})")
            texts.append(str(obj[key]).strip())
        label = None
        if label_key is not None:
            value = obj.get(label_key)
            label = "" if value is None else str(value).strip()
        rows.append(Row(texts[0], texts[1] if len(texts) > 1 else None, label, f"{path}:{i}"))
    return rows


def label_first(path: Path, encoding: str = "utf-8") -> list[Row]:
    """Rows of a ``<label> <text>`` file (the SentEval / Kim-2014 format)."""
    rows = []
    for i, line in enumerate(read_lines(path, encoding), 1):
        if line:
            label, _, text = line.partition(" ")
            rows.append(Row(text.strip(), None, label, f"{path}:{i}"))
    return rows


def parallel(premises: Path, hypotheses: Path, labels: Path) -> list[Row]:
    """Rows from three line-aligned files (SNLI in the SentEval layout)."""
    a, b, y = read_lines(premises), read_lines(hypotheses), read_lines(labels)
    if not len(a) == len(b) == len(y):
        raise ValueError(
            f"parallel files differ in length: {premises} {len(a)}, {hypotheses} {len(b)}, "
            f"{labels} {len(y)} lines"
        )
    return [
        Row(s1.strip(), s2.strip(), lab.strip(), f"{labels}:{i}")
        for i, (s1, s2, lab) in enumerate(zip(a, b, y, strict=True), 1)
    ]


def qqp(path: Path) -> list[Row]:
    """QQP rows (id, qid1, qid2, question1, question2, is_duplicate; no header).

    One row (id 133273) lost the tab before its label, which sits at the end of question2 after a
    space. It is repaired, not dropped: the label is split off again, so all 23,497 rows load.
    """
    repaired = []
    for fields, line in read_records(path):
        if len(fields) == 5:
            question2, _, label = fields[4].rpartition(" ")
            if label in ("0", "1"):
                fields = [*fields[:4], question2, label]
        repaired.append((fields, line))
    return rows_from_records(path, repaired, (3, 4), 5)


# ---------------------------------------------------------------------------------------------
# The user's own files


def load_file(
    path: str | os.PathLike[str],
    *,
    text_columns: Sequence[str | int],
    label_column: str | int | None = None,
    format: str | None = None,
    kind: str = "classification",
    label_names: Sequence[str] | None = None,
    name: str | None = None,
    split: str = "train",
    encoding: str = "utf-8",
) -> TaskData:
    """Load a CSV, TSV or JSON Lines file as :class:`TaskData`.

    ``format`` is ``"csv"``, ``"tsv"`` or ``"jsonl"``, taken from the extension when omitted. One
    text column makes a single-sentence task, two a sentence-pair task. Columns of CSV / TSV files
    are header names (the first row is then the header) or 0-based positions (no header row); JSONL
    columns are object keys. CSV and TSV are parsed with standard quoting (:func:`read_delimited`), and a text
    that still looks CSV-quoted after parsing is refused, naming its rows.

    Labels: ``label_column=None`` loads unlabelled text (``labels`` is None; a classification file
    then needs ``label_names``). For classification, a label equal to one of ``label_names`` gets
    that name's index, otherwise an integer label is taken as the class id itself. Without
    ``label_names`` they are inferred: ``"0".."k"`` when all labels are non-negative integers, else
    the sorted distinct label strings. ``kind="regression"`` parses labels as floats.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    fmt = format or FORMATS.get(path.suffix.lower())
    if fmt not in FORMATS.values():
        raise ValueError(
            f"cannot tell the format of {path} (format={format!r}); pass format='csv', 'tsv' "
            "or 'jsonl'"
        )
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} is not one of {KINDS}")
    if len(text_columns) not in (1, 2) or isinstance(text_columns, str):
        raise ValueError(f"text_columns must list 1 or 2 columns, got {text_columns!r}")
    if not TASK_KINDS[kind].classes and label_names:
        raise ValueError(f"label_names apply to classification, not {kind}")
    if fmt == "jsonl":
        rows = jsonl(path, text_columns, label_column, encoding)
    else:
        rows = rows_from_records(path, read_delimited(path, fmt, encoding), text_columns, label_column)
        _check_quoting(path, rows)
    if not rows:
        raise ValueError(f"{path} has no examples")
    names: tuple[str, ...] = ()
    raw_labels: dict[str, int] = {}
    if TASK_KINDS[kind].classes:
        names = _file_label_names(path, rows, label_column, label_names)
        raw_labels = {label_name: i for i, label_name in enumerate(names)}
        for i in range(len(names)):
            raw_labels.setdefault(str(i), i)
    spec = TaskSpec(
        name=name or path.stem,
        kind=kind,
        label_names=names,
        pair=len(text_columns) == 2,
        metrics=KIND_METRICS[kind],
        main_metric=KIND_METRICS[kind][0],
        splits=(split,),
        source=str(path),
        description=f"Loaded from {path} ({fmt}).",
    )
    return build_task_data(spec, split, rows, raw_labels, labelled=label_column is not None)


QUOTE = '"'


def _check_quoting(path: Path, rows: list[Row]) -> None:
    """Refuse texts that still carry CSV quoting (wrapped in quote marks with doubled ones inside: the file's
    quoting was not understood); warn about texts merely wrapped in quote marks (they may be quotations)."""
    escaped, wrapped = [], []
    for row in rows:
        for text in (row.text_a, row.text_b):
            if text and len(text) >= 2 and text[0] == QUOTE and text[-1] == QUOTE:
                (escaped if QUOTE * 2 in text[1:-1] else wrapped).append(row.where)
    if escaped:
        raise ValueError(f"{len(escaped)} text(s) still carry CSV quoting after parsing (a quote mark at each end, "
                         f"doubled quote marks inside), first at {', '.join(escaped[:5])}: the file mixes quoting "
                         "styles; quote every field that contains a quote mark, or none")
    if wrapped:
        warnings.warn(f"{len(wrapped)} text(s) begin and end with a quote mark, first at {', '.join(wrapped[:5])}; "
                      "they are kept as written", stacklevel=3)


def _file_label_names(
    path: Path,
    rows: list[Row],
    label_column: str | int | None,
    label_names: Sequence[str] | None,
) -> tuple[str, ...]:
    """The class names of a classification file: ``label_names``, else inferred from the rows."""
    if label_names is not None:
        return tuple(label_names)
    if label_column is None:
        raise ValueError(
            f"{path}: unlabelled classification data needs label_names (the model's classes)"
        )
    values = sorted({row.label for row in rows if row.label})
    if values and all(v.isdigit() for v in values):
        names = tuple(str(i) for i in range(max(int(v) for v in values) + 1))
    else:
        names = tuple(values)
    if len(names) < 2:
        raise ValueError(
            f"{path}: found only the label(s) {values}; pass label_names with the full label set"
        )
    return names
