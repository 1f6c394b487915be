"""Settings of the ``transfer`` method: :class:`TransferConfig`, its option tuples and the schedules.

Schedules (``joint``, ``separate-masks``) give a factor ``f(step)`` in [0, 1], ``w(step) = aux_weight * f``:
``start``: 1; ``after:N``: 0 before step N, then 1; ``anneal``: ``1 - step / prune_steps`` (linear to 0
at the end of the pruning phase); ``warmup``: 1 during the sparsity warm-up steps, then 0. The separate-masks
tie penalty is scaled by the same factor. When ``w(step) = 0`` no auxiliary loss is computed, so ``joint`` with
``aux_weight=0`` is the ``l0`` method bit for bit. ``sequential`` and ``intermediate`` take ``start`` only.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass

from structprune.methods.options import (
    L0,
    L0Config,
    Option,
    config_options,
    positive_int,
    setting,
)

COUPLINGS = ("joint", "separate-masks", "sequential", "intermediate")
TRANSFERS = ("weights", "masks", "both")
SCHEDULES = ("start", "after:N", "anneal", "warmup")
GUARDS = ("cosine", "none")


def _after_step(schedule: str) -> int | None:
    """N of ``after:N``, ``None`` for the other schedules; a clear error for an unknown schedule."""
    if schedule in ("start", "anneal", "warmup"):
        return None
    kind, _, steps = schedule.partition(":")
    if kind != "after" or not steps.strip().isdigit():
        raise ValueError(f"schedule must be one of start, after:N (N steps, e.g. after:100), anneal, warmup; "
                         f"got {schedule!r}")
    return int(steps)


@dataclass(frozen=True)
class TransferConfig:
    """Settings of the ``transfer`` method (each coupling's semantics in its module of :mod:`structprune.transfer`).

    ``l0``: the target-side settings (and the seed, batch size, step caps of every phase).
    ``tie_weight``: the separate-masks tie penalty's weight (transfer ``masks`` / ``both``).
    ``aux_epochs``: sequential and intermediate, length of the auxiliary phase in epochs of the target data's steps
    (default: 5 for sequential, 15 for intermediate; :attr:`aux_phase_epochs`).
    ``retarget_epochs``, ``dense_lr``: intermediate only, epochs of dense target fine-tuning after the auxiliary
    phase, and the learning rate of both dense phases.
    ``aux_batch_size``: auxiliary rows per source and step (default: ``l0.batch_size``).
    """

    l0: L0Config = setting(L0Config(), "target-side settings", flag=False)
    coupling: str = setting(  # the default chosen from the experiment in BENCHMARKS.md
        "intermediate", "joint: one mask and weights for all data; separate-masks: shared weights, a second mask for "
        "the auxiliary data; sequential: prune on auxiliary data first; intermediate: train the dense model on the "
        "auxiliary data, fine-tune it on the target again, then prune it with it as the teacher", choices=COUPLINGS)
    transfer: str = setting("both", "what the auxiliary data passes on: weights, masks or both; intermediate passes "
                                    "weights", choices=TRANSFERS)
    schedule: str = setting("start", "joint, separate-masks: when the auxiliary loss is on: start, after:N (from "
                                     "step N), anneal (linear to 0), warmup (during the sparsity warm-up only); "
                                     "sequential and intermediate take start")
    aux_weight: float = setting(1.0, "weight of the auxiliary losses")
    tie_weight: float = setting(1.0, "separate-masks: weight of the penalty tying the two masks")
    aux_epochs: float | None = setting(None, "sequential, intermediate: length of the auxiliary phase in epochs of "
                                             "the target data's steps (None: 5 for sequential, 15 for intermediate)",
                                       type=float)
    retarget_epochs: int = setting(3, "intermediate: epochs of dense target fine-tuning after the auxiliary phase")
    dense_lr: float = setting(1e-4, "intermediate: learning rate of the dense auxiliary and target phases")
    guard: str = setting("cosine", "joint, separate-masks: cosine scales each source by its running agreement "
                                   "with the target's gradient (mean cosine over its root mean square, clipped to "
                                   "[0, 1]); none: full weight", choices=GUARDS)
    aux_batch_size: int | None = setting(None, "auxiliary examples per source and step (None: --batch-size)",
                                         type=positive_int)

    def __post_init__(self) -> None:
        for name, allowed in (("coupling", COUPLINGS), ("transfer", TRANSFERS), ("guard", GUARDS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        _after_step(self.schedule)  # validates the schedule
        if self.coupling == "joint" and self.transfer != "both":
            raise ValueError(f"coupling 'joint' shares both weights and mask, so transfer={self.transfer!r} means "
                             "nothing there; use transfer 'both', or coupling 'separate-masks' or 'sequential' to "
                             "transfer only weights or masks")
        before = self.coupling in ("sequential", "intermediate")  # the auxiliary phase comes first
        if before and self.schedule != "start":
            raise ValueError(f"schedule {self.schedule!r} applies to joint and separate-masks training; "
                             f"{self.coupling} runs the auxiliary phase before the target phase, so use schedule "
                             "'start'")
        if self.coupling == "intermediate" and self.transfer == "masks":
            raise ValueError("coupling 'intermediate' trains the dense model before any mask exists, so it transfers "
                             "weights only; use transfer 'weights', or coupling 'sequential' to transfer masks")
        for name in ("aux_weight", "tie_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if before and self.aux_weight == 0:
            raise ValueError(f"{self.coupling} with aux_weight 0 gives the auxiliary phase no loss to learn from; use "
                             "a positive aux_weight, or method l0")
        if isinstance(self.retarget_epochs, bool) or not isinstance(self.retarget_epochs, int) \
                or self.retarget_epochs < 1:
            raise ValueError(f"retarget_epochs must be an integer >= 1, got {self.retarget_epochs!r}")
        if self.aux_epochs is not None and not self.aux_epochs > 0:
            raise ValueError(f"aux_epochs must be > 0 when given, got {self.aux_epochs}")
        if not self.dense_lr > 0:
            raise ValueError(f"dense_lr must be > 0, got {self.dense_lr}")
        if self.aux_batch_size is not None and self.aux_batch_size < 1:
            raise ValueError(f"aux_batch_size must be >= 1 when given, got {self.aux_batch_size}")

    @property
    def aux_phase_epochs(self) -> float:
        """Length of the auxiliary phase (sequential, intermediate) in epochs of the target data's steps."""
        if self.aux_epochs is not None:
            return self.aux_epochs
        return 15.0 if self.coupling == "intermediate" else 5.0

    @property
    def after_step(self) -> int | None:
        """N of schedule ``after:N`` (``None`` for the other schedules)."""
        return _after_step(self.schedule)

    @property
    def batch_size(self) -> int:
        return self.l0.batch_size if self.aux_batch_size is None else self.aux_batch_size

    def factor(self, step: int, prune_steps: int, warmup_steps: int) -> float:
        """``f(step)`` in [0, 1] of the schedule (``w(step) = aux_weight * f(step)``)."""
        if self.schedule == "start":
            return 1.0
        if self.schedule == "anneal":
            return max(0.0, 1.0 - step / prune_steps)
        if self.schedule == "warmup":
            return 1.0 if step < warmup_steps else 0.0
        return 0.0 if step < self.after_step else 1.0


AUX = Option("--aux", "auxiliary sources, comma-separated TASK[:WEIGHT]: built-in tasks (e.g. mnli, snli, sst2), "
                      "'mlm' (masked LM on the target's own text) or .csv/.tsv/.jsonl files read with --text-column "
                      "/ --label-column; e.g. mnli,snli:0.5,mlm")
AUX_MAX_EXAMPLES = Option("--aux-max-examples", "examples drawn from each source at most, with --seed "
                                                "(default: 8000)", positive_int)

OPTIONS: Mapping[str, Option] = {**L0, **config_options(TransferConfig), "aux": AUX,
                                 "aux_max_examples": AUX_MAX_EXAMPLES}
"""The ``transfer`` method's options: ``l0``'s, :class:`TransferConfig`'s, and its auxiliary sources."""


def config_from_options(settings: Mapping[str, object], base: TransferConfig = TransferConfig()) -> TransferConfig:
    """``base`` with ``settings`` applied: fields of :class:`TransferConfig` and of its ``l0`` config alike."""
    l0_fields = {f.name for f in dataclasses.fields(L0Config)}
    unknown = set(settings) - l0_fields - {f.name for f in dataclasses.fields(TransferConfig)}
    if unknown:
        raise TypeError(f"unknown transfer settings {sorted(unknown)}")
    l0 = dataclasses.replace(base.l0, **{k: v for k, v in settings.items() if k in l0_fields})
    return dataclasses.replace(base, l0=l0, **{k: v for k, v in settings.items() if k not in l0_fields})


def check_options(options: Mapping[str, object]) -> TransferConfig:
    """The :class:`TransferConfig` of ``transfer``'s command-line options (its sources aside); raises before any
    work when they do not fit together."""
    return config_from_options({k: v for k, v in options.items() if k not in ("aux", "aux_max_examples")})
