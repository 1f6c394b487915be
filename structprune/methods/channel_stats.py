"""Calibration statistics gathered one layer at a time: what each head and FFN neuron feeds its output projection.

Removing a head drops its columns of the attention output projection (o-proj); removing a neuron drops its column
of the FFN down-projection. The forward-only methods (``flap``, ``expert``) score units from what flows into those
columns over the real tokens of calibration text:

* per input channel: mean, sample variance and mean square (``ChannelStats``);
* per head: the exact squared norm of the head's contribution to the layer output, ``||W_o[:, h] x_h||^2``;
  a neuron's is ``||W_down[:, j]||^2 x_j^2`` (one column), so the channel mean square gives it.

:func:`layer_by_layer` runs every calibration sequence through one layer before moving on, carrying the residual
streams forward (SparseGPT's and Wanda's schedule): only the layer being run needs to sit on ``device``; the
others stay where they are (e.g. the CPU), so a model whose layers do not all fit on the accelerator can be scored,
or in their files (:mod:`structprune.streaming`), so a model larger than memory can. What the scores need of the
output projections' weights (their columns' squared norms) is taken during the layer's turn.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from structprune.masked_model import kernel_attention
from structprune.modeling_structprune import Layer, StructprunePreTrainedModel
from structprune.streaming import embedded, release_freed_memory, resident, source_of

STATS_TOKENS = 64
"""Tokens per step of the statistics and of the calibration's FFN sublayer: each head's output
(``[tokens, heads, hidden]``), the float64 copies and the FFN's ``[tokens, F]`` activations would otherwise be the
largest transients of a layer's turn (for a 512-token window of SmolLM2, about 50 MB and 10 MB)."""

RunLayer = Callable[[int, Layer, torch.Tensor, object, object, torch.Tensor], torch.Tensor]
"""``(i, layer, x [1, S, D], ctx, rope, real [1, S]) -> x after layer i``."""


@torch.no_grad()
def layer_by_layer(model: StructprunePreTrainedModel, batches: Sequence[dict[str, torch.Tensor]], run: RunLayer,
                   device: torch.device | str | None = None) -> None:
    """Run ``run`` over every layer for every sequence of ``batches``, one layer at a time.

    Each layer comes to ``device`` (default: where the embeddings are; the CPU for a streamed model) for its turn
    and goes back afterwards; a model streamed from its files (:mod:`structprune.streaming`) loads it for the turn
    and drops it. The residual streams of all sequences stay on ``device``. Within a turn the sequences go through
    one at a time (``run`` sees ``B = 1``): the layer's weights are resident for the whole turn anyway, so a batch
    would only widen its transients. Attention runs on ``structprune.ops``
    (:func:`~structprune.masked_model.kernel_attention`), which never holds a sequence's whole score tensor. After
    each sequence the C heap's free pages go back to the OS (:func:`~structprune.streaming.release_freed_memory`),
    so what stays resident is what is carried.
    """
    home = model.embeddings.word.weight.device
    device = torch.device("cpu" if home.type == "meta" else home) if device is None else torch.device(device)
    streams = []  # per sequence: its residual stream [1, S, D] and attention mask [1, S]
    with embedded(model, torch.cat([b["input_ids"].flatten() for b in batches]), device) as ids_of:
        for batch in batches:
            ids, mask = ids_of(batch["input_ids"]).to(device), batch.get("attention_mask")
            mask = torch.ones_like(ids) if mask is None else mask.to(device)
            streams += [[model.layer_inputs(ids[b:b + 1], mask[b:b + 1])[0], mask[b:b + 1]] for b in range(len(ids))]
    release_freed_memory()
    for i, layer in enumerate(model.layers):
        with resident(model, f"layers.{i}", layer, device), kernel_attention(layer):
            for stream in streams:
                x, mask = stream
                # rebuilt for the sequence's turn, not carried (it is what the kernels need: no dense mask)
                ctx, rope = model.layer_context(mask, x.dtype)
                stream[0] = run(i, layer, x, ctx, rope, mask.bool())
                release_freed_memory()


@dataclass
class ChannelStats:
    """Running sums over tokens of each input channel of a projection (float64)."""

    count: int
    sum: torch.Tensor
    sumsq: torch.Tensor
    gram: torch.Tensor | None = None
    """``[C, C]``: the sum of ``x x^T`` over tokens, when asked for (:mod:`structprune.methods.refit` needs it)."""

    @classmethod
    def zeros(cls, channels: int, gram: bool = False) -> ChannelStats:
        return cls(0, torch.zeros(channels, dtype=torch.float64), torch.zeros(channels, dtype=torch.float64),
                   torch.zeros(channels, channels, dtype=torch.float64) if gram else None)

    def add(self, x: torch.Tensor) -> None:
        """Tokens ``[N, C]``, converted to float64 a few at a time (a whole batch's copy would be a layer's largest
        transient)."""
        self.count += x.shape[0]
        for part in x.split(STATS_TOKENS):
            if self.gram is not None:  # products of STATS_TOKENS terms in float32, summed in float64
                self.gram += (part.float().T @ part.float()).double().cpu()
            part = part.double()
            self.sum += part.sum(0).cpu()
            self.sumsq += part.pow(2).sum(0).cpu()

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.count, 1)

    @property
    def meansq(self) -> torch.Tensor:
        return self.sumsq / max(self.count, 1)

    @property
    def variance(self) -> torch.Tensor:
        """Sample variance (``count - 1`` in the denominator), as FLAP computes it."""
        return ((self.sumsq - self.count * self.mean.pow(2)) / max(self.count - 1, 1)).clamp_min(0)

    @property
    def covariance(self) -> torch.Tensor:
        """``[C, C]``, over the tokens (``count`` in the denominator); needs ``gram``."""
        return self.gram / max(self.count, 1) - torch.outer(self.mean, self.mean)


@dataclass
class LayerStats:
    """What one layer's kept sublayers feed their output projections (``None`` for an absent sublayer)."""

    attn: ChannelStats | None
    """The o-proj inputs ``[H * head_dim]``."""
    head_change: torch.Tensor | None
    """``[H]`` summed over tokens: ``||W_o[:, h] x_h||^2``, each head's whole contribution to the output."""
    ffn: ChannelStats | None
    """The down-projection inputs ``[F]``."""
    o_columns: torch.Tensor | None = None
    """``[H * head_dim]``: the squared norm of each o-proj weight column."""
    down_columns: torch.Tensor | None = None
    """``[F]``: the squared norm of each down-projection weight column."""


def column_norms(linear: nn.Linear) -> torch.Tensor:
    """``[in_features]``: the squared norm of each weight column (float64, CPU)."""
    return linear.weight.detach().double().pow(2).sum(0).cpu()


def neuron_change(stats: LayerStats) -> torch.Tensor:
    """``[F]``: each neuron's contribution to the layer output, ``||W_down[:, j]||^2 x_j^2`` summed over tokens."""
    return stats.ffn.sumsq * stats.down_columns


def projection_weight(model: StructprunePreTrainedModel, i: int, name: str) -> torch.Tensor:
    """Layer ``i``'s ``attn.o`` or ``ffn.down`` weight (float64, CPU), from the model or a streamed model's files."""
    source = source_of(model)
    if source is not None:
        return source.tensor(f"layers.{i}.{name}.weight").double()
    return model.layers[i].get_submodule(name).weight.detach().double().cpu()


def merged(runs: Sequence[list[LayerStats]]) -> list[LayerStats]:
    """The statistics of several calibration runs over the same model, as if their tokens were one run."""

    def total(parts):
        if parts[0] is None:
            return None
        if isinstance(parts[0], torch.Tensor):
            return sum(parts[1:], parts[0].clone())
        grams = [p.gram for p in parts]
        return ChannelStats(sum(p.count for p in parts), sum(p.sum for p in parts), sum(p.sumsq for p in parts),
                            None if None in grams else sum(grams[1:], grams[0].clone()))

    return [LayerStats(total([s.attn for s in layer]), total([s.head_change for s in layer]),
                       total([s.ffn for s in layer]), layer[0].o_columns, layer[0].down_columns)
            for layer in zip(*runs)]


@contextmanager
def _recording(module: nn.Module, real: torch.Tensor | None, out: list, heads: int | None) -> Iterator[None]:
    """Accumulate, within the block, the real tokens of ``module``'s input (``real``: a flat token mask; ``None``:
    every token, read as a view rather than copied), and, for an o-proj, each head's output norm."""

    def hook(_module, args):
        x = args[0].flatten(0, -2)  # (N, C)
        x = x if real is None else x[real]
        out[0].add(x)
        if heads is not None:
            w = module.weight.detach()  # (D, H * hd)
            w = w.view(w.shape[0], heads, -1)
            for part in x.split(STATS_TOKENS):  # (n, H, D) per part, and its float64 square
                per_head = torch.einsum("nhd,ehd->nhe", part.view(part.shape[0], heads, -1), w)
                out[1] += per_head.double().pow(2).sum((0, 2)).cpu()

    handle = module.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def channel_stats(model: StructprunePreTrainedModel, batches: Sequence[dict[str, torch.Tensor]],
                  device: torch.device | str | None = None, head_change: bool = True,
                  gram: bool = False) -> list[LayerStats]:
    """One :class:`LayerStats` per layer over the real tokens of ``batches`` (dense forward, layer by layer);
    ``head_change=False`` skips the per-head output norms (``None``), which cost one more o-proj product;
    ``gram=True`` also sums each projection's ``x x^T`` (``[C, C]`` float64 per projection)."""
    found: list[LayerStats] = []

    def run(i, layer, x, ctx, rope, real):
        if len(found) == i:  # the layer's first sequence
            attn, ffn = layer.attn, layer.ffn
            found.append(LayerStats(
                None if attn is None else ChannelStats.zeros(attn.o.in_features, gram),
                None if attn is None or not head_change else torch.zeros(attn.heads, dtype=torch.float64),
                None if ffn is None else ChannelStats.zeros(ffn.down.in_features, gram),
                None if attn is None else column_norms(attn.o), None if ffn is None else column_norms(ffn.down)))
        stats, attn = found[i], layer.attn
        real = real.flatten()  # (S,)
        real = None if bool(real.all()) else real  # decided once per sequence: one host sync
        with (nullcontext() if attn is None else
              _recording(attn.o, real, [stats.attn, stats.head_change], attn.heads if head_change else None)):
            x = layer.attention_block(x, ctx, rope)
        shape = x.shape
        # The FFN sublayer (norm included) is per token: run it STATS_TOKENS tokens at a time, so its
        # [tokens, F] transients are those of one step whatever the sequence's length.
        x = x.flatten(0, -2)  # (S, D)
        out = torch.empty_like(x)
        for start in range(0, x.shape[0], STATS_TOKENS):
            part = slice(start, start + STATS_TOKENS)
            step_real = None if real is None else real[part]
            with nullcontext() if layer.ffn is None else _recording(layer.ffn.down, step_real, [stats.ffn], None):
                out[part] = layer.ffn_block(x[part])
        return out.view(shape)

    layer_by_layer(model, batches, run, device)
    return found
