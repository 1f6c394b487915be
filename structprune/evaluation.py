"""Scoring a model on a task, as the task's kind scores it: :func:`evaluate` (metrics in percent) and
:func:`predict` (outputs of a torch model or an ONNX Runtime session).

:data:`SCORERS` maps each task kind (:data:`structprune.data.tasks.TASK_KINDS`) to its scorer; a new kind
(causal language modelling: perplexity, zero-shot log-likelihood) adds its entry here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import nn

from structprune.data import TaskSpec
from structprune.data.encoding import batches, model_inputs, num_rows, trim_padding
from structprune.metrics import compute_metrics


def _is_ort_session(model: object) -> bool:
    return hasattr(model, "run") and hasattr(model, "get_inputs") and not isinstance(model, nn.Module)


def predict(model, encoded: Mapping[str, torch.Tensor], batch_size: int = 64) -> torch.Tensor:
    """Logits of ``model`` (a torch model or an ONNX Runtime session) for every row, in order."""
    num_rows(encoded, "predict")
    outputs = []
    if _is_ort_session(model):
        names = [i.name for i in model.get_inputs()]
        missing = [n for n in names if n not in encoded]
        if missing:
            raise ValueError(f"the ONNX graph needs inputs {missing}, which the encoded data lacks "
                             f"(it has {sorted(encoded)}); encode with the model's own tokenizer")
        for batch in batches(encoded, batch_size):
            batch = trim_padding(batch)
            feed = {n: batch[n].numpy().astype(np.int64) for n in names}
            outputs.append(torch.from_numpy(model.run(None, feed)[0]))
        return torch.cat(outputs)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with torch.inference_mode():
        for batch in batches(encoded, batch_size):
            inputs = {k: v.to(device) for k, v in model_inputs(trim_padding(batch)).items()}
            outputs.append(model(**inputs).logits.float().cpu())
    model.train(was_training)
    return torch.cat(outputs)


def _label_metrics(model, encoded: Mapping[str, torch.Tensor], task: TaskSpec, batch_size: int) -> dict[str, float]:
    """Classification and regression: the task's metrics of the predicted logits against the labels."""
    if "labels" not in encoded:
        raise ValueError(f"{task.name}: the data has no labels, so there is nothing to score against")
    logits = predict(model, encoded, batch_size)
    bad = (~torch.isfinite(logits)).any(dim=-1).nonzero().flatten()
    if len(bad):
        raise FloatingPointError(f"{task.name}: the model's outputs are NaN or infinite for {len(bad)} of "
                                 f"{len(logits)} examples (first: row {int(bad[0])}), so no metric is reported; the "
                                 "weights or mask scales are broken")
    return compute_metrics(task, logits, encoded["labels"])


SCORERS: Mapping[str, Callable[..., dict[str, float]]] = {"classification": _label_metrics,
                                                          "regression": _label_metrics}


def evaluate(model, encoded: Mapping[str, torch.Tensor], task: TaskSpec, batch_size: int = 64) -> dict[str, float]:
    """The task's metrics (in percent) of ``model`` or an ONNX Runtime session on ``encoded``."""
    return SCORERS[task.kind](model, encoded, task, batch_size)
