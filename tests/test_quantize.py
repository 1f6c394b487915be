"""Quantized ONNX export: int8 (dynamic, static) and fp16 folders made with ONNX Runtime's tools, their node
types, their accuracy check against the fp32 export (classifiers: the task's metric; causal LMs: perplexity),
the command line, and that nothing is written when the fp32 export fails its parity check."""

from __future__ import annotations

import math
import subprocess
import textwrap
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest

import structprune.export as export_module
from structprune.data import encode, load_file
from structprune.evaluation import evaluate, predict
from structprune.export import ExportParityError, OnnxFileError, export, node_counts, session
from structprune.likelihood import Request, loglikelihoods, text_windows
from structprune.loading import load_model, load_tokenizer
from structprune.quantize import MODES, Fp16OnCpuWarning, export_quantized, quantize
from tests.cli.test_cli import cli, make_model, ok, write_task
from tests.cli.test_lm_cli import make_causal_folder, write_text
from tests.conftest import hf457_python

MAX_LENGTH = 16


def _loaded(folder: Path):
    """The model saved in ``folder`` and its tokenizer."""
    model = load_model(str(folder))
    return model, load_tokenizer(str(folder), model.spec["vocab_size"])


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> dict:
    """A tiny random BERT, its fp32 export, and a TSV task encoded with its tokenizer."""
    root = tmp_path_factory.mktemp("quantize")
    folder = make_model(root / "model")
    model, tokenizer = _loaded(folder)
    task = write_task(root / "task.tsv", rows=60)
    data = load_file(task, text_columns=["sentence"], label_column="label")
    export(model, root / "fp32", tokenizer)
    return {"root": root, "folder": folder, "model": model, "tokenizer": tokenizer, "task": task, "data": data,
            "encoded": encode(data, tokenizer, MAX_LENGTH), "fp32": root / "fp32"}


def _initializer_types(folder: Path) -> set[str]:
    model = onnx.load(str(folder / "model.onnx"))
    return {onnx.TensorProto.DataType.Name(t.data_type) for t in model.graph.initializer}


def _check_scores(bert: dict, result, folder: Path, logit_rtol: float) -> None:
    """The reported metrics are those of the two sessions, and the quantized logits are close to, not equal to,
    the fp32 ones (relative to their spread across examples)."""
    fp32, quantized = session(bert["fp32"], threads=1), session(folder, threads=1)
    task = bert["data"].task
    assert result.metric == "accuracy"
    assert result.fp32 == pytest.approx(evaluate(fp32, bert["encoded"], task)["accuracy"], abs=1e-9)
    assert result.quantized == pytest.approx(evaluate(quantized, bert["encoded"], task)["accuracy"], abs=1e-9)
    assert result.change == pytest.approx(result.quantized - result.fp32)
    before, after = predict(fp32, bert["encoded"]).numpy(), predict(quantized, bert["encoded"]).numpy()
    diff = np.abs(after - before).max()
    assert 0 < diff <= logit_rtol * (before.max() - before.min())


def test_int8_dynamic_classifier(bert, tmp_path):
    out = tmp_path / "int8"
    result = quantize(bert["fp32"], out, "int8-dynamic", evaluation=bert["encoded"], task=bert["data"].task)
    assert result.directory == out and result.mode == "int8-dynamic"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in bert["fp32"].iterdir())
    counts = node_counts(out / "model.onnx")
    assert counts["MatMulInteger"] >= 2 * 2 and counts["DynamicQuantizeLinear"] > 0
    assert counts["QAttention"] == 2 and "MatMul" not in counts and "Attention" not in counts
    assert "INT8" in _initializer_types(out)
    assert result.quantized_bytes == (out / "model.onnx").stat().st_size
    assert result.quantized_bytes < 0.6 * result.fp32_bytes
    _check_scores(bert, result, out, logit_rtol=0.1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int8"]  # no temporaries left


def test_int8_static_needs_calibration_and_writes_qdq(bert, tmp_path):
    with pytest.raises(ValueError, match="int8-static needs calibration inputs"):
        quantize(bert["fp32"], tmp_path / "none", "int8-static")
    assert not (tmp_path / "none").exists()
    out = tmp_path / "static"
    result = quantize(bert["fp32"], out, "int8-static", calibration=bert["encoded"], evaluation=bert["encoded"],
                      task=bert["data"].task)
    counts = node_counts(out / "model.onnx")
    assert counts["QuantizeLinear"] > 0 and counts["DequantizeLinear"] >= counts["MatMul"] + counts.get("Gemm", 0)
    assert "INT8" in _initializer_types(out)
    _check_scores(bert, result, out, logit_rtol=0.1)


def test_fp16_halves_the_weights_and_warns(bert, tmp_path):
    out = tmp_path / "fp16"
    with pytest.warns(Fp16OnCpuWarning, match="meant for GPUs"):
        result = quantize(bert["fp32"], out, "fp16", evaluation=bert["encoded"], task=bert["data"].task)
    assert "FLOAT16" in _initializer_types(out) and "FLOAT" not in _initializer_types(out)
    sess = session(out, threads=1)
    assert [i.type for i in sess.get_outputs()] == ["tensor(float)"]  # fp32 inputs and outputs kept
    _check_scores(bert, result, out, logit_rtol=0.01)


def test_bad_input_writes_nothing(bert, tmp_path):
    with pytest.raises(ValueError, match="int8-dynamic, int8-static, fp16"):
        quantize(bert["fp32"], tmp_path / "q", "int4")
    with pytest.raises(OnnxFileError, match="run `structprune export` first"):
        quantize(bert["root"], tmp_path / "q", "int8-dynamic")
    with pytest.raises(ValueError, match="needs the task"):
        quantize(bert["fp32"], tmp_path / "q", "int8-dynamic", evaluation=bert["encoded"])
    code, _, err = cli("export", bert["folder"], "--out", tmp_path / "q", "--quantize", "int4")
    assert code == 2 and all(mode in err for mode in MODES)
    assert list(tmp_path.iterdir()) == []


def test_failed_fp32_parity_writes_nothing(bert, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise ExportParityError("ONNX Runtime output differs from PyTorch")

    monkeypatch.setattr(export_module, "check_parity", broken)
    with pytest.raises(ExportParityError):
        export_quantized(bert["model"], tmp_path / "out", "int8-dynamic", bert["tokenizer"])
    code, _, err = cli("export", bert["folder"], "--out", tmp_path / "cli", "--quantize", "int8-dynamic")
    assert code == 1 and "differs from PyTorch" in err
    assert list(tmp_path.iterdir()) == []


def test_external_weights_stay_external(bert, tmp_path, monkeypatch):
    monkeypatch.setattr(export_module, "TWO_GB", 0)  # a tiny graph takes the path of one over 2 GB
    result = export_quantized(bert["model"], tmp_path / "q", "int8-dynamic", bert["tokenizer"])
    files = {p.name for p in result.directory.iterdir()}
    assert {"model.onnx", "model.onnx_data", "tokenizer.json", "config.json"} <= files and "fp32" not in files
    assert result.quantized_bytes == sum((result.directory / f).stat().st_size
                                         for f in ("model.onnx", "model.onnx_data"))
    assert result.quantized_bytes < 0.7 * result.fp32_bytes  # unfused graph (no fusion with external weights)
    assert session(result.directory).run(None, {k: v[:2].numpy() for k, v in bert["encoded"].items()
                                                if k != "labels"})[0].shape == (2, 2)


def test_cli_quantized_export_of_a_classifier(bert, tmp_path):
    out = ok("export", bert["folder"], "--out", tmp_path / "q", "--quantize", "int8-dynamic", "--task", bert["task"],
             "--max-length", MAX_LENGTH)
    assert "int8-dynamic ONNX model written to" in out and "parity check with PyTorch" in out
    line = next(line for line in out.splitlines() if line.startswith("accuracy on"))
    assert "fp32" in line and "points)" in line and "held-out" in line
    assert (tmp_path / "q" / "tokenizer.json").is_file() and not (tmp_path / "q" / "fp32").exists()
    out = ok("export", bert["folder"], "--out", tmp_path / "plain", "--quantize", "fp16")
    assert "no accuracy check was run: pass --task" in out and "meant for GPUs" in out
    code, _, err = cli("export", bert["folder"], "--out", tmp_path / "static", "--quantize", "int8-static")
    assert code == 1 and "pass --task" in err and not (tmp_path / "static").exists()
    code, _, err = cli("export", bert["folder"], "--out", tmp_path / "task-only", "--task", bert["task"])
    assert code == 1 and "--quantize" in err
    ok("export", bert["folder"], "--out", tmp_path / "static", "--quantize", "int8-static", "--task", bert["task"],
       "--max-length", MAX_LENGTH, "--calib-examples", 8)
    assert node_counts(tmp_path / "static" / "model.onnx")["QuantizeLinear"] > 0


@pytest.fixture(scope="module")
def causal(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("quantize-lm")
    folder = make_causal_folder(root / "model")
    model, tokenizer = _loaded(folder)
    text = write_text(root / "text.txt")
    return {"folder": folder, "model": model, "tokenizer": tokenizer, "text": text,
            "windows": text_windows(tokenizer, text.read_text(), MAX_LENGTH, 6, seed=1)}


def test_causal_lm_int8_dynamic_reports_perplexity(causal, tmp_path):
    result = export_quantized(causal["model"], tmp_path / "q", "int8-dynamic", causal["tokenizer"],
                              evaluation=causal["windows"])
    counts = node_counts(tmp_path / "q" / "model.onnx")
    assert counts["MatMulInteger"] >= 7 * 2  # q, k, v, o, gate, up, down of both layers
    ids = causal["windows"]["input_ids"]
    scored = loglikelihoods(causal["model"], [Request(tuple(row.tolist()), len(row) - 1) for row in ids],
                            progress=False)
    torch_ppl = math.exp(-sum(s.logprob for s in scored) / sum(s.tokens for s in scored))
    assert result.metric == "perplexity"
    assert result.fp32 == pytest.approx(torch_ppl, rel=1e-4)  # the decode-step scorer is exact in fp32
    assert result.quantized != result.fp32 and result.quantized == pytest.approx(result.fp32, rel=0.02)


def test_cli_causal_lm_int8_static(causal, tmp_path):
    out = ok("export", causal["folder"], "--out", tmp_path / "q", "--quantize", "int8-static", "--task",
             f"text:{causal['text']}", "--max-length", MAX_LENGTH, "--calib-examples", 8, "--eval-examples", 4)
    assert "perplexity on text:" in out and "4 windows of 16 tokens" in out and "fp32" in out
    assert node_counts(tmp_path / "q" / "model.onnx")["QuantizeLinear"] > 0
    code, _, err = cli("export", causal["folder"], "--out", tmp_path / "bad", "--quantize", "int8-dynamic",
                       "--task", causal["text"])
    assert code == 1 and "perplexity task" in err


def test_optimum_loads_quantized_folders(bert, causal, tmp_path):
    """optimum (transformers 4.57 venv) serves every mode's folder: the classifier's int8 logits are ONNX Runtime's,
    the causal LM generates."""
    python = hf457_python()
    for mode in MODES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Fp16OnCpuWarning)  # tested above
            quantize(bert["fp32"], tmp_path / f"cls-{mode}", mode, calibration=bert["encoded"])
            export_quantized(causal["model"], tmp_path / f"lm-{mode}", mode, causal["tokenizer"],
                             calibration=causal["windows"])
    inputs = {k: v[:3].numpy() for k, v in bert["encoded"].items() if k != "labels"}
    np.savez(tmp_path / "inputs.npz", **inputs)
    script = textwrap.dedent(f"""
        import numpy as np, torch
        from optimum.onnxruntime import ORTModelForCausalLM, ORTModelForSequenceClassification
        inputs = {{k: torch.from_numpy(v) for k, v in np.load("inputs.npz").items()}}
        ids = torch.tensor([[5, 6, 7, 8]])
        for mode in {list(MODES)!r}:
            classifier = ORTModelForSequenceClassification.from_pretrained(f"cls-{{mode}}")
            np.save(f"cls-{{mode}}.npy", classifier(**inputs).logits.numpy())
            lm = ORTModelForCausalLM.from_pretrained(f"lm-{{mode}}")
            tokens = lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
            assert tokens.shape == (1, 8), tokens.shape
    """)
    subprocess.run([python, "-c", script], check=True, cwd=tmp_path,
                   env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    for mode in MODES:
        expected = session(tmp_path / f"cls-{mode}", threads=1).run(None, inputs)[0]
        assert np.abs(np.load(tmp_path / f"cls-{mode}.npy") - expected).max() <= 1e-5


def test_cpu_sessions_keep_layer_norm_and_add_apart_in_int8_graphs(bert, tmp_path, monkeypatch):
    """ORT would fuse an int8 graph's Add + LayerNormalization into SkipLayerNormalization when it loads it (its CPU
    kernel measured ~8x slower, and it does not shrink with pruning); CPU sessions skip that rewrite."""
    int8 = quantize(bert["fp32"], tmp_path / "int8", "int8-dynamic").directory

    def optimized_ops(name: str) -> dict[str, int]:
        session(int8, threads=1, extra_options={"optimized_model_filepath": str(tmp_path / name)})
        return node_counts(tmp_path / name)

    ops = optimized_ops("kept.onnx")
    assert ops.get("LayerNormalization", 0) > 0 and "SkipLayerNormalization" not in ops
    monkeypatch.setattr(export_module, "CPU_DISABLED_OPTIMIZERS", ())
    assert optimized_ops("fused.onnx").get("SkipLayerNormalization", 0) > 0  # what the switch prevents
