"""ONNX export of structprune models, ONNX Runtime sessions, and the parity check every export runs.

Export uses the TorchScript exporter (``dynamo=False``, opset 17) with dynamic batch and sequence
axes; per-layer head counts are Python ints, so every reshape is static in the graph. For the BERT
family the graph then goes through ONNX Runtime's transformer optimizer with ``num_heads=0`` (read
the head count of each attention from its own reshape), which fuses attention even when layers have
different head counts. The folder (``model.onnx``, ``config.json``, tokenizer files) follows the
layout optimum's ``ORTModelForSequenceClassification`` reads.

Every export is checked: the session that will serve the model (full graph optimisation) must match
PyTorch within ``atol`` on shapes other than the export example, with padding; a failure raises
:class:`ExportParityError` and nothing is written.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from structprune.io import atomic_dir
from structprune.modeling_structprune import (
    StructpruneForCausalLM,
    StructpruneForSequenceClassification,
)

ONNX_FILE = "model.onnx"
EXTERNAL_DATA_FILE = "model.onnx_data"
OPSET = 17
TWO_GB = 2 * 1024**3


class ExportParityError(RuntimeError):
    """ONNX Runtime's outputs differ from PyTorch's beyond the tolerance."""


class OnnxFileError(ValueError):
    """An ONNX file that is missing, corrupt or truncated."""


@dataclass
class ExportResult:
    """Where the export went and what its checks measured."""

    directory: Path
    input_names: list[str]
    max_abs_diff: float
    checked_shapes: list[tuple[int, int]]
    fused_attention: int
    node_counts: dict[str, int] = field(default_factory=dict)


def input_names(model: StructpruneForSequenceClassification) -> list[str]:
    """Graph inputs, as optimum's ONNX configs name them for each architecture."""
    spec = model.spec
    if spec["family"] == "bert" and spec["arch"] != "roberta" and spec.get("type_vocab_size"):
        return ["input_ids", "attention_mask", "token_type_ids"]
    return ["input_ids", "attention_mask"]


class _Logits(nn.Module):
    """Positional-argument wrapper returning only logits, for the exporter."""

    def __init__(self, model: StructpruneForSequenceClassification, names: list[str]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.names, inputs))).logits


def example_inputs(model: StructpruneForSequenceClassification, batch: int, seq: int, seed: int = 0,
                   padded: bool = True) -> dict[str, torch.Tensor]:
    """Random token ids with right padding of random length in all rows but the first."""
    g = torch.Generator().manual_seed(seed)
    spec = model.spec
    pad = spec.get("pad_token_id")
    pad = 0 if pad is None else pad
    low = 5 if spec["vocab_size"] > 10 else 0
    ids = torch.randint(low, spec["vocab_size"], (batch, seq), generator=g)
    ids[ids == pad] = low if pad != low else low + 1
    mask = torch.ones(batch, seq, dtype=torch.long)
    if padded and seq > 1:
        for b in range(1, batch):
            length = int(torch.randint(1, seq + 1, (1,), generator=g))
            mask[b, length:] = 0
            ids[b, length:] = pad
    out = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in input_names(model):
        out["token_type_ids"] = torch.zeros_like(ids)
    return out


CPU_DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)
"""ORT graph rewrites the CPU sessions skip: the CPU ``SkipLayerNormalization`` kernel measured ~8x slower than
the ``LayerNormalization`` + ``Add`` it replaces (13 of 41 ms in int8 MiniLM at batch 8 x 128), and its cost
does not shrink with pruning. Quantized graphs need this at load time: their Add + LayerNormalization pairs
match the fusion that the fp32 export avoids at export time (:func:`_fuse_bert`)."""


PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}
"""ONNX Runtime execution providers per device, in order of preference (CPU: nodes the GPU provider lacks)."""


def check_provider(device: str) -> None:
    """Raise ``ValueError`` unless the installed ONNX Runtime can run on ``device`` (``cpu`` or ``cuda``)."""
    import onnxruntime as ort

    if device not in PROVIDERS:
        raise ValueError(f"device {device!r} is not one of {', '.join(PROVIDERS)}")
    available = ort.get_available_providers()
    if PROVIDERS[device][0] not in available:
        from importlib.metadata import packages_distributions

        package = ", ".join(packages_distributions().get("onnxruntime", ["onnxruntime"]))
        raise ValueError(f"ONNX Runtime on {device} needs {PROVIDERS[device][0]}, but the installed package "
                         f"{package} ({ort.__version__}) has only {available}; install onnxruntime-gpu (built for "
                         f"your CUDA version) instead of {package}: pip uninstall {package} && pip install "
                         "onnxruntime-gpu")


def session(path: str | os.PathLike, threads: int | None = None, optimize: bool = True, device: str = "cpu",
            extra_options: Mapping[str, object] | None = None):
    """An ONNX Runtime session with full graph optimisation (``path``: a file or export folder) on ``device``:
    ``cpu``, or ``cuda`` (``CUDAExecutionProvider``, CPU for nodes it lacks; needs onnxruntime-gpu).
    ``extra_options``: further ``SessionOptions`` attributes by name (``enable_profiling``, ...)."""
    import onnxruntime as ort

    check_provider(device)
    path = Path(path)
    if path.is_dir():
        path = path / ONNX_FILE
    if not path.is_file():
        raise OnnxFileError(f"{path} does not exist; run `structprune export` first")
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    for name, value in (extra_options or {}).items():
        setattr(options, name, value)
    try:
        sess = ort.InferenceSession(str(path), options, providers=PROVIDERS[device],
                                    disabled_optimizers=list(CPU_DISABLED_OPTIMIZERS) if device == "cpu" else [])
    except Exception as err:  # ORT raises its own exception types for unreadable models
        raise OnnxFileError(f"ONNX Runtime cannot load {path} ({err}); the file is corrupt or truncated, "
                            "export again") from err
    if PROVIDERS[device][0] not in sess.get_providers():  # ORT falls back to the CPU with a logged warning
        raise ValueError(f"ONNX Runtime could not start {PROVIDERS[device][0]} for {path} (the session fell back to "
                         f"{sess.get_providers()}); install the CUDA and cuDNN libraries onnxruntime "
                         f"{ort.__version__} was built for")
    return sess


def check_parity(model: StructpruneForSequenceClassification, sess, shapes: list[tuple[int, int]],
                 atol: float = 1e-4) -> float:
    """Max abs logit difference between ``sess`` and ``model`` over ``shapes`` (padded inputs).

    Raises :class:`ExportParityError` above ``atol``.
    """
    names = {i.name for i in sess.get_inputs()}
    worst = 0.0
    model = model.eval()
    for n, (batch, seq) in enumerate(shapes):
        inputs = example_inputs(model, batch, seq, seed=100 + n)
        with torch.inference_mode():
            expected = model(**inputs).logits.float().numpy()
        got = sess.run(["logits"], {k: v.numpy() for k, v in inputs.items() if k in names})[0]
        diff = float(np.abs(got - expected).max())
        worst = max(worst, diff)
        if not diff <= atol:
            raise ExportParityError(
                f"ONNX Runtime output differs from PyTorch by {diff:.3g} > {atol:g} at batch {batch}, "
                f"sequence {seq}; the exported graph is wrong, do not deploy it"
            )
    return worst


def _fuse_bert(path: Path) -> None:
    """Run ORT's transformer optimizer in place (attention, LayerNorm, GELU fusions)."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    # The optimizer logs a warning for every attention whose input width differs from q/k/v width,
    # which is normal once hidden dimensions or heads are pruned.
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            options = FusionOptions("bert")
            # ORT's CPU SkipLayerNormalization kernel measured ~4x slower here than LayerNormalization + Add,
            # and its cost does not shrink with pruning; keep the plain ops (attention still fuses).
            options.enable_skip_layer_norm = False
            options.enable_bias_skip_layer_norm = False
            optimized = optimize_model(str(path), model_type="bert", num_heads=0, hidden_size=0, opt_level=1,
                                       use_gpu=False, only_onnxruntime=False, optimization_options=options)
    finally:
        logging.disable(logging.NOTSET)
    optimized.save_model_to_file(str(path), use_external_data_format=False)


def node_counts(path: Path) -> dict[str, int]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def export(model: StructpruneForSequenceClassification | StructpruneForCausalLM, directory: str | os.PathLike,
           tokenizer=None, example_shape: tuple[int, int] = (2, 16),
           check_shapes: tuple[tuple[int, int], ...] = ((1, 7), (3, 33)), atol: float | None = None, fuse: bool = True,
           overwrite: bool = False, threads: int | None = None, all_logits: bool = False) -> ExportResult:
    """Export ``model`` to ``directory`` (ONNX + config + tokenizer) and check it against PyTorch.

    Args:
        model: a structprune model (dense from ``arch.from_hf`` or compact from ``compact``), fp32. A causal
            LM goes to :func:`structprune.export_decoder.export_decoder` (graph with a key/value cache).
        tokenizer: saved beside the graph when given (optimum needs it for pipelines).
        example_shape: (batch, sequence) used for tracing; ``check_shapes`` must differ from it.
        atol: parity tolerance on logits (default 1e-4; causal LMs: relative to the largest logit,
            :data:`structprune.export_decoder.RTOL`).
        fuse: run ORT's transformer optimizer (BERT family; ignored for causal LMs).
        all_logits: causal LMs: logits of every position, not only the last (which generation reads).
    """
    if isinstance(model, StructpruneForCausalLM):
        from structprune import export_decoder  # imports this module

        return export_decoder.export_decoder(model, directory, tokenizer, example_shape, check_shapes,
                                             atol or export_decoder.RTOL, overwrite, threads, all_logits)
    if not isinstance(model, StructpruneForSequenceClassification):
        raise TypeError(f"export() takes a structprune model, got {type(model).__name__}; "
                        "use structprune.arch.from_hf or structprune.compact first")
    limit = model.max_sequence_length
    if limit is not None:
        example_shape = (example_shape[0], min(example_shape[1], limit))
        check_shapes = tuple((batch, min(seq, limit)) for batch, seq in check_shapes)
    if example_shape in check_shapes:
        raise ValueError("check_shapes must differ from example_shape so parity covers dynamic axes")
    model = model.eval().float()
    names = input_names(model)
    example = example_inputs(model, *example_shape)
    with atomic_dir(directory, overwrite=overwrite, marker=ONNX_FILE) as tmp:
        path = tmp / ONNX_FILE
        axes = {n: {0: "batch_size", 1: "sequence_length"} for n in names} | {"logits": {0: "batch_size"}}
        external = trace(_Logits(model, names), tuple(example[n] for n in names), path, names, ["logits"], axes)
        if fuse and not external and model.spec["family"] == "bert":
            _fuse_bert(path)
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        sess = session(path, threads=threads)
        diff = check_parity(model, sess, list(check_shapes), 1e-4 if atol is None else atol)
        counts = node_counts(path)
    fused = counts.get("Attention", 0) + counts.get("MultiHeadAttention", 0)
    return ExportResult(Path(directory), names, diff, list(check_shapes), fused, counts)


def trace(module: nn.Module, example: tuple, path: Path, input_names: list[str], output_names: list[str],
          dynamic_axes: dict) -> bool:
    """Trace ``module`` on ``example`` to ``path`` with the TorchScript exporter (opset :data:`OPSET`); a graph
    over 2 GB keeps its weights in one external file. Whether it did."""
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, example, str(path), dynamo=False, input_names=input_names,
                          output_names=output_names, opset_version=OPSET, do_constant_folding=True,
                          dynamic_axes=dynamic_axes)
    external = sum(p.numel() * p.element_size() for p in module.parameters()) >= TWO_GB
    if external:
        _consolidate_external_data(path)
    return external


def _consolidate_external_data(path: Path) -> None:
    """Store all weights of a >2 GB graph in one ``model.onnx_data`` file, as optimum expects."""
    import onnx

    model = onnx.load(str(path))
    for leftover in path.parent.iterdir():
        if leftover.name != path.name:
            leftover.unlink()
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=EXTERNAL_DATA_FILE, size_threshold=1024)
