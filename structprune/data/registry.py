"""The built-in tasks, as one table, and loading them.

Each entry of the table names a task, its :class:`~structprune.data.tasks.TaskSpec` (kind, label
names, metrics, splits, dataset folder, description) and one reader per split; task names are
lowercase (``"sst2"``, ``"rte"``, ``"vader-tweets"``). :func:`load_task` reads one split of one
task from the benchmark data folder (:mod:`structprune.data.root`) or, for the ``vader-*`` tasks,
from the VADER cache; :func:`load_vader` reads a VADER corpus with a chosen polarity threshold.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import MappingProxyType

from structprune.data.readers import (
    Column,
    Reader,
    jsonl,
    label_first,
    parallel,
    qqp,
    tsv,
)
from structprune.data.root import DATA_DIR_ENV, resolve_data_dir
from structprune.data.splits import (
    CARVED_NOTE,
    SPLIT_SEED,
    carved,
    carved_splits,
    take_train_size,
)
from structprune.data.tasks import (
    KIND_METRICS,
    Row,
    TaskData,
    TaskSpec,
    build_task_data,
)
from structprune.data.vader import (
    VADER_FILES,
    VADER_SOURCE,
    VADER_THRESHOLD,
    fetch_vader,
    vader_rows,
)


@dataclass(frozen=True)
class TaskEntry:
    """One built-in task: its spec, the file labels' class ids, and a rows reader per split."""

    spec: TaskSpec
    raw_labels: Mapping[str, int]  # label as written in the files -> class id
    readers: Mapping[str, Reader]  # split -> rows, given the dataset folder


def _task(
    name: str,
    source: str,
    description: str,
    readers: dict[str, Reader],
    *,
    labels: Sequence[tuple[str, str]] = (),
    pair: bool = False,
    metrics: tuple[str, ...] | None = None,
    kind: str | None = None,
) -> TaskEntry:
    """A table entry. ``readers`` (split -> reader) gives the splits, in order.

    ``labels`` are (label as written in the files, label name) pairs in class-id order. ``kind``
    defaults to classification when there are labels, else regression. The first of ``metrics``
    (default: the kind's) is the main metric.
    """
    kind = kind or ("classification" if labels else "regression")
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
    return TaskEntry(spec, raw_labels, MappingProxyType(readers))


def _ids(*names: str) -> tuple[tuple[str, str], ...]:
    """Labels written in the files as the digits 0, 1, ..."""
    return tuple((str(i), label_name) for i, label_name in enumerate(names))


def _named(*names: str) -> tuple[tuple[str, str], ...]:
    """Labels written in the files as their names."""
    return tuple((label_name, label_name) for label_name in names)


_SENTIMENT = _ids("negative", "positive")
_NLI3 = _named("entailment", "neutral", "contradiction")
_NLI2 = _named("entailment", "not_entailment")
_PAIR = ("sentence1", "sentence2")
_SST_FINE = _ids("very negative", "negative", "neutral", "positive", "very positive")
_SICK_FILES = {
    "train": "SICK_train.txt",
    "dev": "SICK_trial.txt",
    "test": "SICK_test_annotated.txt",
}
_MRPC_FILES = {"train": "train.tsv", "dev": "dev.tsv", "test": "msr_paraphrase_test.txt"}


def _tsv_reader(file: str, text_columns: Sequence[Column], label_column: Column) -> Reader:
    return lambda folder: tsv(folder / file, text_columns, label_column)


def _label_first_reader(file: str, encoding: str = "utf-8") -> Reader:
    return lambda folder: label_first(folder / file, encoding)


def _snli_reader(part: str) -> Reader:
    return lambda folder: parallel(*(folder / f"{name}.{part}" for name in ("s1", "s2", "labels")))


def _sst2_splits(train_file: str) -> dict[str, Reader]:
    return {
        "train": _tsv_reader(train_file, ("sentence",), "label"),
        "dev": _tsv_reader("dev.tsv", ("sentence",), "label"),
        "test": _tsv_reader("test-labeled.tsv", ("sentence",), "label"),
    }


def _wnli_train(folder: Path) -> list[Row]:
    """WNLI's full GLUE train: train.tsv (with a header) and val.tsv (without one)."""
    return tsv(folder / "train.tsv", _PAIR, "label") + tsv(folder / "val.tsv", (1, 2), 3)


def _vader_tasks(corpus: str, file: str) -> tuple[TaskEntry, TaskEntry]:
    """The polarity and the regression task of one VADER corpus."""
    parts = ("train", "dev", "test")
    polarity = _task(
        f"vader-{corpus}",
        VADER_SOURCE,
        f"VADER {corpus} ({file}) polarity: 1 if the mean human rating > +{VADER_THRESHOLD}, "
        f"0 if < -{VADER_THRESHOLD}, others dropped (load_vader(threshold=...) changes it). "
        f"{CARVED_NOTE} The split is made before thresholding.",
        {
            part: partial(
                vader_rows, corpus=corpus, part=part, threshold=VADER_THRESHOLD, regression=False
            )
            for part in parts
        },
        labels=_SENTIMENT,
    )
    regression = _task(
        f"vader-{corpus}-regression",
        VADER_SOURCE,
        f"VADER {corpus} ({file}): the mean human rating in [-4, 4]. {CARVED_NOTE}",
        {
            part: partial(vader_rows, corpus=corpus, part=part, threshold=0.0, regression=True)
            for part in parts
        },
    )
    return polarity, regression


_TABLE: tuple[TaskEntry, ...] = (
    _task(
        "sst2",
        "SST-2",
        "GLUE SST-2 sentiment; train is train.tsv, a fixed 1,000-example subset of the GLUE train "
        "set; test is the labelled SST test sentences (test-labeled.tsv).",
        _sst2_splits("train.tsv"),
        labels=_SENTIMENT,
    ),
    _task(
        "sst2-full",
        "SST-2",
        "GLUE SST-2 sentiment with the full 67,349-phrase train set (train_full.tsv); dev and "
        "test as for sst2.",
        _sst2_splits("train_full.tsv"),
        labels=_SENTIMENT,
    ),
    *(
        _task(
            f"sst-{variant}",
            "SST",
            f"Stanford Sentiment Treebank sentences, {variant} labels (stsa.{variant}.* files).",
            {
                part: _label_first_reader(f"stsa.{variant}.{part}")
                for part in ("train", "dev", "test")
            },
            labels=labels,
        )
        for variant, labels in (("binary", _SENTIMENT), ("fine", _SST_FINE))
    ),
    _task(
        "mr",
        "MR",
        f"Movie review snippet polarity (Pang & Lee 2005); overlaps SST/SST-2. {CARVED_NOTE}",
        carved_splits(_label_first_reader("rt-polarity.all", "cp1252")),
        labels=_SENTIMENT,
    ),
    _task(
        "cr",
        "CR",
        f"Customer review sentence polarity (Hu & Liu 2004). {CARVED_NOTE}",
        carved_splits(_label_first_reader("custrev.all")),
        labels=_SENTIMENT,
    ),
    _task(
        "subj",
        "SUBJ",
        f"Subjectivity (Pang & Lee 2004); 1 = objective. {CARVED_NOTE}",
        carved_splits(_label_first_reader("subj.all", "cp1252")),
        labels=_ids("subjective", "objective"),
    ),
    _task(
        "mpqa",
        "MPQA",
        f"MPQA opinion phrase polarity; noisy (99 texts occur with both labels). {CARVED_NOTE}",
        carved_splits(_label_first_reader("mpqa.all")),
        labels=_SENTIMENT,
    ),
    _task(
        "trec",
        "TREC",
        "TREC question type, 6 coarse classes (official train and test; no dev).",
        {
            "train": _label_first_reader("TREC.train.all", "cp1252"),
            "test": _label_first_reader("TREC.test.all", "cp1252"),
        },
        labels=_ids("DESC", "ENTY", "ABBR", "HUM", "LOC", "NUM"),
    ),
    _task(
        "cola",
        "CoLA",
        "CoLA acceptability (raw text); dev is the in-domain dev set, dev-ood the out-of-domain "
        "one (GLUE's dev is both together).",
        {
            "train": _tsv_reader("cola_public/raw/in_domain_train.tsv", (3,), 1),
            "dev": _tsv_reader("cola_public/raw/in_domain_dev.tsv", (3,), 1),
            "dev-ood": _tsv_reader("cola_public/raw/out_of_domain_dev.tsv", (3,), 1),
        },
        labels=_ids("unacceptable", "acceptable"),
        metrics=("mcc",),
    ),
    _task(
        "mrpc",
        "MRPC",
        "MSR paraphrase pairs (GLUE split); test is msr_paraphrase_test.txt, the GLUE test with "
        "labels. Licence: non-commercial.",
        {
            part: _tsv_reader(file, ("#1 String", "#2 String"), "Quality")
            for part, file in _MRPC_FILES.items()
        },
        labels=_ids("not_equivalent", "equivalent"),
        pair=True,
        metrics=("accuracy", "f1"),
    ),
    _task(
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
    ),
    _task(
        "qqp",
        "QQP",
        "Quora duplicate questions, a 23,497-pair subset of GLUE train; the row whose label lost "
        f"its tab (id 133273) is repaired. {CARVED_NOTE}",
        carved_splits(lambda folder: qqp(folder / "new_dev.tsv")),
        labels=_ids("not_duplicate", "duplicate"),
        pair=True,
        metrics=("accuracy", "f1"),
    ),
    _task(
        "rte",
        "RTE",
        "GLUE RTE entailment (train and dev; the GLUE test is unlabelled).",
        {part: _tsv_reader(f"{part}.tsv", _PAIR, "label") for part in ("train", "dev")},
        labels=_NLI2,
        pair=True,
    ),
    _task(
        "mnli",
        "MNLI",
        "MultiNLI dev-matched only (no train here). Load split 'dev' to use it as auxiliary "
        "training data for transfer; it then no longer serves as an evaluation set.",
        {"dev": lambda folder: jsonl(folder / "dev.jsonl", ("premise", "hypothesis"), "label")},
        labels=_NLI3,
        pair=True,
    ),
    _task(
        "snli",
        "SNLI",
        "SNLI 1.0 dev and test (PTB-tokenised SentEval files; no train here).",
        {part: _snli_reader(part) for part in ("dev", "test")},
        labels=_NLI3,
        pair=True,
    ),
    _task(
        "sick",
        "SICK",
        "SICK 3-way entailment; dev is the trial set.",
        {
            part: _tsv_reader(file, ("sentence_A", "sentence_B"), "entailment_judgment")
            for part, file in _SICK_FILES.items()
        },
        labels=tuple((label_name.upper(), label_name) for _, label_name in _NLI3),
        pair=True,
    ),
    _task(
        "sick-relatedness",
        "SICK",
        "SICK relatedness scores 1-5; dev is the trial set. Shares 420 sentences with STS-B: "
        "deduplicate before transfer between them.",
        {
            part: _tsv_reader(file, ("sentence_A", "sentence_B"), "relatedness_score")
            for part, file in _SICK_FILES.items()
        },
        pair=True,
    ),
    _task(
        "qnli",
        "QNLI",
        "GLUE QNLI dev only (question, sentence); no train here.",
        {"dev": _tsv_reader("dev.tsv", ("question", "sentence"), "label")},
        labels=_NLI2,
        pair=True,
    ),
    _task(
        "wnli",
        "WNLI",
        "GLUE WNLI; train is the full 635-pair GLUE train (train.tsv 518 + val.tsv 117), dev the "
        "GLUE dev (71). Adversarial: a sanity / negative-transfer task.",
        {"train": _wnli_train, "dev": _tsv_reader("dev.tsv", _PAIR, "label")},
        labels=_ids("not_entailment", "entailment"),
        pair=True,
    ),
    _task(
        "agnews",
        "AGNEWS",
        "AG News topics. Train and dev are a seeded split of dev.tsv (10,001 articles sampled "
        f"from the official train set; dev 10%, seed {SPLIT_SEED}), test is the official "
        "7,600-article test set.",
        {
            "train": carved(_tsv_reader("dev.tsv", (0,), 1), "train", ("dev",)),
            "dev": carved(_tsv_reader("dev.tsv", (0,), 1), "dev", ("dev",)),
            "test": _tsv_reader("test.tsv", (0,), 1),
        },
        labels=_named("World", "Sports", "Business", "Sci/Tech"),
    ),
    *(task for corpus, file in VADER_FILES.items() for task in _vader_tasks(corpus, file)),
)
"""Every built-in task, in registry order."""


def _index(table: Sequence[TaskEntry]) -> Mapping[str, TaskEntry]:
    entries: dict[str, TaskEntry] = {}
    for entry in table:
        if entry.spec.name in entries:
            raise ValueError(f"task {entry.spec.name!r} is in the task table twice")
        entries[entry.spec.name] = entry
    return MappingProxyType(entries)


_ENTRIES = _index(_TABLE)

TASKS: Mapping[str, TaskSpec] = MappingProxyType({name: e.spec for name, e in _ENTRIES.items()})
"""Every built-in task by name (read-only)."""


def list_tasks() -> list[str]:
    """The names of all built-in tasks, in registry order."""
    return list(TASKS)


def get_task(name: str) -> TaskSpec:
    """The spec of task ``name`` (case-insensitive); unknown names list the closest ones."""
    return _lookup(name).spec


def _lookup(name: str) -> TaskEntry:
    key = name.strip().lower()
    if key in _ENTRIES:
        return _ENTRIES[key]
    close = difflib.get_close_matches(key, list(_ENTRIES), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"unknown task {name!r}.{hint} Known tasks: {', '.join(_ENTRIES)}")


def _check_split(spec: TaskSpec, split: str) -> None:
    if split not in spec.splits:
        raise ValueError(
            f"task {spec.name!r} has no split {split!r}; available: {list(spec.splits)}. "
            f"({spec.description})"
        )


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
    (:meth:`TaskData.subset`); ``seed`` has no effect on the fixed splits that
    :mod:`structprune.data.splits` carves.
    """
    entry = _lookup(name)
    spec = entry.spec
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
    data = build_task_data(spec, split, entry.readers[split](folder), entry.raw_labels)
    return take_train_size(data, train_size, seed)


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
    of the ``vader-*`` tasks, made before thresholding. The result's task is that task's spec.
    """
    if corpus not in VADER_FILES:
        raise ValueError(f"unknown VADER corpus {corpus!r}; choose one of {list(VADER_FILES)}")
    if not 0 <= threshold < 4:
        raise ValueError(f"threshold must be in [0, 4) (ratings lie in [-4, 4]), got {threshold}")
    entry = _ENTRIES[f"vader-{corpus}-regression" if regression else f"vader-{corpus}"]
    _check_split(entry.spec, split)
    rows = vader_rows(fetch_vader(cache_dir), corpus, split, threshold, regression)
    data = build_task_data(entry.spec, split, rows, entry.raw_labels)
    return take_train_size(data, train_size, seed)
