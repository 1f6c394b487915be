"""ONNX export of causal LMs with a key/value cache: parity, greedy generation on ONNX Runtime, optimum."""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from structprune.arch import from_hf
from structprune.compaction import compact
from structprune.export import ExportParityError, export, session
from structprune.export_decoder import (
    OptimumIncompatibleError,
    _FlatCache,
    check_decoder_parity,
    check_optimum_compatible,
    left_padded,
)
from structprune.masked_model import MaskedModel
from structprune.maskset import MaskSet
from structprune.ort_generation import empty_past, generate, position_ids, step
from tests.conftest import hf457_python

COMMON = dict(max_position_embeddings=128, pad_token_id=0, bos_token_id=None, eos_token_id=None)
FAMILIES = {
    # untied head
    "llama": (LlamaConfig(vocab_size=101, hidden_size=48, num_hidden_layers=4, num_attention_heads=6,
                          num_key_value_heads=3, intermediate_size=40, tie_word_embeddings=False, **COMMON),
              LlamaForCausalLM),
    # tied head, q/k/v biases
    "qwen2": (Qwen2Config(vocab_size=79, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=56, tie_word_embeddings=True, **COMMON),
              Qwen2ForCausalLM),
    # per-head q/k norms
    "qwen3": (Qwen3Config(vocab_size=83, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, intermediate_size=44, tie_word_embeddings=True,
                          **COMMON), Qwen3ForCausalLM),
    # a 6-token window, far shorter than prompt + generated tokens
    "mistral": (MistralConfig(vocab_size=71, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                              num_key_value_heads=2, intermediate_size=36, sliding_window=6, **COMMON),
                MistralForCausalLM),
}


def _hf(family: str, seed: int = 0):
    config, cls = FAMILIES[family]
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():  # random norms and biases, so that mistakes in them show up
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _uneven(family: str):
    """Different query and key/value heads per layer, layer 1 without attention, FFN and hidden dims pruned."""
    masked = MaskedModel(_hf(family))
    s = masked.structure
    head = torch.ones(s.num_layers, s.max_heads)
    head[0, : s.max_heads // 2] = 0  # a whole key/value group
    head[1] = 0
    head[-1, -1] = 0
    neuron = torch.ones(s.num_layers, s.max_ffn)
    neuron[:, ::3] = 0
    hidden = torch.ones(s.hidden_size)
    hidden[::4] = 0
    return compact(masked, MaskSet({"head": head, "neuron": neuron, "hidden": hidden})).eval()


def _uniform(hidden_pruned: bool):
    """A Llama with the same heads (4 of 6, key/value 2 of 3) in every layer; with ``hidden_pruned`` its hidden
    size is 32 = 4 heads x 8, the shape optimum can allocate a cache for."""
    masked = MaskedModel(_hf("llama"))
    s = masked.structure
    head = torch.ones(s.num_layers, s.max_heads)
    head[:, 4:] = 0
    hidden = torch.ones(s.hidden_size)
    if hidden_pruned:
        hidden[32:] = 0
    return compact(masked, MaskSet({"head": head, "hidden": hidden})).eval()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_generation_matches_pytorch(tmp_path, family):
    model = _uneven(family)
    kv = [layer.attn.kv_heads if layer.attn is not None else 0 for layer in model.layers]
    heads = [layer.attn.heads if layer.attn is not None else 0 for layer in model.layers]
    assert kv[1] == 0 and len(set(heads) - {0}) > 1
    result = export(model, tmp_path / "onnx")
    assert result.max_abs_diff <= 1e-4
    sess = session(tmp_path / "onnx", threads=1)
    names = [i.name for i in sess.get_inputs()]
    cached = [i for i, n in enumerate(kv) if n]
    assert names == ["input_ids", "attention_mask", "position_ids",
                     *(f"past_key_values.{i}.{kind}" for i in cached for kind in ("key", "value"))]
    assert [o.name for o in sess.get_outputs()][1:] == [f"present.{i}.{kind}" for i in cached
                                                       for kind in ("key", "value")]
    assert [sess.get_inputs()[3 + 2 * n].shape[1] for n in range(len(cached))] == [kv[i] for i in cached]
    config = json.loads((tmp_path / "onnx" / "config.json").read_text())
    assert config["structprune_onnx"]["kv_heads"] == kv and config["num_hidden_layers"] == len(kv)
    assert config["hidden_size"] == model.spec["hidden_size"] < FAMILIES[family][0].hidden_size

    ids, mask = left_padded(model, 3, 12, seed=5)
    logits, _ = step(sess, ids.numpy(), mask.numpy(), empty_past(sess, 3))
    assert logits.shape == (3, 1, model.spec["vocab_size"])  # the last position's only
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=32, do_sample=False)
    got = generate(sess, ids.numpy(), mask.numpy(), max_new_tokens=32)
    assert got.shape == (3, 44)
    np.testing.assert_array_equal(got, expected.numpy())


def test_all_logits_serve_scoring(tmp_path):
    model = _uneven("qwen2")
    export(model, tmp_path / "onnx", all_logits=True)
    sess = session(tmp_path / "onnx", threads=1)
    ids, mask = left_padded(model, 2, 9, seed=3)
    got, _ = step(sess, ids.numpy(), mask.numpy(), empty_past(sess, 2))
    with torch.no_grad():
        expected = model(ids, attention_mask=mask, position_ids=torch.from_numpy(position_ids(mask.numpy(), 9))).logits
    assert got.shape == tuple(expected.shape)
    assert np.abs(got - expected.numpy())[mask.bool().numpy()].max() <= 1e-4


def test_rows_that_end_continue_with_padding(tmp_path):
    model = _uneven("llama")
    export(model, tmp_path / "onnx")
    sess = session(tmp_path / "onnx", threads=1)
    ids, mask = left_padded(model, 2, 9, seed=3)
    free = generate(sess, ids.numpy(), mask.numpy(), max_new_tokens=12)
    eos = int(free[0, 9 + 2])  # row 0 ends at its third new token
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=eos,
                              pad_token_id=0)
    got = generate(sess, ids.numpy(), mask.numpy(), max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    np.testing.assert_array_equal(got, expected.numpy())
    assert (got[0, 12:] == 0).all()


def test_an_export_with_a_wrong_cache_fails_and_writes_nothing(tmp_path, monkeypatch):
    """The prefill alone would pass: only the decode steps of the check see a graph that swaps the cached keys
    and values."""
    def swapped(self, key, value, slot):
        past_key, past_value = self.past[slot]
        key, value = torch.cat((past_value, key), dim=2), torch.cat((past_key, value), dim=2)
        self.present += [key, value]
        return key, value

    monkeypatch.setattr(_FlatCache, "update", swapped)
    with pytest.raises(ExportParityError, match="decode step 1"):
        export(_uneven("qwen2"), tmp_path / "onnx")
    assert list(tmp_path.iterdir()) == []


def test_parity_check_is_loud(tmp_path):
    model = _uneven("mistral")
    export(model, tmp_path / "onnx")
    sess = session(tmp_path / "onnx")
    with torch.no_grad():
        model.lm_head.weight.add_(1e-2)
    with pytest.raises(ExportParityError, match="differs from PyTorch|differ from PyTorch"):
        check_decoder_parity(model, sess, [(2, 5)])


def test_dense_model_from_hf_matches_transformers(tmp_path):
    hf = _hf("llama", seed=1)
    model = from_hf(hf).eval()
    export(model, tmp_path / "onnx", check_shapes=((2, 6), (3, 10)))
    ids, mask = left_padded(model, 2, 7, seed=1)
    expected = hf.generate(ids, attention_mask=mask, max_new_tokens=32, do_sample=False)
    got = generate(session(tmp_path / "onnx", threads=1), ids, mask, max_new_tokens=32)
    np.testing.assert_array_equal(got, expected.numpy())


def test_optimum_compatibility_is_checked(tmp_path):
    export(_uniform(hidden_pruned=True), tmp_path / "ok")
    check_optimum_compatible(tmp_path / "ok")
    export(_uneven("llama"), tmp_path / "uneven")
    with pytest.raises(OptimumIncompatibleError, match=r"key/value heads differ per layer \[2, 0, 3, 3\]"):
        check_optimum_compatible(tmp_path / "uneven")
    export(_uniform(hidden_pruned=False), tmp_path / "wide")
    with pytest.raises(OptimumIncompatibleError, match="hidden_size 48 // num_attention_heads 4 = 12"):
        check_optimum_compatible(tmp_path / "wide")


OPTIMUM_SCRIPT = """
import sys, numpy as np, torch
from optimum.onnxruntime import ORTModelForCausalLM
model = ORTModelForCausalLM.from_pretrained(sys.argv[1])
data = np.load(sys.argv[2])
out = model.generate(torch.from_numpy(data["ids"]), attention_mask=torch.from_numpy(data["mask"]),
                     max_new_tokens=32, do_sample=False)
np.save(sys.argv[3], out.numpy())
"""


def _optimum_generate(python: str, folder: Path, ids, mask, tmp_path: Path) -> subprocess.CompletedProcess:
    np.savez(tmp_path / "inputs.npz", ids=ids.numpy(), mask=mask.numpy())
    return subprocess.run([python, "-c", textwrap.dedent(OPTIMUM_SCRIPT), str(folder), str(tmp_path / "inputs.npz"),
                           str(tmp_path / "out.npy")], capture_output=True, text=True, cwd=tmp_path,
                          env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})


def test_optimum_generates_the_same_tokens(tmp_path):
    """optimum's ORTModelForCausalLM (transformers 4.57 venv) on a uniformly pruned model: our tokens; on uneven
    key/value heads it fails on the input shapes instead of generating."""
    python = hf457_python()
    model = _uniform(hidden_pruned=True)
    export(model, tmp_path / "ok")
    ids, mask = left_padded(model, 3, 10, seed=2)
    run = _optimum_generate(python, tmp_path / "ok", ids, mask, tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    ours = generate(session(tmp_path / "ok"), ids, mask, max_new_tokens=32)
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), ours)

    export(_uneven("llama"), tmp_path / "uneven")
    run = _optimum_generate(python, tmp_path / "uneven", ids, mask, tmp_path)
    assert run.returncode != 0 and "past_key_values" in run.stderr and "dimensions" in run.stderr, run.stderr[-3000:]


@pytest.mark.slow
def test_smollm2_generation_matches_pytorch(tmp_path, smollm2_folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder, padding_side="left")
    model = from_hf(AutoModelForCausalLM.from_pretrained(smollm2_folder, dtype=torch.float32)).eval()
    export(model, tmp_path / "onnx", tokenizer=tokenizer, check_shapes=((1, 7), (2, 20)))
    prompts = ["The capital of France is", "Write a short poem about the sea, in the style of a sailor's song:"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    expected = model.generate(**batch, max_new_tokens=32, do_sample=False)
    eos = model.generation_config.eos_token_id
    got = generate(session(tmp_path / "onnx", threads=2), batch["input_ids"], batch["attention_mask"], 32,
                   eos_token_id=eos, pad_token_id=model.generation_config.pad_token_id)
    np.testing.assert_array_equal(got, expected.numpy())
    assert "Paris" in tokenizer.decode(got[0])


def test_head_counts_that_do_not_divide_the_hidden_size(tmp_path):
    """7 of 9 SmolLM2-like heads kept: transformers refuses such a config, so the section alone states them."""
    config = LlamaConfig(vocab_size=64, hidden_size=72, num_hidden_layers=2, num_attention_heads=9,
                         num_key_value_heads=3, intermediate_size=48, max_position_embeddings=128)
    torch.manual_seed(0)
    masked = MaskedModel(LlamaForCausalLM(config).eval())
    head = torch.ones(2, 9)
    head[:, 7:] = 0
    model = compact(masked, MaskSet({"head": head})).eval()
    export(model, tmp_path / "onnx")
    written = json.loads((tmp_path / "onnx" / "config.json").read_text())
    assert written["num_attention_heads"] == 9 and written["structprune_onnx"]["heads"] == [7, 7]
    with pytest.raises(OptimumIncompatibleError, match="cannot state the kept query heads"):
        check_optimum_compatible(tmp_path / "onnx")
