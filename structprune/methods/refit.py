"""Least-squares refit of the output projections after heads and neurons are removed: bias compensation, generalised.

FLAP's compensation stands in for a removed input channel of an output projection (o-proj, down-proj) by its mean
over the calibration tokens. With the channels' covariance ``C`` and means ``mu`` over the same tokens, the best
affine stand-in for the removed channels ``R`` given the kept ones ``K`` is

    x_R ~ A x_K + b,   A = C_RK (C_KK + lam I)^-1,   b = mu_R - A mu_K

(ridge ``lam`` = :data:`RIDGE` times the mean variance of the kept channels). Folded into the projection ``W``, the
kept columns become ``W_K + W_R A`` and the output bias ``W_R b``; ``A = 0`` is FLAP's compensation. Each layer is
refitted on the dense model's statistics, so no pass over the pruned model is needed. No gradient, no training: the
statistics need one ``[C, C]`` float64 matrix per projection (:class:`~structprune.methods.channel_stats.ChannelStats`
with ``gram``), so the refit runs on a model held in memory.
"""

from __future__ import annotations

import torch

from structprune.methods.channel_stats import ChannelStats, LayerStats
from structprune.modeling_structprune import StructprunePreTrainedModel

RIDGE = 0.1
"""``lam`` over the mean variance of the kept channels: the best of 0.001, 0.01 and 0.1 on SmolLM2's PubMed expert
(BENCHMARKS.md, "Customised experts")."""


def refit_projection(weight: torch.Tensor, stats: ChannelStats, keep: torch.Tensor,
                     ridge: float = RIDGE) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight [D, C]`` refitted for the kept channels ``keep [C]`` (bool): the new weight (removed columns zero)
    and the output shift ``[D]``, both float64."""
    if stats.gram is None:
        raise ValueError("refit needs the channels' second moments: gather the statistics with gram=True")
    weight, keep = weight.double(), keep.bool()
    mu, removed = stats.mean, ~keep
    new = weight * keep
    if not removed.any():
        return new, torch.zeros(weight.shape[0], dtype=torch.float64)
    if not keep.any():
        return new, weight[:, removed] @ mu[removed]
    cov = stats.covariance
    c_kk, c_rk = cov[keep][:, keep], cov[removed][:, keep]
    lam = ridge * c_kk.diagonal().mean().clamp_min(1e-12)
    a = torch.linalg.solve(c_kk + lam * torch.eye(len(c_kk), dtype=cov.dtype), c_rk.T).T  # (R, K)
    new[:, keep] += weight[:, removed] @ a
    return new, weight[:, removed] @ (mu[removed] - a @ mu[keep])


def refitted(model: StructprunePreTrainedModel, stats: list[LayerStats], head: torch.Tensor,
             neuron: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``model``'s full-size state dict with its o-proj and down-proj weights refitted for the kept ``head [L, H]``
    and ``neuron [L, F]`` (nonzero: kept; every other tensor is the model's own, not a copy), and the shifts
    ``attn`` / ``ffn`` ``[L, D]`` that go with them."""
    L, D = len(model.layers), model.spec["hidden_size"]
    shifts = {"attn": torch.zeros(L, D), "ffn": torch.zeros(L, D)}
    state = model.state_dict()
    names = {p: name for name, p in model.named_parameters()}
    for i, (layer, layer_stats) in enumerate(zip(model.layers, stats)):
        units = []
        if layer.attn is not None:
            keep = (head[i, :layer.attn.heads] != 0).repeat_interleave(layer.attn.head_dim)
            units.append(("attn", layer.attn.o, layer_stats.attn, keep))
        if layer.ffn is not None:
            units.append(("ffn", layer.ffn.down, layer_stats.ffn, neuron[i, :layer.ffn.down.in_features] != 0))
        for kind, projection, channel_stats, keep in units:
            weight, shift = refit_projection(projection.weight.detach(), channel_stats, keep)
            state[names[projection.weight]] = weight.to(projection.weight)
            shifts[kind][i] = shift.float()
    return state, shifts
