"""``structprune bench`` of classifiers on a device and dtype: the refusals (checked before any model is read where
they need no model), the dtype of ONNX graphs, bf16 on the CPU, and, on a machine with a GPU, torch on CUDA
(fp16 and bf16, eager and CUDA graphs) and ONNX Runtime's CUDA provider."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import pytest
import torch

from tests.cli.test_cli import cli, make_model, ok

CUDA = torch.cuda.is_available()
PROVIDERS = ["AzureExecutionProvider", "CPUExecutionProvider"]


def _cuda_provider() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """A tiny random BERT classifier saved by structprune (``--pruned`` must be), its fp32 ONNX export and an
    fp16 one."""
    from structprune.compaction import save
    from structprune.loading import load_model, load_tokenizer
    from structprune.quantize import Fp16OnCpuWarning

    root = tmp_path_factory.mktemp("bench-device")
    hf = make_model(root / "hf")
    model = load_model(str(hf))
    paths = {"root": root, "model": save(model, root / "model", load_tokenizer(str(hf), model.spec["vocab_size"]))}
    paths |= {name: root / name for name in ("onnx", "onnx-fp16")}
    ok("export", paths["model"], "--out", paths["onnx"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Fp16OnCpuWarning)
        ok("export", paths["model"], "--out", paths["onnx-fp16"], "--quantize", "fp16")
    return paths


def _bench(dense: Path, pruned: Path, *args: object) -> tuple[int, str, str]:
    return cli("bench", "--dense", dense, "--pruned", pruned, "--batch", 2, "--seq", 8, "--warmup", 1,
               "--repeats", 2, *args)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("backend", ["torch", "ort"])
def test_cuda_without_a_gpu_is_refused_before_any_model_is_read(tmp_path, monkeypatch, backend):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    nowhere = tmp_path / "nowhere"
    code, _, err = _bench(nowhere, nowhere, "--backend", backend, "--device", "cuda")
    assert code == 1 and "--device cuda needs a CUDA GPU" in err and "use --device cpu" in err


def test_ort_on_cuda_without_the_cuda_provider_says_which_package_to_install(tmp_path, monkeypatch):
    import onnxruntime

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: PROVIDERS)
    nowhere = tmp_path / "nowhere"
    code, _, err = _bench(nowhere, nowhere, "--backend", "ort", "--device", "cuda")
    assert code == 1 and "Traceback" not in err
    assert f"({onnxruntime.__version__}) has only {PROVIDERS}" in err
    assert "install onnxruntime-gpu (built for your CUDA version)" in err


@pytest.mark.parametrize("args, message", [
    (["--backend", "torch", "--compile"], "--compile: timed on CUDA only; add --device cuda"),
    (["--backend", "torch", "--cuda-graphs"], "--cuda-graphs: timed on CUDA only; add --device cuda"),
    (["--backend", "ort", "--compile", "--cuda-graphs"], "--compile, --cuda-graphs: torch only"),
    (["--backend", "ort", "--dtype", "bf16"], "an ONNX graph's dtype is fixed when it is exported (fp32, or fp16"),
])
def test_settings_that_cannot_run_are_refused_before_any_model_is_read(tmp_path, args, message):
    nowhere = tmp_path / "nowhere"
    code, _, err = _bench(nowhere, nowhere, *args)
    assert code == 1 and message in err, err


def test_fp16_on_the_cpu_is_refused_with_the_reason(folders):
    code, _, err = _bench(folders["model"], folders["model"], "--backend", "torch", "--dtype", "fp16")
    assert code == 1 and "no fp16 arithmetic" in err and "--device cuda" in err


def test_bf16_on_the_cpu_is_timed_and_recorded(folders):
    table = folders["root"] / "bf16.csv"
    code, out, err = _bench(folders["model"], folders["model"], "--backend", "torch", "--dtype", "bf16",
                            "--csv", table)
    assert code == 0, err
    assert "on cpu (bf16)" in out and "FLOPs-ideal" in out
    rows = _rows(table)
    assert [(r["model"], r["device"], r["dtype"], r["timer"], r["gpu"]) for r in rows] == [
        ("dense", "cpu", "bf16", "wall-clock", ""), ("pruned", "cpu", "bf16", "wall-clock", "")]


def test_the_cpu_path_records_device_dtype_and_timer(folders):
    table = folders["root"] / "cpu.csv"
    assert _bench(folders["onnx"], folders["onnx"], "--csv", table)[0] == 0
    assert _bench(folders["model"], folders["model"], "--backend", "torch", "--csv", table)[0] == 0
    assert [(r["backend"], r["device"], r["dtype"], r["compile"], r["cuda_graphs"], r["timer"]) for r in _rows(table)
            ] == [("ort", "cpu", "fp32", "False", "False", "wall-clock")] * 2 + [
                ("torch", "cpu", "fp32", "False", "False", "wall-clock")] * 2


def test_an_onnx_graph_is_timed_in_its_own_dtype(folders):
    table = folders["root"] / "fp16-graph.csv"
    code, out, err = _bench(folders["onnx-fp16"], folders["onnx-fp16"], "--csv", table)
    assert code == 0, err
    assert "on cpu (fp16)" in out and {r["dtype"] for r in _rows(table)} == {"fp16"}
    code, _, err = _bench(folders["onnx"], folders["onnx"], "--dtype", "fp16")
    assert code == 1 and "--dtype fp16: " in err and "is an fp32 graph" in err and "--quantize fp16" in err
    code, _, err = _bench(folders["onnx"], folders["onnx-fp16"])
    assert code == 1 and "compare graphs of one dtype" in err


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "cuda-graphs"])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_a_classifier_is_timed_on_cuda(folders, dtype, graphs):
    table = folders["root"] / f"cuda-{dtype}-{graphs}.csv"
    code, out, err = _bench(folders["model"], folders["model"], "--backend", "torch", "--device", "cuda",
                            "--dtype", dtype, *(["--cuda-graphs"] if graphs else []), "--csv", table)
    assert code == 0, err
    assert f"on cuda ({dtype}" in out and "CUDA-event" in out
    rows = _rows(table)
    assert [(r["device"], r["dtype"], r["cuda_graphs"], r["timer"]) for r in rows] == [
        ("cuda", dtype, str(graphs), "cuda-events")] * 2
    assert rows[0]["gpu"] == torch.cuda.get_device_name() and rows[0]["cuda"] == torch.version.cuda
    assert all(float(r["median_ms"]) > 0 for r in rows)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_a_cuda_graph_replays_the_forward_on_its_static_inputs(folders):
    from structprune import bench
    from structprune.export import example_inputs
    from structprune.loading import load_model

    model = load_model(str(folders["model"])).to("cuda", torch.float16).eval()
    inputs = {k: v.cuda() for k, v in example_inputs(model, 2, 8, padded=False).items()}
    eager = bench.torch_forward(model, inputs)
    replay = bench.cuda_graph(eager)
    torch.testing.assert_close(replay().logits, eager().logits)
    inputs["input_ids"][:, 1:] = inputs["input_ids"][:, :1].clone()  # new tokens, in place: the graph reads them
    torch.testing.assert_close(replay().logits, eager().logits)


@pytest.mark.skipif(not CUDA or not _cuda_provider(), reason="needs a CUDA GPU and onnxruntime-gpu")
def test_ort_is_timed_on_the_cuda_provider(folders):
    table = folders["root"] / "ort-cuda.csv"
    code, _, err = _bench(folders["onnx"], folders["onnx"], "--device", "cuda", "--csv", table)
    assert code == 0, err
    assert [(r["backend"], r["device"], r["timer"]) for r in _rows(table)] == [("ort", "cuda", "wall-clock")] * 2
