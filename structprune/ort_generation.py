"""Greedy generation on an ONNX Runtime session of a decoder exported by :mod:`structprune.export_decoder`.

The session takes ``input_ids``, ``attention_mask`` (past and new tokens), ``position_ids`` and one
``past_key_values.{i}.key`` / ``.value`` pair per layer that has attention, and returns ``logits`` and the
``present.{i}.*`` tensors that become the next step's past. The per-layer key/value head counts and the head
dimension are read from the graph's own input shapes, so pruned models with uneven layers need no config.
Only numpy is needed (no torch), so this serves models where torch is not installed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."
_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def past_shapes(session) -> dict[str, tuple[int, int, type]]:
    """``name -> (kv_heads, head_dim, dtype)`` of each past input of ``session``, in graph order."""
    shapes = {}
    for node in session.get_inputs():
        if node.name.startswith(PAST_PREFIX):
            _, kv_heads, _, head_dim = node.shape
            if not isinstance(kv_heads, int) or not isinstance(head_dim, int):
                raise ValueError(f"input {node.name} has shape {node.shape}; expected static key/value heads and "
                                 "head dimension (export the model with structprune.export)")
            shapes[node.name] = (kv_heads, head_dim, _DTYPES.get(node.type, np.float32))
    return shapes


def empty_past(session, batch: int) -> dict[str, np.ndarray]:
    """Zero-length past tensors ``[batch, kv_heads_i, 0, head_dim]`` for a prefill."""
    return {name: np.zeros((batch, kv_heads, 0, head_dim), dtype=dtype)
            for name, (kv_heads, head_dim, dtype) in past_shapes(session).items()}


def position_ids(attention_mask: np.ndarray, length: int) -> np.ndarray:
    """Positions of the last ``length`` tokens, counted over real tokens only (left padding), as transformers'
    generate derives them: ``cumsum(mask) - 1`` with padding at 0."""
    positions = np.cumsum(attention_mask, axis=-1, dtype=np.int64) - 1
    positions[attention_mask == 0] = 0
    return positions[:, -length:]


def step(session, input_ids: np.ndarray, attention_mask: np.ndarray,
         past: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One forward pass: logits ``[B, S, vocab]`` and the next past (this pass's presents). Inputs the graph does
    not take are left out (a model without attention reads neither the mask nor the positions)."""
    feeds = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64),
             "position_ids": position_ids(attention_mask, input_ids.shape[1]), **past}
    takes = {i.name for i in session.get_inputs()}
    feeds = {name: value for name, value in feeds.items() if name in takes}
    names = ["logits", *(PRESENT_PREFIX + name[len(PAST_PREFIX):] for name in past)]
    logits, *presents = session.run(names, feeds)
    return logits, dict(zip(past, presents))


def generate(session, input_ids, attention_mask, max_new_tokens: int,
             eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None) -> np.ndarray:
    """Greedy decoding: the prompt ``[B, S]`` (left padded) followed by up to ``max_new_tokens`` tokens.

    As transformers' ``generate(do_sample=False)``: a row that produced an end token continues with
    ``pad_token_id`` (default: the first end token), and decoding stops once every row has ended.
    """
    ids = np.asarray(input_ids, dtype=np.int64)
    mask = np.asarray(attention_mask, dtype=np.int64)
    if ids.ndim != 2 or mask.shape != ids.shape:
        raise ValueError(f"input_ids {ids.shape} and attention_mask {mask.shape} must both be [batch, sequence]")
    if mask[:, -1].min() == 0:
        raise ValueError("the last column of attention_mask holds padding; pad prompts on the left "
                         "(tokenizer.padding_side = 'left')")
    eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    done = np.zeros(ids.shape[0], dtype=bool)
    past = empty_past(session, ids.shape[0])
    tokens, new = ids, ids
    for _ in range(max_new_tokens):
        logits, past = step(session, new, mask, past)
        nxt = np.where(done, pad, logits[:, -1].argmax(-1)).astype(np.int64)
        tokens = np.concatenate([tokens, nxt[:, None]], axis=1)
        mask = np.concatenate([mask, np.ones_like(nxt)[:, None]], axis=1)
        done |= np.isin(nxt, eos)
        if done.all():
            break
        new = nxt[:, None]
    return tokens
