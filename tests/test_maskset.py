"""MaskSet: counting against hand counts, save / load, validation and corrupt files."""

from __future__ import annotations

import json

import pytest
import torch

from structprune.arch import from_hf
from structprune.arch.structure import LayerStructure, ModelStructure
from structprune.costs import count_flops, count_params
from structprune.io import OutputExistsError
from structprune.maskset import MaskError, MaskSet, random_masks, uniform_masks
from tests.conftest import make_hf

SPEC = {"qkv_bias": True, "o_bias": True, "ffn_bias": True}


def _tiny(heads=2, kv=2, ffn=3, gated=False) -> ModelStructure:
    kv_map = None if heads == kv else tuple(h // (heads // kv) for h in range(heads))
    return ModelStructure("bert", "bert", hidden_size=4, head_dim=2, gated_ffn=gated,
                          layers=(LayerStructure(heads, kv, kv_map, ffn),))


def test_flops_match_a_hand_count():
    # seq 5, hidden 4, 2 heads of dim 2, FFN 3:
    # q,k,v,o projections 4 * 5*4*4 = 320 MACs; scores + context 2 * 5*5*4 = 200; FFN 2 * 5*4*3 = 120
    assert count_flops(_tiny(), SPEC, seq_len=5) == 2 * (320 + 200 + 120)
    # GQA: 2 query heads share 1 kv head: q,o 2*5*4*4 = 160, k,v 2*5*4*2 = 80; scores 200; gated FFN 3*5*4*3 = 180
    assert count_flops(_tiny(kv=1, gated=True), SPEC, seq_len=5) == 2 * (160 + 80 + 200 + 180)


def test_params_match_a_hand_count():
    # attention: 4 matrices 4x4 + biases 3*4 + 4 = 80; FFN: 2 matrices 3x4 + biases 3 + 4 = 31
    assert count_params(_tiny(), SPEC) == 111
    assert count_params(_tiny(ffn=0, heads=0, kv=0), SPEC) == 0


def test_summary_reports_sparsity_and_flops():
    model = from_hf(make_hf("bert"))
    structure = ModelStructure.from_spec(model.spec)
    masks = uniform_masks(structure, 0.5, 0.5)
    summary = masks.summary(structure, model.spec, seq_len=16)
    assert summary["layers"][0] == {"heads": 3, "kv_heads": 3, "ffn": 20}
    assert 0.45 < summary["param_sparsity"] < 0.55
    assert summary["flops_kept"] == count_flops(masks.resolve(structure), model.spec, 16)
    with pytest.raises(MaskError, match=r"outside \[0, 1\)"):
        uniform_masks(structure, 1.0, 0.5)


def test_save_load_round_trip(tmp_path):
    model = from_hf(make_hf("llama"))
    structure = ModelStructure.from_spec(model.spec)
    masks = random_masks(structure, torch.Generator().manual_seed(0))
    masks.scales["head"] = torch.rand(3, 6) + 0.5
    masks.meta["method"] = "test"
    masks.save(tmp_path / "masks", structure, model.spec)
    loaded = MaskSet.load(tmp_path / "masks")
    assert loaded.masks.keys() == masks.masks.keys()
    assert all(torch.equal(loaded.masks[k], masks.masks[k]) for k in masks.masks)
    assert torch.equal(loaded.scales["head"], masks.scales["head"])
    assert loaded.meta == {"method": "test"}
    info = json.loads((tmp_path / "masks" / "masks.json").read_text())
    assert info["summary"]["layers"] == [
        {"heads": layer.heads, "kv_heads": layer.kv_heads, "ffn": layer.ffn} for layer in masks.resolve(structure).layers]
    with pytest.raises(OutputExistsError):
        masks.save(tmp_path / "masks")


def test_corrupt_mask_files(tmp_path):
    masks = MaskSet({"head": torch.ones(2, 3)})
    masks.save(tmp_path / "m")
    path = tmp_path / "m" / "masks.safetensors"
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(MaskError, match="corrupt or truncated"):
        MaskSet.load(tmp_path / "m")
    masks.save(tmp_path / "m", overwrite=True)
    (tmp_path / "m" / "masks.json").write_text("[")
    with pytest.raises(MaskError, match="not valid JSON"):
        MaskSet.load(tmp_path / "m")
    with pytest.raises(MaskError, match="not a structprune mask folder"):
        MaskSet.load(tmp_path / "absent")


def test_validation_messages():
    model = from_hf(make_hf("bert"))
    structure = ModelStructure.from_spec(model.spec)
    with pytest.raises(MaskError, match="hidden"):
        MaskSet({"hidden": torch.zeros(48)}).validate(structure)
    with pytest.raises(MaskError, match=r"scale 'neuron' has shape"):
        MaskSet({}, {"neuron": torch.ones(3, 4)}).validate(structure)
    with pytest.raises(MaskError, match="non-finite"):
        MaskSet({}, {"head": torch.full((3, 6), float("nan"))})
