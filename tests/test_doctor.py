"""``structprune doctor``: the verdict drawn from constructed measurements for every cause, ORT profiles parsed
and placed (layers vs embeddings and head), and the command end to end on tiny models."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from structprune import bench
from structprune.arch import ModelStructure, from_hf
from structprune.cli import main
from structprune.compaction import compact, save
from structprune.doctor import (
    Measurements,
    ModelCosts,
    alignment_flags,
    describe_alignment,
    diagnose,
    examine,
    report,
)
from structprune.export import example_inputs, export
from structprune.maskset import MaskSet, uniform_masks
from structprune.ort_profile import in_layers, parse_profile, profile
from tests.conftest import make_causal

QUICK = {"warmup": 1, "repeats": 3, "min_time": 0.0, "max_repeats": 3, "turn_time": 0.0, "settle": 0.0}


def cli(*args: object) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["doctor", *(str(a) for a in args)])
    return code, out.getvalue(), err.getvalue()


def costs(latency: float, *, kernels: int = 100, overhead_us: float = 5.0, between: float = 0.0, fixed: float = 0.5,
          norm: float = 2.0, norm_op: str = "LayerNormalization", matmul: float | None = None,
          gflop: float = 10.0) -> ModelCosts:
    """One model's costs, profile times equal to the latency's scale (run = latency)."""
    matmul = 0.6 * latency if matmul is None else matmul
    other = max(0.0, latency - matmul - norm - fixed)
    groups = {"MatMul": matmul, "attention": 0.0, "normalisation": norm, "other": other + fixed}
    return ModelCosts(latency, latency, kernels, overhead_us / 1e3, between, fixed, 10, norm, 12, norm_op, matmul, 24,
                      gflop, groups)


# ---- the verdict, from constructed measurements


def test_no_gap_when_the_ratio_reaches_the_threshold():
    v = diagnose(Measurements(8, 128, 2.0, costs(118.0), costs(61.0)))
    assert v.cause == "none" and v.ratio == pytest.approx(118 / 61 / 2)
    assert "no gap: the speedup is within 3% of ideal" in v.text


def test_small_shape_overhead_is_named_with_the_bound_it_sets():
    dense = costs(10.0, kernels=400, overhead_us=10.0, between=0.5, fixed=0.6, norm=0.5, matmul=3.0)
    pruned = costs(7.5, kernels=400, overhead_us=10.0, between=0.5, fixed=0.6, norm=0.5, matmul=1.5, gflop=5.0)
    v = diagnose(Measurements(1, 64, 2.0, dense, pruned, suggestion=(8, 1.8)))
    fixed = 400 * 0.01 + 0.5 + (0.6 - 10 * 0.01)  # overhead + ops outside the layers beyond their own overhead
    assert v.cause == "overhead" and v.fixed_share == pytest.approx(fixed / 10)
    assert v.best == pytest.approx(10 / (fixed + (10 - fixed) / 2))
    assert v.excess_ms["overhead"] > 0.25 * v.gap_ms
    assert "50% of the dense time" in v.text and "expect at most 1.33x" in v.text
    assert "At batch 8 the measured speedup is 1.80x" in v.text


def test_a_skip_layer_norm_that_does_not_shrink_is_named():
    """The known case: ORT's CPU SkipLayerNormalization, ~12 ms of MiniLM's 131 ms at batch 8 x 128, in both models."""
    sln = {"norm": 12.0, "norm_op": "SkipLayerNormalization"}
    v = diagnose(Measurements(8, 128, 2.0, costs(131.0, **sln), costs(131 / 1.76, **sln)))
    assert v.cause == "normalisation" and v.ratio < 0.9
    assert v.excess_ms["normalisation"] > max(v.excess_ms["overhead"], v.excess_ms["misaligned"])
    assert "SkipLayerNormalization: 12.00 ms dense, 12.00 ms pruned" in v.text
    assert "does not fuse it" in v.text
    # at ratio 0.92 there is no gap to explain, but what is left of it is still named
    close = diagnose(Measurements(8, 128, 2.0, costs(75.5, **sln), costs(41.25, **sln)))
    assert close.cause == "none" and "is mostly the layers' SkipLayerNormalization, which does not shrink" in close.text
    # LayerNormalization + Add (~4 ms in both) leaves no gap to explain
    plain = diagnose(Measurements(8, 128, 2.0, costs(118.0, norm=4.0), costs(59.8, norm=4.0)))
    assert plain.cause == "none" and "measure again" not in plain.text
    busy = diagnose(Measurements(8, 128, 2.0, costs(118.0, norm=4.0), costs(59.8, norm=4.0), other_cores=0.9))
    assert busy.text.endswith("But other processes kept 0.90 cores busy while timing; the latencies are inflated and "
                              "noisy, measure again on a quiet machine.")


def test_misaligned_widths_whose_matmuls_shrink_less_than_their_flops_are_named():
    flags = ("FFN 509 (layers 0, 1): not a multiple of 8",)
    dense, pruned = costs(100.0, matmul=60.0, gflop=10.0), costs(65.0, matmul=45.0, gflop=5.0)
    v = diagnose(Measurements(8, 128, 2.0, dense, pruned, misaligned=flags))
    assert v.cause == "misaligned"
    assert v.excess_ms["misaligned"] == pytest.approx((45 - 24 * 0.005) - (60 - 24 * 0.005) / 2)
    assert "FFN 509" in v.text and "shrank 1.33x where their FLOPs shrank 2.00x" in v.text
    # the same slow MatMuls with aligned widths: not an alignment effect, and nothing else explains it
    aligned = diagnose(Measurements(8, 128, 2.0, dense, pruned))
    assert aligned.cause == "unexplained" and aligned.excess_ms["misaligned"] == 0.0
    assert "the MatMul kernels exceed their ideal share the most" in aligned.text


def test_alignment_is_described_and_flagged():
    assert describe_alignment(1536) == "multiple of 64"
    assert describe_alignment(48) == "multiple of 16, not of 64"
    assert describe_alignment(520) == "multiple of 8, not of 16"
    assert describe_alignment(509) == "not a multiple of 8"
    spec = {"hidden_size": 384, "layers": [{"ffn": 509}, {"ffn": 520}, {"ffn": 509}, {"ffn": 0}]}
    assert alignment_flags(spec) == ["FFN 509 (layers 0, 2): not a multiple of 8",
                                     "FFN 520 (layers 1): multiple of 8, not of 16"]
    assert alignment_flags({**spec, "hidden_size": 380}, 8) == ["FFN 509 (layers 0, 2): not a multiple of 8",
                                                                "hidden size 380: not a multiple of 8"]


# ---- the profile


def _kernel(name: str, op: str, ts: int, dur: int, a: list[int] | None = None, out: list[int] | None = None) -> dict:
    args = {"op_name": op}
    if a is not None:
        args |= {"input_type_shape": [{"float": a}, {"float": [a[-1], out[-1]]}], "output_type_shape": [{"float": out}]}
    return {"cat": "Node", "ph": "X", "name": f"{name}_kernel_time", "ts": ts, "dur": dur, "args": args}


def _trace(matmul_us: list[int]) -> list[dict]:
    """One run per entry (the first a warm-up): mask, embeddings, a fused attention, a MatMul, a fused norm, head."""
    events, ts = [], 0
    for us in matmul_us:
        nodes = [("Cast_1", "Cast", 2, None, None), ("/model/embeddings/word/Gather", "Gather", 10, None, None),
                 ("Attention_0", "Attention", 100, None, None),
                 ("/model/layers.0/ffn/up/MatMul", "MatMul", us, [1, 8, 64], [1, 8, 128]),
                 ("SkipLayerNorm_AddBias_0", "SkipLayerNormalization", 30, None, None),
                 ("/model/head/out/Gemm", "Gemm", 5, [1, 64], [1, 2])]
        start = ts
        for name, op, dur, a, out in nodes:
            events.append(_kernel(name, op, ts + 1, dur, a, out))
            ts += dur + 2
        events.append({"cat": "Session", "name": "model_run", "ts": start, "dur": ts - start + 5})
        ts += 100
    return events


def test_a_trace_is_read_per_call_with_warmup_and_stalls_left_out():
    p = parse_profile(_trace([9000, 50, 700, 50, 50]), warmup=1, graph_nodes={"MatMul": 1})
    assert p.calls == 4 and p.op_ms["MatMul"] == pytest.approx(0.05)  # median: neither warm-up nor the stall
    assert p.op_kernels == dict.fromkeys(["Cast", "Gather", "Attention", "MatMul", "SkipLayerNormalization", "Gemm"], 1)
    assert set(p.fixed_ms) == {"Cast", "Gather", "Gemm"} and p.fixed_kernels == 3
    assert p.norm_ms == {"SkipLayerNormalization": pytest.approx(0.03)} and p.norm_kernels == 1
    assert p.matmul_kernels == 1 and p.matmul_gflop == pytest.approx(2 * 8 * 128 * 64 / 1e9)
    assert p.kernel_overhead_ms == pytest.approx(0.002)  # the cheapest kernel
    assert p.between_ms == pytest.approx((6 * 2 + 5) / 1e3)
    assert p.group_ms()["attention"] == pytest.approx(0.1)


def test_fused_nodes_take_the_place_of_their_named_neighbours():
    nodes = [("Cast_7", "Cast"), ("/model/embeddings/Unsqueeze", "Unsqueeze"),
             ("EmbedLayerNormalization_0", "EmbedLayerNormalization"), ("Attention_0", "Attention"),
             ("/model/layers.0/attn/o/MatMul", "MatMul"), ("SkipLayerNorm_AddBias_5", "SkipLayerNormalization"),
             ("/model/head/Gather", "Gather"), ("fused /model/head/dense/Gemm", "FusedGemm")]
    assert in_layers(nodes) == [False, False, False, True, True, True, False, False]
    assert in_layers([("Cast_1", "Cast")]) == [False]


# ---- on real ONNX Runtime sessions


def _tiny_bert(vocab: int = 97) -> torch.nn.Module:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64, num_labels=2)
    return from_hf(BertForSequenceClassification(config).eval()).eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A tiny BERT: the dense model's folder and export, and a 50%-pruned export (aligned widths)."""
    root = tmp_path_factory.mktemp("doctor")
    full = _tiny_bert()
    structure = ModelStructure.from_spec(full.spec)
    dense = compact(full, MaskSet.ones(structure))
    with pytest.warns(UserWarning, match="without a tokenizer"):
        save(dense, root / "dense-model")
    export(dense, root / "dense")
    export(compact(full, uniform_masks(structure, 0.5, 0.5)), root / "pruned")
    return {"root": root, "model": root / "dense-model", "dense": root / "dense", "pruned": root / "pruned"}


def _fuse_skip_layer_norm(src: Path, dst: Path) -> None:
    """A copy of an export with ORT's transformer optimizer's default BERT fusions, SkipLayerNormalization included."""
    import logging

    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    shutil.copytree(src, dst)
    logging.disable(logging.WARNING)
    try:
        optimized = optimize_model(str(dst / "model.onnx"), model_type="bert", num_heads=0, hidden_size=0, opt_level=1,
                                   use_gpu=False, optimization_options=FusionOptions("bert"))
    finally:
        logging.disable(logging.NOTSET)
    optimized.save_model_to_file(str(dst / "model.onnx"), use_external_data_format=False)


def test_profiles_place_skip_layer_norm_in_the_layers_and_embeddings_outside(tiny, tmp_path):
    _fuse_skip_layer_norm(tiny["dense"], tmp_path / "sln")
    inputs = example_inputs(_tiny_bert(), 2, 16, padded=False)

    def make_call(sess):
        return bench.ort_forward(sess, inputs)

    plain = profile(tiny["dense"], make_call, 1, tmp_path / "plain-profile", calls=3)
    fused = profile(tmp_path / "sln", make_call, 1, tmp_path / "sln-profile", calls=3)
    assert plain.norm_kernels == 4 and set(plain.norm_ms) == {"LayerNormalization"}
    assert plain.fixed_ms.get("LayerNormalization", 0) > 0  # the embeddings' norm
    assert fused.norm_kernels == 4 and set(fused.norm_ms) == {"SkipLayerNormalization"}
    assert "EmbedLayerNormalization" in fused.fixed_ms and "SkipLayerNormalization" not in fused.fixed_ms
    for p in (plain, fused):
        assert sum(p.op_kernels.values()) == sum(p.graph_nodes.values())
        assert p.matmul_gflop > 0 and 0 < p.kernel_overhead_ms < p.run_ms


def _shares(out: str, column: int) -> list[float]:
    rows = out.split("time by operator group")[1].splitlines()[2:6]
    return [float(re.findall(r"([\d.]+)%", row)[column]) for row in rows]


def test_the_command_reports_a_tiny_shape_end_to_end(tiny, tmp_path, monkeypatch):
    """The report's structure and its numbers' consistency; which cause real timings of a tiny model name varies
    with the machine's load (the causes themselves are tested on constructed measurements above)."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    out_json = tmp_path / "doctor.json"
    code, out, err = cli(tiny["model"], tiny["pruned"], "--batch", 1, "--seq", 8, "--suggest-batch", 4,
                         "--profile-calls", 3, "--json", out_json)
    assert code == 0, err
    assert "exporting" in err and not list(scratch.iterdir())  # the model folder's export is gone
    for section in ("settings: forward pass of batch 1 x 8 tokens", "latency (median", "time by operator group",
                    "operators (", "layer shapes", "fixed costs", "best expected speedup", "verdict ("):
        assert section in out
    for column in (0, 1):
        assert sum(_shares(out, column)) == pytest.approx(100.0, abs=0.3)
    result = json.loads(out_json.read_text())
    v, m = result["verdict"], result["measurements"]
    assert f"verdict ({v['cause']})" in out and v["cause"] in ("none", "overhead", "normalisation", "unexplained")
    assert v["cause"] != "overhead" or "At batch 4 the measured speedup is" in v["text"]
    assert v["measured"] == pytest.approx(result["latency"]["dense"]["median_ms"]
                                          / result["latency"]["pruned"]["median_ms"])
    assert v["ideal"] > 1.9 and 0 < v["fixed_share"] <= 1 and 1 <= v["best"] <= v["ideal"]
    assert m["misaligned"] == [] and m["suggestion"][0] == 4
    for name in ("dense", "pruned"):
        p = result["profiles"][name]
        assert all(ms >= 0 for ms in p["op_ms"].values()) and result["latency"][name]["median_ms"] > 0
        assert sum(p["op_kernels"].values()) == sum(p["graph_nodes"].values())
    assert result["shapes"]["pruned"]["layers"][0] == {"heads": 2, "kv_heads": 2, "ffn": 64}
    code, _, err = cli(tiny["dense"], tiny["pruned"], "--json", out_json)
    assert code == 1 and "already exists" in err


def test_bad_inputs_are_refused_before_timing(tiny, tmp_path):
    (tmp_path / "empty").mkdir()
    other = tmp_path / "other"
    export(_tiny_bert(vocab=50), other)
    cases = [((tmp_path / "missing", tiny["pruned"]), "is not a folder"),
             ((tmp_path / "empty", tiny["pruned"]), "holds neither model.onnx"),
             ((tiny["dense"], other), "differ in vocabulary size (97 vs 50)"),
             ((tiny["dense"], tiny["pruned"], "--seq", 100), "--seq 100 exceeds the 64 positions")]
    for args, message in cases:
        code, _, err = cli(*args)
        assert code == 1 and message in err, err


def test_a_causal_lm_is_diagnosed_on_its_prefill(tmp_path):
    full = from_hf(make_causal("llama")).eval()
    structure = ModelStructure.from_spec(full.spec)
    export(compact(full, MaskSet.ones(structure)), tmp_path / "dense")
    export(compact(full, uniform_masks(structure, 1 / 3, 0.5)), tmp_path / "pruned")
    dx = examine(tmp_path / "dense", tmp_path / "pruned", batch=1, seq=8, timing=QUICK, profile_calls=2)
    assert dx.phase == "prefill" and dx.verdict.ideal > 1
    assert dx.measurements.dense.norm_op == "SimplifiedLayerNormalization"
    assert dx.profiles["pruned"].fixed_kernels > 0  # embeddings, final norm, LM head
    assert "settings: prefill of batch 1 x 8 tokens" in report(dx)
