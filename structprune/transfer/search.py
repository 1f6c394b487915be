"""Choosing how to use auxiliary tasks for one target: a small, budgeted sweep scored on held-out rows.

:func:`transfer_search` holds out a seeded :data:`SEARCH_DEV_FRACTION` of the target's training rows as
a search dev set (the rest trains every run, teacher included, so the choice never sees the real
evaluation data), loads the auxiliary sources once (deduplicated against all of the target's rows
and evaluation splits, :func:`structprune.transfer.sources.load_auxiliary`) and runs :func:`sweep`:

1. target-only ``l0`` (the baseline every transfer setting has to beat);
2. each coupling with transfer ``both`` and schedule ``start``, ``base``'s coupling first (the default,
   ``intermediate``, so a budget of two runs compares it with the baseline);
3. the best coupling so far with its other settings: for ``joint`` the schedules ``after:N``
   (N = a quarter of the pruning steps), ``anneal``, ``warmup``; for ``separate-masks`` those
   schedules, then transfers ``weights`` and ``masks``; for ``sequential`` transfers ``weights``
   and ``masks``; ``intermediate`` has no other settings;

stopping when ``budget_runs`` runs are done or, before starting another run, ``budget_minutes``
have passed (the baseline always runs). Each transfer run's ``confidence`` is the paired bootstrap's
probability that it beats the baseline on the search dev rows (:func:`structprune.metrics.paired_bootstrap`):
with a few hundred rows held out, a gap of a point is often noise, and this says how much. The choice is
the run with the best search-dev score (the task's main metric) among the baseline and the runs whose
confidence is at least ``min_confidence`` (default 0: every run); ties go to the earlier run, so the baseline
wins a tie. Settings not varied (aux weight, guard, the l0 options) come from ``base``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from structprune.budget import Budget
from structprune.compaction import compact
from structprune.data import TaskData, encode
from structprune.evaluation import predict
from structprune.finetune import FinetuneConfig, dense_teacher
from structprune.io import atomic_write_text
from structprune.methods import l0
from structprune.metrics import compute_metrics, paired_bootstrap
from structprune.modeling_structprune import StructpruneForSequenceClassification
from structprune.transfer import method
from structprune.transfer.config import COUPLINGS, TransferConfig
from structprune.transfer.sources import AuxSource, load_auxiliary

SEARCH_DEV_FRACTION = 0.2
BASELINE = "l0 (target only)"


def run_name(config: TransferConfig | None) -> str:
    """``coupling/transfer/schedule``, or :data:`BASELINE` for target-only l0 (``None``)."""
    return BASELINE if config is None else f"{config.coupling}/{config.transfer}/{config.schedule}"


def _followups(best: TransferConfig, prune_steps: int) -> list[TransferConfig]:
    """Step 3 of the module docstring for the best coupling."""
    schedules = [f"after:{max(1, prune_steps // 4)}", "anneal", "warmup"]
    if best.coupling == "joint":
        return [dataclasses.replace(best, schedule=s) for s in schedules]
    if best.coupling == "intermediate":  # one setting: weights move before pruning, schedule start
        return []
    transfers = [dataclasses.replace(best, transfer=t, schedule="start") for t in ("weights", "masks")]
    if best.coupling == "sequential":
        return transfers
    return [dataclasses.replace(best, schedule=s) for s in schedules] + transfers


def sweep(score: Callable[[TransferConfig | None], Mapping[str, float]], base: TransferConfig, prune_steps: int,
          budget_runs: int, budget_minutes: float | None = None) -> list[dict]:
    """Run the sweep of the module docstring; ``score(config)`` prunes with ``config`` (``None``: target-only
    l0) and returns at least ``{"score": ...}``. Returns one record per run, in order."""
    if budget_runs < 1:
        raise ValueError(f"budget_runs must be >= 1, got {budget_runs}")
    started = time.perf_counter()
    runs: list[dict] = []

    def spent() -> bool:  # the baseline always runs
        return len(runs) >= budget_runs or (budget_minutes is not None and bool(runs)
                                            and time.perf_counter() - started >= 60 * budget_minutes)

    def attempt(config: TransferConfig | None) -> None:
        begin = time.perf_counter()
        outcome = dict(score(config))
        settings = {} if config is None else {"coupling": config.coupling, "transfer": config.transfer,
                                              "schedule": config.schedule}
        runs.append({"name": run_name(config), **settings, **outcome, "seconds": time.perf_counter() - begin,
                     "config": config})

    start = dataclasses.replace(base, transfer="both", schedule="start")
    couplings = [base.coupling] + [c for c in COUPLINGS if c != base.coupling]  # the default first
    queue: list[TransferConfig | None] = [None] + [dataclasses.replace(start, coupling=c) for c in couplings]
    while queue and not spent():
        attempt(queue.pop(0))
    if not spent():
        tried = [run for run in runs if run["config"] is not None]
        best = max(tried, key=lambda run: run["score"])["config"]  # max keeps the first of equal scores
        for config in _followups(best, prune_steps):
            if spent():
                break
            attempt(config)
    return runs


@dataclass
class SearchResult:
    """Every run of a search (``name``, settings, ``score``, ``achieved`` sparsity, ``seconds``, and for transfer
    runs the ``confidence`` that they beat the baseline, the first run) and the choice."""

    task: str
    metric: str
    runs: list[dict]
    setup: dict = field(default_factory=dict)
    min_confidence: float = 0.0

    @property
    def choice(self) -> dict:
        """The run with the best score (the first of equal ones) among the baseline and the runs whose
        ``confidence`` (1 where none was measured) is at least :attr:`min_confidence`."""
        eligible = [run for i, run in enumerate(self.runs)
                    if i == 0 or (run.get("confidence") is None or run["confidence"] >= self.min_confidence)]
        return max(eligible, key=lambda run: run["score"])

    def table(self) -> str:
        lines = [f"{'run':<34} {self.metric + ' %':>12} {'P(> l0)':>8} {'sparsity':>9} {'seconds':>8}"]
        for run in self.runs:
            mark = "  <- choice" if run is self.choice else ""
            sure = "" if run.get("confidence") is None else f"{run['confidence']:.2f}"
            lines.append(f"{run['name']:<34} {run['score']:>12.2f} {sure:>8} {run['achieved']:>9.3f} "
                         f"{run['seconds']:>8.0f}" + mark)
        return "\n".join(lines)

    def as_dict(self) -> dict:
        def plain(run: dict) -> dict:
            config = run["config"]
            return {k: v for k, v in run.items() if k != "config"} | {
                "config": None if config is None else dataclasses.asdict(config)}

        runs = [plain(run) for run in self.runs]
        return {"task": self.task, "metric": self.metric, "setup": self.setup, "runs": runs,
                "min_confidence": self.min_confidence, "choice": plain(self.choice)}

    def save(self, path: str | os.PathLike) -> None:
        """Write :meth:`as_dict` as JSON (atomically)."""
        atomic_write_text(Path(path), json.dumps(self.as_dict(), indent=2, default=float))


def split_search_dev(train: TaskData, seed: int) -> tuple[TaskData, TaskData]:
    """(search train, search dev): a seeded :data:`SEARCH_DEV_FRACTION` of the rows held out (at least one
    row each side), both kept in file order."""
    if len(train) < 2:
        raise ValueError(f"transfer search needs at least 2 training examples to hold some out, got {len(train)}")
    held = min(len(train) - 1, max(1, round(SEARCH_DEV_FRACTION * len(train))))
    order = np.random.default_rng(seed).permutation(len(train))
    return train.select(sorted(order[held:].tolist())), train.select(sorted(order[:held].tolist()))


def transfer_search(model: StructpruneForSequenceClassification, tokenizer, train: TaskData,
                    sources: Sequence[AuxSource], budget: Budget, *, base: TransferConfig = TransferConfig(),
                    budget_runs: int = 6, budget_minutes: float | None = None, min_confidence: float = 0.0,
                    target_eval: Sequence[TaskData] = (),
                    data_dir: str | None = None, max_length: int = 128,
                    dense_config: FinetuneConfig = FinetuneConfig(epochs=3, lr=1e-4),
                    checkpoint_dir: str | os.PathLike | None = None, model_name: str = "model",
                    progress: bool = True) -> SearchResult:
    """Search how to use ``sources`` for pruning ``model`` on ``train.task`` (see the module docstring).

    ``model`` is the teacher when it is fine-tuned on the task (it may then have seen the search dev
    rows: fine-tune from the pre-trained model for a clean search); otherwise a copy is fine-tuned
    on the search-train rows. ``checkpoint_dir`` makes every run resumable (one folder per run).
    ``min_confidence``: a transfer run is chosen only if it beats the baseline with at least this paired bootstrap
    probability on the search dev rows (0.9: a clear win; 0: the best score, whatever the noise).
    """
    if not 0.0 <= min_confidence <= 1.0:
        raise ValueError(f"min_confidence is a probability in [0, 1], got {min_confidence}")
    seed = base.l0.seed
    search_train, search_dev = split_search_dev(train, seed)
    aux, dedup = load_auxiliary(sources, train, target_eval, tokenizer, max_length, seed, data_dir)
    train_enc, dev_enc = encode(search_train, tokenizer, max_length), encode(search_dev, tokenizer, max_length)
    directory = None if checkpoint_dir is None else Path(checkpoint_dir)
    teacher, trained_here = dense_teacher(model, train_enc, train.task, dense_config, directory, progress, model_name,
                                          "transfer-search")
    task = train.task

    def score(config: TransferConfig | None) -> dict[str, float]:
        where = None if directory is None else directory / run_name(config).replace("/", "-").replace(" ", "-")
        if config is None:
            result = l0.prune(teacher, train_enc, budget, config=base.l0, checkpoint_dir=where, progress=progress)
        else:  # no teacher given: intermediate distils from its retargeted model, the others from ``teacher``
            result = method.prune(teacher, train_enc, budget, aux=aux, config=config, checkpoint_dir=where,
                                    progress=progress)
        pruned = compact(teacher, result.masks)
        pruned.load_state_dict(result.weights)
        predictions = predict(pruned.eval(), dev_enc)
        return {"score": compute_metrics(task, predictions, dev_enc["labels"])[task.main_metric],
                "achieved": result.log["achieved"], "predictions": predictions}

    prune_steps = base.l0.steps(base.l0.prune_epochs, len(search_train))
    runs = sweep(score, base, prune_steps, budget_runs, budget_minutes)
    baseline = runs[0]["predictions"]
    for run in runs:
        predictions = run.pop("predictions")
        run["confidence"] = None if run["config"] is None else paired_bootstrap(
            task, predictions, baseline, dev_enc["labels"], seed=seed)
    setup = {"model": model_name, "train_size": len(train), "search_train": len(search_train),
             "search_dev": len(search_dev), "seed": seed, "budget": budget.as_dict(),
             "teacher": "fine-tuned here on the search-train rows" if trained_here else "the given model",
             "aux": dedup, "budget_runs": budget_runs, "budget_minutes": budget_minutes}
    return SearchResult(task.name, task.main_metric, runs, setup, min_confidence)
