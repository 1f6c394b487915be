"""Task data: the built-in benchmark tasks, loaders for their files and for a user's own file,
the VADER corpora, and tokenisation.

* :data:`TASKS`, :func:`list_tasks`, :func:`get_task`: one :class:`TaskSpec` per built-in task;
  :func:`load_task` -> :class:`TaskData` (texts plus class ids or float scores) for one split
  (:mod:`.registry`; task kinds and types in :mod:`.tasks`).
* :func:`load_file`: the same for a CSV / TSV / JSONL file (:mod:`.readers`).
* :func:`resolve_data_dir`: the benchmark data folder: ``data_dir``, else
  ``$STRUCTPRUNE_DATA_DIR``, else ``../shared/data`` from the current working directory
  (:mod:`.root`).
* Seeded splits for datasets without one, and train-size subsets (:mod:`.splits`).
* :func:`fetch_vader` / :func:`load_vader`: four human-rated sentiment corpora from PyPI
  (:mod:`.vader`).
* Language-model tasks (perplexity text, zero-shot items, LAMBADA): :data:`LM_TASKS`, :func:`list_lm_tasks`,
  :func:`get_lm_task`, :func:`load_text`, :func:`load_items` (:mod:`.lm`).
* :func:`encode`, :func:`batches`, :func:`model_inputs`, :func:`trim_padding`: tensors for training and
  evaluation (:mod:`.encoding`, loaded on first use: it imports torch, the rest of the package does not).
"""

from structprune.data.lm import LM_TASKS, get_lm_task, list_lm_tasks, load_items, load_text
from structprune.data.readers import is_task_file, load_file
from structprune.data.registry import TASKS, get_task, list_tasks, load_task, load_vader
from structprune.data.root import DATA_DIR_ENV, default_data_dir, resolve_data_dir
from structprune.data.splits import FILE_HELD_OUT_SHARE, HELD_OUT_FRACTION, MIN_HELD_OUT, SPLIT_SEED, hold_out
from structprune.data.tasks import KIND_METRICS, KINDS, METRIC_NAMES, TaskData, TaskSpec
from structprune.data.vader import (
    CACHE_ENV,
    VADER_FILES,
    VADER_REQUIREMENT,
    VADER_SDIST,
    VADER_SHA256,
    VADER_SOURCE,
    VADER_THRESHOLD,
    VaderDownloadError,
    fetch_vader,
    vader_cache_dir,
)
from structprune.lazy import exports

_ENCODING = ("MODEL_INPUTS", "batches", "encode", "model_inputs", "num_rows", "trim_padding")

__getattr__, __dir__ = exports("structprune.data", {name: "structprune.data.encoding" for name in _ENCODING})

__all__ = [
    "LM_TASKS",
    "get_lm_task",
    "list_lm_tasks",
    "load_items",
    "load_text",
    "MODEL_INPUTS",
    "CACHE_ENV",
    "DATA_DIR_ENV",
    "FILE_HELD_OUT_SHARE",
    "HELD_OUT_FRACTION",
    "KINDS",
    "KIND_METRICS",
    "METRIC_NAMES",
    "MIN_HELD_OUT",
    "SPLIT_SEED",
    "TASKS",
    "VADER_FILES",
    "VADER_REQUIREMENT",
    "VADER_SDIST",
    "VADER_SHA256",
    "VADER_SOURCE",
    "VADER_THRESHOLD",
    "TaskData",
    "TaskSpec",
    "VaderDownloadError",
    "batches",
    "default_data_dir",
    "encode",
    "fetch_vader",
    "get_task",
    "hold_out",
    "is_task_file",
    "list_tasks",
    "load_file",
    "load_task",
    "load_vader",
    "model_inputs",
    "num_rows",
    "resolve_data_dir",
    "trim_padding",
    "vader_cache_dir",
]
