"""Task-specific pruning of a multi-task model: one shared encoder with a head per task
(:mod:`~structprune.multitask.model`), and a bank of per-task masks saved beside it
(:mod:`~structprune.multitask.maskbank`)."""

from structprune.multitask.maskbank import BANK_FOLDER, MaskBank, build_bank
from structprune.multitask.model import MultiTaskModel, finetune_multitask

__all__ = ["BANK_FOLDER", "MaskBank", "MultiTaskModel", "build_bank", "finetune_multitask"]
