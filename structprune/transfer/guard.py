"""The harm guard ``cosine`` of the ``transfer`` method, and the gradient helpers it is built from.

After Du et al. 2018, "Adapting auxiliary losses using gradient similarity". At every step of ``joint`` and
``separate-masks`` the gradients of the target loss (task + distillation) and of each auxiliary loss are taken
with respect to a small shared set of parameters, the last encoder layer (:func:`last_layer`;
``torch.autograd.grad`` retaining the graph, so only its top is traversed), and their cosine is added to the
source's running statistics (:func:`update_trust`). The source's weight is multiplied by its trust: the running
mean of the cosine over its running root mean square, clipped to [0, 1]. Both are exponential averages with decay
:data:`GUARD_DECAY` per optimiser step (``GUARD_DECAY ** (1 / grad_accum)`` per micro-batch); the mean starts
from 0 without bias correction, so a source earns trust over its first steps, and the mean square is
bias-corrected. The ratio is scale-free: 1 for a cosine that is the same at every step, whatever its size.
(Du et al. multiply by the step's ``max(0, cos)``; BENCHMARKS.md, "The cosine guard", says why not here.)

With ``separate-masks`` / transfer ``masks`` the auxiliary loss does not reach the weights, so the gradients
compared are those of the gate logits (target loss vs. target gates, auxiliary loss vs. auxiliary gates). A zero
gradient on either side gives ``cos = 0``. Under DDP the target gradient is summed over the processes, each
weighted by its rows (:func:`over_processes`, as :mod:`structprune.train` weights their losses), so every process
applies the weights one process would over the whole batch; every process draws the same auxiliary batch, so the
auxiliary gradient needs no reduction.

The guard scales only what reaches the shared weights and gates: each auxiliary head learns at the full weight
(:class:`~structprune.transfer.objective.TransferObjective`). It scales the separate-masks tie penalty too, by
the source-weighted mean trust ``sum_i weight_i * trust_i / sum_i weight_i``: an auxiliary mask whose loss the
guard has switched off learns from its sparsity constraint alone. The auxiliary phases of ``sequential`` and
``intermediate`` have no target loss, so the guard does not apply there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

GUARD_DECAY = 0.95
"""Decay of the cosine guard's running averages per optimiser step (a memory of about 20 steps)."""


def flat_gradient(loss: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
    """The gradient of ``loss`` w.r.t. ``params`` as one float64 vector (zeros where ``loss`` does not depend
    on a parameter); the graph is retained for the backward pass that follows."""
    grads = torch.autograd.grad(loss, list(params), retain_graph=True, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).detach().double().flatten()
                      for g, p in zip(grads, params)])


def over_processes(gradient: torch.Tensor, rows: int) -> torch.Tensor:
    """A process's gradient on its shard of ``rows`` rows -> the gradient over the whole batch of a DDP step, up to
    scale (the sum over processes weighted by rows); ``gradient`` itself with one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return gradient
    gradient = gradient * rows
    dist.all_reduce(gradient)
    return gradient


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """The cosine of two vectors; 0 when either is zero (no evidence that the auxiliary loss helps)."""
    norms = float(a.norm() * b.norm())
    return float(a @ b) / norms if norms > 0 else 0.0


def gradient_cosine(target_loss: torch.Tensor, aux_loss: torch.Tensor, target_params: Sequence[torch.Tensor],
                    aux_params: Sequence[torch.Tensor]) -> float:
    """The cosine between the gradient of ``target_loss`` w.r.t. ``target_params`` and that of ``aux_loss``
    w.r.t. ``aux_params`` (the same shapes); 0 when either gradient is zero. The graphs are retained."""
    return cosine(flat_gradient(target_loss, target_params), flat_gradient(aux_loss, aux_params))


def last_layer(student: nn.Module) -> list[torch.Tensor]:
    """The trainable parameters of the student's last encoder layer: what the guard compares when the auxiliary
    loss reaches the shared weights."""
    return [p for p in student.model.layers[-1].parameters() if p.requires_grad]


def update_trust(stats: dict[str, tuple[float, float, int]], name: str, similarity: float, grad_accum: int) -> float:
    """Add a micro-batch's gradient ``similarity`` to source ``name``'s running statistics in ``stats`` (updated in
    place: ``(mean, mean square, updates)``); the guard's trust in the source, in [0, 1]."""
    decay = GUARD_DECAY ** (1 / grad_accum)
    mean, square, updates = stats.get(name, (0.0, 0.0, 0))
    mean = decay * mean + (1 - decay) * similarity
    square = decay * square + (1 - decay) * similarity ** 2
    updates += 1
    stats[name] = (mean, square, updates)
    rms = math.sqrt(square / (1 - decay ** updates))
    return min(1.0, max(0.0, mean / rms)) if rms > 0 else 0.0


def verdicts(target_loss: torch.Tensor, rows: int, aux_losses: Sequence[torch.Tensor], names: Sequence[str],
             params: tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]],
             stats: dict[str, tuple[float, float, int]], grad_accum: int) -> list[tuple[float, float]]:
    """Per source, ``(cosine, trust)`` of this micro-batch: the target gradient (of ``target_loss`` on this
    process's ``rows`` rows, w.r.t. ``params[0]``, over the processes) against each auxiliary loss's gradient
    (w.r.t. ``params[1]``); each source's statistics in ``stats`` are updated."""
    ours, theirs = params
    target_gradient = over_processes(flat_gradient(target_loss, ours), rows)
    found = []
    for name, aux_loss in zip(names, aux_losses):
        similarity = cosine(target_gradient, flat_gradient(aux_loss, theirs))
        found.append((similarity, update_trust(stats, name, similarity, grad_accum)))
    return found
