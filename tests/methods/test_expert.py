"""``expert`` (Cus-Prun): relevance is the exact output change of removing a unit, corpora combine into one score,
the report finds units specific to a corpus, and ``--expert`` is parsed and loaded before any work."""

from __future__ import annotations

import pytest
import torch

from structprune.arch import from_hf
from structprune.budget import Budget
from structprune.methods import check_settings, get_method
from structprune.methods.calibration import calibration_batches
from structprune.methods.channel_stats import channel_stats
from structprune.methods.expert import (
    combined,
    corpus_text,
    expert_inputs,
    parse_expert,
    relevance,
    relevance_report,
)
from tests.conftest import make_causal


def _data(vocab: int, low: int, high: int, n: int = 4, seq: int = 10) -> dict[str, torch.Tensor]:
    ids = torch.randint(low, high, (n, seq), generator=torch.Generator().manual_seed(low))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def test_head_relevance_is_the_output_change_of_removing_the_head():
    model = from_hf(make_causal("llama")).eval()
    data = _data(model.spec["vocab_size"], 3, model.spec["vocab_size"])
    scores = relevance(model, channel_stats(model, calibration_batches(data, 2)))
    layer, head = model.layers[1], 2
    seen = []
    hook = layer.attn.o.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        model(data["input_ids"], attention_mask=data["attention_mask"])
        hook.remove()
        x = torch.cat([s.flatten(0, 1) for s in seen]).double()
        hd = model.spec["head_dim"]
        w = layer.attn.o.weight.double()
        changes = torch.stack([(x[:, h * hd:(h + 1) * hd] @ w[:, h * hd:(h + 1) * hd].t()).pow(2).sum()
                               for h in range(layer.attn.heads)])
    share = scores["head"][1] / scores["head"][1].sum()
    torch.testing.assert_close(share[head], changes[head] / changes.sum(), rtol=1e-5, atol=0)
    totals = scores["head"].sum(1) + scores["neuron"].sum(1)
    torch.testing.assert_close(totals, torch.ones(len(model.layers), dtype=torch.float64))


def test_corpora_combine_and_the_report_names_specific_units():
    a = {"head": torch.tensor([[1.0, 4.0]]), "neuron": torch.tensor([[1.0, 1.0, 0.5]])}
    b = {"head": torch.tensor([[1.0, 1.0]]), "neuron": torch.tensor([[3.0, 1.0, 0.5]])}
    assert combined({"a": a, "b": b}, "mean")["head"].tolist() == [[1.0, 2.5]]
    assert combined({"a": a, "b": b}, "max")["neuron"].tolist() == [[3.0, 1.0, 0.5]]
    report = relevance_report({"a": a, "b": b})
    assert report["a"]["head"]["specific"] == 1 and report["a"]["head"]["top"][0][:2] == [0, 1]
    assert report["b"]["neuron"]["specific_per_layer"] == [1]


def test_expert_masks_follow_the_corpora_and_differ_from_general_calibration():
    hf = make_causal("qwen2")
    vocab = hf.config.vocab_size
    general = _data(vocab, 3, vocab, n=6)
    corpora = {"domain=low": _data(vocab, 3, 12, n=6)}  # a narrow vocabulary: a "domain"
    expert = get_method("expert")(hf, general, Budget(0.3), corpora=corpora)
    base = get_method("expert")(hf, general, Budget(0.3))
    assert expert.log["achieved"] >= 0.3 and base.log["achieved"] >= 0.3
    assert not torch.equal(expert.masks.masks["neuron"], base.masks.masks["neuron"])
    assert expert.masks.meta["options"]["corpora"] == ["domain=low"]
    assert set(expert.masks.meta["relevance"]) == {"domain=low", "reference"}
    assert set(expert.masks.shifts) == {"attn", "ffn"}
    assert get_method("expert")(hf, general, Budget(0.3), compensate=False).masks.shifts == {}
    with pytest.raises(ValueError, match="needs calibration text"):
        get_method("expert")(hf, None, Budget(0.3))
    with pytest.raises(ValueError, match="combine"):
        get_method("expert")(hf, general, Budget(0.3), combine="min")


def test_the_expert_option_is_parsed_and_loaded(tmp_path):
    assert parse_expert("language=xquad-de, domain=text:x.txt") == [("language", "xquad-de"), ("domain", "text:x.txt")]
    for bad in ("lang=xquad-de", "language=", "language=a,language=b"):
        with pytest.raises(ValueError, match="--expert"):
            check_settings("expert", {"expert": bad})
    text = tmp_path / "notes.txt"
    text.write_text("the patient was given a dose of the drug. " * 200)
    assert corpus_text(f"text:{text}").startswith("the patient")
    with pytest.raises(ValueError, match="no calibration text"):
        corpus_text("hellaswag")

    class Tokenizer:
        def __call__(self, text, **_):
            return type("Encoded", (), {"input_ids": list(range(len(text.split())))})()

    options, setup, log = expert_inputs({"expert": f"domain=text:{text}", "max_examples": 3}, None, (), Tokenizer(),
                                        max_length=16)
    assert "expert" not in options and options["corpora"]["domain=text:" + str(text)]["input_ids"].shape == (3, 16)
    assert log["expert_windows"] == {f"domain=text:{text}": 3} and "3 windows of 16 tokens" in setup["expert"]
