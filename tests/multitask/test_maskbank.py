"""Multi-task model (shared encoder, a head per task) and the per-task mask bank saved beside it."""

from __future__ import annotations

import pytest
import torch
from conftest import make_hf, make_inputs

from structprune.arch import from_hf
from structprune.budget import Budget
from structprune.finetune import FinetuneConfig
from structprune.masked_model import MaskedModel
from structprune.multitask.maskbank import BANK_FOLDER, MaskBank, build_bank
from structprune.multitask.model import MultiTaskModel, finetune_multitask


def _task_data(model, labels: int, seed: int) -> dict[str, torch.Tensor]:
    data = make_inputs(model, batch=16, seq=10, seed=seed)
    # A learnable rule per task: the label is a function of the first real token after [CLS].
    data["labels"] = data["input_ids"][:, 1] % labels
    return data


@pytest.fixture(scope="module")
def trained():
    hf = make_hf("bert")
    model = MultiTaskModel(from_hf(hf), {"three": 3, "two": 2})
    data = {"three": _task_data(hf, 3, 1), "two": _task_data(hf, 2, 2)}
    encoder_before = model.encoder.layers[0].attn.q.weight.detach().clone()
    losses = finetune_multitask(model, data, FinetuneConfig(epochs=3, batch_size=8, lr=1e-3), progress=False)
    assert not torch.equal(model.encoder.layers[0].attn.q.weight, encoder_before)
    return model, data, losses


def test_task_views_share_the_encoder_and_have_their_own_heads(trained):
    model, data, losses = trained
    three, two = model.task_model("three"), model.task_model("two")
    assert three.layers[0].attn.q.weight is two.layers[0].attn.q.weight is model.encoder.layers[0].attn.q.weight
    assert three.head.out.out_features == 3 and two.head.out.out_features == 2
    assert len(losses) == 12 and sum(losses[-4:]) < sum(losses[:4])
    with pytest.raises(ValueError, match="unknown task"):
        model.task_model("four")


def test_bank_round_trip_apply_and_compact(trained, tmp_path):
    model, data, _ = trained
    bank = build_bank(model, data, Budget(0.4, "flops", seq_len=16), method="fisher", grad_batch_size=8)
    assert set(bank.masks) == {"three", "two"}
    assert not torch.equal(bank.masks["three"].masks["neuron"], bank.masks["two"].masks["neuron"])
    model.save(tmp_path / "base")
    bank.save(tmp_path / "base")
    assert (tmp_path / "base" / BANK_FOLDER / "two" / "masks.safetensors").is_file()
    loaded_model, loaded_bank = MultiTaskModel.load(tmp_path / "base"), MaskBank.load(tmp_path / "base")
    assert loaded_bank.info["two"]["method"] == "fisher"
    inputs = make_inputs(model.encoder, batch=3, seq=9, seed=7)
    for task in ("three", "two"):
        with torch.no_grad():
            expected = MaskedModel(model.task_model(task), bank.masks[task]).eval()(**inputs).logits
            applied = loaded_bank.apply(loaded_model, task).eval()(**inputs).logits
            small = loaded_bank.compact(loaded_model, task).eval()(**inputs).logits
            dense_before = model.task_model(task).eval()(**inputs).logits
            dense_after = loaded_model.task_model(task).eval()(**inputs).logits
        torch.testing.assert_close(applied, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(small, expected, atol=1e-4, rtol=0)
        torch.testing.assert_close(dense_after, dense_before, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="no mask"):
        loaded_bank.apply(loaded_model, "four")
    with pytest.raises(ValueError, match="no mask bank"):
        MaskBank.load(tmp_path)
