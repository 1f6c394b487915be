"""Distillation losses from a dense teacher: predictions, and hidden states with a dynamic layer mapping.

* :func:`prediction_loss`: ``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` (Hinton et al.),
  or the MSE between the outputs for regression (one output).
* :class:`LayerDistillation`: CoFiPruning's layer-wise loss. A set of teacher layers
  (:func:`teacher_layers`: 3, 6, 9, 12 of a 12-layer model) is matched to student layers by a
  learned linear map ``W`` (initialised to the identity) and the mean squared error over each
  example's real (non-padding) tokens, averaged over examples. The mapping is dynamic: at every
  step, going from the last chosen teacher layer down, each is matched to the student layer with
  the lowest error among those below the student layer matched just before (and leaving enough
  layers for the rest), so the mapping stays monotone while layers are being pruned. The loss is
  the sum over the chosen teacher layers.

With a hidden-dimension mask the student's states are zero on removed dimensions in the masked
model and absent in the compact one; :meth:`LayerDistillation.restrict` drops the matching columns
of ``W`` so both give the same loss.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from structprune.data.encoding import model_inputs, trim_padding
from structprune.modeling_structprune import StructpruneForSequenceClassification


def prediction_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Distillation loss between logits ``[B, C]`` (KL at ``temperature``; MSE when ``C == 1``)."""
    if student.shape[-1] == 1:
        return F.mse_loss(student.float(), teacher.float())
    t = temperature
    return F.kl_div(F.log_softmax(student.float() / t, -1), F.log_softmax(teacher.float() / t, -1),
                    reduction="batchmean", log_target=True) * t * t


def teacher_layers(num_layers: int) -> tuple[int, ...]:
    """Teacher layers to distil (1-based layer outputs): every quarter of the depth, as CoFi's 3/6/9/12."""
    return tuple(sorted({max(1, num_layers * k // 4) for k in range(1, 5)}))


class LayerDistillation(nn.Module):
    """Hidden-state distillation with a learned map ``W`` and a dynamic teacher-to-student layer mapping.

    Args:
        student_hidden, teacher_hidden: hidden sizes (``W`` maps student states to teacher states).
        layers: teacher layers to distil (1-based; default :func:`teacher_layers`).
        num_student_layers: layers of the student (the mapping picks among them).
    """

    def __init__(self, student_hidden: int, teacher_hidden: int, num_student_layers: int,
                 layers: Sequence[int]):
        super().__init__()
        if not layers or len(layers) > num_student_layers:
            raise ValueError(f"distil between 1 and {num_student_layers} teacher layers, got {list(layers)}")
        self.layers = tuple(layers)
        self.num_student_layers = num_student_layers
        self.transform = nn.Linear(student_hidden, teacher_hidden)
        with torch.no_grad():
            self.transform.weight.copy_(torch.eye(teacher_hidden, student_hidden))
            self.transform.bias.zero_()

    def restrict(self, kept_hidden: Sequence[int]) -> LayerDistillation:
        """The same distillation for a student that keeps only ``kept_hidden`` dimensions."""
        out = LayerDistillation(len(kept_hidden), self.transform.out_features, self.num_student_layers, self.layers)
        with torch.no_grad():
            out.transform.weight.copy_(self.transform.weight[:, list(kept_hidden)])
            out.transform.bias.copy_(self.transform.bias)
        return out.to(self.transform.weight.device)

    def errors(self, student_states: Sequence[torch.Tensor], teacher_states: Sequence[torch.Tensor],
               attention_mask: torch.Tensor) -> torch.Tensor:
        """``[len(layers), num_student_layers]`` errors of every teacher/student layer pair: the MSE over
        each example's real tokens, averaged over examples (so a batch's loss is a mean over rows)."""
        real = attention_mask.to(torch.float32).unsqueeze(-1)
        count = real.sum(dim=(1, 2)) * self.transform.out_features
        mapped = [self.transform(s.float()) for s in student_states[1:]]
        rows = []
        for t in self.layers:
            target = teacher_states[t].float()
            rows.append(torch.stack([((((m - target) ** 2) * real).sum(dim=(1, 2)) / count).mean() for m in mapped]))
        return torch.stack(rows)

    def mapping(self, errors: torch.Tensor) -> list[int]:
        """Student layer (0-based) for each teacher layer: lowest error, monotone, searched from the last."""
        chosen, upper = [], self.num_student_layers
        values = errors.detach()
        for k in range(len(self.layers) - 1, -1, -1):
            lowest = k  # leave one student layer for each teacher layer still to match below
            candidates = range(lowest, upper)
            best = min(candidates, key=lambda j: (float(values[k, j]), j))
            chosen.append(best)
            upper = best
        return chosen[::-1]

    def forward(self, student_states: Sequence[torch.Tensor], teacher_states: Sequence[torch.Tensor],
                attention_mask: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """(sum of the matched layers' errors, the mapping)."""
        errors = self.errors(student_states, teacher_states, attention_mask)
        mapping = self.mapping(errors)
        return errors[torch.arange(len(mapping)), torch.tensor(mapping)].sum(), mapping


class TeacherCache:
    """The frozen teacher's logits and distilled hidden states for every training row, computed once.

    A learned pruning run shows the teacher every row once per epoch (15 times with the ``l0`` defaults);
    the teacher is frozen and in eval mode, so its outputs for a row never change. Caching them removes
    the teacher forward from every step (a quarter of a pruning step and about half of a fine-tuning
    step of all-MiniLM-L6-v2 on a CPU). Only the states of the distilled layers are kept, in the
    teacher's dtype, on the teacher's device: ``rows x max_length x hidden x (len(layers) + 1)`` values
    (:meth:`nbytes`), so callers cap it (:data:`CACHE_LIMIT_BYTES`) and fall back to the live teacher.
    """

    def __init__(self, teacher: nn.Module, data: Mapping[str, torch.Tensor], layers: Sequence[int],
                 batch_size: int = 64):
        reference = next(teacher.parameters())
        rows, length = data["input_ids"].shape
        self.layers = tuple(layers)
        self.states: dict[int, torch.Tensor] = {}
        self.logits: torch.Tensor | None = None
        with torch.inference_mode():
            for index in torch.arange(rows).split(batch_size):
                batch = trim_padding({name: value[index] for name, value in data.items()})
                inputs = {name: value.to(reference.device) for name, value in model_inputs(batch).items()}
                out = teacher(**inputs, output_hidden_states=True)
                if self.logits is None:
                    self.logits = torch.empty(rows, out.logits.shape[-1], dtype=out.logits.dtype,
                                              device=reference.device)
                    self.states = {t: torch.zeros(rows, length, out.hidden_states[t].shape[-1],
                                                  dtype=reference.dtype, device=reference.device) for t in layers}
                self.logits[index] = out.logits
                width = inputs["input_ids"].shape[1]
                for t in layers:
                    self.states[t][index, :width] = out.hidden_states[t]

    @staticmethod
    def nbytes(rows: int, length: int, hidden: int, layers: Sequence[int], element_size: int = 4) -> int:
        """Memory the cache of ``rows`` rows of ``length`` tokens would take."""
        return rows * length * hidden * len(layers) * element_size

    def attach(self, teacher: nn.Module) -> None:
        """Make this the cache :meth:`outputs` uses for ``teacher`` (a private copy: the learned methods
        deep-copy the teacher they are given)."""
        teacher.__dict__[_ATTRIBUTE] = self

    @staticmethod
    def outputs(teacher: nn.Module, batch: Mapping[str, torch.Tensor], inputs: Mapping[str, torch.Tensor]
                ) -> tuple[torch.Tensor, Sequence[torch.Tensor] | dict[int, torch.Tensor]]:
        """The teacher's (logits, hidden states) for ``batch``: from its attached cache when the batch carries
        the training rows' indices (``batch["row"]``), else from a forward pass."""
        cache = teacher.__dict__.get(_ATTRIBUTE)
        if cache is not None and "row" in batch:
            return cache.lookup(batch["row"], inputs["input_ids"].shape[1])
        with torch.no_grad():
            out = teacher(**inputs, output_hidden_states=True)
        return out.logits, out.hidden_states

    def lookup(self, rows: torch.Tensor, width: int) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """(logits, ``{layer: states[:, :width]}``) of the given row indices, as the live teacher gives them."""
        rows = rows.to(self.logits.device)
        return self.logits[rows], {t: s[rows, :width] for t, s in self.states.items()}


_ATTRIBUTE = "_structprune_teacher_cache"
CACHE_LIMIT_BYTES = 2 * 1024**3
"""Largest :class:`TeacherCache` the learned methods build; above it they run the teacher at every step."""


def check_teacher(teacher: StructpruneForSequenceClassification, student: StructpruneForSequenceClassification,
                  task_name: str | None = None, label_names: tuple[str, ...] | None = None) -> None:
    """Raise ``ValueError`` when ``teacher`` cannot teach ``student`` (task, labels or vocabulary differ)."""
    t, s = teacher.spec, student.spec
    if t["family"] != s["family"] or t.get("type_vocab_size") != s.get("type_vocab_size"):
        raise ValueError(f"the teacher is a {t['arch']} model and the student a {s['arch']} one: they take different "
                         "inputs; use a teacher of the student's architecture, fine-tuned on the task")
    if t["num_labels"] != s["num_labels"]:
        raise ValueError(f"the teacher has {t['num_labels']} outputs but the student has {s['num_labels']}: "
                         "use a teacher fine-tuned on the same task (same labels)")
    if t["vocab_size"] != s["vocab_size"]:
        raise ValueError(f"the teacher's vocabulary ({t['vocab_size']} tokens) differs from the student's "
                         f"({s['vocab_size']}): teacher and student must share a tokenizer")
    trained_on = getattr(teacher.config, "finetuned_task", None)
    if task_name is not None and trained_on and trained_on != task_name:
        raise ValueError(f"the teacher was fine-tuned on {trained_on!r}, not on {task_name!r}: use a teacher "
                         f"fine-tuned on {task_name!r} (structprune finetune --task {task_name})")
    if label_names is not None and trained_on:
        labels = tuple(teacher.config.id2label[i] for i in range(len(teacher.config.id2label)))
        if labels != tuple(label_names):
            raise ValueError(f"the teacher's labels {labels} differ from the task's {tuple(label_names)}: "
                             "use a teacher fine-tuned on this task")
