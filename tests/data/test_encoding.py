"""Tests of structprune.data.encoding: encode (tokenisation into tensors) and batches."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from structprune.data import TaskData, encode, get_task
from structprune.data.encoding import batches

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "good", "bad", "film", "is", "the"]


@pytest.fixture
def tokenizer(tmp_path: Path):
    from transformers import BertTokenizer

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    return BertTokenizer(str(vocab))


def test_encode_single_sentences(tokenizer) -> None:
    spec = get_task("sst2")
    data = TaskData(
        spec, "train", ["a good film", "bad", "the film is a good film"], None, [1, 0, 1]
    )
    enc = encode(data, tokenizer, max_length=6)
    assert set(enc) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert enc["input_ids"].shape == (3, 6)  # longest (8 tokens) truncated to 6
    assert enc["attention_mask"].tolist()[1] == [1, 1, 1, 0, 0, 0]
    assert enc["labels"].dtype == torch.long and enc["labels"].tolist() == [1, 0, 1]


def test_encode_pairs_regression_and_unlabelled(tokenizer) -> None:
    spec = get_task("stsb")
    data = TaskData(spec, "dev", ["a film", "bad"], ["the film", "good"], [4.5, 1.0])
    enc = encode(data, tokenizer)
    assert enc["input_ids"].shape == (2, 7)  # [CLS] a film [SEP] the film [SEP]
    assert enc["token_type_ids"][0].tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert enc["labels"].dtype == torch.float32
    unlabelled = TaskData(spec, "dev", ["a"], ["b"], None)
    assert "labels" not in encode(unlabelled, tokenizer)


def test_encode_errors(tokenizer) -> None:
    data = TaskData(get_task("sst2"), "train", ["a"], None, [1])
    tokenizer.model_max_length = 16
    with pytest.raises(ValueError, match="model_max_length=16"):
        encode(data, tokenizer, max_length=32)
    with pytest.raises(ValueError, match="max_length must be"):
        encode(data, tokenizer, max_length=0)

    class NoPad:
        pad_token = None
        model_max_length = 512

    with pytest.raises(ValueError, match="no padding token"):
        encode(data, NoPad())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no examples"):
        encode(TaskData(get_task("sst2"), "train", [], None, []), tokenizer)


def test_batches_sizes_order_and_seed() -> None:
    encoded = {"input_ids": torch.arange(20).view(10, 2), "labels": torch.arange(10)}
    plain = list(batches(encoded, 4))
    assert [len(b["labels"]) for b in plain] == [4, 4, 2]
    assert torch.cat([b["labels"] for b in plain]).tolist() == list(range(10))
    assert plain[1]["input_ids"].tolist() == [[8, 9], [10, 11], [12, 13], [14, 15]]
    shuffled = [b["labels"].tolist() for b in batches(encoded, 4, shuffle=True, seed=3)]
    assert shuffled == [b["labels"].tolist() for b in batches(encoded, 4, shuffle=True, seed=3)]
    assert shuffled != [b["labels"].tolist() for b in batches(encoded, 4, shuffle=True, seed=4)]
    assert sorted(itertools.chain(*shuffled)) == list(range(10))
    for b in batches(encoded, 4, shuffle=True, seed=3):  # rows stay aligned across tensors
        assert (b["input_ids"][:, 0] == 2 * b["labels"]).all()
    with pytest.raises(ValueError, match="same number of rows"):
        batches({"a": torch.zeros(3), "b": torch.zeros(4)}, 2)
    with pytest.raises(ValueError, match="positive integer"):
        batches(encoded, 0)
