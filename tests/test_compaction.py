"""Compaction: compact output == masked output on random and edge-case masks; save / load round trip."""

from __future__ import annotations

import json
import subprocess
import textwrap

import pytest
import torch

from structprune.compaction import ModelFileError, compact, from_pretrained, save
from structprune.costs import count_params
from structprune.io import OutputExistsError
from structprune.masked_model import MaskedModel
from structprune.maskset import MASK_NAMES, MaskSet, mask_shapes
from tests.conftest import BERT_FAMILY, LLAMA_FAMILY, hf457_python, make_hf, make_inputs

TOL = 1e-4
CASES_PER_ARCH = 40  # 6 architectures (3 configs per family) -> 240 random mask sets


def _random_masks(structure, g: torch.Generator) -> MaskSet:
    """A random subset of mask kinds, random keep rates (some layers emptied), random scales."""
    shapes = mask_shapes(structure)
    names = [n for n in MASK_NAMES if torch.rand(1, generator=g) < 0.6] or ["head"]
    masks = {}
    for name in names:
        keep = float(torch.rand(1, generator=g)) * 0.9 + 0.1
        masks[name] = (torch.rand(shapes[name], generator=g) < keep).float()
    if "hidden" in masks and not masks["hidden"].any():
        masks["hidden"][0] = 1
    scales = {}
    for name in ("head", "neuron"):
        if torch.rand(1, generator=g) < 0.3:
            scales[name] = torch.rand(shapes[name], generator=g) + 0.5
    return MaskSet(masks, scales)


def _assert_same(masked: MaskedModel, compacted, inputs) -> float:
    with torch.no_grad():
        a = masked(**inputs).logits
        b = compacted(**inputs).logits
    diff = float((a - b).abs().max())
    assert diff <= TOL, diff
    return diff


def test_random_mask_sets(arch):
    hf = make_hf(arch)
    masked = MaskedModel(hf).eval()
    inputs = make_inputs(hf, batch=3, seq=9)
    g = torch.Generator().manual_seed(1234)
    for _ in range(CASES_PER_ARCH):
        masks = _random_masks(masked.structure, g)
        masked.set_masks(masks)
        compacted = compact(masked, masks).eval()
        _assert_same(masked, compacted, inputs)
        pruned = masks.resolve(masked.structure)
        assert count_params(pruned, masked.spec) == _projection_params(compacted)


def _projection_params(model) -> int:
    """Parameters of attention and FFN projections counted on the real modules."""
    total = 0
    for layer in model.layers:
        for block in (layer.attn, layer.ffn):
            if block is not None:
                total += sum(p.numel() for p in block.parameters())
    return total


def _edge_masks(structure) -> dict[str, MaskSet]:
    L, H, F, D = structure.num_layers, structure.max_heads, structure.max_ffn, structure.hidden_size
    head, neuron = torch.ones(L, H), torch.ones(L, F)
    no_heads = head.clone()
    no_heads[0] = 0
    one_head = torch.zeros(L, H)
    one_head[:, H - 1] = 1
    no_neurons = neuron.clone()
    no_neurons[-1] = 0
    all_but_one = torch.zeros(L)
    all_but_one[L // 2] = 1
    hidden = torch.ones(D)
    hidden[::3] = 0
    group = head.clone()
    group[:, : structure.group_size] = 0  # the first key/value group entirely
    return {
        "layer without heads": MaskSet({"head": no_heads}),
        "all neurons of a layer": MaskSet({"neuron": no_neurons}),
        "one head left": MaskSet({"head": one_head}),
        "all layers but one": MaskSet({"attn_layer": all_but_one, "ffn_layer": all_but_one}),
        "hidden dims": MaskSet({"hidden": hidden}),
        "hidden dims and units": MaskSet({"hidden": hidden, "head": one_head, "neuron": no_neurons}),
        "whole kv group": MaskSet({"head": group}),
        "everything removed": MaskSet({"attn_layer": torch.zeros(L), "ffn_layer": torch.zeros(L)}),
    }


@pytest.mark.parametrize("case", list(_edge_masks(type("S", (), {"num_layers": 2, "max_heads": 4, "max_ffn": 4,
                                                                    "hidden_size": 6, "group_size": 2})())))
def test_edge_cases(arch, case):
    hf = make_hf(arch)
    masked = MaskedModel(hf).eval()
    masks = _edge_masks(masked.structure)[case]
    masked.set_masks(masks)
    compacted = compact(masked, masks).eval()
    _assert_same(masked, compacted, make_inputs(hf, batch=3, seq=9))
    kept, _ = masks.kept(masked.structure)
    for layer, k in zip(compacted.layers, kept):
        assert (layer.attn is None) == (not k.heads)  # removed sublayers are not built at all
        assert (layer.ffn is None) == (not k.neurons)


def test_gqa_drops_whole_groups_only_when_empty():
    hf = make_hf("llama")  # 6 query heads over 3 key/value heads
    masked = MaskedModel(hf).eval()
    head = torch.ones(3, 6)
    head[0, [0, 1]] = 0  # group 0 emptied -> 2 kv heads left
    head[1, [0, 3]] = 0  # one head from groups 0 and 1 -> all 3 kv heads stay
    masks = MaskSet({"head": head})
    compacted = compact(masked, masks)
    assert [(layer.attn.heads, layer.attn.kv_heads) for layer in compacted.layers] == [(4, 2), (4, 3), (6, 3)]
    assert compacted.layers[1].attn.kv_map == [0, 1, 2, 2]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compact_on_cuda_stays_there_and_equals_cpu():
    hf = make_hf("bert")
    masks = _random_masks(MaskedModel(hf).structure, torch.Generator().manual_seed(3))
    on_cpu = compact(hf, masks)
    on_gpu = compact(hf.cuda(), masks)
    assert next(on_gpu.parameters()).is_cuda
    for name, value in on_cpu.state_dict().items():
        torch.testing.assert_close(on_gpu.state_dict()[name].cpu(), value)


def test_compact_is_smaller_and_shapes_are_ints():
    hf = make_hf("bert")
    masked = MaskedModel(hf)
    head = torch.ones(3, 6)
    head[0, :3] = 0
    masks = MaskSet({"head": head, "neuron": torch.cat([torch.ones(3, 10), torch.zeros(3, 30)], 1)})
    compacted = compact(masked, masks)
    assert sum(p.numel() for p in compacted.parameters()) < sum(p.numel() for p in masked.parameters())
    assert compacted.layers[0].attn.q.weight.shape == (3 * 8, 48)
    assert compacted.layers[0].ffn.down.weight.shape == (48, 10)
    assert all(isinstance(layer["heads"], int) for layer in compacted.spec["layers"])


def test_save_and_load_round_trip(tmp_path, arch):
    hf = make_hf(arch)
    masked = MaskedModel(hf).eval()
    masks = _random_masks(masked.structure, torch.Generator().manual_seed(7))
    compacted = compact(masked, masks).eval()
    save(compacted, tmp_path / "model")
    loaded = from_pretrained(tmp_path / "model")
    inputs = make_inputs(hf)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, compacted(**inputs).logits)
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["model_type"] == hf.config.model_type
    assert config["hidden_size"] == hf.config.hidden_size  # the original sizes stay
    assert set(config["auto_map"]) == {"AutoModelForSequenceClassification"}
    assert "per_layer_config" not in config
    assert (tmp_path / "model" / "modeling_structprune.py").is_file()


def test_output_folder_is_refused_unless_overwrite(tmp_path):
    compacted = compact(MaskedModel(make_hf("bert")), MaskSet({"head": torch.ones(3, 6)}))
    save(compacted, tmp_path / "m")
    before = (tmp_path / "m" / "model.safetensors").read_bytes()
    with pytest.raises(OutputExistsError, match="overwrite"):
        save(compacted, tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before
    save(compacted, tmp_path / "m", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary folders left behind


def test_corrupt_and_truncated_model_files(tmp_path):
    compacted = compact(MaskedModel(make_hf("bert")), MaskSet({"head": torch.ones(3, 6)}))
    save(compacted, tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="corrupt or truncated"):
        from_pretrained(tmp_path / "m")
    weights.write_bytes(data)
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(ModelFileError, match="not valid JSON"):
        from_pretrained(tmp_path / "m")
    with pytest.raises(ModelFileError, match="missing"):
        from_pretrained(tmp_path / "nothing")


def test_loads_with_transformers_remote_code_without_structprune(tmp_path):
    """In the transformers-4.57 venv, where structprune is not installed, AutoModel loads the folder."""
    python = hf457_python()
    for arch in ("bert", "qwen2"):
        hf = make_hf(arch)
        masked = MaskedModel(hf).eval()
        masks = _random_masks(masked.structure, torch.Generator().manual_seed(3))
        compacted = compact(masked, masks).eval()
        folder = tmp_path / arch
        save(compacted, folder)
        inputs = make_inputs(hf)
        torch.save(inputs, tmp_path / "inputs.pt")
        with torch.no_grad():
            expected = compacted(**inputs).logits
        script = textwrap.dedent(f"""
            import importlib.util, sys, torch
            assert importlib.util.find_spec("structprune") is None, "structprune must not be importable here"
            from transformers import AutoModelForSequenceClassification
            model = AutoModelForSequenceClassification.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
            inputs = torch.load({str(tmp_path / 'inputs.pt')!r}, weights_only=True)
            with torch.no_grad():
                torch.save(model(**inputs).logits, {str(tmp_path / 'out.pt')!r})
        """)
        subprocess.run([python, "-c", script], check=True, cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
        got = torch.load(tmp_path / "out.pt", weights_only=True)
        assert (got - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("family", [BERT_FAMILY, LLAMA_FAMILY])
def test_configs_per_family_have_uneven_shapes(family):
    shapes = {make_hf(arch).config.hidden_size for arch in family}
    assert len(shapes) >= 2


def test_loads_with_transformers_auto_class(tmp_path):
    from transformers import AutoModelForSequenceClassification

    hf = make_hf("llama")
    masked = MaskedModel(hf).eval()
    compacted = compact(masked, _random_masks(masked.structure, torch.Generator().manual_seed(5))).eval()
    save(compacted, tmp_path / "m")
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m", trust_remote_code=True).eval()
    inputs = make_inputs(hf)
    with torch.no_grad():
        assert (loaded(**inputs).logits - compacted(**inputs).logits).abs().max() <= 1e-6


def test_weights_past_the_shard_size_go_to_shards_that_load_back_and_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    from tests.conftest import make_causal

    hf = make_causal("llama")
    masked = MaskedModel(hf).eval()
    compacted = compact(masked, _random_masks(masked.structure, torch.Generator().manual_seed(7))).eval()
    with pytest.warns(UserWarning, match="without a tokenizer"):
        save(compacted, tmp_path / "m", max_shard_mb=0.01)
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (tmp_path / "m" / "model.safetensors").exists()
    assert set(index["weight_map"]) == set(compacted.state_dict())
    checksums = (tmp_path / "m" / "model.safetensors.sha256").read_text().splitlines()
    assert [line.split()[1] for line in checksums] == shards
    ids = torch.randint(0, hf.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = compacted(input_ids=ids).logits
        assert torch.equal(from_pretrained(tmp_path / "m")(input_ids=ids).logits, expected)
        stock = AutoModelForCausalLM.from_pretrained(tmp_path / "m", trust_remote_code=True).eval()
        assert (stock(input_ids=ids).logits - expected).abs().max() <= 1e-6
    shard = tmp_path / "m" / shards[1]
    shard.write_bytes(shard.read_bytes()[:-8])
    with pytest.raises(ModelFileError, match=f"{shards[1]} differs from the checksum"):
        from_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="max_shard_mb must be positive"):
        save(compacted, tmp_path / "other", max_shard_mb=0)
    assert not (tmp_path / "other").exists()
