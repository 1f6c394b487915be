"""Tests of structprune.likelihood: windows score each token once, perplexity and choice scores equal sums of
log-probabilities computed by hand, acc vs acc_norm, LAMBADA's greedy rule, lm-eval's context/continuation
split, BOS handling, and the errors."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from structprune.arch import from_hf
from structprune.data.lm import Completion, MultipleChoice
from structprune.likelihood import (
    Request,
    adds_bos,
    encode_pair,
    evaluate_lm,
    lambada,
    loglikelihoods,
    multiple_choice,
    perplexity,
    windows,
)

CORPUS = [
    "Question: How do I boil an egg?\nAnswer: Put the egg in boiling water for eight minutes. " * 3,
    "The quick brown fox jumps over the lazy dog. The cat sat on the mat, and the dog sat by the door. " * 3,
    "Scientists say the weather will be warm and dry in the south, with rain in the north tomorrow. " * 3,
]
TEXT = " ".join(CORPUS)


def make_tokenizer(bos: bool = False, vocab: int = 300) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on CORPUS; ``bos``: it puts ``<s>`` first when encoding, as Llama 2's does."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", model_max_length=128)


def make_lm(vocab: int = 300, seed: int = 0) -> LlamaForCausalLM:
    """A tiny random Llama with the tokenizer's vocabulary, in eval mode."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=48, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


class Fixed(nn.Module):
    """Logits that do not depend on the input: ``row`` at every position (NaN rows test the error)."""

    def __init__(self, row: torch.Tensor):
        super().__init__()
        self.row = nn.Parameter(row, requires_grad=False)

    def forward(self, input_ids):
        return SimpleNamespace(logits=self.row.expand(*input_ids.shape, -1))


def by_hand(model, tokens: list[int], targets: int) -> tuple[float, bool]:
    """Summed log-probability of the last ``targets`` tokens and whether each is the argmax: one unbatched pass."""
    with torch.no_grad():
        logprobs = model(input_ids=torch.tensor([tokens[:-1]])).logits[0].float().log_softmax(-1)
    rows = logprobs[len(tokens) - 1 - targets:]
    wanted = torch.tensor(tokens[-targets:])
    return float(rows.gather(-1, wanted[:, None]).sum()), bool((rows.argmax(-1) == wanted).all())


@pytest.mark.parametrize(("n", "window", "stride", "bos"),
                         [(100, 16, 16, False), (100, 16, 16, True), (100, 16, 5, False), (101, 16, 7, True),
                          (7, 16, 16, False), (33, 16, 1, False)])
def test_windows_score_each_token_once(n, window, stride, bos):
    spans = windows(n, window, stride, bos)
    scored = [t for w in spans for t in range(w.score_from, w.end)]
    assert len(scored) == len(set(scored))
    assert all(w.end - w.begin <= window and w.begin <= w.score_from - (not bos) for w in spans)
    starts = {0} if stride < window else set(range(0, n, window))
    assert sorted(scored) == [t for t in range(n) if bos or t not in starts]
    assert spans[-1].end == n


def test_windows_refuse_a_stride_that_skips_tokens():
    with pytest.raises(ValueError, match="stride must be between 1 and window"):
        windows(100, 16, 17, False)


@pytest.mark.parametrize(("window", "stride", "bos"), [(16, 16, False), (16, 5, False), (20, 20, True)])
def test_perplexity_is_exp_mean_nll_by_hand(window, stride, bos):
    tokenizer, hf = make_tokenizer(bos=bos), make_lm()
    ids = tokenizer(TEXT, add_special_tokens=False).input_ids
    total, count = 0.0, 0
    for w in windows(len(ids), window, stride, bos):
        prefix = [tokenizer.bos_token_id] if bos else []
        logprob, _ = by_hand(hf, prefix + ids[w.begin:w.end], w.end - w.score_from)
        total, count = total + logprob, count + w.end - w.score_from
    for model in (hf, from_hf(hf).eval()):
        result = perplexity(model, tokenizer, TEXT, window, stride, batch_size=3, progress=False)
        assert result.tokens == count and result.text_tokens == len(ids) and result.bos == bos
        assert result.perplexity == pytest.approx(math.exp(-total / count), rel=1e-5)


def test_bos_follows_the_tokenizer_and_limit_caps_windows():
    assert not adds_bos(make_tokenizer()) and adds_bos(make_tokenizer(bos=True))
    tokenizer, model = make_tokenizer(bos=True), make_lm()
    result = perplexity(model, tokenizer, TEXT, window=16, stride=16, limit=3, progress=False)
    assert (result.bos, result.windows, result.tokens) == (True, 3, 48)
    plain = perplexity(model, make_tokenizer(), TEXT, window=16, stride=16, limit=3, progress=False)
    assert (plain.bos, plain.tokens) == (False, 45)


def test_encode_pair_splits_as_lm_eval():
    tokenizer = make_tokenizer()
    request = encode_pair(tokenizer, "Question: How do I boil an egg?\nAnswer:", " Put the egg in water")
    whole = tokenizer("Question: How do I boil an egg?\nAnswer: Put the egg in water").input_ids
    assert request.tokens == tuple(whole)
    assert tokenizer.decode(whole[-request.targets:]) == " Put the egg in water"
    # trailing spaces of the context move to the continuation
    assert encode_pair(tokenizer, "The cat sat on the ", "mat") == encode_pair(tokenizer, "The cat sat on the", " mat")
    with_bos = make_tokenizer(bos=True)
    request = encode_pair(with_bos, "The cat", " sat")
    assert request.tokens[0] == with_bos.bos_token_id and request.tokens[1:] == tuple(tokenizer("The cat sat").input_ids)
    empty = encode_pair(with_bos, "", " sat")  # an empty context is the BOS token
    assert empty == Request((with_bos.bos_token_id, *tokenizer(" sat").input_ids), len(tokenizer(" sat").input_ids))


def test_batched_scores_equal_unbatched_scores_by_hand():
    tokenizer, hf = make_tokenizer(), make_lm(seed=1)
    items = [MultipleChoice("Question: How do I boil an egg?\nAnswer:", ("Put the egg in boiling water.", "Sit."), 0,
                            "a"),
             MultipleChoice("The quick brown fox", ("jumps over the lazy dog.", "sat", "is warm and dry"), 2, "b"),
             MultipleChoice("", ("The cat sat on", "The dog sat by"), 1, "c", partial="the mat.")]
    result = multiple_choice(from_hf(hf).eval(), tokenizer, items, batch_size=3, progress=False)
    for item, scores in zip(items, result.scores, strict=True):
        requests = [encode_pair(tokenizer, *pair) for pair in item.requests()]
        expected = [by_hand(hf, list(r.tokens), r.targets)[0] for r in requests]
        assert scores == pytest.approx(expected, abs=1e-4)
    assert multiple_choice(hf, tokenizer, items, limit=2, progress=False).items == 2


def test_acc_and_acc_norm_differ_when_lengths_differ():
    """A uniform model gives every token log(1/V): acc picks the choice of fewest tokens, acc_norm the one of
    fewest tokens per character."""
    tokenizer = make_tokenizer()
    uniform = Fixed(torch.zeros(len(tokenizer)))
    short, long = "Sit", "Put the egg in boiling water"
    assert len(tokenizer(" " + short).input_ids) < len(tokenizer(" " + long).input_ids)
    assert len(tokenizer(" " + short).input_ids) / len(short) > len(tokenizer(" " + long).input_ids) / len(long)
    items = [MultipleChoice("Question: How do I boil an egg?\nAnswer:", (short, long), 1, "egg")]
    result = multiple_choice(uniform, tokenizer, items, progress=False)
    assert (result.acc, result.acc_norm) == (0.0, 100.0)
    expected = -len(tokenizer(" " + long).input_ids) * math.log(len(tokenizer))
    assert result.scores[0][1] == pytest.approx(expected)


def test_lambada_counts_a_hit_only_when_every_target_token_is_greedy():
    tokenizer = make_tokenizer()
    (the,) = tokenizer(" the").input_ids
    row = torch.zeros(len(tokenizer))
    row[the] = 10.0
    items = [Completion("The cat sat on", " the", "hit"), Completion("The cat sat on", " the the", "hit twice"),
             Completion("The cat sat on", " the mat", "miss")]
    result = lambada(Fixed(row), tokenizer, items, progress=False)
    assert result.acc == pytest.approx(200 / 3)
    logprob = float(row.log_softmax(-1)[the])
    other = float(row.log_softmax(-1)[0])
    mat_tokens = len(tokenizer(" mat").input_ids)
    assert result.perplexity == pytest.approx(math.exp(-(logprob + 2 * logprob + logprob + mat_tokens * other) / 3))


def test_nan_logits_raise_naming_the_window():
    tokenizer = make_tokenizer()
    broken = Fixed(torch.full((len(tokenizer),), float("nan")))
    with pytest.raises(FloatingPointError, match=r"window 0 \(tokens 0-16\)"):
        perplexity(broken, tokenizer, TEXT, window=16, stride=16, progress=False)
    with pytest.raises(FloatingPointError, match="item egg"):
        multiple_choice(broken, tokenizer, [MultipleChoice("How", ("a", "b"), 0, "egg")], progress=False)


def test_errors_say_what_was_wrong():
    tokenizer, model = make_tokenizer(), make_lm()
    with pytest.raises(ValueError, match="too short"):
        perplexity(model, tokenizer, "The", progress=False)
    with pytest.raises(ValueError, match="exceed the model's maximum of 128"):
        perplexity(model, tokenizer, TEXT, window=200, stride=200, progress=False)
    with pytest.raises(ValueError, match="no BOS token"):
        no_bos = make_tokenizer()
        no_bos.bos_token = None
        perplexity(model, no_bos, TEXT, bos=True, progress=False)
    with pytest.raises(ValueError, match="at least one target"):
        loglikelihoods(model, [Request((1, 2), 2)], progress=False)
    with pytest.raises(ValueError, match="no items"):
        multiple_choice(model, tokenizer, [], progress=False)


def test_evaluate_lm_runs_a_task_by_name():
    pytest.importorskip("gensim")
    tokenizer, model = make_tokenizer(), make_lm()
    result = evaluate_lm(model, tokenizer, "gensim-news", window=32, stride=32, limit=2, progress=False)
    assert result.windows == 2 and result.tokens == 62 and math.isfinite(result.perplexity)
