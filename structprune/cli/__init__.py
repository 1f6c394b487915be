"""The ``structprune`` command line: prune, compact, export, bench, eval and the demo.

A typical chain, each step reading what the previous one wrote::

    structprune finetune --model MODEL --task sst2 --train-size 1000 --out dense/
    structprune prune --model dense/ --task sst2 --train-size 1000 --method fisher --target-sparsity 0.5 --out masks/
    structprune compact masks/ --model dense/ --out pruned/
    structprune export dense/ --out onnx-dense/
    structprune export pruned/ --out onnx-pruned/
    structprune bench --dense onnx-dense/ --pruned onnx-pruned/ --backend ort
    structprune eval onnx-pruned/ --task sst2 --split dev

Methods that train weights (``l0``, ``transfer``) write all of that in one folder. ``MODEL`` is a structprune
folder (its ``config.json`` has a ``structprune`` section) or a Hugging Face folder / hub name of a
sequence-classification model. Bad input ends with a one-line error and exit status 1, never a traceback;
``--traceback`` shows it anyway, for bug reports. Building the parser imports nothing heavy: each command
imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from structprune.cli import demo, doctor, measure, models, prune
from structprune.cli.common import CliError

COMMANDS = (prune, models, measure, doctor, demo)

USER_ERRORS = ("ValueError", "OSError", "FloatingPointError", "DemoError", "AccuracyFloorError",
               "ExportParityError", "VaderDownloadError", "MissingPackageError")
"""Failures caused by input or environment (by class name, so checking imports nothing): one line, exit 1."""


def is_user_error(err: BaseException) -> bool:
    return any(cls.__name__ in USER_ERRORS for cls in type(err).__mro__)


def _check_environment() -> None:
    """Settings read from the environment, checked before a command does any work."""
    from structprune.ops import BACKENDS

    forced = os.environ.get("STRUCTPRUNE_BACKEND", "").strip().lower()
    if forced and forced not in BACKENDS:
        raise CliError(f"STRUCTPRUNE_BACKEND={forced!r} is not one of {', '.join(BACKENDS)}; unset it to let "
                       "structprune choose")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="structprune",
        description="Structured pruning for transformers: remove heads, neurons and layers for one task, compact "
                    "the model, export it to ONNX Runtime, and measure accuracy and latency.",
        epilog="Run `structprune COMMAND --help` for the options of a command.")
    parser.add_argument("--traceback", action="store_true", help="show the full Python traceback on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; the exit status (0 success, 1 bad input or failure, 2 bad arguments)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help or an argparse error (already printed)
        return int(exit_.code or 0)
    try:
        _check_environment()
        args.run(args)
    except Exception as err:
        if args.traceback or not is_user_error(err):
            raise
        print(f"structprune {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"structprune {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


__all__ = ["CliError", "build_parser", "main"]
