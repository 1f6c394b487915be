"""Latency lookup tables and latency budgets."""

from __future__ import annotations

import json

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


# Causal LMs: a table per phase (prefill or decode), timed as structprune.decode_bench times them.

FAST = {"warmup": 1, "repeats": 3, "min_time": 0.0, "max_repeats": 3}

def _causal_lm():
    """A tiny random Llama causal LM: hidden 32, 2 layers of 4 heads in 2 key/value groups, FFN 48."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def test_measure_table_of_a_causal_lm_per_phase(tmp_path):
    model = from_hf(_causal_lm())
    structure = ModelStructure.from_spec(model.spec)
    for phase in ("decode", "prefill"):
        table = measure_table(model, batch=2, seq_len=8, ffn_points=2, timing=FAST, progress=False, phase=phase)
        assert table.phase == phase and (table.batch, table.seq_len) == (2, 8)
        assert len(table.attn_ms) == 5 and table.attn_ms[0] == 0.0
        assert table.ffn_widths == (0, 24, 48) and table.ffn_ms[0] == 0.0
        assert list(table.attn_ms) == sorted(table.attn_ms) and list(table.ffn_ms) == sorted(table.ffn_ms)
        assert table.base_ms > 0
        table.check(structure)
        loaded = LatencyTable.load(table.save(tmp_path / f"{phase}.json"))
        assert loaded == table and loaded.phase == phase


def test_a_table_file_without_phase_loads_as_forward_and_a_bad_phase_is_damage(tmp_path):
    structure = ModelStructure.from_spec(from_hf(make_hf("bert")).spec)
    path = _table(structure).save(tmp_path / "table.json")
    info = json.loads(path.read_text())
    del info["phase"]
    path.write_text(json.dumps(info))
    assert LatencyTable.load(path).phase == "forward"
    (tmp_path / "bad.json").write_text(json.dumps(info | {"phase": "generate"}))
    with pytest.raises(ValueError, match="damaged.*generate"):
        LatencyTable.load(tmp_path / "bad.json")


def test_latency_budget_from_a_decode_table_prunes_a_causal_lm(tmp_path):
    """Fixed numbers (a measured tiny model is mostly its LM head, and noise moves what is reachable):
    0.5 ms per head, 1 ms per 24 FFN neurons, 2 ms base."""
    hf = _causal_lm()
    structure = ModelStructure.from_spec(from_hf(hf).spec)
    table = LatencyTable("onnxruntime-cpu", 2, 8, 2, LatencyTable.signature(structure), base_ms=2.0,
                         attn_ms=tuple(0.5 * h for h in range(5)), ffn_widths=(0, 24, 48), ffn_ms=(0.0, 1.0, 2.0),
                         machine={}, phase="decode")
    path = table.save(tmp_path / "decode.json")
    assert LatencyTable.load(path) == table
    result = get_method("magnitude")(hf, None, Budget(0.3, "latency", latency_table=str(path)))
    predicted = result.log["summary"]["latency_reduction_predicted"]
    assert predicted == pytest.approx(1 - table.estimate(result.masks.resolve(structure)) / table.estimate(structure))
    assert 0.3 <= predicted <= 0.3 + DEFAULT_TOLERANCE + 0.05


def test_measure_table_refuses_the_wrong_phase_or_a_too_long_sequence():
    with pytest.raises(ValueError, match="None or 'forward'"):
        measure_table(from_hf(make_hf("bert")), phase="decode", progress=False)
    causal = from_hf(_causal_lm())
    with pytest.raises(ValueError, match="'prefill' or 'decode'"):
        measure_table(causal, phase="forward", progress=False)
    with pytest.raises(ValueError, match="decode batch 1 context 64 needs 65 positions, more than the 64"):
        measure_table(causal, batch=1, seq_len=64, progress=False)
    with pytest.raises(ValueError, match="65 positions, more than the 64"):
        measure_table(causal, batch=1, seq_len=65, phase="prefill", progress=False)
    with pytest.raises(ValueError, match="more than the 64"):
        measure_table(from_hf(make_hf("bert")), seq_len=65, progress=False)


def test_cli_refuses_phase_for_a_classifier(tmp_path):
    from tests.cli.test_cli import cli, make_model

    code, _, err = cli("latency-table", "--model", make_model(tmp_path / "classifier"), "--phase", "decode",
                       "--out", tmp_path / "classifier.json")
    assert code == 1 and "--phase is for causal LMs" in err and not (tmp_path / "classifier.json").exists()


def test_cli_latency_table_of_a_causal_lm(tmp_path):
    from tests.cli.test_cli import ok
    from tests.cli.test_lm_cli import make_causal_folder

    folder = make_causal_folder(tmp_path / "model")
    table = tmp_path / "decode.json"
    out = ok("latency-table", "--model", folder, "--phase", "decode", "--out", table, "--batch", 1, "--seq", 8,
             "--ffn-points", 1)
    assert "decode (one step), batch 1, context 8" in out
    assert LatencyTable.load(table).phase == "decode"
