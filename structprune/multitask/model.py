"""A multi-task model: one shared encoder, one classification head per task; its fine-tuning and files.

:class:`MultiTaskModel` holds a full-size structprune model (the shared encoder; its own head is
the first task's) and a head per task. :meth:`MultiTaskModel.task_model` returns an ordinary
:class:`~structprune.modeling_structprune.StructpruneForSequenceClassification` for one task that
*shares* the encoder's parameters and carries that task's head, so every function of the project
(pruning methods, :class:`~structprune.masked_model.MaskedModel`, ``compact()``, ``export()``) works on
one task at a time without a second forward implementation.

:func:`finetune_multitask` trains the encoder and all heads together: the batches of all tasks
are shuffled into one seeded order (each step one task's batch, so tasks are sampled in
proportion to their size), AdamW with linear warm-up and decay.

Files: :meth:`save` writes the first task's model with :func:`structprune.compaction.save` (so the
folder is a normal structprune model folder) plus ``heads.safetensors`` and ``tasks.json``.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from structprune.compaction import from_pretrained, save
from structprune.data.encoding import batches, model_inputs, trim_padding
from structprune.finetune import FinetuneConfig
from structprune.io import atomic_write_text
from structprune.modeling_structprune import (
    SECTION,
    ClassificationHead,
    StructpruneForSequenceClassification,
)

HEADS_FILE = "heads.safetensors"
TASKS_FILE = "tasks.json"


def _new_head(head: ClassificationHead, num_labels: int) -> ClassificationHead:
    """A copy of ``head`` (keeping e.g. BERT's pre-trained pooler) with a new output layer of ``num_labels``."""
    new = copy.deepcopy(head)
    out = nn.Linear(head.out.in_features, num_labels, bias=head.out.bias is not None)
    nn.init.normal_(out.weight, std=0.02)
    if out.bias is not None:
        nn.init.zeros_(out.bias)
    new.out = out.to(head.out.weight)
    return new


class MultiTaskModel(nn.Module):
    """A shared full-size encoder with one classification head per task (``num_labels`` by task)."""

    def __init__(self, encoder: StructpruneForSequenceClassification, num_labels: Mapping[str, int]):
        super().__init__()
        if not num_labels:
            raise ValueError("a multi-task model needs at least one task")
        self.encoder = encoder
        self.num_labels = dict(num_labels)
        self.heads = nn.ModuleDict({task: _new_head(encoder.head, n) for task, n in self.num_labels.items()})

    @property
    def tasks(self) -> list[str]:
        return list(self.num_labels)

    def task_model(self, task: str) -> StructpruneForSequenceClassification:
        """A model for ``task`` sharing the encoder's parameters, with the task's head."""
        if task not in self.heads:
            raise ValueError(f"unknown task {task!r}; this model has heads for {self.tasks}")
        view = copy.copy(self.encoder)
        view._modules = dict(self.encoder._modules) | {"head": self.heads[task]}
        view.spec = {**self.encoder.spec, "num_labels": self.num_labels[task]}
        view.config = copy.deepcopy(self.encoder.config)
        view.config.num_labels = self.num_labels[task]
        setattr(view.config, SECTION, view.spec)
        return view

    def save(self, directory: str | os.PathLike, tokenizer=None, overwrite: bool = False) -> Path:
        directory = Path(directory)
        save(self.task_model(self.tasks[0]), directory, tokenizer, overwrite=overwrite)
        tensors = {f"{task}.{name}": t.detach().contiguous() for task, head in self.heads.items()
                   for name, t in head.state_dict().items()}
        tmp = directory / f".{HEADS_FILE}.tmp"
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, directory / HEADS_FILE)
        atomic_write_text(directory / TASKS_FILE, json.dumps({"num_labels": self.num_labels}, indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> MultiTaskModel:
        """Read a folder written by :meth:`save` (safetensors and JSON only)."""
        directory = Path(directory)
        for name in (HEADS_FILE, TASKS_FILE):
            if not (directory / name).is_file():
                raise ValueError(f"{directory / name} is missing: {directory} is not a multi-task model folder")
        num_labels = json.loads((directory / TASKS_FILE).read_text())["num_labels"]
        model = cls(from_pretrained(directory), num_labels)
        tensors = load_file(str(directory / HEADS_FILE))
        for task, head in model.heads.items():
            head.load_state_dict({k.removeprefix(f"{task}."): v for k, v in tensors.items()
                                  if k.startswith(f"{task}.")})
        return model.eval()


def finetune_multitask(model: MultiTaskModel, data: Mapping[str, Mapping[str, torch.Tensor]],
                       config: FinetuneConfig = FinetuneConfig(), progress: bool = True) -> list[float]:
    """Train the encoder and every head on ``data`` (task -> encoded, labelled tensors); the losses."""
    unknown = set(data) - set(model.tasks)
    if unknown:
        raise ValueError(f"data for tasks {sorted(unknown)} that have no head; the model has {model.tasks}")
    views = {task: model.task_model(task) for task in data}
    order = [(task, epoch) for epoch in range(config.epochs) for task, encoded in data.items()
             for _ in range(math.ceil(len(encoded["input_ids"]) / config.batch_size))]
    shuffled = torch.randperm(len(order), generator=torch.Generator().manual_seed(config.seed)).tolist()
    total = len(order) if config.max_steps is None else min(len(order), config.max_steps)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
                                   {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=config.lr)
    warmup = math.ceil(config.warmup_ratio * total)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: (step + 1) / warmup if step < warmup else max(0.0, (total - step) / max(1, total - warmup)))
    streams = {(task, epoch): None for task, epoch in order}
    torch.manual_seed(config.seed)
    model.train()
    losses = []
    for index in tqdm(shuffled[:total], desc="multi-task fine-tune", unit="step", disable=not progress):
        task, epoch = order[index]
        if streams[(task, epoch)] is None:
            streams[(task, epoch)] = batches(data[task], config.batch_size, shuffle=True, seed=config.seed + epoch)
        batch = trim_padding(next(streams[(task, epoch)]))
        loss = views[task](**model_inputs(batch), labels=batch["labels"]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    model.eval()
    return losses
