"""Recovery distils a pruned causal LM from its dense parent: the KL to the dense model falls, the dense model
is left unchanged, and models of another kind are refused."""

from __future__ import annotations

import pytest
import torch

from structprune.arch import from_hf
from structprune.budget import Budget
from structprune.compaction import compact
from structprune.masked_model import MaskedModel
from structprune.methods import get_method
from structprune.methods.distill import prediction_loss
from structprune.recovery import recover
from tests.conftest import make_causal, make_hf


def _kl(student, teacher, ids) -> float:
    with torch.no_grad():
        return float(prediction_loss(student(ids).logits.flatten(0, 1), teacher(ids).logits.flatten(0, 1), 1.0))


def test_recovery_brings_the_pruned_model_back_towards_the_dense_one():
    dense = from_hf(make_causal("llama")).eval()
    ids = torch.randint(3, dense.spec["vocab_size"], (32, 16), generator=torch.Generator().manual_seed(0))
    windows = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    masks = get_method("magnitude")(dense, None, Budget(0.5)).masks
    small = compact(MaskedModel(dense), masks)
    before, weights = _kl(small, dense, ids[:8]), {k: v.clone() for k, v in dense.state_dict().items()}
    result = recover(small, dense, windows, steps=30, lr=1e-3, batch_size=8, progress=False)
    assert result.steps == 30 and not small.training
    assert _kl(small, dense, ids[:8]) < 0.5 * before
    assert all(torch.equal(v, weights[k]) for k, v in dense.state_dict().items())


def test_recovery_refuses_a_classifier():
    dense = from_hf(make_causal("llama")).eval()
    ids = torch.randint(3, 90, (4, 8))
    with pytest.raises(ValueError, match="recovery distils a pruned causal LM"):
        recover(from_hf(make_hf("llama")), dense, {"input_ids": ids, "labels": ids}, steps=1)
