"""``structprune prune --method l0 --quantize MODE``: the pipeline also quantizes the pruned export, scores and times
it, and the report carries the row; masks-only methods refuse the flag."""

from __future__ import annotations

import json

from structprune.cli.common import QUANTIZE_MODES
from structprune.quantize import MODES
from tests.cli.test_cli import cli, make_model, ok, write_task


def test_the_parser_offers_the_quantizer_modes():
    assert QUANTIZE_MODES == MODES


def test_l0_report_has_the_quantized_row(tmp_path):
    model_dir = make_model(tmp_path / "model")
    task = write_task(tmp_path / "task.tsv", rows=32)
    ok("prune", "--method", "l0", "--model", model_dir, "--task", task, "--target-sparsity", 0.5, "--batch-size", 16,
       "--max-steps", 2, "--seq-len", 16, "--max-length", 32, "--quantize", "int8-dynamic",
       "--out", tmp_path / "out", "--checkpoint-dir", tmp_path / "ckpt")
    out = tmp_path / "out"
    assert (out / "onnx-pruned-int8-dynamic" / "model.onnx").is_file()
    int8 = json.loads((out / "results.json").read_text())["quantized"]
    assert int8["mode"] == "int8-dynamic" and 0 <= int8["accuracy_onnx"] <= 100 and int8["ort_ms"] > 0
    assert "| latency, pruned + int8-dynamic, ONNX Runtime (ms) |" in (out / "report.md").read_text()


def test_a_masks_only_method_refuses_quantize(tmp_path):
    code, _, err = cli("prune", "--method", "magnitude", "--model", make_model(tmp_path / "model"), "--task",
                       write_task(tmp_path / "task.tsv", rows=16), "--target-sparsity", 0.5, "--quantize",
                       "int8-dynamic", "--out", tmp_path / "masks")
    assert code == 1 and "--quantize is for l0 and transfer" in err and not (tmp_path / "masks").exists()
