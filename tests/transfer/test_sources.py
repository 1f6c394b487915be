"""Auxiliary sources (structprune.transfer.sources): parsing, deduplication against the target (counted), the
cap, MLM masking statistics, the tied MLM decoder, auxiliary heads reading the encoder as the model's head does,
and bad input."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import BertTokenizerFast

from structprune.arch import from_hf
from structprune.data import TaskData, get_task, load_task
from structprune.transfer.sources import (
    IGNORE_INDEX,
    MLM,
    AuxSource,
    MLMHead,
    auxiliary_split,
    classification_head,
    deduplicate,
    load_auxiliary,
    mask_tokens,
    normalise,
    parse_aux,
    sentences,
)
from tests.cli.test_cli import make_model
from tests.methods.test_l0 import tiny_bert

SST2, MNLI = get_task("sst2"), get_task("mnli")


def single(texts: list[str], split: str = "train") -> TaskData:
    return TaskData(SST2, split, list(texts), None, [i % 2 for i in range(len(texts))])


def pairs(rows: list[tuple[str, str]], split: str = "dev") -> TaskData:
    return TaskData(MNLI, split, [a for a, _ in rows], [b for _, b in rows], [i % 3 for i in range(len(rows))])


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> BertTokenizerFast:
    return BertTokenizerFast.from_pretrained(str(make_model(tmp_path_factory.mktemp("aux") / "model")))


TARGET = single(["the movie was good", "the film was bad", "very dull plot", ""])
TARGET_DEV = single(["the plot was fun", "not great"], "dev")
TARGET_TEST = single(["awful film"], "test")


def aux_rows() -> TaskData:
    """Ten pairs; four contain a target sentence (case / whitespace changed, in text_a or text_b)."""
    rows = [("the movie is fine", "a film"), ("The  Movie was GOOD", "unrelated"),  # target train, text_a
            ("a plot", "the plot   was fun"),  # target dev, text_b
            ("fun", "fun"), ("AWFUL film", "x"),  # target test
            ("great", ""), ("poor", "dull"), ("very dull plot ", "y"),  # target train again
            ("is", "was"), ("the movie", "the film")]
    return pairs(rows, "train")


def test_parse_aux_names_weights_and_errors():
    sources = parse_aux("mnli:1.0, sst2:0.5,mlm,snli")
    assert [(s.name, s.weight) for s in sources] == [("mnli", 1.0), ("sst2", 0.5), (MLM, 1.0), ("snli", 1.0)]
    assert all(s.max_examples == 8000 for s in sources)
    assert parse_aux("MLM:2", max_examples=10) == [AuxSource(MLM, 2.0, 10)]
    with pytest.raises(ValueError, match="listed twice"):
        parse_aux("mnli,mnli:0.5")
    with pytest.raises(ValueError, match="unknown task 'mnly'.*Did you mean 'mnli'"):
        parse_aux("mnly")
    with pytest.raises(ValueError, match="weight after ':' must be a number"):
        parse_aux("mnli:heavy")
    with pytest.raises(ValueError, match="weight must be a finite number >= 0"):
        parse_aux("mnli:-1")
    with pytest.raises(ValueError, match="no auxiliary source"):
        parse_aux(" , ")


def test_deduplicate_removes_planted_duplicates_and_counts_them():
    assert normalise("  The\tMovie \n was  GOOD ") == "the movie was good"
    assert normalise("A man is sleeping .") == normalise("a man is sleeping.") == "a man is sleeping"
    reference = sentences([TARGET, TARGET_DEV, TARGET_TEST])
    assert "" not in reference and "very dull plot" in reference and len(reference) == 6
    kept, removed = deduplicate(aux_rows(), reference)
    assert removed == 4
    assert kept.text_a == ["the movie is fine", "fun", "great", "poor", "is", "the movie"]
    assert kept.text_b == ["a film", "fun", "", "dull", "was", "the film"]  # empty texts never match
    assert kept.labels == [0, 0, 2, 0, 2, 0]


def test_load_auxiliary_reports_removed_counts_and_caps_with_the_seed(tokenizer):
    sources = [AuxSource("toy", 0.5, data=aux_rows()), AuxSource("capped", 1.0, max_examples=3, data=aux_rows())]
    aux, report = load_auxiliary(sources, TARGET, [TARGET_DEV, TARGET_TEST], tokenizer, max_length=16, seed=3)
    assert report == {"toy": {"split": "train", "kept": 6, "removed": 4},
                      "capped": {"split": "train", "kept": 3, "removed": 4}}
    assert [a.name for a in aux] == ["toy", "capped"] and aux[0].weight == 0.5 and aux[0].task is MNLI
    assert len(aux[0]) == 6 and aux[0].encoded["labels"].tolist() == [0, 0, 2, 0, 2, 0]
    again, _ = load_auxiliary(sources, TARGET, [TARGET_DEV, TARGET_TEST], tokenizer, max_length=16, seed=3)
    assert torch.equal(again[1].encoded["input_ids"], aux[1].encoded["input_ids"])  # the cap's draw is seeded
    # only the target's evaluation splits and train rows count: without them nothing is removed
    _, report = load_auxiliary(sources[:1], single(["zzz"]), [], tokenizer, max_length=16)
    assert report["toy"] == {"split": "train", "kept": 10, "removed": 0}


def test_source_emptied_by_deduplication_is_an_error(tokenizer):
    copies = pairs([("the movie was good", "x"), ("y", "Not  great")], "train")
    with pytest.raises(ValueError, match="'copies' has no examples left after removing 2"):
        load_auxiliary([AuxSource("copies", data=copies)], TARGET, [TARGET_DEV], tokenizer)
    with pytest.raises(ValueError, match="no auxiliary sources"):
        load_auxiliary([], TARGET, [TARGET_DEV], tokenizer)
    with pytest.raises(ValueError, match="was not loaded"):
        load_auxiliary(parse_aux("extra.tsv"), TARGET, [], tokenizer)


def test_mlm_source_is_the_target_text_without_evaluation_sentences(tokenizer):
    target = single(["the movie was good", "the plot was fun", "the film was bad"])  # row 2 is also in dev
    (mlm,), report = load_auxiliary([AuxSource(MLM, 0.3)], target, [TARGET_DEV], tokenizer, max_length=16)
    assert report == {MLM: {"split": "train", "kept": 2, "removed": 1}}
    assert mlm.is_mlm and mlm.task is None and mlm.weight == 0.3 and "labels" not in mlm.encoded
    assert mlm.mask_token_id == tokenizer.mask_token_id and mlm.vocab_size == len(tokenizer)
    special = mlm.encoded["special_tokens_mask"]
    ids = mlm.encoded["input_ids"]
    assert special.tolist() == torch.isin(ids, torch.tensor(tokenizer.all_special_ids)).tolist()
    assert bool(special[:, 0].all())  # [CLS] is never masked
    batch = mlm.draw(torch.Generator().manual_seed(0), 2)
    chosen = batch["labels"] != IGNORE_INDEX
    assert not bool((chosen & (batch["attention_mask"] == 0)).any())


def test_mask_tokens_statistics():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 1000, (400, 250), generator=g)
    maskable = torch.rand(ids.shape, generator=g) < 0.8
    inputs, labels = mask_tokens(ids, maskable, mask_token_id=4, vocab_size=1000,
                                 generator=torch.Generator().manual_seed(1))
    chosen = labels != IGNORE_INDEX
    assert not bool((chosen & ~maskable).any())
    assert float(chosen.sum() / maskable.sum()) == pytest.approx(0.15, abs=0.005)
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(inputs[~chosen], ids[~chosen])
    n = float(chosen.sum())
    masked = float((inputs[chosen] == 4).sum()) / n
    kept = float((inputs[chosen] == ids[chosen]).sum()) / n
    randomised = 1 - masked - kept
    assert masked == pytest.approx(0.8, abs=0.01) and kept == pytest.approx(0.1, abs=0.01)
    assert randomised == pytest.approx(0.1, abs=0.01)
    again = mask_tokens(ids, maskable, 4, 1000, torch.Generator().manual_seed(1))
    assert torch.equal(again[0], inputs) and torch.equal(again[1], labels)  # seeded: a resume draws the same


def test_mlm_decoder_is_the_word_embedding_parameter():
    model = from_hf(tiny_bert())
    word = model.embeddings.word
    head = MLMHead(model.spec, word, torch.Generator().manual_seed(0))
    assert head.decoder_weight is word.weight
    assert sorted(head.state_dict()) == ["bias", "dense.bias", "dense.weight", "norm.bias", "norm.weight"]
    hidden = torch.randn(5, model.spec["hidden_size"])
    logits = head(hidden)
    expected = head.norm(torch.nn.functional.gelu(head.dense(hidden))) @ word.weight.t() + head.bias
    assert logits.shape == (5, model.spec["vocab_size"]) and torch.allclose(logits, expected)
    logits.logsumexp(-1).sum().backward()
    assert word.weight.grad is not None and float(word.weight.grad.abs().sum()) > 0


def test_classification_head_reads_the_encoder_like_the_models_own_head():
    model = from_hf(tiny_bert(num_labels=2)).eval()
    head = classification_head(model.spec, 5, torch.Generator().manual_seed(0))
    own = dict(model.head.named_parameters())
    assert {name: p.shape for name, p in head.named_parameters() if not name.startswith("out.")} == {
        name: p.shape for name, p in own.items() if not name.startswith("out.")}
    assert head.out.weight.shape == (5, model.spec["hidden_size"])
    assert not torch.equal(head.dense.weight, model.head.dense.weight)  # fresh, not a copy
    same = classification_head(model.spec, 5, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(head.parameters(), same.parameters()))
    mirror = classification_head(model.spec, 2, torch.Generator().manual_seed(0))
    mirror.load_state_dict(model.head.state_dict())
    ids = torch.randint(5, 100, (3, 7))
    hidden, states = model.backbone(ids)
    assert len(states) == len(model.layers) + 1
    assert torch.allclose(mirror(hidden, ids), model(ids).logits)


def test_auxiliary_split_choice():
    rte = get_task("rte")
    assert auxiliary_split(get_task("mnli"), rte) == "dev"
    assert auxiliary_split(get_task("snli"), rte) == "dev"
    assert auxiliary_split(get_task("qnli"), rte) == "dev"
    assert auxiliary_split(get_task("sick"), rte) == "train"
    with pytest.raises(ValueError, match="is the target task itself"):
        auxiliary_split(rte, rte)
    qnli_view = dataclasses.replace(get_task("qnli"), name="qnli-view")  # another task over QNLI's only split
    with pytest.raises(ValueError, match="has no usable split"):
        auxiliary_split(get_task("qnli"), qnli_view)


def test_real_overlap_between_stsb_and_sick_is_removed(data_dir, tokenizer):
    target = load_task("stsb", "train", data_dir=data_dir, train_size=300)
    evaluation = [load_task("stsb", split, data_dir=data_dir) for split in ("dev", "test")]
    aux, report = load_auxiliary([AuxSource("sick-relatedness", max_examples=8000), AuxSource("mnli", 0.5, 200)],
                                 target, evaluation, tokenizer, max_length=32, seed=0, data_dir=data_dir)
    sick = report["sick-relatedness"]  # SICK's sentences are STS-B's without the final period
    assert sick["split"] == "train" and sick["removed"] > 100 and sick["kept"] + sick["removed"] == 4500
    assert report["mnli"]["split"] == "dev" and report["mnli"]["kept"] == 200
    assert aux[0].task.num_labels == 1 and aux[0].encoded["labels"].dtype == torch.float32
