"""The prefill / decode timing protocol of causal LMs: what a timed call computes on torch and ONNX Runtime,
the ideal speedups it is set against, and ``structprune bench`` on causal LMs."""

from __future__ import annotations

import csv

import pytest
import torch

from structprune.arch import from_hf
from structprune.arch.structure import ModelStructure
from structprune.bench import LatencyStats
from structprune.cli import main
from structprune.compaction import compact, save
from structprune.costs import decode_bytes, prefill_flops
from structprune.decode_bench import (
    OrtLM,
    Phase,
    PhaseResult,
    TorchLM,
    check_positions,
    measure_phase,
    phase_call,
    results_table,
    token_ids,
)
from structprune.export import export, session
from structprune.maskset import MaskSet
from tests.conftest import make_causal, make_hf

VOCAB = 101  # make_causal("llama"): 3 layers, 6 query heads in 3 key/value groups, FFN 40


@pytest.fixture(scope="module")
def lms() -> dict:
    """The dense tiny Llama (compacted with all-ones masks) and a pruned one: the last key/value group of
    every layer removed, half of the FFN of layer 0, layer 2 without attention."""
    full = from_hf(make_causal("llama")).eval()
    structure = ModelStructure.from_spec(full.spec)
    head, neuron = torch.ones(3, 6), torch.ones(3, 40)
    head[:, 4:] = 0
    head[2] = 0
    neuron[0, 20:] = 0
    return {"dense": compact(full, MaskSet.ones(structure)).eval(),
            "pruned": compact(full, MaskSet({"head": head, "neuron": neuron})).eval()}


def _reference(model, context: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Last-position logits of the whole sequence (context copied to every row, then the new token), no cache."""
    ids = torch.cat([context.expand(new.shape[0], -1), new], dim=1)
    with torch.inference_mode():
        return model(ids).logits[:, -1:]


@pytest.mark.parametrize("variant", ["dense", "pruned"])
def test_torch_decode_call_reads_the_same_context_every_time(lms, variant):
    model = lms[variant]
    context, new = token_ids(VOCAB, 1, 9), token_ids(VOCAB, 3, 1, seed=1)
    call = TorchLM(model).decode(context, new)
    first, second, third = call(), call(), call()
    expected = _reference(model, context, new)
    assert first.shape == (3, 1, VOCAB)
    torch.testing.assert_close(first, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(first, second) and torch.equal(first, third)


def test_torch_prefill_call_picks_the_next_token_from_the_last_position(lms):
    ids = token_ids(VOCAB, 2, 12, seed=3)
    with torch.inference_mode():
        expected = lms["pruned"](ids).logits[:, -1].argmax(-1)
    assert torch.equal(TorchLM(lms["pruned"]).prefill(ids)(), expected)


def test_ort_calls_compute_what_the_torch_calls_compute(lms, tmp_path):
    model = lms["pruned"]
    export(model, tmp_path / "onnx", threads=1)
    ort_lm, torch_lm = OrtLM(session(tmp_path / "onnx", threads=1)), TorchLM(model)
    context, new = token_ids(VOCAB, 1, 11), token_ids(VOCAB, 2, 1, seed=1)
    call = ort_lm.decode(context, new)
    first, second = call(), call()
    torch.testing.assert_close(torch.from_numpy(first), torch_lm.decode(context, new)(), atol=1e-4, rtol=1e-4)
    assert (first == second).all()
    ids = token_ids(VOCAB, 2, 10, seed=2)
    assert (ort_lm.prefill(ids)() == torch_lm.prefill(ids)().numpy()).all()


def test_phases_check_their_settings_and_the_model_length():
    with pytest.raises(ValueError, match="not one of"):
        Phase("generate", 1, 8)
    with pytest.raises(ValueError, match=">= 1"):
        Phase("decode", 0, 8)
    phases = [Phase("prefill", 1, 128), Phase("decode", 8, 128)]
    assert [p.positions for p in phases] == [128, 129]
    check_positions(phases, 129)
    check_positions(phases, None)
    with pytest.raises(ValueError, match="decode batch 8 context 128 needs 129 positions, more than the 128"):
        check_positions(phases, 128)


def test_ideal_speedups_are_flops_for_prefill_and_bytes_for_decode(lms):
    spec = lms["dense"].spec
    dense, pruned = (ModelStructure.from_spec(lms[v].spec) for v in ("dense", "pruned"))
    assert Phase("prefill", 1, 16).ideal_speedup(dense, pruned, spec) == pytest.approx(
        prefill_flops(dense, spec, 16) / prefill_flops(pruned, spec, 16))
    for batch in (1, 8):
        assert Phase("decode", batch, 32).ideal_speedup(dense, pruned, spec) == pytest.approx(
            decode_bytes(dense, spec, 32, batch) / decode_bytes(pruned, spec, 32, batch))


class _Recorder:
    """A runner that records what it was asked to build."""

    def __init__(self):
        self.asked = []

    def prefill(self, ids):
        self.asked.append(("prefill", tuple(ids.shape)))
        return lambda: None

    def decode(self, context, new):
        self.asked.append(("decode", tuple(context.shape), tuple(new.shape)))
        return lambda: None


def _stats(ms: float) -> LatencyStats:
    return LatencyStats(ms, ms, ms, ms, 3)


def test_measure_phase_times_every_runner_in_one_block_and_pairs_them_per_backend():
    runners = {(b, v): _Recorder() for b in ("torch", "ort") for v in ("dense", "pruned")}
    medians = {("torch", "dense"): 10.0, ("torch", "pruned"): 8.0, ("ort", "dense"): 6.0, ("ort", "pruned"): 3.0}
    timed = []

    def timer(calls):
        timed.append(sorted(calls))
        return {key: _stats(medians[key]) for key in calls}

    results = measure_phase(runners, Phase("decode", 4, 16), VOCAB, 2.5, timer)
    assert timed == [sorted(runners)]
    assert all(r.asked == [("decode", (1, 16), (4, 1))] for r in runners.values())
    assert [(r.backend, r.speedup, r.ratio) for r in results] == [("torch", 1.25, 0.5), ("ort", 2.0, 0.8)]
    row = results[1].row()
    assert (row["phase"], row["batch"], row["tokens"], row["ideal_kind"], row["dense_median_ms"]) == (
        "decode", 4, 16, "bytes", 6.0)
    table = results_table(results)
    assert "2.50B" in table and "ort" in table
    with pytest.raises(ValueError, match=r"no runner for \[\('ort', 'pruned'\)\]"):
        measure_phase({key: r for key, r in runners.items() if key != ("ort", "pruned")},
                      Phase("prefill", 1, 8), VOCAB, 1.0, timer)


def test_a_prefill_call_gets_a_prompt_of_the_phase_shape():
    runner = _Recorder()
    phase_call(runner, Phase("prefill", 2, 24), VOCAB)
    assert runner.asked == [("prefill", (2, 24))]


def test_results_table_marks_the_ideal_kind():
    result = PhaseResult(Phase("prefill", 1, 512), "torch", _stats(4.0), _stats(2.0), 2.0, None)
    assert result.ratio == 1.0 and "2.00F" in results_table([result])


@pytest.fixture(scope="module")
def folders(lms, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("lm-bench")
    out = {}
    for variant, model in lms.items():
        with pytest.warns(UserWarning, match="without a tokenizer"):
            out[variant] = save(model, root / variant)
        out[f"onnx-{variant}"] = export(model, root / f"onnx-{variant}", threads=1).directory
    out["root"] = root
    return out


@pytest.mark.parametrize("backend", ["torch", "ort"])
def test_bench_times_prefill_and_decode_of_causal_lms(folders, backend, capsys):
    dense, pruned = (folders["dense"], folders["pruned"]) if backend == "torch" else (
        folders["onnx-dense"], folders["onnx-pruned"])
    table = folders["root"] / f"bench-{backend}.csv"
    code = main(["bench", "--dense", str(dense), "--pruned", str(pruned), "--backend", backend, "--prompt", "8",
                 "--context", "12", "--batch", "1", "2", "--warmup", "1", "--repeats", "2", "--csv", str(table)])
    out = capsys.readouterr().out
    assert code == 0
    assert "prefill" in out and "decode" in out and "FLOPs-ideal" in out
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["phase"], r["batch"], r["tokens"], r["backend"]) for r in rows] == [
        ("prefill", "1", "8", backend), ("decode", "1", "12", backend), ("decode", "2", "12", backend)]
    assert all(float(r["ideal_speedup"]) > 1 and float(r["dense_median_ms"]) > 0 for r in rows)


def _error(capsys, *args) -> str:
    code = main(["bench", *map(str, args)])
    assert code == 1
    return capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the error of a machine without a GPU")
def test_bench_on_cuda_without_a_gpu_says_what_to_do(folders, capsys):
    err = _error(capsys, "--dense", folders["dense"], "--pruned", folders["pruned"], "--backend", "torch",
                 "--device", "cuda")
    assert "--device cuda needs a CUDA GPU" in err and "use --device cpu" in err


@pytest.mark.parametrize("args, message", [
    (["--backend", "torch", "--compile"], "add --device cuda"),
    (["--backend", "ort", "--dtype", "bf16"], "fixed when it is exported"),
    (["--backend", "torch", "--seq", "16"], "--seq is for classifiers"),
    (["--backend", "torch", "--prompt", "200"], "more than the 128 the model has"),
])
def test_bench_refuses_settings_that_cannot_run(folders, capsys, args, message):
    err = _error(capsys, "--dense", folders["dense"], "--pruned", folders["pruned"], *args)
    assert message in err


@pytest.mark.parametrize("backend, flag, message", [
    ("ort", None, "--backend ort --device cuda times classifiers only"),
    ("torch", "--cuda-graphs", "--cuda-graphs times classifiers only"),
])
def test_bench_refuses_classifier_only_cuda_settings_for_causal_lms(folders, capsys, monkeypatch, backend, flag,
                                                                     message):
    # a GPU and ONNX Runtime's CUDA provider, as far as the checks before them can tell; nothing runs on them
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr("onnxruntime.get_available_providers", lambda: providers)
    names = ("onnx-dense", "onnx-pruned") if backend == "ort" else ("dense", "pruned")
    err = _error(capsys, "--dense", folders[names[0]], "--pruned", folders[names[1]], "--backend", backend,
                 "--device", "cuda", *([flag] if flag else []))
    assert message in err


def test_bench_refuses_lm_settings_for_a_classifier(tmp_path, capsys):
    with pytest.warns(UserWarning, match="without a tokenizer"):
        folder = save(from_hf(make_hf("llama")), tmp_path / "classifier")
    err = _error(capsys, "--dense", folder, "--pruned", folder, "--backend", "torch", "--prompt", "8")
    assert "--prompt: only for causal LMs" in err


@pytest.mark.parametrize("heads, kv_heads, kept_groups", [(9, 3, [1, 2]), (14, 2, [1, 1]), (32, 8, [4, 4])])
def test_the_benchmark_removes_half_of_the_heads_as_whole_key_value_groups(heads, kv_heads, kept_groups):
    from benchmarks.bench_llm_latency import kv_group_masks
    from structprune.arch.structure import LayerStructure

    kv_map = tuple(h // (heads // kv_heads) for h in range(heads))
    dense = ModelStructure("llama", "llama", 64 * heads, 64, True, (LayerStructure(heads, kv_heads, kv_map, 96),) * 30)
    pruned = kv_group_masks(dense).resolve(dense)
    assert [layer.kv_heads for layer in pruned.layers[:2]] == kept_groups  # layers alternate when groups are odd
    assert sum(layer.heads for layer in pruned.layers) * 2 == heads * 30
    assert sum(layer.kv_heads for layer in pruned.layers) * 2 == kv_heads * 30
    assert all(layer.heads == layer.kv_heads * heads // kv_heads and layer.ffn == 48 for layer in pruned.layers)
