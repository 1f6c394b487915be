"""Latency lookup tables and latency budgets."""

from __future__ import annotations

import pytest
import torch
from conftest import make_hf, make_inputs

from structprune.arch import from_hf
from structprune.arch.structure import ModelStructure
from structprune.budget import Budget
from structprune.costs import TIE_MS, LatencyTable
from structprune.latency import measure_table
from structprune.methods import get_method
from structprune.methods.selection import DEFAULT_TOLERANCE


def _table(structure: ModelStructure) -> LatencyTable:
    """Attention: 0.5 ms per head; FFN: flat up to 10 neurons (0.4 ms), then 0.1 ms per neuron."""
    return LatencyTable("test", 8, 128, 2,
                        {"arch": structure.arch, "layers": structure.num_layers, "heads": structure.max_heads,
                         "ffn": structure.max_ffn, "hidden": structure.hidden_size},
                        base_ms=2.0, attn_ms=tuple(0.5 * h for h in range(structure.max_heads + 1)),
                        ffn_widths=(0, 10, 20, 30, 40), ffn_ms=(0.0, 0.4, 1.4, 2.4, 3.4), machine={})


def test_estimate_is_base_plus_layers_with_interpolation():
    structure = ModelStructure.from_spec(from_hf(make_hf("bert")).spec)
    table = _table(structure)
    assert table.ffn(15) == pytest.approx(0.9 + 15 * TIE_MS)
    assert table.ffn(5) == pytest.approx(0.2 + 5 * TIE_MS)
    dense = 2.0 + 3 * (3.0 + 3.4) + 3 * (6 + 40) * TIE_MS
    assert table.estimate(structure) == pytest.approx(dense)
    with pytest.raises(ValueError, match="outside"):
        table.ffn(41)


def test_save_load_round_trip_and_model_check(tmp_path):
    structure = ModelStructure.from_spec(from_hf(make_hf("bert")).spec)
    path = _table(structure).save(tmp_path / "table.json")
    loaded = LatencyTable.load(path)
    assert loaded == _table(structure)
    other = ModelStructure.from_spec(from_hf(make_hf("roberta")).spec)
    with pytest.raises(ValueError, match="measured for"):
        loaded.check(other)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        LatencyTable.load(tmp_path / "bad.json")


def test_latency_budget_meets_predicted_target(tmp_path):
    hf = make_hf("bert")
    structure = ModelStructure.from_spec(from_hf(hf).spec)
    path = _table(structure).save(tmp_path / "table.json")
    data = make_inputs(hf, batch=8, seq=10)
    data["labels"] = torch.zeros(8, dtype=torch.long)
    budget = Budget(0.4, "latency", latency_table=str(path))
    for method, options in (("taylor", {}), ("fisher", {"tune": False}), ("attribution", {})):
        result = get_method(method)(hf, data, budget, **options)
        predicted = result.log["summary"]["latency_reduction_predicted"]
        resolved = result.masks.resolve(structure)
        by_hand = 1 - _table(structure).estimate(resolved) / _table(structure).estimate(structure)
        assert predicted == pytest.approx(by_hand)
        assert 0.4 <= predicted <= 0.4 + DEFAULT_TOLERANCE + 0.02, method  # one unit: up to 0.5 ms of 21 ms


def test_latency_budget_needs_a_table():
    with pytest.raises(ValueError, match="latency_table"):
        Budget(0.5, "latency")
    with pytest.raises(ValueError, match="latency_table"):
        Budget(0.5, "flops", latency_table="t.json")


def test_measure_table_on_onnx_runtime():
    model = from_hf(make_hf("bert"))
    timing = {"warmup": 1, "repeats": 3, "min_time": 0.0, "max_repeats": 3}
    table = measure_table(model, batch=2, seq_len=16, ffn_points=2, timing=timing, progress=False)
    structure = ModelStructure.from_spec(model.spec)
    assert len(table.attn_ms) == structure.max_heads + 1 and table.attn_ms[0] == 0.0
    assert table.ffn_widths == (0, 20, 40) and table.ffn_ms[0] == 0.0
    assert list(table.attn_ms) == sorted(table.attn_ms) and list(table.ffn_ms) == sorted(table.ffn_ms)
    assert table.base_ms > 0 and table.attn_ms[-1] > 0
    table.check(structure)
