"""Task data: a registry of benchmark tasks, loaders for their files, and tokenisation.

What this module gives
----------------------
* :data:`TASKS`, :func:`list_tasks`, :func:`get_task`: one :class:`TaskSpec` per task (lowercase
  names such as ``"sst2"``, ``"rte"``, ``"vader-tweets"``).
* :func:`load_task` -> :class:`TaskData`: texts plus integer class ids (classification) or float
  scores (regression), for one split of one task.
* :func:`load_file`: the same for a user's own CSV / TSV / JSONL file.
* :func:`fetch_vader` / :func:`load_vader`: four human-rated sentiment corpora obtained from PyPI,
  so a demo runs on a machine that lacks the benchmark folder.
* :func:`encode` and :func:`batches`: tensors for training and evaluation.

Where the benchmark files are
-----------------------------
They are not part of the package. The folder is, in this order: the ``data_dir`` argument, the
``STRUCTPRUNE_DATA_DIR`` environment variable, ``<repo root>/../shared/data``. It holds one
sub-folder per dataset (``SST-2/``, ``RTE/``, ...) laid out as that folder's README describes.

Splits made here
----------------
MR, CR, SUBJ, MPQA, QQP and the VADER corpora come without a split, and AGNEWS's labelled
training sample has no dev part. The loader carves them with the fixed seed :data:`SPLIT_SEED`,
which does not depend on ``load_task(seed=...)``: each held-out part (dev and test; dev only for
AGNEWS, whose test set is official) gets 10 % of the rows but at least 500, and train gets the
rest. Identical inputs are kept together in one part, so duplicated texts (MPQA has 2,365) never
sit on both sides of a train/test boundary; a part can therefore exceed its target by a few rows.
Which part an input lands in follows a seeded hash of its text, so the split is the same on every
machine and library version. Within a part, rows keep their file order.

Text and labels
---------------
Texts are stripped of surrounding whitespace and otherwise left as in the files (several corpora
are lower-cased and pre-tokenised). Rows with an empty text are kept (CR has 4, MPQA 3), so that
sizes match the data README. Class ids follow the order of ``TaskSpec.label_names``.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

KINDS = ("classification", "regression")
METRIC_NAMES = ("accuracy", "f1", "mcc", "pearson", "spearman")
KIND_METRICS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {"classification": ("accuracy",), "regression": ("pearson", "spearman")}
)
"""Metrics reported for a task of each kind unless its spec names others."""

DATA_DIR_ENV = "STRUCTPRUNE_DATA_DIR"
CACHE_ENV = "STRUCTPRUNE_CACHE"

SPLIT_SEED = 1234
"""Seed of the split carved for datasets without one (fixed, so every run sees the same split)."""
HELD_OUT_FRACTION = 0.1
MIN_HELD_OUT = 500

VADER_REQUIREMENT = "vaderSentiment==3.3.2"
VADER_SDIST = "vaderSentiment-3.3.2.tar.gz"
VADER_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
VADER_THRESHOLD = 0.5
"""Default polarity threshold: mean rating > +0.5 is positive, < -0.5 negative, the rest dropped."""
VADER_FILES: Mapping[str, str] = MappingProxyType(
    {
        "tweets": "tweets_GroundTruth.txt",
        "movies": "movieReviewSnippets_GroundTruth.txt",
        "amazon": "amazonReviewSnippets_GroundTruth.txt",
        "nyt": "nytEditorialSnippets_GroundTruth.txt",
    }
)
VADER_SOURCE = f"PyPI sdist {VADER_REQUIREMENT} (hutto_ICWSM_2014), cached by fetch_vader()"
_VADER_INNER_ARCHIVE = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
_VADER_INNER_FOLDER = "hutto_ICWSM_2014"


@dataclass(frozen=True)
class TaskSpec:
    """What a task is: its kind, labels, input shape, metrics and where its data comes from.

    ``metrics`` are the metrics :func:`structprune.metrics.compute_metrics` reports for the task
    (GLUE conventions); ``main_metric`` is the one to select models by. ``source`` is the dataset
    folder under the data directory (or :data:`VADER_SOURCE`); ``splits`` are the splits
    :func:`load_task` accepts.
    """

    name: str
    kind: str
    label_names: tuple[str, ...]
    pair: bool
    metrics: tuple[str, ...]
    main_metric: str
    splits: tuple[str, ...]
    source: str
    description: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"task {self.name!r}: kind {self.kind!r} is not one of {KINDS}")
        if self.kind == "regression" and self.label_names:
            raise ValueError(f"task {self.name!r}: a regression task has no label_names")
        if self.kind == "classification" and len(self.label_names) < 2:
            raise ValueError(
                f"task {self.name!r}: a classification task needs at least 2 label names, "
                f"got {self.label_names}"
            )
        if len(set(self.label_names)) != len(self.label_names):
            raise ValueError(f"task {self.name!r}: duplicate label names in {self.label_names}")
        unknown = [m for m in self.metrics if m not in METRIC_NAMES]
        if not self.metrics or unknown:
            raise ValueError(
                f"task {self.name!r}: metrics {self.metrics} must be a non-empty subset of "
                f"{METRIC_NAMES}"
            )
        if self.main_metric not in self.metrics:
            raise ValueError(
                f"task {self.name!r}: main_metric {self.main_metric!r} is not in {self.metrics}"
            )
        if not self.splits:
            raise ValueError(f"task {self.name!r}: no splits")

    @property
    def num_labels(self) -> int:
        """Output size of a model head for this task: the class count, or 1 for regression."""
        return len(self.label_names) if self.kind == "classification" else 1


@dataclass(repr=False)
class TaskData:
    """One split of one task: parallel lists of texts and labels.

    ``text_b`` holds the second sentence of each pair for pair tasks and is ``None`` otherwise.
    ``labels`` are class ids (indices into ``task.label_names``) for classification, floats for
    regression, or ``None`` for unlabelled text (see :func:`load_file`).
    """

    task: TaskSpec
    split: str
    text_a: list[str]
    text_b: list[str] | None
    labels: list[int] | list[float] | None

    def __post_init__(self) -> None:
        n = len(self.text_a)
        if self.task.pair != (self.text_b is not None):
            raise ValueError(
                f"{self.task.name}: text_b must be {'a list' if self.task.pair else 'None'} "
                f"because the task is {'a' if self.task.pair else 'not a'} sentence-pair task"
            )
        if self.text_b is not None and len(self.text_b) != n:
            raise ValueError(f"{self.task.name}: {n} text_a but {len(self.text_b)} text_b entries")
        if self.labels is not None and len(self.labels) != n:
            raise ValueError(f"{self.task.name}: {n} texts but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.text_a)

    def __repr__(self) -> str:
        return (
            f"TaskData(task={self.task.name!r}, split={self.split!r}, n={len(self)}, "
            f"pair={self.task.pair}, labelled={self.labels is not None})"
        )

    def select(self, indices: Sequence[int]) -> TaskData:
        """The examples at ``indices``, in that order (repeats allowed, e.g. for bootstrapping)."""
        idx = [int(i) for i in indices]
        bad = [i for i in idx if not 0 <= i < len(self)]
        if bad:
            raise IndexError(
                f"{self.task.name} {self.split}: indices {bad[:5]} are outside 0..{len(self) - 1}"
            )
        return TaskData(
            task=self.task,
            split=self.split,
            text_a=[self.text_a[i] for i in idx],
            text_b=None if self.text_b is None else [self.text_b[i] for i in idx],
            labels=None if self.labels is None else [self.labels[i] for i in idx],
        )

    def subset(self, n: int, seed: int = 0) -> TaskData:
        """``n`` examples drawn at random without replacement, kept in their original order.

        The draw takes the first ``n`` of a permutation seeded with ``seed``, so under one seed a
        smaller subset is contained in a larger one (learning curves add data, never swap it).
        """
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
            raise TypeError(f"subset size must be an integer, got {n!r}")
        if not 1 <= n <= len(self):
            raise ValueError(
                f"cannot take {n} examples from {self.task.name} {self.split}, which has "
                f"{len(self)}; choose a size between 1 and {len(self)}"
            )
        order = np.random.default_rng(seed).permutation(len(self))
        return self.select(sorted(order[:n].tolist()))


# ---------------------------------------------------------------------------------------------
# Locating the data


def default_data_dir() -> Path:
    """``<repo root>/../shared/data``, where the repo root is the folder above this package."""
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The benchmark data folder: ``data_dir``, else ``$STRUCTPRUNE_DATA_DIR``, else the default."""
    env = os.environ.get(DATA_DIR_ENV)
    if data_dir is not None:
        candidate, origin = Path(data_dir), "the data_dir argument"
    elif env:
        candidate, origin = Path(env), f"${DATA_DIR_ENV}"
    else:
        candidate, origin = default_data_dir(), "the default location"
    candidate = candidate.expanduser()
    if candidate.is_dir():
        return candidate
    raise FileNotFoundError(
        f"task data folder {candidate} (from {origin}) does not exist. It is looked up in this "
        f"order: 1) the data_dir argument, 2) the {DATA_DIR_ENV} environment variable, "
        f"3) {default_data_dir()} (../shared/data beside the repository). Point one of them at "
        "the folder holding SST-2/, RTE/, ... (see that folder's README)."
    )


# ---------------------------------------------------------------------------------------------
# Reading files


class _Row(NamedTuple):
    """One example as read from a file, before its label is parsed."""

    text_a: str
    text_b: str | None
    label: str | None
    where: str  # "path:line", for error messages


_Reader = Callable[[Path], list[_Row]]  # dataset folder -> the rows of one split
_Column = str | int


def _read_lines(path: Path, encoding: str = "utf-8") -> list[str]:
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


def _records(path: Path, fmt: str, encoding: str = "utf-8") -> list[tuple[list[str], int]]:
    """Non-blank records of a delimited file with their line numbers.

    TSV is split on tabs with quoting disabled (RTE, QNLI and others contain bare double quotes);
    CSV follows the usual quoting rules.
    """
    if fmt == "tsv":
        return [
            (line.split("\t"), i) for i, line in enumerate(_read_lines(path, encoding), 1) if line
        ]
    reader = csv.reader(io.StringIO("\n".join(_read_lines(path, encoding)), newline=""))
    return [(fields, reader.line_num) for fields in reader if fields]


def _rows_from_records(
    path: Path,
    records: list[tuple[list[str], int]],
    text_columns: Sequence[_Column],
    label_column: _Column | None,
) -> list[_Row]:
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
        rows.append(_Row(texts[0], texts[1] if len(texts) > 1 else None, label, f"{path}:{line}"))
    return rows


def _tsv(
    path: Path, text_columns: Sequence[_Column], label_column: _Column, encoding: str = "utf-8"
) -> list[_Row]:
    return _rows_from_records(path, _records(path, "tsv", encoding), text_columns, label_column)


def _jsonl(
    path: Path,
    text_keys: Sequence[_Column],
    label_key: _Column | None,
    encoding: str = "utf-8",
) -> list[_Row]:
    """Rows of a JSON Lines file: one object per line, texts and label under the given keys."""
    if not all(
        isinstance(k, str) for k in [*text_keys, *([] if label_key is None else [label_key])]
    ):
        raise ValueError(
            f"{path}: JSONL columns are object keys (strings), got {text_keys}, {label_key}"
        )
    rows = []
    for i, line in enumerate(_read_lines(path, encoding), 1):
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
        rows.append(_Row(texts[0], texts[1] if len(texts) > 1 else None, label, f"{path}:{i}"))
    return rows


def _label_first(path: Path, encoding: str = "utf-8") -> list[_Row]:
    """Rows of a ``<label> <text>`` file (the SentEval / Kim-2014 format)."""
    rows = []
    for i, line in enumerate(_read_lines(path, encoding), 1):
        if line:
            label, _, text = line.partition(" ")
            rows.append(_Row(text.strip(), None, label, f"{path}:{i}"))
    return rows


def _parallel(premises: Path, hypotheses: Path, labels: Path) -> list[_Row]:
    """Rows from three line-aligned files (SNLI in the SentEval layout)."""
    a, b, y = _read_lines(premises), _read_lines(hypotheses), _read_lines(labels)
    if not len(a) == len(b) == len(y):
        raise ValueError(
            f"parallel files differ in length: {premises} {len(a)}, {hypotheses} {len(b)}, "
            f"{labels} {len(y)} lines"
        )
    return [
        _Row(s1.strip(), s2.strip(), lab.strip(), f"{labels}:{i}")
        for i, (s1, s2, lab) in enumerate(zip(a, b, y, strict=True), 1)
    ]


def _qqp(path: Path) -> list[_Row]:
    """QQP rows (id, qid1, qid2, question1, question2, is_duplicate; no header).

    One row (id 133273) lost the tab before its label, which sits at the end of question2 after a
    space. It is repaired, not dropped: the label is split off again, so all 23,497 rows load.
    """
    records = []
    for fields, line in _records(path, "tsv"):
        if len(fields) == 5:
            question2, _, label = fields[4].rpartition(" ")
            if label in ("0", "1"):
                fields = [*fields[:4], question2, label]
        records.append((fields, line))
    return _rows_from_records(path, records, (3, 4), 5)


def _number(row: _Row) -> float:
    """The row's label as a finite float, or an error naming the file and line."""
    try:
        value = float(row.label)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{row.where}: label {row.label!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{row.where}: label {row.label!r} is not a finite number")
    return value


def _to_task_data(
    spec: TaskSpec,
    split: str,
    rows: list[_Row],
    raw_labels: Mapping[str, int],
    labelled: bool = True,
) -> TaskData:
    """Parse labels (raw string -> class id, or -> float) and build the :class:`TaskData`."""
    if not rows:
        raise ValueError(f"{spec.name} {split}: the data has no examples")
    labels: list[int] | list[float] | None = None
    if labelled:
        for row in rows:
            if not row.label:
                raise ValueError(f"{row.where}: label missing ({spec.name} needs one per example)")
        if spec.kind == "regression":
            labels = [_number(row) for row in rows]
        else:
            unknown = next((row for row in rows if row.label not in raw_labels), None)
            if unknown is not None:
                raise ValueError(
                    f"{unknown.where}: label {unknown.label!r} is not one of {list(raw_labels)} "
                    f"(task {spec.name})"
                )
            labels = [raw_labels[row.label] for row in rows]  # type: ignore[index]
    return TaskData(
        task=spec,
        split=split,
        text_a=[row.text_a for row in rows],
        text_b=[row.text_b or "" for row in rows] if spec.pair else None,
        labels=labels,
    )


# ---------------------------------------------------------------------------------------------
# Seeded splits for datasets that have none


def _carve(rows: list[_Row], held_out: tuple[str, ...]) -> dict[str, list[_Row]]:
    """Split ``rows`` into the ``held_out`` parts and ``"train"`` (see the module docstring).

    Groups of identical inputs are visited in the order of a seeded hash of their text, so the
    split depends on nothing but the data: not on the NumPy version, nor on the order of the rows.
    Held-out parts are filled in turn until each reaches its target; the rest is train.
    """
    groups: dict[tuple[str, str | None], list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault((row.text_a, row.text_b), []).append(i)

    def rank(key: tuple[str, str | None]) -> bytes:
        text = f"{SPLIT_SEED}\x00{key[0]}\x00{'' if key[1] is None else key[1]}"
        return hashlib.sha256(text.encode("utf-8")).digest()

    target = max(MIN_HELD_OUT, math.ceil(HELD_OUT_FRACTION * len(rows)))
    parts: dict[str, list[int]] = {name: [] for name in (*held_out, "train")}
    pending = list(held_out)
    for key in sorted(groups, key=rank):
        part = pending[0] if pending else "train"
        parts[part].extend(groups[key])
        if pending and len(parts[part]) >= target:
            pending.pop(0)
    return {name: [rows[i] for i in sorted(idx)] for name, idx in parts.items()}


def _carved(pool: _Reader, part: str, held_out: tuple[str, ...] = ("dev", "test")) -> _Reader:
    """A reader for one part of the seeded split of the rows ``pool`` reads."""
    return lambda folder: _carve(pool(folder), held_out)[part]


# ---------------------------------------------------------------------------------------------
# The VADER corpora (PyPI)


class VaderDownloadError(RuntimeError):
    """pip could not download the vaderSentiment source archive (no network or no index)."""


def vader_cache_dir() -> Path:
    """``$STRUCTPRUNE_CACHE/vader``, or ``~/.cache/structprune/vader`` when that is unset."""
    root = os.environ.get(CACHE_ENV)
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "structprune") / "vader"


def fetch_vader(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    archive: str | os.PathLike[str] | None = None,
) -> Path:
    """The folder holding the four VADER ``*_GroundTruth.txt`` corpora, downloading them if needed.

    The corpora ship inside the source distribution of ``vaderSentiment==3.3.2`` on PyPI (MIT
    licence; Hutto & Gilbert, ICWSM 2014). If ``cache_dir`` (default :func:`vader_cache_dir`)
    already holds the four files, nothing is downloaded. Otherwise ``pip download`` fetches the
    archive (or ``archive`` names a copy of it, for machines without network), its sha256 must equal
    :data:`VADER_SHA256`, and the four files are extracted into a temporary folder beside
    ``cache_dir`` that is then renamed into place, so the cache is never half-written.

    Raises :class:`VaderDownloadError` when pip fails and ``ValueError`` on a checksum mismatch
    (nothing is cached then).
    """
    target = Path(cache_dir).expanduser() if cache_dir is not None else vader_cache_dir()
    if all((target / name).is_file() for name in VADER_FILES.values()):
        return target
    with tempfile.TemporaryDirectory(prefix="structprune-vader-") as tmp:
        sdist = Path(archive) if archive is not None else _pip_download(Path(tmp))
        _check_sha256(sdist)
        _install_vader(sdist, target)
    return target


def _pip_download(dest: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        "--disable-pip-version-check",
        VADER_REQUIREMENT,
        "-d",
        str(dest),
    ]
    advice = (
        f"Check access to the package index, or download {VADER_SDIST} elsewhere and call "
        "fetch_vader(archive=<path>)."
    )
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    except subprocess.TimeoutExpired:
        raise VaderDownloadError(f"`{' '.join(cmd)}` took over 600 s. {advice}") from None
    if proc.returncode != 0:
        raise VaderDownloadError(
            f"`{' '.join(cmd)}` failed (exit {proc.returncode}): "
            f"{proc.stderr.strip()[-2000:]}\n{advice}"
        )
    sdist = dest / VADER_SDIST
    if not sdist.is_file():
        found = sorted(p.name for p in dest.iterdir())
        raise VaderDownloadError(
            f"pip succeeded but did not save {VADER_SDIST} (found {found}). {advice}"
        )
    return sdist


def _check_sha256(path: Path) -> None:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != VADER_SHA256:
        raise ValueError(
            f"{path} has sha256 {digest.hexdigest()}, expected {VADER_SHA256}: it is not the "
            f"published {VADER_SDIST} (corrupt or altered). Nothing was cached; download it again."
        )


def _member_bytes(archive: tarfile.TarFile, name: str) -> bytes:
    member = archive.extractfile(name)
    if member is None:
        raise ValueError(f"{name} in {archive.name} is not a regular file")
    return member.read()


def _install_vader(sdist: Path, target: Path) -> None:
    """Extract the four corpora from ``sdist`` into ``target`` via a temporary sibling folder."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-partial-", dir=target.parent))
    try:
        with tarfile.open(sdist, "r:gz") as outer:
            inner_bytes = _member_bytes(outer, _VADER_INNER_ARCHIVE)
        with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
            for name in VADER_FILES.values():
                (staging / name).write_bytes(_member_bytes(inner, f"{_VADER_INNER_FOLDER}/{name}"))
        if not target.exists():
            try:
                staging.rename(target)
                return
            except OSError:  # another process created it meanwhile: fall through to file moves
                pass
        target.mkdir(exist_ok=True)
        for path in staging.iterdir():
            os.replace(path, target / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _vader_rows(
    folder: Path, corpus: str, part: str, threshold: float, regression: bool
) -> list[_Row]:
    """One part of a VADER corpus: ratings as labels, or 0/1 polarity with near-zero rows dropped.

    The seeded split is made on all rows before thresholding, so a sentence stays in the same part
    whatever the threshold and in both the polarity and the regression variant.
    """
    path = folder / VADER_FILES[corpus]
    pool = []
    for i, line in enumerate(_read_lines(path), 1):
        fields = line.split("\t")
        if len(fields) != 3:
            raise ValueError(
                f"{path}:{i}: expected id<TAB>rating<TAB>text, found {len(fields)} fields; delete "
                f"{folder} to fetch the corpus again"
            )
        pool.append(_Row(fields[2].strip(), None, fields[1].strip(), f"{path}:{i}"))
    rows = _carve(pool, ("dev", "test"))[part]
    if regression:
        return rows
    return [
        row._replace(label="1" if _number(row) > 0 else "0")
        for row in rows
        if abs(_number(row)) > threshold
    ]


# ---------------------------------------------------------------------------------------------
# The registry


@dataclass(frozen=True)
class _Source:
    spec: TaskSpec
    raw_labels: Mapping[str, int]  # label as written in the files -> class id
    readers: Mapping[str, _Reader]  # split -> rows, given the dataset folder


_SOURCES: dict[str, _Source] = {}


def _register(
    name: str,
    source: str,
    description: str,
    readers: dict[str, _Reader],
    *,
    labels: Sequence[tuple[str, str]] = (),
    pair: bool = False,
    metrics: tuple[str, ...] | None = None,
) -> None:
    """Add a task to the registry.

    ``labels`` are (label as written in the files, label name) pairs in class-id order; none means
    a regression task. The first of ``metrics`` is the main metric.
    """
    kind = "classification" if labels else "regression"
    metrics = metrics or KIND_METRICS[kind]
    spec = TaskSpec(
        name=name,
        kind=kind,
        label_names=tuple(label_name for _, label_name in labels),
        pair=pair,
        metrics=metrics,
        main_metric=metrics[0],
        splits=tuple(readers),
        source=source,
        description=description,
    )
    raw_labels = MappingProxyType({raw: i for i, (raw, _) in enumerate(labels)})
    _SOURCES[name] = _Source(spec, raw_labels, MappingProxyType(readers))


def _ids(*names: str) -> tuple[tuple[str, str], ...]:
    """Labels written in the files as the digits 0, 1, ..."""
    return tuple((str(i), label_name) for i, label_name in enumerate(names))


def _named(*names: str) -> tuple[tuple[str, str], ...]:
    """Labels written in the files as their names."""
    return tuple((label_name, label_name) for label_name in names)


def _tsv_reader(file: str, text_columns: Sequence[_Column], label_column: _Column) -> _Reader:
    return lambda folder: _tsv(folder / file, text_columns, label_column)


def _label_first_reader(file: str, encoding: str = "utf-8") -> _Reader:
    return lambda folder: _label_first(folder / file, encoding)


def _snli_reader(part: str) -> _Reader:
    return lambda folder: _parallel(*(folder / f"{name}.{part}" for name in ("s1", "s2", "labels")))


def _carved_splits(pool: _Reader) -> dict[str, _Reader]:
    return {part: _carved(pool, part) for part in ("train", "dev", "test")}


_SENTIMENT = _ids("negative", "positive")
_NLI3 = _named("entailment", "neutral", "contradiction")
_NLI2 = _named("entailment", "not_entailment")
_PAIR = ("sentence1", "sentence2")
_CARVED = (
    f"No official split: seeded split (seed {SPLIT_SEED}), dev and test 10% each but at least "
    f"{MIN_HELD_OUT} rows, train the rest; duplicates kept in one part."
)


def _sst2_splits(train_file: str) -> dict[str, _Reader]:
    return {
        "train": _tsv_reader(train_file, ("sentence",), "label"),
        "dev": _tsv_reader("dev.tsv", ("sentence",), "label"),
        "test": _tsv_reader("test-labeled.tsv", ("sentence",), "label"),
    }


_register(
    "sst2",
    "SST-2",
    "GLUE SST-2 sentiment; train is train.tsv, a fixed 1,000-example subset of the GLUE train set; "
    "test is the labelled SST test sentences (test-labeled.tsv).",
    _sst2_splits("train.tsv"),
    labels=_SENTIMENT,
)
_register(
    "sst2-full",
    "SST-2",
    "GLUE SST-2 sentiment with the full 67,349-phrase train set (train_full.tsv); dev and test as "
    "for sst2.",
    _sst2_splits("train_full.tsv"),
    labels=_SENTIMENT,
)
for _variant, _labels in (
    ("binary", _SENTIMENT),
    ("fine", _ids("very negative", "negative", "neutral", "positive", "very positive")),
):
    _register(
        f"sst-{_variant}",
        "SST",
        f"Stanford Sentiment Treebank sentences, {_variant} labels (stsa.{_variant}.* files).",
        {part: _label_first_reader(f"stsa.{_variant}.{part}") for part in ("train", "dev", "test")},
        labels=_labels,
    )
_register(
    "mr",
    "MR",
    f"Movie review snippet polarity (Pang & Lee 2005); overlaps SST/SST-2. {_CARVED}",
    _carved_splits(_label_first_reader("rt-polarity.all", "cp1252")),
    labels=_SENTIMENT,
)
_register(
    "cr",
    "CR",
    f"Customer review sentence polarity (Hu & Liu 2004). {_CARVED}",
    _carved_splits(_label_first_reader("custrev.all")),
    labels=_SENTIMENT,
)
_register(
    "subj",
    "SUBJ",
    f"Subjectivity (Pang & Lee 2004); 1 = objective. {_CARVED}",
    _carved_splits(_label_first_reader("subj.all", "cp1252")),
    labels=_ids("subjective", "objective"),
)
_register(
    "mpqa",
    "MPQA",
    f"MPQA opinion phrase polarity; noisy (99 texts occur with both labels). {_CARVED}",
    _carved_splits(_label_first_reader("mpqa.all")),
    labels=_SENTIMENT,
)
_register(
    "trec",
    "TREC",
    "TREC question type, 6 coarse classes (official train and test; no dev).",
    {
        "train": _label_first_reader("TREC.train.all", "cp1252"),
        "test": _label_first_reader("TREC.test.all", "cp1252"),
    },
    labels=_ids("DESC", "ENTY", "ABBR", "HUM", "LOC", "NUM"),
)
_register(
    "cola",
    "CoLA",
    "CoLA acceptability (raw text); dev is the in-domain dev set, dev-ood the out-of-domain one "
    "(GLUE's dev is both together).",
    {
        "train": _tsv_reader("cola_public/raw/in_domain_train.tsv", (3,), 1),
        "dev": _tsv_reader("cola_public/raw/in_domain_dev.tsv", (3,), 1),
        "dev-ood": _tsv_reader("cola_public/raw/out_of_domain_dev.tsv", (3,), 1),
    },
    labels=_ids("unacceptable", "acceptable"),
    metrics=("mcc",),
)
_register(
    "mrpc",
    "MRPC",
    "MSR paraphrase pairs (GLUE split); test is msr_paraphrase_test.txt, the GLUE test with "
    "labels. Licence: non-commercial.",
    {
        part: _tsv_reader(file, ("#1 String", "#2 String"), "Quality")
        for part, file in (
            ("train", "train.tsv"),
            ("dev", "dev.tsv"),
            ("test", "msr_paraphrase_test.txt"),
        )
    },
    labels=_ids("not_equivalent", "equivalent"),
    pair=True,
    metrics=("accuracy", "f1"),
)
_register(
    "stsb",
    "STS-B",
    "STS Benchmark similarity scores 0-5; test is original/sts-test.tsv (GLUE's test has no "
    "scores).",
    {
        "train": _tsv_reader("train.tsv", _PAIR, "score"),
        "dev": _tsv_reader("dev.tsv", _PAIR, "score"),
        "test": _tsv_reader("original/sts-test.tsv", (5, 6), 4),
    },
    pair=True,
)
_register(
    "qqp",
    "QQP",
    "Quora duplicate questions, a 23,497-pair subset of GLUE train; the row whose label lost its "
    f"tab (id 133273) is repaired. {_CARVED}",
    _carved_splits(lambda folder: _qqp(folder / "new_dev.tsv")),
    labels=_ids("not_duplicate", "duplicate"),
    pair=True,
    metrics=("accuracy", "f1"),
)
_register(
    "rte",
    "RTE",
    "GLUE RTE entailment (train and dev; the GLUE test is unlabelled).",
    {part: _tsv_reader(f"{part}.tsv", _PAIR, "label") for part in ("train", "dev")},
    labels=_NLI2,
    pair=True,
)
_register(
    "mnli",
    "MNLI",
    "MultiNLI dev-matched only (no train here). Load split 'dev' to use it as auxiliary training "
    "data for transfer; it then no longer serves as an evaluation set.",
    {"dev": lambda folder: _jsonl(folder / "dev.jsonl", ("premise", "hypothesis"), "label")},
    labels=_NLI3,
    pair=True,
)
_register(
    "snli",
    "SNLI",
    "SNLI 1.0 dev and test (PTB-tokenised SentEval files; no train here).",
    {part: _snli_reader(part) for part in ("dev", "test")},
    labels=_NLI3,
    pair=True,
)
_SICK_FILES = {
    "train": "SICK_train.txt",
    "dev": "SICK_trial.txt",
    "test": "SICK_test_annotated.txt",
}
_register(
    "sick",
    "SICK",
    "SICK 3-way entailment; dev is the trial set.",
    {
        part: _tsv_reader(file, ("sentence_A", "sentence_B"), "entailment_judgment")
        for part, file in _SICK_FILES.items()
    },
    labels=tuple((label_name.upper(), label_name) for _, label_name in _NLI3),
    pair=True,
)
_register(
    "sick-relatedness",
    "SICK",
    "SICK relatedness scores 1-5; dev is the trial set. Shares 420 sentences with STS-B: "
    "deduplicate before transfer between them.",
    {
        part: _tsv_reader(file, ("sentence_A", "sentence_B"), "relatedness_score")
        for part, file in _SICK_FILES.items()
    },
    pair=True,
)
_register(
    "qnli",
    "QNLI",
    "GLUE QNLI dev only (question, sentence); no train here.",
    {"dev": _tsv_reader("dev.tsv", ("question", "sentence"), "label")},
    labels=_NLI2,
    pair=True,
)
_register(
    "wnli",
    "WNLI",
    "GLUE WNLI; train is the full 635-pair GLUE train (train.tsv 518 + val.tsv 117), dev the GLUE "
    "dev (71). Adversarial: a sanity / negative-transfer task.",
    {
        "train": lambda folder: (
            _tsv(folder / "train.tsv", _PAIR, "label") + _tsv(folder / "val.tsv", (1, 2), 3)
        ),
        "dev": _tsv_reader("dev.tsv", _PAIR, "label"),
    },
    labels=_ids("not_entailment", "entailment"),
    pair=True,
)
_register(
    "agnews",
    "AGNEWS",
    "AG News topics. Train and dev are a seeded split of dev.tsv (10,001 articles sampled from "
    f"the official train set; dev 10%, seed {SPLIT_SEED}), test is the official 7,600-article "
    "test set.",
    {
        "train": _carved(_tsv_reader("dev.tsv", (0,), 1), "train", ("dev",)),
        "dev": _carved(_tsv_reader("dev.tsv", (0,), 1), "dev", ("dev",)),
        "test": _tsv_reader("test.tsv", (0,), 1),
    },
    labels=_named("World", "Sports", "Business", "Sci/Tech"),
)
for _corpus, _file in VADER_FILES.items():
    _register(
        f"vader-{_corpus}",
        VADER_SOURCE,
        f"VADER {_corpus} ({_file}) polarity: 1 if the mean human rating > +{VADER_THRESHOLD}, "
        f"0 if < -{VADER_THRESHOLD}, others dropped (load_vader(threshold=...) changes it). "
        f"{_CARVED} The split is made before thresholding.",
        {
            part: partial(
                _vader_rows, corpus=_corpus, part=part, threshold=VADER_THRESHOLD, regression=False
            )
            for part in ("train", "dev", "test")
        },
        labels=_SENTIMENT,
    )
    _register(
        f"vader-{_corpus}-regression",
        VADER_SOURCE,
        f"VADER {_corpus} ({_file}): the mean human rating in [-4, 4]. {_CARVED}",
        {
            part: partial(_vader_rows, corpus=_corpus, part=part, threshold=0.0, regression=True)
            for part in ("train", "dev", "test")
        },
    )

del _variant, _labels, _corpus, _file

TASKS: Mapping[str, TaskSpec] = MappingProxyType({name: src.spec for name, src in _SOURCES.items()})
"""Every built-in task by name (read-only)."""


def list_tasks() -> list[str]:
    """The names of all built-in tasks, in registry order."""
    return list(TASKS)


def get_task(name: str) -> TaskSpec:
    """The spec of task ``name`` (case-insensitive); unknown names list the closest ones."""
    return _source(name).spec


def _source(name: str) -> _Source:
    key = name.strip().lower()
    if key in _SOURCES:
        return _SOURCES[key]
    close = difflib.get_close_matches(key, list(_SOURCES), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"unknown task {name!r}.{hint} Known tasks: {', '.join(_SOURCES)}")


def _check_split(spec: TaskSpec, split: str) -> None:
    if split not in spec.splits:
        raise ValueError(
            f"task {spec.name!r} has no split {split!r}; available: {list(spec.splits)}. "
            f"({spec.description})"
        )


def _check_train_size(data: TaskData, train_size: int | None, seed: int) -> TaskData:
    if train_size is None:
        return data
    if isinstance(train_size, bool) or not isinstance(train_size, (int, np.integer)):
        raise TypeError(f"train_size must be an integer, got {train_size!r}")
    if not 1 <= train_size <= len(data):
        raise ValueError(
            f"train_size={train_size} but {data.task.name} {data.split} has {len(data)} examples; "
            f"choose 1 <= train_size <= {len(data)}"
        )
    return data.subset(train_size, seed)


def load_task(
    name: str,
    split: str = "train",
    *,
    data_dir: str | os.PathLike[str] | None = None,
    train_size: int | None = None,
    seed: int = 0,
) -> TaskData:
    """Load one split of a built-in task.

    ``data_dir`` locates the benchmark folder (see :func:`resolve_data_dir`); the ``vader-*`` tasks
    ignore it and read the :func:`fetch_vader` cache, downloading the corpus on first use.
    ``train_size=N`` keeps a random subset of N examples of the loaded split, drawn with ``seed``
    (:meth:`TaskData.subset`); ``seed`` has no effect on the fixed splits described in the module
    docstring.
    """
    source = _source(name)
    spec = source.spec
    _check_split(spec, split)
    if spec.source == VADER_SOURCE:
        folder = fetch_vader()
    else:
        root = resolve_data_dir(data_dir)
        folder = root / spec.source
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{folder} not found: task {spec.name!r} reads the {spec.source}/ folder of the "
                f"task data folder {root}. Add that folder there or point data_dir / "
                f"${DATA_DIR_ENV} at a folder that has it."
            )
    data = _to_task_data(spec, split, source.readers[split](folder), source.raw_labels)
    return _check_train_size(data, train_size, seed)


def load_vader(
    corpus: str,
    split: str = "train",
    *,
    threshold: float = VADER_THRESHOLD,
    regression: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    train_size: int | None = None,
    seed: int = 0,
) -> TaskData:
    """Load a VADER corpus (``tweets``, ``movies``, ``amazon``, ``nyt``) with a chosen threshold.

    Polarity (default): label 1 if the mean rating > ``threshold``, 0 if < ``-threshold``, rows in
    between dropped. ``regression=True``: the rating itself, all rows. The seeded split is the one
    of the ``vader-*`` tasks, made before thresholding.
    """
    if corpus not in VADER_FILES:
        raise ValueError(f"unknown VADER corpus {corpus!r}; choose one of {list(VADER_FILES)}")
    if not 0 <= threshold < 4:
        raise ValueError(f"threshold must be in [0, 4) (ratings lie in [-4, 4]), got {threshold}")
    source = _SOURCES[f"vader-{corpus}-regression" if regression else f"vader-{corpus}"]
    _check_split(source.spec, split)
    rows = _vader_rows(fetch_vader(cache_dir), corpus, split, threshold, regression)
    data = _to_task_data(source.spec, split, rows, source.raw_labels)
    return _check_train_size(data, train_size, seed)


# ---------------------------------------------------------------------------------------------
# The user's own files

_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl"}


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
    columns are object keys. TSV is read with quoting disabled, CSV with standard quoting.

    Labels: ``label_column=None`` loads unlabelled text (``labels`` is None; a classification file
    then needs ``label_names``). For classification, a label equal to one of ``label_names`` gets
    that name's index, otherwise an integer label is taken as the class id itself. Without
    ``label_names`` they are inferred: ``"0".."k"`` when all labels are non-negative integers, else
    the sorted distinct label strings. ``kind="regression"`` parses labels as floats.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    fmt = format or _FORMATS.get(path.suffix.lower())
    if fmt not in _FORMATS.values():
        raise ValueError(
            f"cannot tell the format of {path} (format={format!r}); pass format='csv', 'tsv' "
            "or 'jsonl'"
        )
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} is not one of {KINDS}")
    if len(text_columns) not in (1, 2) or isinstance(text_columns, str):
        raise ValueError(f"text_columns must list 1 or 2 columns, got {text_columns!r}")
    if kind == "regression" and label_names:
        raise ValueError("label_names apply to classification, not regression")
    if fmt == "jsonl":
        rows = _jsonl(path, text_columns, label_column, encoding)
    else:
        rows = _rows_from_records(path, _records(path, fmt, encoding), text_columns, label_column)
    if not rows:
        raise ValueError(f"{path} has no examples")
    names: tuple[str, ...] = ()
    raw_labels: dict[str, int] = {}
    if kind == "classification":
        if label_names is not None:
            names = tuple(label_names)
        elif label_column is not None:
            names = _infer_label_names(path, rows)
        else:
            raise ValueError(
                f"{path}: unlabelled classification data needs label_names (the model's classes)"
            )
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
    return _to_task_data(spec, split, rows, raw_labels, labelled=label_column is not None)


def _infer_label_names(path: Path, rows: list[_Row]) -> tuple[str, ...]:
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


# ---------------------------------------------------------------------------------------------
# Tokenisation


def encode(
    data: TaskData, tokenizer: PreTrainedTokenizerBase, max_length: int = 128
) -> dict[str, torch.Tensor]:
    """Tokenise ``data`` into tensors: ``input_ids``, ``attention_mask``, ``token_type_ids`` when
    the tokenizer makes them, and ``labels`` (int64 for classification, float32 for regression;
    absent for unlabelled data).

    Sequences (pairs truncated longest-first) are cut at ``max_length`` tokens and padded to the
    longest one in ``data``, so all rows share one length.
    """
    if len(data) == 0:
        raise ValueError(f"{data.task.name} {data.split}: nothing to encode (no examples)")
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and max_length > limit:
        raise ValueError(
            f"max_length={max_length} exceeds the tokenizer's model_max_length={limit}: the model "
            f"cannot take sequences that long; use max_length <= {limit}"
        )
    if tokenizer.pad_token is None:
        raise ValueError(
            "the tokenizer has no padding token; set one first, e.g. "
            "tokenizer.pad_token = tokenizer.eos_token"
        )
    encoded = tokenizer(
        data.text_a,
        data.text_b,
        padding="longest",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    out = {key: value for key, value in encoded.items() if isinstance(value, torch.Tensor)}
    if data.labels is not None:
        dtype = torch.long if data.task.kind == "classification" else torch.float32
        out["labels"] = torch.tensor(data.labels, dtype=dtype)
    return out


def batches(
    encoded: Mapping[str, torch.Tensor], batch_size: int, shuffle: bool = False, seed: int = 0
) -> Iterator[dict[str, torch.Tensor]]:
    """Split row-aligned tensors into batches of ``batch_size`` rows (the last one may be smaller).

    With ``shuffle`` the row order is a permutation drawn from a generator seeded with ``seed``, so
    the same seed always gives the same batches.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not encoded:
        raise ValueError("no tensors to batch")
    rows = {key: value.shape[0] for key, value in encoded.items()}
    n = next(iter(rows.values()))
    if any(count != n for count in rows.values()):
        raise ValueError(f"tensors must have the same number of rows, got {rows}")
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    else:
        order = torch.arange(n)
    return ({key: value[idx] for key, value in encoded.items()} for idx in order.split(batch_size))
