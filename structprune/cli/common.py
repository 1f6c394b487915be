"""What every command shares: the task and output options, their typed form, and loading the task's data.

Arguments become typed objects here (:class:`TaskArgs`), so nothing below the command line sees an
``argparse.Namespace``. Models and tokenizers load through :mod:`structprune.loading`. Heavy modules (torch, transformers) are imported inside the functions that need
them, so building the parser (and ``--help``) stays instant.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from structprune.data.lm import LM_TASKS, TEXT_PREFIX, list_lm_tasks
from structprune.data.readers import is_task_file
from structprune.data.registry import list_tasks
from structprune.data.splits import FILE_HELD_OUT_SHARE, SPLIT_SEED
from structprune.methods.options import SEED, positive_int

LM_CALIBRATION_WINDOWS = 128
THREADS = 2
"""Threads of every timed or ONNX Runtime command (the benchmark protocol's, structprune.bench.CPU_THREADS)."""
QUANTIZE_MODES = ("int8-dynamic", "int8-static", "fp16")
"""``structprune.quantize.MODES``, named here so that building the parser imports no ONNX Runtime."""


class CliError(ValueError):
    """A command-line input that cannot be used, with what to do instead."""


@dataclass(frozen=True)
class TaskArgs:
    """Which examples a command reads: a built-in task's split or a task file, optionally subsampled."""

    task: str
    split: str
    train_size: int | None = None
    data_dir: str | None = None
    text_columns: tuple[str, ...] = ("sentence",)
    label_column: str = "label"
    max_length: int = 128
    seed: int = 0
    eval_file: str | None = None
    """Held-out examples of a task file (same columns)."""
    carve: bool = True
    """Without ``eval_file``, hold out a seeded share of a task file for scoring (commands that train)."""

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TaskArgs:
        held_out = hasattr(args, "eval")  # the commands that train take --eval; eval scores a whole file
        return cls(args.task, args.split, args.train_size, args.data_dir, tuple(args.text_column or ["sentence"]),
                   args.label_column, args.max_length, 0 if args.seed is None else args.seed,
                   getattr(args, "eval", None), carve=held_out)

    @property
    def is_file(self) -> bool:
        return is_task_file(self.task) and not self.is_lm

    @property
    def is_lm(self) -> bool:
        """A language-model task (perplexity, zero-shot choice, last word): the model is a causal LM."""
        return self.task.startswith(TEXT_PREFIX) or self.task.strip().lower() in LM_TASKS

    def lm_calibration(self, tokenizer) -> dict:
        """Calibration windows of a language-model task's text: ``train_size`` windows (default 128) of
        ``max_length`` tokens, drawn with ``seed`` from its calibration split (a ``text:FILE`` file whole)."""
        from structprune.data.lm import get_lm_task, load_text
        from structprune.likelihood import text_windows

        lm = get_lm_task(self.task)
        if lm.kind != "perplexity" or (lm.calibration is None and not self.task.startswith(TEXT_PREFIX)):
            calibrated = [name for name, t in LM_TASKS.items() if t.calibration]
            raise CliError(f"{self.task} has no calibration text; prune on {', '.join(calibrated)} or text:FILE "
                           "(and evaluate on this task with `structprune eval`)")
        text = load_text(self.task, lm.calibration, data_dir=self.data_dir)
        return text_windows(tokenizer, text, self.max_length, self.train_size or LM_CALIBRATION_WINDOWS, self.seed)

    @cached_property
    def _file(self):
        """(rows to train on or score, held-out rows or ``None``) of a task file."""
        from structprune.data import hold_out, load_file

        data = load_file(self.task, text_columns=list(self.text_columns), label_column=self.label_column,
                         split="train" if self.carve else Path(self.task).name)
        if self.eval_file is not None:
            return data, load_file(self.eval_file, text_columns=list(self.text_columns),
                                   label_column=self.label_column, label_names=data.task.label_names or None,
                                   name=data.task.name, split=Path(self.eval_file).name)
        return hold_out(data) if self.carve else (data, None)

    @property
    def carved(self) -> bool:
        """Whether the held-out rows are a share carved from the task file."""
        return self.is_file and self.carve and self.eval_file is None

    def describe_held_out(self) -> dict[str, str]:
        """A report entry saying where the held-out rows of a task file come from."""
        if not self.carved:
            return {}
        return {"held-out rows": f"{FILE_HELD_OUT_SHARE:.0%} of {self.task} carved with seed {SPLIT_SEED} (identical "
                                 "texts kept together); trained on the rest. Pass --eval FILE for your own"}

    def load(self, split: str | None = None):
        """The examples (:class:`~structprune.data.TaskData`): a task file's training rows (all of it for ``eval``),
        or ``split`` (default: ``self.split``) of a built-in task; cut to ``train_size`` when given."""
        from structprune.data import load_task

        if self.is_file:
            data = self._file[0]
            return data if self.train_size is None else data.subset(self.train_size, self.seed)
        return load_task(self.task, split or self.split, data_dir=self.data_dir, train_size=self.train_size,
                         seed=self.seed)

    def held_out(self, split: str):
        """``split`` of a built-in task in full; for a task file, the ``--eval`` file or the carved share."""
        from structprune.data import load_task

        if not self.is_file:
            return load_task(self.task, split, data_dir=self.data_dir)
        return self._file[1]

    def other_splits(self) -> tuple:
        """Every split of the task except the one read: a built-in task's other splits, a task file's held-out
        rows (auxiliary examples found there are removed)."""
        from structprune.data import get_task

        if self.is_file:
            return () if self._file[1] is None else (self._file[1],)
        return tuple(self.held_out(split) for split in get_task(self.task).splits if split != self.split)


def add_task_options(p: argparse.ArgumentParser, split: str, subset: str = "use a random subset of this many "
                     "training examples", held_out: bool = True) -> None:
    p.add_argument("--task", required=True,
                   help=f"a built-in task ({', '.join(list_tasks())}) or a .csv/.tsv/.jsonl file of labelled "
                        "examples (see --text-column, --label-column); for a causal LM, a language-model task "
                        f"({', '.join(list_lm_tasks())})")
    p.add_argument("--split", default=split, help=f"split of a built-in task to read (default: {split}); "
                                                  "ignored for files")
    p.add_argument("--train-size", type=positive_int, default=None, help=f"{subset}, drawn with --seed (default: all)")
    p.add_argument("--data-dir", default=None,
                   help="folder holding the benchmark data sets (default: $STRUCTPRUNE_DATA_DIR, else "
                        "../shared/data from the current directory); the vader-* tasks need none")
    p.add_argument("--text-column", action="append", default=None,
                   help="for a task file: the text column (header name); give it twice for sentence pairs "
                        "(default: sentence)")
    p.add_argument("--label-column", default="label", help="for a task file: the label column (default: label)")
    if held_out:
        p.add_argument("--eval", default=None, metavar="FILE",
                       help="for a task file: a file of held-out examples with the same columns, scored after "
                            "training (auxiliary examples found there are removed too); default: 20%% of the task "
                            "file, carved with a fixed seed and not trained on")
    p.add_argument("--max-length", type=positive_int, default=128, help="tokens per example; longer ones are cut "
                                                               "(default: 128)")
    SEED.add_to(p)


def add_output_options(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--out", required=True, help=what)
    p.add_argument("--overwrite", action="store_true", help="replace --out if it already holds something")


def refuse_existing_file(path: str, overwrite: bool) -> None:
    if Path(path).exists() and not overwrite:
        raise CliError(f"{path} already exists; choose another file or pass --overwrite")
