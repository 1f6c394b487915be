"""Quantized ONNX export: an fp32 export folder made int8 (dynamic or static) or fp16 with ONNX Runtime's own tools.

``int8-dynamic`` quantizes the weights of MatMul / Attention / Gather to int8 and each activation at run time
(``quantize_dynamic``: MatMulInteger, QAttention); ``int8-static`` also fixes the activation ranges of the weight
MatMuls from calibration inputs (``quantize_static``, QDQ format: QuantizeLinear / DequantizeLinear pairs that
ONNX Runtime fuses into integer kernels). Weights are quantized per output channel: per tensor (ORT's default),
SmolLM2-135M's perplexity rose 18% instead of 6%. ``fp16`` halves every float weight
(``convert_float_to_float16`` with fp32 inputs and outputs), for GPUs. Both int8 modes run ORT's pre-processing
first: the exported graphs hold contrib ops (fused Attention) that ONNX shape inference cannot type, and without
symbolic shapes the quantizer fails (dynamic) or leaves MatMuls in fp32 (static).

The check of a quantized model is its accuracy on the task, not a logit tolerance: int8 moves logits by far
more than 1e-4 by design, and what matters is whether the predictions still score. A classifier is scored with
:func:`structprune.evaluation.evaluate` (the task's main metric), a causal LM by perplexity over text windows,
fp32 and quantized session alike. The folder keeps the export's layout (``model.onnx``, ``config.json``,
tokenizer files), so :func:`structprune.export.session` and optimum load it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process
from onnxruntime.transformers.float16 import convert_float_to_float16

from structprune import ort_generation
from structprune.data import TaskSpec
from structprune.data.encoding import batches, trim_padding
from structprune.evaluation import evaluate
from structprune.export import EXTERNAL_DATA_FILE, ONNX_FILE, export, session
from structprune.export_decoder import ONNX_SECTION
from structprune.io import MARKER, atomic_dir, check_output_dir

MODES = ("int8-dynamic", "int8-static", "fp16")
BATCH = 16
"""Rows per ONNX Runtime call when calibrating and scoring."""
FP16_ON_CPU = ("fp16 ONNX graphs are meant for GPUs (CUDAExecutionProvider): ONNX Runtime's CPU provider runs them "
               "no faster than fp32, or slower; for CPU serving use int8-dynamic")


class Fp16OnCpuWarning(UserWarning):
    """An fp16 graph was made; ONNX Runtime's CPU provider gains nothing from it."""


@dataclass(frozen=True)
class QuantizedExport:
    """The quantized folder, its mode, both model files' sizes (bytes, external data included), and the metric
    (``None``: no check was run) of the fp32 and quantized sessions on the evaluation examples."""

    directory: Path
    mode: str
    fp32_bytes: int
    quantized_bytes: int
    metric: str | None = None
    fp32: float | None = None
    quantized: float | None = None

    @property
    def change(self) -> float | None:
        """quantized - fp32 (points of a percent metric; perplexity units)."""
        return None if self.metric is None else self.quantized - self.fp32


def _check_mode(mode: str, calibration: Mapping[str, torch.Tensor] | None) -> None:
    """Refuse an unknown mode and int8-static without calibration inputs; warn that fp16 is for GPUs."""
    if mode == "fp16":
        warnings.warn(FP16_ON_CPU, Fp16OnCpuWarning, stacklevel=3)
    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "int8-static" and calibration is None:
        raise ValueError("int8-static needs calibration inputs to fix activation ranges: pass calibration= "
                         "(structprune.data.encode of task examples for a classifier, structprune.likelihood."
                         "text_windows for a causal LM), or use int8-dynamic, which needs none")


def _is_decoder(folder: Path) -> bool:
    """Whether ``folder`` holds a causal-LM export (its config has the key/value cache section)."""
    return ONNX_SECTION in json.loads((folder / "config.json").read_text())


def _model_bytes(folder: Path) -> int:
    """Size of ``model.onnx`` plus its external data file, if any."""
    return sum((folder / name).stat().st_size for name in (ONNX_FILE, EXTERNAL_DATA_FILE) if (folder / name).exists())


def _feeds(sess, inputs: Mapping[str, torch.Tensor], decoder: bool) -> Iterator[dict[str, np.ndarray]]:
    """Session feeds of ``inputs`` in batches: a classifier's graph inputs, or a decoder's prefill (empty past)."""
    names = {i.name for i in sess.get_inputs()}
    for batch in batches(inputs, BATCH):
        batch = {k: v.numpy().astype(np.int64) for k, v in trim_padding(batch).items()}
        if decoder:
            ids, mask = batch["input_ids"], batch["attention_mask"]
            batch = {"input_ids": ids, "attention_mask": mask,
                     "position_ids": ort_generation.position_ids(mask, ids.shape[1]),
                     **ort_generation.empty_past(sess, len(ids))}
        yield {k: v for k, v in batch.items() if k in names}


class _Reader(CalibrationDataReader):
    def __init__(self, feeds: Iterator[dict[str, np.ndarray]]):
        self.feeds = feeds

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.feeds, None)


def perplexity(sess, windows: Mapping[str, torch.Tensor]) -> float:
    """Perplexity of a decoder session on ``windows["input_ids"]`` (``[N, L]``, no padding): every token after a
    window's first, predicted one decode step at a time through the key/value cache (any export serves)."""
    nll, count = 0.0, 0
    for batch in batches(windows, BATCH):
        ids = batch["input_ids"].numpy().astype(np.int64)
        past = ort_generation.empty_past(sess, len(ids))
        for t in range(ids.shape[1] - 1):
            logits, past = ort_generation.step(sess, ids[:, t:t + 1], np.ones((len(ids), t + 1), np.int64), past)
            logits = logits[:, -1].astype(np.float64)
            top = logits.max(-1, keepdims=True)
            logprobs = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
            nll -= float(logprobs[np.arange(len(ids)), ids[:, t + 1]].sum())
            count += len(ids)
    if not count or not math.isfinite(nll):
        raise FloatingPointError(f"the perplexity is not finite over {count} tokens (windows need 2+ tokens); "
                                 "the graph's outputs are broken")
    return math.exp(nll / count)


def _score(sess, evaluation: Mapping[str, torch.Tensor], task: TaskSpec | None, decoder: bool) -> tuple[str, float]:
    """(metric name, value): a classifier's main metric on ``task``, or a decoder's perplexity."""
    if decoder:
        return "perplexity", perplexity(sess, evaluation)
    if task is None:
        raise ValueError("scoring a classifier needs the task (task=) of the evaluation examples")
    return task.main_metric, evaluate(sess, evaluation, task, BATCH)[task.main_metric]


def _save(model: onnx.ModelProto, folder: Path, external: bool) -> None:
    onnx.save_model(model, str(folder / ONNX_FILE), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=EXTERNAL_DATA_FILE, size_threshold=1024)


def _convert(source: Path, out: Path, mode: str, calibration: Mapping[str, torch.Tensor] | None, decoder: bool,
             fp32) -> None:
    """Write ``mode``'s graph of ``source/model.onnx`` to ``out`` (pre-processed copies in a scratch folder)."""
    external = (source / EXTERNAL_DATA_FILE).exists()
    if mode == "fp16":
        _save(convert_float_to_float16(onnx.load(str(source / ONNX_FILE)), keep_io_types=True), out, external)
        return
    logging.disable(logging.WARNING)  # ORT logs a line per tensor it cannot type; the accuracy check is the verdict
    try:
        with tempfile.TemporaryDirectory(dir=out) as scratch:
            pre, quantized = Path(scratch) / "pre.onnx", Path(scratch) / "quantized.onnx"
            quant_pre_process(str(source / ONNX_FILE), str(pre), save_as_external_data=external,
                              all_tensors_to_one_file=True)
            if mode == "int8-dynamic":
                quantize_dynamic(pre, quantized, per_channel=True, weight_type=QuantType.QInt8,
                                 use_external_data_format=external)
            else:
                quantize_static(pre, quantized, _Reader(_feeds(fp32, calibration, decoder)),
                                quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul", "Gemm"], per_channel=True,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                use_external_data_format=external, extra_options={"MatMulConstBOnly": True})
            _save(onnx.load(str(quantized)), out, external)
    finally:
        logging.disable(logging.NOTSET)


def _quantize_into(source: Path, out: Path, mode: str, calibration: Mapping[str, torch.Tensor] | None,
                   evaluation: Mapping[str, torch.Tensor] | None, task: TaskSpec | None,
                   threads: int | None) -> QuantizedExport:
    """Quantize the export ``source`` into the (temporary) folder ``out`` and score both when ``evaluation``."""
    fp32 = session(source, threads=threads)  # says what to do when source is no export
    decoder = _is_decoder(source)
    for file in source.iterdir():
        if file.is_file() and file.name not in (ONNX_FILE, EXTERNAL_DATA_FILE, MARKER):
            shutil.copy2(file, out / file.name)
    _convert(source, out, mode, calibration, decoder, fp32)
    result = QuantizedExport(out, mode, _model_bytes(source), _model_bytes(out))
    if evaluation is None:
        return result
    metric, before = _score(fp32, evaluation, task, decoder)
    _, after = _score(session(out, threads=threads), evaluation, task, decoder)
    return replace(result, metric=metric, fp32=before, quantized=after)


def quantize(source: str | os.PathLike, directory: str | os.PathLike, mode: str,
             calibration: Mapping[str, torch.Tensor] | None = None,
             evaluation: Mapping[str, torch.Tensor] | None = None, task: TaskSpec | None = None,
             overwrite: bool = False, threads: int | None = None) -> QuantizedExport:
    """Quantize the export folder ``source`` (written by :func:`structprune.export.export`) into ``directory``.

    Args:
        mode: one of :data:`MODES`.
        calibration: int8-static's inputs: ``structprune.data.encode`` output (classifier) or
            ``structprune.likelihood.text_windows`` output (causal LM, fed as prefills).
        evaluation: examples of the same kinds to score the fp32 and quantized sessions on; ``task``: a
            classifier's task (its ``main_metric`` is reported). Without, no check is run.

    The folder is written atomically: on any error nothing is left behind.
    """
    _check_mode(mode, calibration)
    check_output_dir(directory, overwrite, inputs=(source,))
    with atomic_dir(directory, overwrite=overwrite, marker=ONNX_FILE) as tmp:
        result = _quantize_into(Path(source), tmp, mode, calibration, evaluation, task, threads)
    return replace(result, directory=Path(directory))


def export_quantized(model, directory: str | os.PathLike, mode: str, tokenizer=None,
                     calibration: Mapping[str, torch.Tensor] | None = None,
                     evaluation: Mapping[str, torch.Tensor] | None = None, task: TaskSpec | None = None,
                     overwrite: bool = False, threads: int | None = None, all_logits: bool = False) -> QuantizedExport:
    """:func:`structprune.export.export` ``model`` (with its fp32 parity check) into a temporary folder inside the
    output's, then :func:`quantize` it into ``directory``; the fp32 export is not kept. Arguments as there."""
    _check_mode(mode, calibration)
    with atomic_dir(directory, overwrite=overwrite, marker=ONNX_FILE) as tmp:
        fp32 = export(model, tmp / "fp32", tokenizer, threads=threads, all_logits=all_logits).directory
        result = _quantize_into(fp32, tmp, mode, calibration, evaluation, task, threads)
        shutil.rmtree(fp32)
    return replace(result, directory=Path(directory))
