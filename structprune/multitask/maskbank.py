"""A multi-task mask bank: one base model, one training-free mask per task, applied on demand.

Training-free methods never change weights, so a single base model can serve many tasks, each with
its own pruned structure. :func:`build_bank` prunes each task's view of a
:class:`~structprune.multitask.model.MultiTaskModel` (shared encoder, that task's head) with any method of
the registry (``fisher`` by default) on that task's calibration data. The bank is saved *next to
the base model*, in ``<model folder>/maskbank/<task>/`` (one :class:`~structprune.maskset.MaskSet`
folder per task) with ``maskbank/bank.json`` indexing them; :meth:`MaskBank.apply` gives a task's
masked model and :meth:`MaskBank.compact` its physically smaller model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from structprune.arch.structure import ModelStructure
from structprune.budget import Budget
from structprune.compaction import compact
from structprune.io import atomic_write_text
from structprune.masked_model import MaskedModel
from structprune.maskset import MaskSet
from structprune.methods import get_method
from structprune.modeling_structprune import StructpruneForSequenceClassification
from structprune.multitask.model import MultiTaskModel

BANK_FOLDER = "maskbank"
INDEX_FILE = "bank.json"


@dataclass
class MaskBank:
    """Masks by task, and what each was made with (method, budget, summary)."""

    masks: dict[str, MaskSet]
    info: dict[str, dict] = field(default_factory=dict)

    def _check(self, model: MultiTaskModel, task: str) -> None:
        if task not in self.masks:
            raise ValueError(f"the mask bank has no mask for task {task!r}; it has {sorted(self.masks)}")
        if task not in model.tasks:
            raise ValueError(f"the model has no head for task {task!r}; it has {model.tasks}")

    def apply(self, model: MultiTaskModel, task: str) -> MaskedModel:
        """``task``'s model with its mask (full size, gated)."""
        self._check(model, task)
        return MaskedModel(model.task_model(task), self.masks[task])

    def compact(self, model: MultiTaskModel, task: str) -> StructpruneForSequenceClassification:
        """``task``'s physically pruned model (see :func:`structprune.compaction.compact`)."""
        self._check(model, task)
        return compact(model.task_model(task), self.masks[task])

    def save(self, model_dir: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the bank into ``<model_dir>/maskbank/``; tasks already there are kept unless replaced."""
        root = Path(model_dir) / BANK_FOLDER
        root.mkdir(parents=True, exist_ok=True)
        index = _read_index(root) if (root / INDEX_FILE).is_file() else {}
        for task, masks in self.masks.items():
            masks.save(root / task, overwrite=overwrite)
            index[task] = self.info.get(task, {})
        atomic_write_text(root / INDEX_FILE, json.dumps(index, indent=2, sort_keys=True))
        return root

    @classmethod
    def load(cls, model_dir: str | os.PathLike) -> MaskBank:
        """Read the bank saved next to the model in ``model_dir`` (safetensors and JSON only)."""
        root = Path(model_dir) / BANK_FOLDER
        if not (root / INDEX_FILE).is_file():
            raise ValueError(f"no mask bank at {root}: build one with structprune.multitask.maskbank.build_bank and save it")
        index = _read_index(root)
        return cls({task: MaskSet.load(root / task) for task in index}, index)


def _read_index(root: Path) -> dict:
    try:
        return json.loads((root / INDEX_FILE).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{root / INDEX_FILE} is not valid JSON ({err}); rebuild the mask bank") from None


def build_bank(model: MultiTaskModel, data: Mapping[str, Mapping[str, torch.Tensor]], budget: Budget | float,
               method: str = "fisher", **options) -> MaskBank:
    """A mask per task in ``data`` (task -> encoded calibration tensors), each made by ``method``."""
    prune = get_method(method)
    bank = MaskBank({})
    for task, encoded in data.items():
        view = model.task_model(task)
        result = prune(view, encoded, budget, **options)
        result.masks.meta |= {"task": task, "num_labels": model.num_labels[task]}
        bank.masks[task] = result.masks
        structure = ModelStructure.from_spec(view.spec)
        bank.info[task] = {"method": method, "summary": result.masks.summary(structure, view.spec,
                                                                           result.log["summary"]["seq_len"])}
    return bank
