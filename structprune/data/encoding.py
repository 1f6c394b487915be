"""Tokenisation of :class:`~structprune.data.tasks.TaskData` into tensors, batching them, and the model's
view of a batch.

The tokenizer is passed in (any Hugging Face ``PreTrainedTokenizerBase``); transformers is not
imported here.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

import torch

from structprune.data.tasks import TASK_KINDS, TaskData

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def encode(
    data: TaskData, tokenizer: PreTrainedTokenizerBase, max_length: int = 128
) -> dict[str, torch.Tensor]:
    """Tokenise ``data`` into tensors: ``input_ids``, ``attention_mask``, ``token_type_ids`` when
    the tokenizer makes them, and ``labels`` (int64 for classification, float32 for regression;
    absent for unlabelled data).

    Sequences (pairs truncated longest-first) are cut at ``max_length`` tokens and padded to the
    longest one in ``data``, so all rows share one length.
    """
    if len(data) == 0:
        raise ValueError(f"{data.task.name} {data.split}: nothing to encode (no examples)")
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and max_length > limit:
        raise ValueError(
            f"max_length={max_length} exceeds the tokenizer's model_max_length={limit}: the model "
            f"cannot take sequences that long; use max_length <= {limit}"
        )
    if tokenizer.pad_token is None:
        raise ValueError(
            "the tokenizer has no padding token; set one first, e.g. "
            "tokenizer.pad_token = tokenizer.eos_token"
        )
    encoded = tokenizer(
        data.text_a,
        data.text_b,
        padding="longest",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    out = {key: value for key, value in encoded.items() if isinstance(value, torch.Tensor)}
    if data.labels is not None:
        dtype = torch.long if TASK_KINDS[data.task.kind].classes else torch.float32
        out["labels"] = torch.tensor(data.labels, dtype=dtype)
    return out


def batches(
    encoded: Mapping[str, torch.Tensor], batch_size: int, shuffle: bool = False, seed: int = 0
) -> Iterator[dict[str, torch.Tensor]]:
    """Split row-aligned tensors into batches of ``batch_size`` rows (the last one may be smaller).

    With ``shuffle`` the row order is a permutation drawn from a generator seeded with ``seed``, so
    the same seed always gives the same batches.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not encoded:
        raise ValueError("no tensors to batch")
    rows = {key: value.shape[0] for key, value in encoded.items()}
    n = next(iter(rows.values()))
    if any(count != n for count in rows.values()):
        raise ValueError(f"tensors must have the same number of rows, got {rows}")
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    else:
        order = torch.arange(n)
    return ({key: value[idx] for key, value in encoded.items()} for idx in order.split(batch_size))


MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def model_inputs(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of ``batch`` a model takes as inputs (labels and extra tokenizer fields left out)."""
    return {name: batch[name] for name in MODEL_INPUTS if name in batch}


def trim_padding(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``batch`` without trailing columns that are padding in every row.

    Exact for right and left padding alike: only columns after the last real token of every
    row go, which no real token attends to and no classifier reads.
    """
    mask = batch.get("attention_mask")
    if mask is None or mask.ndim != 2:
        return dict(batch)
    real = mask.any(0).nonzero()
    length = int(real.max()) + 1 if len(real) else 1
    return {name: t[:, :length] if t.ndim == 2 and t.shape[1] == mask.shape[1] else t for name, t in batch.items()}


def num_rows(encoded: Mapping[str, torch.Tensor], what: str) -> int:
    """The rows of ``encoded``; ``ValueError`` naming ``what`` when there are none."""
    if "input_ids" not in encoded or len(encoded["input_ids"]) == 0:
        raise ValueError(f"{what}: the data set is empty (no input_ids rows); load a task with examples")
    return len(encoded["input_ids"])
