"""Hard-concrete (L0) gates, their exact expected size and FLOPs, and deterministic mask extraction.

A gate ``z`` in [0, 1] per unit (Louizos et al., 2018, as in CoFiPruning) is drawn during training as
``z = clamp(sigmoid((log u - log(1 - u) + log_alpha) / BETA) * (R - L) + L, 0, 1)`` with
``u ~ U(0, 1)``; ``log_alpha`` is learned. The stretch ``(L, R) = (-0.1, 1.1)`` makes exact 0 and
exact 1 likely, so a unit is really removed (the kernels skip it) while the gate stays
differentiable elsewhere. ``P(z != 0) = sigmoid(log_alpha - BETA * log(-L / R))``.

Granularities are those of :mod:`structprune.maskset` (``attn_layer``, ``head``, ``ffn_layer``,
``neuron``, ``hidden``), any subset.

**Expected cost.** :func:`expected_cost` gives the exact expectation of
:func:`structprune.costs.count_params` and :func:`~structprune.costs.count_flops` of the compacted
model when every unit is kept independently with probability ``P(z != 0)``, the removal rules
included (a layer gate at 0 removes its heads or neurons; a sublayer's output bias goes with its
last unit; a key/value head goes with the last query head of its group). Every count is a sum of
products of independent factors (kept query dims x kept hidden dims, ...), so its expectation is
the same sum of products of expectations, and "any unit of a group kept" has probability
``1 - prod(1 - p)``. With 0/1 probabilities it equals the counts of the masks exactly.

**Deterministic masks** (:meth:`HardConcreteGates.extract`). The rule (CoFi's, plus a shift): in
every group (the heads of one layer, the neurons of one layer, all hidden dims, all attention layers,
all FFN layers) keep ``round(sum of P(z != 0))`` units, those with the largest ``log_alpha`` (ties:
the lower index), at least one hidden dim. Rounding groups separately can land off the budget when
gates have not polarised, so if these masks miss the target by more than ``tolerance`` the same
rule is applied to ``log_alpha + delta`` with one shift ``delta`` for every gate, the shift (found
by bisection; the kept sets grow monotonically with it) whose masks land closest to the target.
Every granularity moves together, so a whole layer can come back as well as single neurons. When
the shift's steps are too coarse (tied gates, whole layers), a fine repair follows: FFN neurons,
then hidden dims, then heads are added back (largest ``log_alpha`` first) or removed (smallest
first), as few as bring the masks within ``tolerance`` (bisection over the ranked units).

**Aligned widths** (``multiple_of=N``: hardware-aligned shapes, as :mod:`structprune.methods.selection`
gives the scoring methods). Every layer's kept FFN width and the kept hidden size are multiples of N (or the
whole dense width where that is not one: chunks of N leave it whole, as in the selection). Each layer's neurons
and the hidden dims keep the allowed count nearest ``sum of P(z != 0)``, so a layer expected to keep fewer than
N / 2 neurons keeps none (its FFN goes) and one expected to keep N / 2 or more at least N; the largest
``log_alpha``, and at least N hidden dims. The fine repair adds or removes neurons and hidden dims in whole
chunks of N (a group's N largest ``log_alpha`` left out, or its N smallest kept; chunks of every group ranked by
their mean ``log_alpha``). A chunk can jump over the band (N hidden dims shrink every matrix), so passes follow,
each the other way from the last, until one lands in the band (:data:`REPAIR_PASSES` at most); the masks
closest to the target win. Heads and whole sublayers need no rounding. N = 1 is the rule above, unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from structprune.arch.structure import ModelStructure
from structprune.costs import expected_cost
from structprune.maskset import MASK_NAMES, MaskSet, mask_shapes
from structprune.methods.selection import aligned_chunks

LIMIT_LOW, LIMIT_HIGH = -0.1, 1.1
BETA = 2.0 / 3.0
EPS = 1e-6
SHIFT_LIMIT = 40.0
"""Largest ``log_alpha`` shift the extraction tries (it makes every keep probability 0 or 1)."""
SHIFT_STEPS = 40
PROJECT_STEPS = 30
"""Bisection steps of :meth:`HardConcreteGates.project` (a shift within 1e-7 of the exact one)."""
REPAIR_ORDER = ("neuron", "hidden", "head")
"""Granularities the final fine repair adjusts, finest first."""
REPAIR_PASSES = 4
"""Most passes of the fine repair with chunks: a coarse chunk overshoots, finer ones come back."""
ALIGNED = ("neuron", "hidden")
"""Granularities whose kept counts ``multiple_of`` aligns."""


def _keep_probability(log_alpha: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(log_alpha - BETA * math.log(-LIMIT_LOW / LIMIT_HIGH))


def check_multiple_of(structure: ModelStructure, multiple_of: int) -> None:
    """Raise ``ValueError`` unless ``multiple_of`` is a whole number from 1 to the FFN width and hidden size."""
    limit = min(structure.max_ffn, structure.hidden_size)
    if isinstance(multiple_of, bool) or not isinstance(multiple_of, int) or not 1 <= multiple_of <= limit:
        raise ValueError(f"multiple_of must be a whole number between 1 and {limit} (the widest FFN has "
                         f"{structure.max_ffn} neurons, the hidden size is {structure.hidden_size}), "
                         f"got {multiple_of!r}")


def _aligned_count(expected: torch.Tensor, width: int, multiple_of: int) -> torch.Tensor:
    """The count nearest ``expected`` among the multiples of ``multiple_of`` and ``width`` itself (halves to
    even, as ``torch.round``)."""
    keep = torch.round(expected / multiple_of).long() * multiple_of
    top = width - width % multiple_of  # the largest multiple within the width
    whole = (expected > top) & (width - expected < expected - top)
    return torch.where(whole, width, keep)


class HardConcreteGates(nn.Module):
    """Learned hard-concrete gates over a model's units, one ``log_alpha`` tensor per granularity.

    Args:
        structure: the dense model's structure (mask shapes come from it).
        names: the granularities to gate (a subset of :data:`structprune.maskset.MASK_NAMES`).
        init_log_alpha: the starting ``log_alpha`` of every gate. The default 2.0 keeps a unit with
            probability 0.98 (mean gate 0.83), so pruning starts near the fine-tuned teacher.
    """

    def __init__(self, structure: ModelStructure, names: Sequence[str] = MASK_NAMES, init_log_alpha: float = 2.0):
        super().__init__()
        names = tuple(names)
        unknown = set(names) - set(MASK_NAMES)
        if not names or unknown:
            raise ValueError(f"gate granularities must be a non-empty subset of {MASK_NAMES}, got {list(names)}")
        self.structure = structure
        self.names = tuple(name for name in MASK_NAMES if name in names)
        shapes = mask_shapes(structure)
        self.log_alpha = nn.ParameterDict(
            {name: nn.Parameter(torch.full(shapes[name], float(init_log_alpha))) for name in self.names})

    def keep_probabilities(self) -> dict[str, torch.Tensor]:
        """``P(z != 0)`` of every gate (differentiable)."""
        return {name: _keep_probability(a) for name, a in self.log_alpha.items()}

    def sample(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """One draw of every gate (differentiable in ``log_alpha``), noise from ``generator`` (CPU)."""
        out = {}
        for name, log_alpha in self.log_alpha.items():
            u = torch.rand(log_alpha.shape, generator=generator).clamp(EPS, 1 - EPS).to(log_alpha.device)
            s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / BETA)
            out[name] = (s * (LIMIT_HIGH - LIMIT_LOW) + LIMIT_LOW).clamp(0.0, 1.0)
        return out

    def expected_cost(self, spec: dict, seq_len: int, shift: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Expected (parameters, FLOPs) of the model these gates would leave (see :func:`expected_cost`), with
        ``shift`` added to every ``log_alpha``."""
        probs = {name: _keep_probability(a + shift) for name, a in self.log_alpha.items()}
        return expected_cost(self.structure, spec, probs, seq_len)

    @torch.no_grad()
    def project(self, reduction: Callable[[float], float], target: float) -> float:
        """Add to every ``log_alpha`` the one shift that puts ``reduction(shift)`` (the expected reduction with
        that shift, falling as it grows) on ``target`` (bisection); the shift."""
        shift = sum(_bisect_shift(reduction, target, PROJECT_STEPS)) / 2
        for log_alpha in self.log_alpha.values():
            log_alpha.add_(shift)
        return shift

    @torch.no_grad()
    def rounded_masks(self, shift: float = 0.0, multiple_of: int = 1) -> MaskSet:
        """CoFi's rule on ``log_alpha + shift``: in each group keep the round(expected count) units with
        the largest ``log_alpha`` (ties: the lower index), at least one hidden dim; neuron and hidden counts
        aligned to ``multiple_of`` (module docstring)."""
        masks = {}
        for name, log_alpha in self.log_alpha.items():
            a = log_alpha.detach().double().cpu()
            rows = a.view(1, -1) if name in ("hidden", "attn_layer", "ffn_layer") else a
            size = multiple_of if name in ALIGNED else 1
            keep = _aligned_count(_keep_probability(rows + shift).sum(-1), rows.shape[-1], size)
            if name == "hidden":
                keep = keep.clamp(min=size)
            # rank within each row: largest log_alpha first, ties to the lower index (stable sort)
            order = torch.sort(-rows, dim=-1, stable=True).indices
            rank = torch.empty_like(order)
            rank.scatter_(-1, order, torch.arange(rows.shape[-1]).expand_as(order).contiguous())
            masks[name] = (rank < keep.unsqueeze(-1)).float().view_as(a)
        return MaskSet(masks)

    @torch.no_grad()
    def extract(self, spec: dict, target: float, kind: str = "params", seq_len: int = 128,
                tolerance: float = 0.005, multiple_of: int = 1) -> MaskSet:
        """Deterministic 0/1 masks: :meth:`rounded_masks`, shifted onto the target, kept FFN widths and hidden
        size multiples of ``multiple_of`` (module docstring)."""
        check_multiple_of(self.structure, multiple_of)

        def achieved(shift: float) -> float:
            return _achieved(self.rounded_masks(shift, multiple_of), self.structure, spec, kind, seq_len)

        if abs(achieved(0.0) - target) <= tolerance:
            return self.rounded_masks(0.0, multiple_of)
        best = min(_bisect_shift(achieved, target, SHIFT_STEPS),
                   key=lambda shift: (abs(achieved(shift) - target), shift))
        return self._fine_repair(self.rounded_masks(best, multiple_of), spec, target, kind, seq_len, tolerance,
                                 multiple_of)

    def _repair_chunks(self, masks: MaskSet, unit: str, too_sparse: bool,
                       multiple_of: int) -> list[tuple[int, ...]]:
        """The flat indices of ``unit`` the repair may flip, in chunks (of ``multiple_of`` neurons or hidden dims,
        single heads) in the order it flips them: to add, each group's removed units largest ``log_alpha`` first;
        to remove, its kept ones smallest first (ties: the lower index), one chunk of hidden dims always kept;
        the groups merged by the chunks' mean ``log_alpha``."""
        a = self.log_alpha[unit].detach().float().cpu()
        rows = a.view(1, -1) if unit == "hidden" else a
        pool = masks.masks[unit].view_as(rows) == (0 if too_sparse else 1)
        size = multiple_of if unit in ALIGNED else 1
        chunks = []
        for i, row in enumerate(rows.tolist()):
            order = sorted(pool[i].nonzero().flatten().tolist(),
                           key=lambda j: (-row[j], j) if too_sparse else (row[j], j))
            # chunks from the front of ``order``; a remainder (a width that is no multiple) is the one at the width
            ordered = aligned_chunks(order[::-1], size)[::-1] if too_sparse else aligned_chunks(order, size)
            if unit == "hidden" and not too_sparse:
                ordered = ordered[:-1]
            chunks += [tuple(i * rows.shape[-1] + j for j in chunk) for chunk in ordered]
        flat = a.flatten().tolist()
        sign = -1 if too_sparse else 1
        return sorted(chunks, key=lambda chunk: (sign * sum(flat[j] for j in chunk) / len(chunk), min(chunk)))

    def _fine_repair(self, masks: MaskSet, spec: dict, target: float, kind: str, seq_len: int,
                     tolerance: float, multiple_of: int) -> MaskSet:
        """One :meth:`_repair_pass`; with chunks (``multiple_of`` > 1), whose last one can jump over the band,
        passes (each the other way from the last) until one lands in the band, :data:`REPAIR_PASSES` at most, and
        the masks closest to the target of them all."""
        if multiple_of == 1:
            return self._repair_pass(masks, spec, target, kind, seq_len, tolerance, multiple_of)

        def distance(candidate: MaskSet) -> float:
            return abs(_achieved(candidate, self.structure, spec, kind, seq_len) - target)

        passes = [(distance(masks), masks)]
        while len(passes) <= REPAIR_PASSES and passes[-1][0] > tolerance:
            repaired = self._repair_pass(passes[-1][1], spec, target, kind, seq_len, tolerance, multiple_of)
            passes.append((distance(repaired), repaired))
        return min(passes, key=lambda scored: scored[0])[1]

    def _repair_pass(self, masks: MaskSet, spec: dict, target: float, kind: str, seq_len: int,
                     tolerance: float, multiple_of: int) -> MaskSet:
        """Add back (largest ``log_alpha`` first) or remove (smallest first) fine units, neurons, then hidden
        dims, then heads, in chunks of ``multiple_of`` neurons or hidden dims, as few as bring ``masks`` within
        ``tolerance`` of the target (bisection)."""
        units = [name for name in REPAIR_ORDER if name in self.names]
        gap = _achieved(masks, self.structure, spec, kind, seq_len) - target
        if not units or abs(gap) <= tolerance:
            return masks
        too_sparse = gap > 0
        ranked = [(unit, chunk) for unit in units for chunk in self._repair_chunks(masks, unit, too_sparse,
                                                                                   multiple_of)]

        def flipped(n: int) -> MaskSet:
            values = {unit: masks.masks[unit].clone().flatten() for unit in units}
            for unit, chunk in ranked[:n]:
                values[unit][list(chunk)] = 1.0 if too_sparse else 0.0
            return MaskSet(masks.masks | {unit: v.view_as(masks.masks[unit]) for unit, v in values.items()})

        def reached(n: int) -> bool:
            achieved = _achieved(flipped(n), self.structure, spec, kind, seq_len)
            return achieved <= target + tolerance if too_sparse else achieved >= target - tolerance

        lo, hi = 0, len(ranked)
        if not reached(hi):
            return flipped(hi)
        while lo < hi:  # the fewest flips that reach the band (monotone in n)
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if reached(mid) else (mid + 1, hi)
        return flipped(lo)


def _bisect_shift(reduction: Callable[[float], float], target: float, steps: int) -> tuple[float, float]:
    """The two ends ``(at or above target, below target)`` of the log-alpha shift bracket around the crossing of
    ``reduction``, which falls as the shift grows (every gate keeps more), after ``steps`` bisections."""
    sparse, dense = -SHIFT_LIMIT, SHIFT_LIMIT
    for _ in range(steps):
        mid = (sparse + dense) / 2
        sparse, dense = (mid, dense) if reduction(mid) >= target else (sparse, mid)
    return sparse, dense


def _achieved(masks: MaskSet, structure: ModelStructure, spec: dict, kind: str, seq_len: int) -> float:
    summary = masks.summary(structure, spec, seq_len)
    return summary["param_sparsity" if kind == "params" else "flops_reduction"]


def max_sparsity(structure: ModelStructure, spec: dict, names: Sequence[str], kind: str = "params",
                 seq_len: int = 128, multiple_of: int = 1) -> float:
    """The largest reduction gating ``names`` can reach (every gated unit removed, ``multiple_of`` hidden dims
    kept)."""
    probs = {name: torch.zeros(shape, dtype=torch.float64) for name, shape in mask_shapes(structure).items()
             if name in names}
    if "hidden" in probs:
        probs["hidden"][:multiple_of] = 1.0
    if not probs:
        return 0.0
    ones = {name: torch.ones_like(p) for name, p in probs.items()}
    dense_params, dense_flops = expected_cost(structure, spec, ones, seq_len)
    params, flops = expected_cost(structure, spec, probs, seq_len)
    return float(1 - params / dense_params) if kind == "params" else float(1 - flops / dense_flops)
