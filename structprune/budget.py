"""``Budget``: how much a pruning method removes, as a fraction of parameters, FLOPs or measured latency."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from structprune.arch.structure import ModelStructure
from structprune.costs import KINDS, CostModel


@dataclass(frozen=True)
class Budget:
    """How much to remove: a fraction of parameters, of FLOPs, or of measured latency.

    ``target`` in [0, 1): with ``kind="params"`` the parameter sparsity (attention and FFN
    projections, embeddings excluded, as in :mod:`structprune.costs`); with ``kind="flops"`` the
    fraction of forward FLOPs removed at sequence length ``seq_len``; with ``kind="latency"`` the
    fraction of latency removed as predicted by the :class:`~structprune.costs.LatencyTable` saved
    at ``latency_table`` (0.5: 2x faster on the backend and input shape the table was measured on).
    """

    target: float
    kind: str = "params"
    seq_len: int = 128
    latency_table: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.target, bool) or not isinstance(self.target, (int, float)):
            raise TypeError(f"budget target must be a number in [0, 1), got {self.target!r}")
        if not 0.0 <= self.target < 1.0:
            raise ValueError(
                f"target sparsity {self.target} is outside [0, 1): it is the fraction to remove "
                "(0.5 removes half); choose a value such as 0.5"
            )
        if self.kind not in KINDS:
            raise ValueError(f"budget kind {self.kind!r} is not one of {KINDS}")
        if (self.kind == "latency") != (self.latency_table is not None):
            raise ValueError(f"a budget of kind {self.kind!r} with latency_table={self.latency_table!r}: kind "
                             "'latency' needs latency_table (a table file from structprune.latency), and only "
                             "kind 'latency' takes one")
        if self.seq_len < 1:
            raise ValueError(f"budget seq_len must be >= 1, got {self.seq_len}")

    def cost_model(self, structure: ModelStructure, spec: dict) -> CostModel:
        """The :class:`~structprune.costs.CostModel` that measures this budget's kind for a model."""
        return CostModel(structure, spec, self.kind, self.seq_len, self.latency_table)

    def achieved(self, summary: Mapping[str, float]) -> float:
        """The fraction a :meth:`MaskSet.summary` shows removed, in this budget's kind."""
        return summary[{"params": "param_sparsity", "flops": "flops_reduction",
                        "latency": "latency_reduction_predicted"}[self.kind]]

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def as_budget(budget: Budget | float) -> Budget:
    """``budget`` itself, or a parameter-sparsity budget for a plain number."""
    return budget if isinstance(budget, Budget) else Budget(budget)
