"""Architecture adapters and the structprune forward against Hugging Face's own models."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2ForSequenceClassification

from structprune.arch import ModelStructure, adapter_for, from_hf
from structprune.masked_model import MaskedModel
from tests.conftest import BERT_FAMILY, make_hf, make_inputs


@pytest.mark.parametrize("seq", [1, 11, 17])
def test_full_size_forward_matches_hf(arch, seq):
    hf = make_hf(arch)
    inputs = make_inputs(hf, batch=3, seq=seq)
    ours = from_hf(hf).eval()
    with torch.no_grad():
        expected = hf(**inputs, output_hidden_states=True)
        got = ours(**inputs, output_hidden_states=True)
    assert torch.allclose(got.logits, expected.logits, atol=1e-5, rtol=0), (got.logits - expected.logits).abs().max()
    # hidden states of real (non-padding) tokens after every layer; HF's last entry is after the final norm
    real = inputs["attention_mask"].bool()
    n = len(got.hidden_states) - (0 if arch in BERT_FAMILY else 1)
    for mine, theirs in zip(got.hidden_states[:n], expected.hidden_states[:n]):
        assert (mine[real] - theirs[real]).abs().max() <= 1e-5


def test_masked_model_all_gates_one_matches_hf(arch):
    hf = make_hf(arch)
    inputs = make_inputs(hf)
    masked = MaskedModel(hf).eval()
    structure = masked.structure
    ones = {
        "attn_layer": torch.ones(structure.num_layers), "head": torch.ones(structure.num_layers, structure.max_heads),
        "ffn_layer": torch.ones(structure.num_layers), "neuron": torch.ones(structure.num_layers, structure.max_ffn),
        "hidden": torch.ones(structure.hidden_size),
    }
    with torch.no_grad():
        expected = hf(**inputs).logits
        assert (masked(**inputs).logits - expected).abs().max() <= 1e-5
        assert (masked(**inputs, gates=ones).logits - expected).abs().max() <= 1e-5


def test_structure_reads_shapes(arch):
    hf = make_hf(arch)
    structure = ModelStructure.from_spec(from_hf(hf).spec)
    cfg = hf.config
    assert structure.num_layers == cfg.num_hidden_layers
    assert structure.max_heads == cfg.num_attention_heads
    assert structure.max_ffn == cfg.intermediate_size
    assert structure.hidden_size == cfg.hidden_size
    assert structure.max_kv_heads == getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
    assert structure.gated_ffn == (arch not in BERT_FAMILY)


def test_unsupported_architecture_is_named():
    model = GPT2ForSequenceClassification(GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=10))
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'.*supports"):
        adapter_for(model.config)
    with pytest.raises(ValueError, match="unsupported architecture"):
        MaskedModel(model)


def test_llama_classification_needs_pad_token():
    hf = make_hf("llama")
    hf.config.pad_token_id = None
    with pytest.raises(ValueError, match="pad_token_id"):
        from_hf(hf)


def test_relative_positions_are_refused():
    hf = make_hf("bert")
    hf.config.position_embedding_type = "relative_key"
    with pytest.raises(ValueError, match="position_embedding_type"):
        from_hf(hf)
