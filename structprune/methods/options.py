"""The options every pruning method declares: typed settings and their command-line flags.

This module imports nothing heavy (no torch), so the command line can show every method's options
instantly. A method's options are a mapping ``keyword -> Option``: the keyword is an argument of its
``prune`` function, the :class:`Option` says how a user sets it (flag, type, help). ``l0`` and
``transfer`` keep their many settings in a config dataclass (:class:`L0Config` here; ``TransferConfig``
in :mod:`structprune.transfer.config`) whose fields carry their help, so one declaration serves the
Python API, the defaults shown in ``--help`` and the flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from structprune.arch.structure import UNIT_NAMES


@dataclass(frozen=True)
class Option:
    """One setting as a command-line flag; ``None`` (the flag not given) leaves the method's default."""

    flag: str
    help: str
    type: Callable[[str], object] | None = None
    choices: tuple[str, ...] | None = None
    boolean: bool = False
    """``--flag`` / ``--no-flag``."""
    convert: Callable[[object], object] | None = None
    """Applied to a given value before the method sees it."""

    @property
    def dest(self) -> str:
        """The attribute argparse stores the value under."""
        return self.flag.removeprefix("--").replace("-", "_")

    def add_to(self, parser) -> None:
        """Add the flag to an ``argparse`` parser or argument group."""
        if self.boolean:
            parser.add_argument(self.flag, action=argparse.BooleanOptionalAction, default=None, help=self.help)
        else:
            parser.add_argument(self.flag, type=self.type, choices=self.choices, default=None, help=self.help)

    def value(self, given: object) -> object:
        """What the method receives for a given command-line value."""
        return given if self.convert is None else self.convert(given)


def _whole_number(text: str, minimum: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """A whole number >= 1 (an argparse type)."""
    return _whole_number(text, 1, "a whole number >= 1")


def non_negative_int(text: str) -> int:
    """A whole number >= 0 (an argparse type)."""
    return _whole_number(text, 0, "a whole number >= 0")


def count_or_all(text: str) -> int | str:
    """A positive example count, or ``all``."""
    return text if text == "all" else _whole_number(text, 1, "a positive number of examples or 'all'")


def comma_list(text: str) -> tuple[str, ...]:
    """``"a, b"`` -> ``("a", "b")``."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def setting(default: object, help: str, flag: bool = True, type: Callable[[str], object] | None = None,
            choices: tuple[str, ...] | None = None, shown: str | None = None) -> object:
    """A config dataclass field with its help text (and, unless ``flag`` is false, its command-line flag);
    ``shown``: the default as the help states it, where the value alone does not say it."""
    return field(default=default, metadata={"help": help, "flag": flag, "type": type, "choices": choices,
                                            "shown": shown})


def config_options(config: type, **flags: str) -> dict[str, Option]:
    """``keyword -> Option`` of every flagged field of a config dataclass (help ends with its default).

    ``flags`` renames a field's flag (``batch_size="--batch-size"`` is the default naming anyway).
    """
    out = {}
    for f in dataclasses.fields(config):
        meta = f.metadata
        if not meta.get("flag"):
            continue
        default = ",".join(f.default) if isinstance(f.default, tuple) else f.default
        kind = meta["type"] or (type(f.default) if f.default is not None and not isinstance(f.default, tuple)
                                else None)
        kind = positive_int if kind is int else kind
        out[f.name] = Option(flags.get(f.name, "--" + f.name.replace("_", "-")),
                             f"{meta['help']} (default: {meta.get('shown') or default})", kind, meta["choices"])
    return out


CONTROLLERS = ("hold", "lagrangian")
WARMUP = {"hold": 0.8, "lagrangian": 0.5}
"""Each controller's default sparsity warm-up share: ``hold`` measured best at 0.8 (BENCHMARKS.md); 0.5 is CoFi's."""


@dataclass(frozen=True)
class L0Config:
    """Settings of the ``l0`` method (defaults: CoFi's design, step counts sized for ~1,000 examples).

    ``max_steps`` caps each phase (smoke tests). Learning rates: ``lr`` for the model weights and
    the distillation map (linear warm-up over ``lr_warmup_ratio``, then decay), ``gate_lr`` and
    ``lambda_lr`` constant.
    """

    granularities: tuple[str, ...] = setting(UNIT_NAMES, "units to gate, comma-separated", type=comma_list)
    prune_epochs: float = setting(10.0, "epochs of the pruning phase")
    finetune_epochs: float = setting(5.0, "epochs of fine-tuning the compact model")
    sparsity_warmup: float | None = setting(None, "share of the pruning phase over which the target rises",
                                            type=float, shown="0.8 with hold, 0.5 with lagrangian")
    controller: str = setting("hold", "how the gates meet the target: hold (the Lagrangian through the warm-up, "
                                      "then one shift of all gate logits after every step keeps the expected "
                                      "sparsity exactly on the target) or lagrangian (CoFi's multipliers alone; the "
                                      "expected sparsity may end off the target, extraction then lands the masks)",
                              choices=CONTROLLERS)
    batch_size: int = setting(32, "examples per step", flag=False)
    grad_accum: int = setting(1, "micro-batches per step")
    lr: float = setting(5e-5, "weights' learning rate")
    gate_lr: float = setting(0.05, "gates' learning rate")
    lambda_lr: float = setting(0.05, "Lagrange multipliers' learning rate, gradient ascent")
    weight_decay: float = setting(0.01, "AdamW weight decay of the weights", flag=False)
    lr_warmup_ratio: float = setting(0.1, "share of each phase with a linear learning-rate warm-up", flag=False)
    max_grad_norm: float = setting(1.0, "gradient clipping norm", flag=False)
    init_log_alpha: float = setting(2.0, "initial gate log-alpha", flag=False)
    task_weight: float = setting(0.5, "weight of the task loss")
    pred_weight: float = setting(0.5, "weight of prediction distillation")
    layer_weight: float = setting(0.5, "weight of layer-wise hidden-state distillation")
    temperature: float = setting(2.0, "prediction distillation temperature")
    tolerance: float = setting(0.005, "how far mask extraction may land from the target", flag=False)
    multiple_of: int = setting(1, "extracted FFN widths and hidden size are multiples of this (--multiple-of)",
                               flag=False)
    seed: int = setting(0, "seed of gate noise, shuffling and dropout", flag=False)
    checkpoint_every: int | None = setting(50, "steps between checkpoints", flag=False)
    max_steps: int | None = setting(None, "cap on the steps of each phase (smoke tests)", type=positive_int)

    def __post_init__(self) -> None:
        unknown = set(self.granularities) - set(UNIT_NAMES)
        if not self.granularities or unknown:
            raise ValueError(f"granularities must be a non-empty subset of {UNIT_NAMES}, "
                             f"got {list(self.granularities)}")
        if self.prune_epochs <= 0 or self.finetune_epochs < 0:
            raise ValueError(f"need prune_epochs > 0 and finetune_epochs >= 0, got {self.prune_epochs} and "
                             f"{self.finetune_epochs}")
        if self.controller not in CONTROLLERS:
            raise ValueError(f"controller must be one of {CONTROLLERS}, got {self.controller!r}")
        if not 0 <= self.warmup_share <= 1:
            raise ValueError(f"sparsity_warmup is a share of the pruning phase, in [0, 1]; got {self.sparsity_warmup}")
        if min(self.lr, self.gate_lr, self.lambda_lr, self.temperature) <= 0:
            raise ValueError("lr, gate_lr, lambda_lr and temperature must be > 0")
        if isinstance(self.multiple_of, bool) or not isinstance(self.multiple_of, int) or self.multiple_of < 1:
            raise ValueError(f"multiple_of must be a whole number >= 1, got {self.multiple_of!r}")
        if min(self.task_weight, self.pred_weight, self.layer_weight) < 0 or not (
                self.task_weight or self.pred_weight or self.layer_weight):
            raise ValueError("loss weights must be >= 0 and not all 0")

    @property
    def warmup_share(self) -> float:
        """The sparsity warm-up's share of the pruning phase: ``sparsity_warmup``, else the controller's default."""
        return WARMUP[self.controller] if self.sparsity_warmup is None else self.sparsity_warmup

    def steps(self, epochs: float, rows: int) -> int:
        steps = math.ceil(epochs * math.ceil(rows / self.batch_size))
        return steps if self.max_steps is None else min(steps, self.max_steps)


SEED = Option("--seed", "seed of the data subset, calibration draws and any shuffling (default: 0)",
              non_negative_int)
BATCH_SIZE = Option("--batch-size", "examples per step (l0, transfer) or per calibration batch (default: the "
                                    "method's: 32, attribution and block_influence 8)", positive_int)
CALIB_BATCHES = Option("--calib-batches", "taylor: batches of task data used to score units (default: 8)",
                       positive_int)
OBJECTIVE = Option("--objective", "attribution, fisher, head_importance: supervised: gold labels; pseudo: the "
                                  "model's own predictions as labels; entropy: prediction entropy (attribution "
                                  "only); pseudo and entropy ignore the labels (default: supervised)",
                   choices=("supervised", "pseudo", "entropy"))
CALIB_EXAMPLES = Option("--calib-examples", "attribution, block_influence, expert, fisher, flap, head_importance: "
                                            "calibration examples drawn from the task data (default: 2048, "
                                            "head_importance 512, block_influence, expert and flap 128)", positive_int)
STEPS = Option("--steps", "attribution: points on each integration path (default: 4)", positive_int)
SCOPE = Option("--scope", "attribution: rank units across all layers (global) or prune each layer alike "
                          "(default: global)", choices=("global", "layer"))
TUNE = Option("--tune", "least-squares mask tuning of the kept units (fisher: on by default; attribution: off)",
              boolean=True)
TUNING_TEACHER = Option("--tuning-teacher", "fisher: the sublayer outputs mask tuning reconstructs "
                                            "(default: dense)", choices=("dense", "intermediate"))
TUNE_EXAMPLES = Option("--tune-examples", "fisher: calibration examples mask tuning fits, a number or 'all' "
                                          "(default: 512)", count_or_all,
                      convert=lambda value: None if value == "all" else value)
BF16 = Option("--bf16", "fisher: bf16 autocast for the gradient and tuning passes (default: where the hardware "
                        "runs bf16 natively: CUDA, or a CPU with AVX512-BF16 / AMX)", boolean=True)

MULTIPLE_OF = Option("--multiple-of", "attribution, expert, fisher, flap, l0, magnitude, taylor, transfer: keep "
                                     "every FFN width a multiple of N, and with l0 and transfer the hidden size too "
                                     "(hardware-aligned shapes, e.g. 64; default: 1)", positive_int)

ATTRIBUTION: Mapping[str, Option] = {"steps": STEPS, "objective": OBJECTIVE, "scope": SCOPE, "batch_size": BATCH_SIZE,
                                     "max_examples": CALIB_EXAMPLES, "tune": TUNE, "seed": SEED,
                                     "multiple_of": MULTIPLE_OF}
FISHER: Mapping[str, Option] = {"objective": OBJECTIVE, "max_examples": CALIB_EXAMPLES, "grad_batch_size": BATCH_SIZE,
                                "tune": TUNE, "tune_examples": TUNE_EXAMPLES, "teacher": TUNING_TEACHER, "bf16": BF16,
                                "seed": SEED, "multiple_of": MULTIPLE_OF}
HEAD_IMPORTANCE: Mapping[str, Option] = {"objective": OBJECTIVE, "batch_size": BATCH_SIZE,
                                         "max_examples": CALIB_EXAMPLES, "seed": SEED}
L0: Mapping[str, Option] = {**config_options(L0Config), "batch_size": BATCH_SIZE, "seed": SEED,
                            "multiple_of": MULTIPLE_OF}


def l0_settings(options: Mapping[str, object]) -> L0Config:
    """The :class:`L0Config` of ``l0``'s options (raises before any work when they do not fit together)."""
    return L0Config(**options)
GRANULARITY = Option("--granularity", "block_influence: remove whole layers, or attention and FFN sublayers "
                                     "apart (default: layer)", choices=("layer", "sublayer"))
ITERATIVE = Option("--iterative", "block_influence: score the remaining blocks again after each removal "
                                  "(default: once, on the dense model)", boolean=True)
BLOCK_INFLUENCE: Mapping[str, Option] = {"granularity": GRANULARITY, "iterative": ITERATIVE, "batch_size": BATCH_SIZE,
                                         "max_examples": CALIB_EXAMPLES, "seed": SEED}
MAGNITUDE: Mapping[str, Option] = {"multiple_of": MULTIPLE_OF}
METRIC = Option("--metric", "flap: a channel's input variance (fluctuation) or mean square (norm, Wanda-sp) times its "
                            "weight column's squared norm (default: fluctuation)", choices=("fluctuation", "norm"))
COMPENSATE = Option("--compensate", "expert, flap: add the removed units' mean output as a bias (default: on)",
                    boolean=True)
REFIT = Option("--refit", "expert, flap: compensate by a least-squares refit of each output projection's kept columns "
                          "on the calibration statistics, not by a bias alone (needs the model in memory; "
                          "default: off)", boolean=True)
EXPERT_SPEC = Option("--expert", "expert: the expert's calibration corpora as DIMENSION=SOURCE pairs, DIMENSION one of "
                                 "language, domain, task; SOURCE an LM task with calibration text (xquad-de, pubmed, "
                                 "wikitext2...), text:FILE or a classification task (its training sentences); e.g. "
                                 "language=xquad-de,domain=pubmed (default: none: score on --task's text alone)")
COMBINE = Option("--combine", "expert: a unit's score over the corpora: their mean relevance, or the largest "
                              "(default: mean)", choices=("mean", "max"))
EXPERT: Mapping[str, Option] = {"expert": EXPERT_SPEC, "combine": COMBINE, "compensate": COMPENSATE, "refit": REFIT,
                                "batch_size": BATCH_SIZE,
                                "max_examples": CALIB_EXAMPLES, "seed": SEED, "multiple_of": MULTIPLE_OF}
CANDIDATES = Option("--candidates", "sprint: sublayers probed by a short tuning each round (default: 3)", positive_int)
PROBE_STEPS = Option("--probe-steps", "sprint: tuning steps of each probe, 0 to rank by sensitivity alone (default: 8)",
                     non_negative_int)
TUNE_STEPS = Option("--tune-steps", "sprint: tuning steps kept after each removal (default: 16)", non_negative_int)
SHORTLIST = Option("--shortlist", "sprint: sublayers whose calibration loss is measured each round, those of lowest "
                                   "block influence per latency saved; 0: every sublayer (default: 12)",
                   non_negative_int)
SPRINT: Mapping[str, Option] = {"candidates": CANDIDATES, "probe_steps": PROBE_STEPS, "tune_steps": TUNE_STEPS,
                                "shortlist": SHORTLIST,
                                "lr": L0["lr"], "batch_size": BATCH_SIZE, "max_examples": CALIB_EXAMPLES, "seed": SEED}
FLAP: Mapping[str, Option] = {"metric": METRIC, "compensate": COMPENSATE, "refit": REFIT, "batch_size": BATCH_SIZE,
                              "max_examples": CALIB_EXAMPLES, "seed": SEED, "multiple_of": MULTIPLE_OF}
TAYLOR: Mapping[str, Option] = {"batch_size": BATCH_SIZE, "calib_batches": CALIB_BATCHES, "seed": SEED,
                                "multiple_of": MULTIPLE_OF}
