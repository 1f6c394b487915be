"""ONNX export: parity on the optimised graph, attention fusion with uneven heads, optimum loading."""

from __future__ import annotations

import subprocess
import textwrap

import numpy as np
import pytest
import torch

from structprune.compaction import compact
from structprune.export import (
    ExportParityError,
    OnnxFileError,
    check_parity,
    example_inputs,
    export,
    session,
)
from structprune.io import OutputExistsError
from structprune.masked_model import MaskedModel
from structprune.maskset import MaskSet
from tests.conftest import BERT_FAMILY, hf457_python, make_hf


def _uneven(arch: str):
    """A compact model with different head counts per layer, one layer without attention, hidden dims pruned."""
    masked = MaskedModel(make_hf(arch))
    s = masked.structure
    head = torch.ones(s.num_layers, s.max_heads)
    head[0, : s.max_heads // 2] = 0
    head[1] = 0
    head[-1, -1] = 0
    hidden = torch.ones(s.hidden_size)
    hidden[::4] = 0
    neuron = torch.ones(s.num_layers, s.max_ffn)
    neuron[:, ::3] = 0
    return compact(masked, MaskSet({"head": head, "hidden": hidden, "neuron": neuron})).eval()


def test_export_parity_every_architecture(tmp_path, arch):
    model = _uneven(arch)
    result = export(model, tmp_path / "onnx")
    assert result.max_abs_diff <= 1e-4
    assert len(result.checked_shapes) >= 2
    assert (tmp_path / "onnx" / "model.onnx").is_file() and (tmp_path / "onnx" / "config.json").is_file()
    # dynamic axes: a shape never seen at export time runs and matches
    sess = session(tmp_path / "onnx", threads=1)
    inputs = example_inputs(model, 5, 21, seed=9)
    names = {i.name for i in sess.get_inputs()}
    got = sess.run(["logits"], {k: v.numpy() for k, v in inputs.items() if k in names})[0]
    with torch.no_grad():
        expected = model(**inputs).logits.numpy()
    assert np.abs(got - expected).max() <= 1e-4


@pytest.mark.parametrize("arch", BERT_FAMILY)
def test_attention_is_fused_with_uneven_heads(tmp_path, arch):
    model = _uneven(arch)
    heads = [layer.attn.heads if layer.attn is not None else 0 for layer in model.layers]
    assert len(set(heads) - {0}) > 1 and 0 in heads
    result = export(model, tmp_path / "onnx")
    assert result.fused_attention == sum(h > 0 for h in heads)


def test_parity_failure_is_loud(tmp_path):
    model = _uneven("bert")
    export(model, tmp_path / "onnx")
    sess = session(tmp_path / "onnx")
    with torch.no_grad():
        model.head.out.bias.add_(1e-2)
    with pytest.raises(ExportParityError, match="differs from PyTorch"):
        check_parity(model, sess, [(2, 5), (1, 9)])


def test_failed_export_leaves_nothing(tmp_path, monkeypatch):
    import structprune.export as export_module

    def broken(*args, **kwargs):
        raise ExportParityError("injected")

    monkeypatch.setattr(export_module, "check_parity", broken)
    with pytest.raises(ExportParityError):
        export(_uneven("llama"), tmp_path / "onnx")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_and_corrupt_onnx(tmp_path):
    model = _uneven("bert")
    export(model, tmp_path / "onnx")
    with pytest.raises(OutputExistsError):
        export(model, tmp_path / "onnx")
    path = tmp_path / "onnx" / "model.onnx"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(OnnxFileError, match="corrupt or truncated"):
        session(path)
    with pytest.raises(OnnxFileError, match="does not exist"):
        session(tmp_path / "absent.onnx")


def test_optimum_loads_the_onnx_folder(tmp_path):
    """optimum's ORTModelForSequenceClassification (transformers 4.57 venv) gives the PyTorch logits."""
    python = hf457_python()
    for arch in ("bert", "roberta"):
        model = _uneven(arch)
        folder = tmp_path / arch
        export(model, folder)
        inputs = example_inputs(model, 3, 12, seed=4)
        np.savez(tmp_path / "inputs.npz", **{k: v.numpy() for k, v in inputs.items()})
        with torch.no_grad():
            expected = model(**inputs).logits.numpy()
        script = textwrap.dedent(f"""
            import numpy as np, torch
            from optimum.onnxruntime import ORTModelForSequenceClassification
            model = ORTModelForSequenceClassification.from_pretrained({str(folder)!r})
            inputs = {{k: torch.from_numpy(v) for k, v in np.load({str(tmp_path / 'inputs.npz')!r}).items()}}
            np.save({str(tmp_path / 'out.npy')!r}, model(**inputs).logits.numpy())
        """)
        subprocess.run([python, "-c", script], check=True, cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
        assert np.abs(np.load(tmp_path / "out.npy") - expected).max() <= 1e-4


def test_short_position_tables_and_too_long_inputs(tmp_path):
    hf = make_hf("roberta")  # 72 positions, padding id 1: at most 70 tokens
    model = compact(MaskedModel(hf), MaskSet({"head": torch.ones(4, 5)})).eval()
    assert model.max_sequence_length == 70
    result = export(model, tmp_path / "onnx", check_shapes=((1, 7), (3, 90)))
    assert result.checked_shapes == [(1, 7), (3, 70)]
    with pytest.raises(ValueError, match="exceeds the model's maximum of 70"):
        model(**example_inputs(model, 1, 71))
    mistral = compact(MaskedModel(make_hf("mistral")), MaskSet({"head": torch.ones(2, 4)})).eval()
    assert mistral.max_sequence_length == 128  # its rotary positions; the 24-token window is a mask
    with pytest.raises(ValueError, match="maximum of 128 tokens"):
        mistral(**example_inputs(mistral, 1, 129))
