"""ONNX export of structprune causal LMs with a key/value cache, and the parity check every export runs.

The graph follows optimum's ``text-generation-with-past`` layout, so one model serves the prefill (past
length 0) and every decode step: inputs ``input_ids``, ``attention_mask`` (past and new tokens),
``position_ids`` and ``past_key_values.{i}.key`` / ``.value``; outputs ``logits`` and ``present.{i}.key`` /
``.value``. ``logits`` are those of the last position only (``[batch, 1, vocab]``): generation reads no
other, and the LM head over every prompt position cost SmolLM2-135M a fifth of its prefill time; export with
``all_logits=True`` to score text on ONNX Runtime. ``{i}`` is the index of the transformer layer; a layer without attention keeps no cache and has
no such pair, so names stay the same whatever else is pruned. Key/value head counts and the head
dimension are static in the graph (they differ per layer), batch and lengths are dynamic.

The folder's ``config.json`` describes the graph: the global sizes (``num_attention_heads``, ...) are the
kept ones when every layer agrees (else the largest), and the ``structprune_onnx`` section lists each
layer's key/value heads (0: no cache) so that a runtime can allocate the empty past.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import DynamicCache, PretrainedConfig

from structprune import ort_generation
from structprune.export import (
    ONNX_FILE,
    ExportParityError,
    ExportResult,
    node_counts,
    session,
    trace,
)
from structprune.io import atomic_dir
from structprune.modeling_structprune import StructpruneForCausalLM

ONNX_SECTION = "structprune_onnx"
LAYOUT = "text-generation-with-past"
INPUTS = ["input_ids", "attention_mask", "position_ids"]
TRACE_PAST = 3
"""Cached tokens in the traced example: above 0, so the past axis is traced as a dynamic one."""


class OptimumIncompatibleError(ValueError):
    """An exported decoder whose shapes optimum's ``ORTModelForCausalLM`` cannot allocate a cache for."""


def cache_layers(model: StructpruneForCausalLM) -> list[int]:
    """Indices of the layers that keep a key/value cache (those with attention), in cache-slot order."""
    return [i for i, layer in enumerate(model.layers) if layer.attn is not None]


def io_names(model: StructpruneForCausalLM) -> tuple[list[str], list[str]]:
    """Graph input and output names: past and present pairs numbered by layer index."""
    layers = cache_layers(model)
    past = [f"{ort_generation.PAST_PREFIX}{i}.{kind}" for i in layers for kind in ("key", "value")]
    present = [f"{ort_generation.PRESENT_PREFIX}{i}.{kind}" for i in layers for kind in ("key", "value")]
    return INPUTS + past, ["logits", *present]


class _FlatCache:
    """The cache interface the forward uses, over flat past tensors: no transformers cache in the trace."""

    def __init__(self, past: tuple[torch.Tensor, ...], past_length):
        self.past = [past[i: i + 2] for i in range(0, len(past), 2)]
        self.present: list[torch.Tensor] = []
        self.past_length = past_length

    def update(self, key: torch.Tensor, value: torch.Tensor, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        past_key, past_value = self.past[slot]
        key, value = torch.cat((past_key, key), dim=2), torch.cat((past_value, value), dim=2)
        self.present += [key, value]
        return key, value

    def get_seq_length(self, layer: int = 0):
        return self.past_length


class _DecoderGraph(nn.Module):
    """Positional wrapper: ``(input_ids, attention_mask, position_ids, *past) -> (logits, *present)``."""

    def __init__(self, model: StructpruneForCausalLM, all_logits: bool):
        super().__init__()
        self.model, self.keep = model, 0 if all_logits else 1

    def forward(self, input_ids, attention_mask, position_ids, *past):
        # The mask covers past and new tokens, so the past length needs no cache tensor (none with no attention).
        cache = _FlatCache(past, attention_mask.shape[1] - input_ids.shape[1])
        logits = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                            use_cache=True, logits_to_keep=self.keep).logits
        return (logits, *cache.present)


def left_padded(model: StructpruneForCausalLM, batch: int, seq: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts ``[batch, seq]``: row 0 full, the others left padded to random shorter lengths."""
    g = torch.Generator().manual_seed(seed)
    pad = model.spec.get("pad_token_id") or 0
    ids = torch.randint(0, model.spec["vocab_size"], (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for b in range(1, batch):
        start = int(torch.randint(0, seq, (1,), generator=g))
        mask[b, :start], ids[b, :start] = 0, pad
    return ids, mask


def _trace_example(model: StructpruneForCausalLM, batch: int, seq: int) -> tuple[torch.Tensor, ...]:
    ids, mask = left_padded(model, batch, seq, seed=0)
    mask = torch.cat([torch.ones(batch, TRACE_PAST, dtype=torch.long), mask], dim=1)
    positions = torch.from_numpy(ort_generation.position_ids(mask.numpy(), seq))
    dim, g = model.spec["head_dim"], torch.Generator().manual_seed(0)
    past = [torch.randn(batch, model.layers[i].attn.kv_heads, TRACE_PAST, dim, generator=g)
            for i in cache_layers(model) for _ in range(2)]
    return (ids, mask, positions, *past)


def _dynamic_axes(inputs: list[str], outputs: list[str], all_logits: bool) -> dict[str, dict[int, str]]:
    batch, seq, past, total = "batch_size", "sequence_length", "past_sequence_length", \
        "past_sequence_length + sequence_length"
    axes = {"input_ids": {0: batch, 1: seq}, "position_ids": {0: batch, 1: seq},
            "attention_mask": {0: batch, 1: total}, "logits": {0: batch, 1: seq} if all_logits else {0: batch}}
    axes |= {name: {0: batch, 2: past} for name in inputs[len(INPUTS):]}
    return axes | {name: {0: batch, 2: total} for name in outputs[1:]}


def graph_config(model: StructpruneForCausalLM, all_logits: bool = False) -> PretrainedConfig:
    """``model.config`` with the global sizes of the exported graph and the per-layer cache shapes.

    A compact model's config keeps the dense sizes (the kept ones are in its ``structprune`` section);
    runtimes such as optimum read the global fields, so they are rewritten here (the query heads only where
    their count divides the hidden size, as transformers requires; the section always has the true counts).
    """
    config = copy.deepcopy(model.config)
    attns = [layer.attn for layer in model.layers if layer.attn is not None]
    ffns = [layer.ffn.up.out_features for layer in model.layers if layer.ffn is not None]
    heads = max((a.heads for a in attns), default=0)
    if heads and model.spec["hidden_size"] % heads == 0:  # transformers refuses a config where they do not divide
        config.num_attention_heads = heads
    config.num_key_value_heads = max((a.kv_heads for a in attns), default=0)
    config.intermediate_size = max(ffns, default=0)
    config.hidden_size = model.spec["hidden_size"]
    config.head_dim = model.spec["head_dim"]
    config.num_hidden_layers = len(model.layers)
    config.use_cache = True
    setattr(config, ONNX_SECTION, {
        "layout": LAYOUT,
        "cache_numbering": "layer index; layers without attention have no past/present pair",
        "kv_heads": [layer.attn.kv_heads if layer.attn is not None else 0 for layer in model.layers],
        "heads": [layer.attn.heads if layer.attn is not None else 0 for layer in model.layers],
        "head_dim": model.spec["head_dim"],
        "logits": "all positions" if all_logits else "last position",
    })
    return config


RTOL = 5e-4
"""Default parity tolerance of decoders, relative to the largest logit: fp32 reorderings alone moved the logits of
SmolLM2-135M by 1e-4 of 35 (dense) and of a 30%-pruned SmolLM2 by 3.4e-3 of 25; a wrong graph moves them by
order 1."""


def check_decoder_parity(model: StructpruneForCausalLM, sess, shapes: list[tuple[int, int]], steps: int = 8,
                         atol: float = RTOL) -> float:
    """Max abs logit difference between ``sess`` and ``model`` over a left-padded prefill of each
    ``(batch, prompt length)`` in ``shapes`` and ``steps`` greedy decode steps, each side on its own cache
    (over the positions the graph returns: the last, or all).

    Raises :class:`ExportParityError` above ``atol`` times the largest logit magnitude (when above 1): a
    language model's logits reach tens, where fp32 rounding alone differs by more than 1e-4 (see :data:`RTOL`;
    PyTorch on 1 and 2 threads differs by 5e-5 on SmolLM2-135M).
    """
    model = model.eval()
    worst = 0.0
    for n, (batch, seq) in enumerate(shapes):
        ids, mask = left_padded(model, batch, seq, seed=100 + n)
        cache, past = DynamicCache(), ort_generation.empty_past(sess, batch)
        new = ids
        for step in range(steps + 1):
            positions = torch.from_numpy(ort_generation.position_ids(mask.numpy(), new.shape[1]))
            with torch.inference_mode():
                expected = model(new, attention_mask=mask, position_ids=positions, cache=cache,
                                 use_cache=True).logits.float().numpy()
            got, past = ort_generation.step(sess, new.numpy(), mask.numpy(), past)
            expected = expected[:, -got.shape[1]:]
            diff = float(np.abs(got - expected).max())
            worst = max(worst, diff)
            tolerance = atol * max(1.0, float(np.abs(expected).max()))
            if not diff <= tolerance:
                raise ExportParityError(
                    f"ONNX Runtime logits differ from PyTorch by {diff:.3g} > {tolerance:.3g} at batch {batch}, "
                    f"prompt {seq}, {'prefill' if step == 0 else f'decode step {step}'}; the exported graph is "
                    "wrong, do not deploy it")
            new = torch.from_numpy(expected[:, -1].argmax(-1))[:, None]
            mask = torch.cat([mask, torch.ones_like(new)], dim=1)
    return worst


def check_optimum_compatible(folder: str | os.PathLike) -> None:
    """Raise :class:`OptimumIncompatibleError` when optimum's ``ORTModelForCausalLM`` would allocate a wrong
    empty cache for the decoder exported to ``folder``.

    optimum allocates every past as ``[batch, num_key_value_heads, 0, hidden_size // num_attention_heads]``
    from the global config, so every attention layer must have the same key/value heads and the kept hidden
    size must equal query heads x head dimension. (Were it wrong, ONNX Runtime would refuse the input shapes;
    this check says why before that.)
    """
    config = json.loads((Path(folder) / "config.json").read_text())
    section = config.get(ONNX_SECTION)
    if section is None:
        raise OptimumIncompatibleError(f"{folder}/config.json has no '{ONNX_SECTION}' section; it is not a "
                                       "decoder exported by structprune.export")
    kv = sorted(set(section["kv_heads"]) - {0})
    problems = []
    if max(section["heads"], default=0) != config["num_attention_heads"]:
        problems.append(f"the config cannot state the kept query heads per layer {section['heads']} (their count "
                        f"must divide hidden_size {config['hidden_size']})")
    if len(kv) > 1:
        problems.append(f"key/value heads differ per layer {section['kv_heads']} (optimum reads one "
                        "num_key_value_heads)")
    per_head = config["hidden_size"] // max(config["num_attention_heads"], 1)
    if per_head != section["head_dim"]:
        problems.append(f"hidden_size {config['hidden_size']} // num_attention_heads "
                        f"{config['num_attention_heads']} = {per_head}, but the head dimension is "
                        f"{section['head_dim']} (optimum derives one from the other)")
    if problems:
        raise OptimumIncompatibleError(
            f"optimum's ORTModelForCausalLM cannot run {folder}: " + "; ".join(problems) + ". Serve it with "
            "structprune.ort_generation.generate (reads per-layer shapes from the graph), or prune with the same "
            "key/value heads in every layer and hidden size = heads x head dim")


def export_decoder(model: StructpruneForCausalLM, directory: str | os.PathLike, tokenizer=None,
                   example_shape: tuple[int, int] = (2, 16),
                   check_shapes: tuple[tuple[int, int], ...] = ((1, 7), (3, 33)), atol: float = RTOL,
                   overwrite: bool = False, threads: int | None = None, all_logits: bool = False) -> ExportResult:
    """Export a causal LM with its key/value cache to ``directory`` and check it against PyTorch.

    ``all_logits``: return the logits of every position (for scoring text), not only the last one's.

    The graph is traced at ``example_shape`` (batch, new tokens) with :data:`TRACE_PAST` cached tokens;
    the check runs a prefill of each ``check_shapes`` (batch, prompt length) and 8 decode steps (see
    :func:`check_decoder_parity`). Other arguments as :func:`structprune.export.export`. ORT's transformer
    optimizer is not run: on this graph it fuses only the RMSNorms, which ONNX Runtime's session already
    does, and decode latency did not change.
    """
    limit = model.max_sequence_length
    steps = 8
    if limit is not None:
        check_shapes = tuple((batch, min(seq, limit - steps)) for batch, seq in check_shapes)
    if example_shape in check_shapes:
        raise ValueError("check_shapes must differ from example_shape so parity covers dynamic axes")
    if all(batch < 2 for batch, _ in check_shapes):
        raise ValueError("check_shapes need a batch of 2 or more, so that parity covers left padding")
    model = model.eval().float()
    inputs, outputs = io_names(model)
    example = _trace_example(model, *example_shape)
    with atomic_dir(directory, overwrite=overwrite, marker=ONNX_FILE) as tmp:
        path = tmp / ONNX_FILE
        trace(_DecoderGraph(model, all_logits), example, path, inputs, outputs,
              _dynamic_axes(inputs, outputs, all_logits))
        graph_config(model, all_logits).save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        sess = session(path, threads=threads)
        diff = check_decoder_parity(model, sess, list(check_shapes), steps, atol)
        counts = node_counts(path)
    fused = sum(counts.get(op, 0) for op in ("GroupQueryAttention", "MultiHeadAttention", "Attention"))
    return ExportResult(Path(directory), inputs, diff, list(check_shapes), fused, counts)
