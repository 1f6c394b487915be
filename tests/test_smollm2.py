"""A real decoder LLM (SmolLM2-135M-Instruct, Llama with GQA, tied embeddings): the GGUF conversion, parity with
Hugging Face, greedy generation, and masked == compact after pruning."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM

from structprune.arch import from_hf
from structprune.compaction import compact
from structprune.gguf import MissingPackageError, gguf_folder
from structprune.loading import ModelLoadError, load_model, load_tokenizer
from structprune.masked_model import MaskedModel
from structprune.maskset import MaskSet, mask_shapes

PROMPTS = ["The capital of France is", "Once upon a time, in a small village,"]


@pytest.fixture(scope="module")
def smollm2(smollm2_folder):
    hf = AutoModelForCausalLM.from_pretrained(smollm2_folder, dtype=torch.float32, attn_implementation="eager").eval()
    tokenizer = load_tokenizer(smollm2_folder, hf.config.vocab_size)
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    return hf, tokenizer, dict(inputs)


def test_converted_folder_loads_as_a_structprune_causal_lm(smollm2_folder):
    model = load_model(str(smollm2_folder))  # found to be a causal LM from its config
    assert model.spec["task"] == "causal_lm" and model.spec["tie_word_embeddings"]
    assert [(layer["heads"], layer["kv_heads"], layer["ffn"]) for layer in model.spec["layers"]] == [(9, 3, 1536)] * 30
    with pytest.raises(ModelLoadError, match="no trained classification head"):
        load_model(str(smollm2_folder), causal=False)


def test_matches_hugging_face_and_generates_the_same_text(smollm2):
    hf, tokenizer, inputs = smollm2
    ours = from_hf(hf).eval()
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        # float32 through 30 layers: the two forwards round apart by 4.3e-5 on an AMD EPYC, under 1e-5 on an Intel Xeon
        assert (hf(**inputs).logits - ours(**inputs).logits)[real].abs().max() <= 1e-4
    kw = {"max_new_tokens": 32, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    expected = hf.generate(**inputs, **kw)
    assert torch.equal(ours.generate(**inputs, **kw), expected)
    assert "Paris" in tokenizer.decode(expected[0], skip_special_tokens=True)


def test_pruned_compact_equals_masked(smollm2):
    hf, tokenizer, inputs = smollm2
    masked = MaskedModel(hf).eval()
    shapes = mask_shapes(masked.structure)
    g = torch.Generator().manual_seed(0)
    head = torch.ones(shapes["head"])
    head[:, 6:] = 0  # the third KV group of every layer goes
    head[5] = 0  # and all attention of layer 5
    masks = MaskSet({"head": head, "neuron": (torch.rand(shapes["neuron"], generator=g) < 0.5).float()})
    masked.set_masks(masks)
    small = compact(masked, masks).eval()
    assert small.layers[5].attn is None and small.layers[0].attn.kv_heads == 2
    ids = inputs["input_ids"][:1]
    with torch.no_grad():
        assert (masked(ids).logits - small(ids).logits).abs().max() <= 1e-4


def test_missing_gguf_file_or_package_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        gguf_folder(tmp_path / "none.gguf")
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    monkeypatch.setenv("STRUCTPRUNE_CACHE", str(tmp_path / "cache"))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(MissingPackageError, match="pip install gguf"):
        gguf_folder(tmp_path / "model.gguf")
