"""Compaction: frozen masks -> a physically smaller dense model; and its save / load round trip.

``compact(model, masks)`` slices every weight to the kept units: heads (q/k/v rows, o columns),
key/value heads of grouped-query attention (rows of k/v, when every query head of the group is
gone), neurons (up/gate rows, down columns), whole sublayers (the module is not built at all), and
hidden dimensions (embeddings, every projection, norms, the classifier input). Kept-unit scales are
folded into the o-proj and down-proj input columns, sublayer shifts into their output biases. The result runs the same forward code
(:mod:`structprune.modeling_structprune`) with per-layer shapes as Python ints.

The saved folder is a Hugging Face model folder: ``config.json`` (the original config, its
``model_type`` and sizes, plus the ``structprune`` section and an ``auto_map`` naming only
``AutoModelForSequenceClassification`` or ``AutoModelForCausalLM``), ``model.safetensors``, ``modeling_structprune.py`` (a copy
of :mod:`structprune.modeling_structprune`) and the tokenizer files.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, GenerationMixin, PretrainedConfig, PreTrainedModel

from structprune import modeling_structprune
from structprune.arch import from_hf
from structprune.arch.structure import ModelStructure
from structprune.costs import check_memory, declared_params
from structprune.io import atomic_dir, sha256_file
from structprune.masked_model import MaskedModel
from structprune.maskset import KeptLayer, MaskSet
from structprune.modeling_structprune import (
    CONFIGS,
    SECTION,
    StructprunePreTrainedModel,
    model_class,
)

MODELING_FILE = "modeling_structprune.py"
CHECKSUM_FILE = "model.safetensors.sha256"
WEIGHTS_FILE = "model.safetensors"


class ModelFileError(ValueError):
    """A model folder that is not a structprune model, or whose files are corrupt."""


def _index(t: torch.Tensor, dim: int, keep: list[int]) -> torch.Tensor:
    return t.index_select(dim, torch.tensor(keep, dtype=torch.long, device=t.device))


def _rows(head_ids, head_dim: int) -> list[int]:
    return [h * head_dim + d for h in head_ids for d in range(head_dim)]


class _Slicer:
    """Copies the full model's weights into the compact model's state dict, cut to the kept rows and
    columns, with kept-unit scales folded in."""

    def __init__(self, source: dict[str, torch.Tensor]):
        self.source, self.state = source, {}

    def take(self, name: str, dim_keep: dict[int, list[int]], scale_cols: torch.Tensor | None = None) -> None:
        t = self.source[name]
        for dim, keep in dim_keep.items():
            t = _index(t, dim, keep)
        if scale_cols is not None:
            t = t * scale_cols.to(device=t.device, dtype=t.dtype)
        self.state[name] = t.contiguous()

    def linear(self, prefix: str, rows: list[int] | None, cols: list[int] | None, col_scale=None,
               out_scale=None) -> None:
        """A linear (or norm) ``prefix``: its kept ``rows`` (outputs) and ``cols`` (inputs); ``None`` keeps all."""
        dims = {k: v for k, v in ((0, rows), (1, cols)) if v is not None}
        weight_scale = col_scale
        if out_scale is not None:
            weight_scale = out_scale if weight_scale is None else weight_scale * out_scale
        self.take(f"{prefix}.weight", dims, weight_scale)
        if f"{prefix}.bias" in self.source:
            self.take(f"{prefix}.bias", {0: rows} if rows is not None else {}, out_scale)

    def shift(self, prefix: str, shift: torch.Tensor | None, rows: list[int], out_scale=None) -> None:
        """Add a sublayer's output ``shift`` (kept ``rows``) to the bias of its output projection ``prefix``."""
        if shift is None:
            return
        shift = _index(shift, 0, rows) * (1.0 if out_scale is None else out_scale)
        name = f"{prefix}.bias"
        self.state[name] = (self.state[name] + shift.to(self.state[name]) if name in self.state
                            else shift.to(self.state[f"{prefix}.weight"])).contiguous()

    def embeddings(self, spec: dict, H: list[int]) -> None:
        project = spec["family"] == "bert" and spec.get("embedding_project")
        for name in ("embeddings.word", "embeddings.position", "embeddings.token_type"):
            if f"{name}.weight" in self.source:
                self.take(f"{name}.weight", {} if project else {1: H})
        if spec["family"] == "bert":
            if project:
                self.linear("embeddings.project", H, None)
                self.linear("embeddings.norm", None, None)
            else:
                self.linear("embeddings.norm", H, None)

    def layer(self, i: int, kept: KeptLayer, gates: dict[str, torch.Tensor], spec: dict, H: list[int]) -> None:
        p, hd, bert = f"layers.{i}", spec["head_dim"], spec["family"] == "bert"
        if kept.heads:
            q_rows, kv_rows = _rows(kept.heads, hd), _rows(kept.kv_heads, hd)
            self.linear(f"{p}.attn.q", q_rows, H)
            self.linear(f"{p}.attn.k", kv_rows, H)
            self.linear(f"{p}.attn.v", kv_rows, H)
            head_scale = gates["head"][i][list(kept.heads)] if "head" in gates else torch.ones(len(kept.heads))
            layer_scale = gates["attn_layer"][i] if "attn_layer" in gates else None
            self.linear(f"{p}.attn.o", H, q_rows, head_scale.repeat_interleave(hd), layer_scale)
            self.shift(f"{p}.attn.o", gates["attn_shift"][i] if "attn_shift" in gates else None, H, layer_scale)
            self.layer_norms(i, spec)
        if kept.heads or bert:
            self.linear(f"{p}.attn_norm", H, None)
        if kept.neurons:
            n = list(kept.neurons)
            self.linear(f"{p}.ffn.up", n, H)
            if spec["gated_ffn"]:
                self.linear(f"{p}.ffn.gate", n, H)
            neuron_scale = gates["neuron"][i][n] if "neuron" in gates else None
            layer_scale = gates["ffn_layer"][i] if "ffn_layer" in gates else None
            self.linear(f"{p}.ffn.down", H, n, neuron_scale, layer_scale)
            self.shift(f"{p}.ffn.down", gates["ffn_shift"][i] if "ffn_shift" in gates else None, H, layer_scale)
        if kept.neurons or bert:
            self.linear(f"{p}.ffn_norm", H, None)

    def layer_norms(self, i: int, spec: dict) -> None:
        """Per-head query/key norms (Qwen3) act on head dims, which no mask touches."""
        for name in ("q_norm", "k_norm"):
            if f"layers.{i}.attn.{name}.weight" in self.source:
                self.linear(f"layers.{i}.attn.{name}", None, None)

    def head(self, spec: dict, H: list[int]) -> None:
        if spec.get("task") == "causal_lm":
            self.linear("final_norm", H, None)
            if "lm_head.weight" in self.source:
                self.linear("lm_head", None, H)
        elif spec["family"] == "llama":
            self.linear("final_norm", H, None)
            self.linear("head.out", None, H)
        else:
            self.linear("head.dense", None, H)
            self.linear("head.out", None, None)


def compact(model: PreTrainedModel | MaskedModel, masks: MaskSet) -> StructprunePreTrainedModel:
    """The physically pruned model that gives the same outputs as ``MaskedModel(model, masks)``.

    Args:
        model: a Hugging Face classifier or causal LM, a full-size structprune model, or a MaskedModel.
        masks: frozen masks for the dense model; validated first (a mismatch raises ``MaskError``).
    """
    if not isinstance(masks, MaskSet):
        raise TypeError(f"masks must be a MaskSet (structprune.maskset.MaskSet, or MaskSet.load(folder)), not a "
                        f"{type(masks).__name__}")
    full = model.model if isinstance(model, MaskedModel) else from_hf(model)
    structure = ModelStructure.from_spec(full.spec)
    kept_layers, hidden = masks.kept(structure)
    new_structure = masks.resolve(structure)
    gates = masks.gates(structure)
    spec = masks.compact_spec(copy.deepcopy(full.spec))
    spec["hidden_size"] = new_structure.hidden_size
    spec["layers"] = [
        old | {"heads": layer.heads, "kv_heads": layer.kv_heads,
               "kv_map": list(layer.kv_map) if layer.kv_map is not None else None, "ffn": layer.ffn}
        for old, layer in zip(spec["layers"], new_structure.layers)
    ]
    slicer, H = _Slicer({name: t.detach() for name, t in full.state_dict().items()}), list(hidden)
    slicer.embeddings(spec, H)
    for i, kept in enumerate(kept_layers):
        slicer.layer(i, kept, gates, spec, H)
    slicer.head(spec, H)
    state = slicer.state

    config = copy.deepcopy(full.config)
    setattr(config, SECTION, spec)
    out = model_class(config)(config)
    out.load_state_dict(state, strict=True)
    out.to(device=full.embeddings.word.weight.device, dtype=full.embeddings.word.weight.dtype)
    return out.train(full.training)


def save(model: StructprunePreTrainedModel, directory: str | os.PathLike, tokenizer=None,
         overwrite: bool = False) -> Path:
    """Write a model folder loadable by :func:`from_pretrained` and by transformers' Auto classes.

    The folder is written to a temporary name and renamed; an existing non-empty folder is
    refused unless ``overwrite``.
    """
    if not isinstance(model, StructprunePreTrainedModel):
        raise TypeError(f"save() takes a structprune model (from compact()), got {type(model).__name__}")
    if tokenizer is None:
        warnings.warn(f"saving {directory} without a tokenizer: the folder cannot be evaluated or exported on its "
                      "own; pass the model's tokenizer (save(model, folder, tokenizer))", stacklevel=2)
    config = copy.deepcopy(model.config)
    cls = model_class(config)
    auto = "AutoModelForCausalLM" if isinstance(model, GenerationMixin) else "AutoModelForSequenceClassification"
    config.auto_map = {auto: f"{Path(MODELING_FILE).stem}.{cls.__name__}"}
    config.architectures = [cls.__name__]
    state = {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()}
    with atomic_dir(directory, overwrite=overwrite, marker=WEIGHTS_FILE) as tmp:
        config.save_pretrained(tmp)
        shutil.copyfile(modeling_structprune.__file__, tmp / MODELING_FILE)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CHECKSUM_FILE).write_text(f"{sha256_file(tmp / WEIGHTS_FILE)}  {WEIGHTS_FILE}\n")
    return Path(directory)



def _check_weights(directory: Path, weights_path: Path) -> None:
    """Compare the weights with the checksum :func:`save` recorded (folders of other origin have none)."""
    recorded = directory / CHECKSUM_FILE
    if not recorded.is_file():
        return
    expected = (recorded.read_text().split() or [""])[0]
    if sha256_file(weights_path) != expected:
        raise ModelFileError(f"{weights_path} differs from the checksum structprune recorded when it saved the model "
                             f"({CHECKSUM_FILE}): the file is corrupt or truncated; save the model again")


def _check_section(config_path: Path, section: object) -> None:
    """The ``structprune`` section has the shape :class:`ModelStructure` reads, and a size this machine holds."""
    try:
        structure = ModelStructure.from_spec(section)
        sizes = [structure.hidden_size, structure.head_dim] + [n for layer in structure.layers
                                                               for n in (layer.heads, layer.kv_heads, layer.ffn)]
        if structure.hidden_size < 1 or structure.head_dim < 1 or min(sizes) < 0 or not structure.layers:
            raise ValueError("sizes must be positive")
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ModelFileError(f"{config_path}: its '{SECTION}' section is damaged ({err!r}); re-save the model") from None
    try:
        check_memory(str(config_path.parent), declared_params(structure, section))
    except ValueError as err:
        raise ModelFileError(str(err)) from None


def read_config(directory: str | os.PathLike) -> PretrainedConfig:
    """The config of a folder written by :func:`save` or by ``structprune export`` (JSON only)."""
    config_path = Path(directory) / "config.json"
    if not config_path.is_file():
        raise ModelFileError(f"{config_path} is missing: {directory} is not a structprune model folder")
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ModelFileError(f"{config_path} is not valid JSON ({err}); the folder is corrupt") from err
    if SECTION not in raw:
        raise ModelFileError(f"{config_path} has no '{SECTION}' section; it was not saved by structprune")
    if raw.get("model_type") not in CONFIGS:
        raise ModelFileError(f"{config_path}: unsupported model_type {raw.get('model_type')!r}")
    _check_section(config_path, raw[SECTION])
    config = AutoConfig.for_model(**raw)
    config._attn_implementation = "eager"
    return config


def empty_model(directory: str | os.PathLike) -> StructprunePreTrainedModel:
    """A weightless (meta-device) model of a folder's config: its shapes and inputs, without loading weights."""
    config = read_config(directory)
    with torch.device("meta"):
        return model_class(config)(config)


def from_pretrained(directory: str | os.PathLike, dtype: torch.dtype | None = None) -> StructprunePreTrainedModel:
    """Load a folder written by :func:`save`. Reads JSON and safetensors only; runs no code from it."""
    config = read_config(directory)
    weights_path = Path(directory) / WEIGHTS_FILE
    if not weights_path.is_file():
        raise ModelFileError(f"{weights_path} is missing: {directory} is not a structprune model folder")
    _check_weights(Path(directory), weights_path)
    try:
        model = model_class(config)(config)
    except ValueError as err:
        raise ModelFileError(f"{directory}: {err}") from None
    expected = model.state_dict()
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            names = set(f.keys())
            if names != set(expected):
                missing, extra = sorted(set(expected) - names), sorted(names - set(expected))
                raise ModelFileError(f"{weights_path} does not match its config: missing {missing[:5]}, "
                                     f"unexpected {extra[:5]}")
            state = {name: f.get_tensor(name) for name in names}
    except (SafetensorError, OSError) as err:
        raise ModelFileError(f"{weights_path} is corrupt or truncated ({err}); save the model again") from err
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise ModelFileError(f"{weights_path}: {name} has shape {list(tensor.shape)}, config says "
                                 f"{list(expected[name].shape)}")
    model.load_state_dict(state, strict=True)
    model.to(dtype or next(iter(state.values())).dtype)
    return model.eval()

