"""The causal LM of the one forward: parity with Hugging Face, generation with the per-layer KV cache,
masked == compact, save / load (with and without structprune), and its errors."""

from __future__ import annotations

import subprocess
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from structprune.arch import from_hf
from structprune.compaction import compact, from_pretrained, save
from structprune.masked_model import MaskedModel
from structprune.maskset import MaskSet, mask_shapes
from structprune.modeling_structprune import StructpruneForCausalLM
from tests.conftest import CAUSAL_ARCHS, PAD, hf457_python, left_padded, make_causal

NEW_TOKENS = 32


def _greedy(model, inputs, n=NEW_TOKENS, **kw) -> torch.Tensor:
    out = model.generate(**inputs, max_new_tokens=n, do_sample=False, pad_token_id=PAD, **kw)
    return out[:, inputs["input_ids"].shape[1]:]


def _masks(structure, seed: int) -> MaskSet:
    """Uneven heads (one layer without attention), neurons, hidden dims, with scales."""
    g = torch.Generator().manual_seed(seed)
    shapes = mask_shapes(structure)
    head = (torch.rand(shapes["head"], generator=g) < 0.6).float()
    head[0] = 0
    head[-1, 0] = 1
    neuron = (torch.rand(shapes["neuron"], generator=g) < 0.5).float()
    hidden = (torch.rand(shapes["hidden"], generator=g) < 0.8).float()
    scales = {"neuron": torch.rand(shapes["neuron"], generator=g) + 0.5}
    return MaskSet({"head": head, "neuron": neuron, "hidden": hidden}, scales)


@pytest.mark.parametrize("arch", CAUSAL_ARCHS)
def test_matches_hugging_face_logits_and_greedy_tokens(arch):
    hf = make_causal(arch)
    ours = from_hf(hf).eval()
    assert isinstance(ours, StructpruneForCausalLM)
    inputs = left_padded(hf.config.vocab_size, seq=14)
    with torch.no_grad():
        a, b = hf(**inputs).logits, ours(**inputs).logits
    real = inputs["attention_mask"].bool()
    assert (a - b)[real].abs().max() <= 1e-5
    expected = _greedy(hf, inputs)
    assert torch.equal(_greedy(ours, inputs), expected)
    assert torch.equal(_greedy(ours, inputs, use_cache=False), expected)


def test_sampling_and_tied_head_follow_the_source():
    hf = make_causal("llama")
    ours = from_hf(hf).eval()
    assert ours.spec["tie_word_embeddings"] and ours.lm_head is None
    assert not from_hf(make_causal("llama3")).spec["tie_word_embeddings"]
    inputs = left_padded(hf.config.vocab_size)
    runs = []
    for model in (hf, ours):
        torch.manual_seed(7)
        runs.append(model.generate(**inputs, max_new_tokens=12, do_sample=True, top_k=20, pad_token_id=PAD))
    assert torch.equal(*runs)


@pytest.mark.parametrize("arch", CAUSAL_ARCHS)
def test_compact_equals_masked_and_generates_the_same_tokens(arch):
    hf = make_causal(arch)
    masked = MaskedModel(hf).eval()
    masks = _masks(masked.structure, seed=len(arch))
    masked.set_masks(masks)
    small = compact(masked, masks).eval()
    assert small.layers[0].attn is None
    ids = torch.randint(3, hf.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (masked(ids).logits - small(ids).logits).abs().max() <= 1e-4
        tokens = ids
        for _ in range(NEW_TOKENS):  # greedy decoding on the masked model, without a cache
            tokens = torch.cat([tokens, masked(tokens).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(_greedy(small, {"input_ids": ids}), tokens[:, ids.shape[1]:])


def test_masked_model_leaves_the_callers_model_alone():
    ours = from_hf(make_causal("qwen2")).eval()
    MaskedModel(ours)
    assert all(layer.attn.attention_fn is None and layer.ffn.ffn_fn is None for layer in ours.layers)


def test_layers_without_attention_keep_no_cache():
    hf = make_causal("llama")
    masked = MaskedModel(hf)
    small = compact(masked, _masks(masked.structure, seed=3)).eval()
    attention = [layer.attn for layer in small.layers if layer.attn is not None]
    with torch.no_grad():
        out = small(torch.tensor([[5, 6, 7]]), use_cache=True)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    assert len(cache.layers) == len(attention) < len(small.layers)
    assert [layer.keys.shape[1] for layer in cache.layers] == [a.kv_heads for a in attention]


def test_cache_errors_and_positions():
    hf = make_causal("llama")
    ours = from_hf(hf).eval()
    other = from_hf(make_causal("qwen2")).eval()
    with torch.no_grad():
        cache = other(torch.tensor([[5, 6, 7]]), use_cache=True).cache
        with pytest.raises(ValueError, match="comes from another model"):
            ours(torch.tensor([[5]]), attention_mask=torch.ones(1, 4, dtype=torch.long), cache=cache)
        own = ours(torch.tensor([[5, 6, 7]]), use_cache=True).cache
        with pytest.raises(ValueError, match="attention_mask covers 2 tokens"):
            ours(torch.tensor([[5]]), attention_mask=torch.ones(1, 2, dtype=torch.long), cache=own)
        with pytest.raises(ValueError, match="exceeds the model's maximum of 128"):
            ours(torch.randint(3, 90, (1, 129)))
        with pytest.raises(ValueError, match="exceeds the model's maximum of 128"):
            ours.generate(torch.randint(3, 90, (1, 120)), max_new_tokens=20, do_sample=False, pad_token_id=PAD)


def test_unsupported_rope_scaling_is_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=8, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ValueError, match="RoPE scaling 'dynamic' is not supported"):
        from_hf(LlamaForCausalLM(config))


def test_save_load_and_auto_class_generate_the_same_tokens(tmp_path):
    hf = make_causal("qwen3")
    masked = MaskedModel(hf)
    small = compact(masked, _masks(masked.structure, seed=4)).eval()
    save(small, tmp_path / "m")
    inputs = left_padded(hf.config.vocab_size)
    expected = _greedy(small, inputs)
    assert torch.equal(_greedy(from_pretrained(tmp_path / "m"), inputs), expected)
    auto = AutoModelForCausalLM.from_pretrained(tmp_path / "m", trust_remote_code=True).eval()
    assert torch.equal(_greedy(auto, inputs), expected)


def test_generates_through_remote_code_without_structprune(tmp_path):
    """transformers 4.57 (its ``past_key_values`` API), structprune not installed: the same greedy tokens."""
    python = hf457_python()
    hf = make_causal("mistral")
    masked = MaskedModel(hf)
    small = compact(masked, _masks(masked.structure, seed=5)).eval()
    save(small, tmp_path / "m")
    inputs = left_padded(hf.config.vocab_size)
    torch.save(inputs, tmp_path / "inputs.pt")
    script = textwrap.dedent(f"""
        import importlib.util, torch
        assert importlib.util.find_spec("structprune") is None, "structprune must not be importable here"
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'm')!r}, trust_remote_code=True).eval()
        inputs = torch.load({str(tmp_path / 'inputs.pt')!r}, weights_only=True)
        out = model.generate(**inputs, max_new_tokens={NEW_TOKENS}, do_sample=False, pad_token_id={PAD})
        torch.save(out[:, inputs["input_ids"].shape[1]:], {str(tmp_path / 'out.pt')!r})
    """)
    subprocess.run([python, "-c", script], check=True, cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert torch.equal(torch.load(tmp_path / "out.pt", weights_only=True), _greedy(small, inputs))


def test_dynamic_cache_built_outside_is_accepted():
    ours = from_hf(make_causal("qwen2")).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        full = ours(ids).logits[:, -1]
        cache = DynamicCache()
        ours(ids[:, :3], cache=cache, use_cache=True)
        step = ours(ids[:, 3:], attention_mask=torch.ones(1, 4, dtype=torch.long), cache=cache).logits[:, -1]
    assert (full - step).abs().max() <= 1e-5


def test_an_unknown_causal_architecture_is_named(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from structprune.loading import ModelLoadError, load_model

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ModelLoadError, match="'gpt2' model; structprune supports causal language models of type llama"):
        load_model(str(tmp_path / "gpt2"), causal=True)
