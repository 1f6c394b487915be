"""MaskSet: summaries, save / load, validation and corrupt files (counting: tests/test_costs.py)."""

from __future__ import annotations

import json

import pytest
import torch

from structprune.arch import from_hf
from structprune.arch.structure import ModelStructure
from structprune.costs import count_flops
from structprune.io import OutputExistsError
from structprune.maskset import MaskError, MaskSet, random_masks, uniform_masks
from tests.conftest import make_hf

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
