"""The LLM demo end to end (quick settings) on a tiny random Llama: every stage runs and the report says what it
measured."""

from __future__ import annotations

import json

from structprune.llm_demo import LLMDemoConfig, run_llm_demo
from tests.cli.test_lm_cli import make_causal_folder


def test_quick_llm_demo_writes_its_report(tmp_path):
    model = make_causal_folder(tmp_path / "model")
    numbers = run_llm_demo(tmp_path / "demo", LLMDemoConfig(target_sparsity=0.3), str(model), quick=True)
    out = tmp_path / "demo"
    assert {p.name for p in out.iterdir()} >= {"report.md", "report.png", "results.json", "masks", "pruned",
                                               "onnx-dense", "onnx-pruned"}
    assert all(g["ort_equals_torch"] for g in numbers["generation"].values())
    assert numbers["params"]["pruned"] < numbers["params"]["dense"]
    assert {(r["backend"], r["phase"]) for r in numbers["latency"]} == {(b, p) for b in ("torch", "ort")
                                                                         for p in ("prefill", "decode")}
    report = (out / "report.md").read_text()
    assert "perplexity" in report and "ideal" in report
    assert json.loads((out / "results.json").read_text())["perplexity"]["dense"]["windows"] == 2
