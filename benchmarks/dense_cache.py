"""Dense fine-tuned all-MiniLM-L6-v2 models for the training-free benchmark, cached on disk.

Each task's dense baseline is fine-tuned once with :func:`structprune.finetune.finetune` and saved
(:func:`structprune.compaction.save`) under ``benchmarks/cache/dense/<task>-<train size>-s<seed>/``
(ignored by git); later runs load it instead of training again. Run this file directly to
fill the cache before a benchmark run::

    python benchmarks/dense_cache.py sst2 cr mrpc rte trec
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from structprune.arch import from_hf
from structprune.compaction import from_pretrained, save
from structprune.data import encode, load_task
from structprune.demo import minilm_dir
from structprune.evaluation import evaluate
from structprune.finetune import FinetuneConfig, finetune
from structprune.io import atomic_write_text
from structprune.modeling_structprune import StructpruneForSequenceClassification

CACHE = Path(__file__).resolve().parent / "cache" / "dense"
MAX_LENGTH = 128


@dataclass(frozen=True)
class TaskSetup:
    """Which data a task's dense model is trained and evaluated on."""

    task: str
    train_size: int | None  # None: the full training split
    eval_split: str


SETUPS = {
    "sst2": TaskSetup("sst2", 1000, "dev"),
    "cr": TaskSetup("cr", 1000, "test"),
    "mrpc": TaskSetup("mrpc", None, "dev"),
    "rte": TaskSetup("rte", None, "dev"),
    "trec": TaskSetup("trec", 1000, "test"),
}
"""SST-2, CR and TREC use 1,000 training examples, MRPC and RTE their full training split: the setups of
Kwon et al.'s reference runs that issue 6 compares against."""
FINETUNE = FinetuneConfig(epochs=3, batch_size=32, lr=1e-4, seed=0)
"""Dense fine-tuning settings, the same for every task (the demo's learning rate)."""


def folder(setup: TaskSetup, seed: int = 0) -> Path:
    return CACHE / f"{setup.task}-{setup.train_size or 'full'}-s{seed}"


def tokenizer():
    return AutoTokenizer.from_pretrained(str(minilm_dir()))


def train_data(setup: TaskSetup, seed: int = 0):
    return load_task(setup.task, "train", train_size=setup.train_size, seed=seed)


def eval_data(setup: TaskSetup):
    return load_task(setup.task, setup.eval_split)


def dense_model(setup: TaskSetup, seed: int = 0) -> tuple[StructpruneForSequenceClassification, dict]:
    """The cached dense model of ``setup`` and its record (accuracy, settings), training it if absent."""
    path = folder(setup, seed)
    record_path = path / "finetune.json"
    if record_path.is_file():
        return from_pretrained(path).eval(), json.loads(record_path.read_text())
    tok = tokenizer()
    data = train_data(setup, seed)
    torch.manual_seed(seed)
    hf = AutoModelForSequenceClassification.from_pretrained(str(minilm_dir()), num_labels=data.task.num_labels)
    log = finetune(hf, encode(data, tok, MAX_LENGTH), FINETUNE, description=f"fine-tune {setup.task}")
    model = from_hf(hf).eval()
    metrics = evaluate(model, encode(eval_data(setup), tok, MAX_LENGTH), data.task)
    record = {"task": setup.task, "train_size": len(data), "eval_split": setup.eval_split, "seed": seed,
              "metrics": metrics, "finetune": asdict(FINETUNE), "finetune_seconds": log.seconds,
              "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    save(model, path, tok, overwrite=True)
    atomic_write_text(record_path, json.dumps(record, indent=2))
    return model, record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tasks", nargs="+", choices=sorted(SETUPS))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for task in args.tasks:
        _, record = dense_model(SETUPS[task])
        print(f"{task}: {record['metrics']} ({record['train_size']} train examples, "
              f"{record['finetune_seconds']:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
