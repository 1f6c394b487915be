"""Compaction: frozen masks -> a physically smaller dense model; and its save / load round trip.

``compact(model, masks)`` slices every weight to the kept units: heads (q/k/v rows, o columns),
key/value heads of grouped-query attention (rows of k/v, when every query head of the group is
gone), neurons (up/gate rows, down columns), whole sublayers (the module is not built at all), and
hidden dimensions (embeddings, every projection, norms, the classifier input). Kept-unit scales are
folded into the o-proj and down-proj input columns, sublayer shifts into their output biases. The result runs the same forward code
(:mod:`structprune.modeling_structprune`) with per-layer shapes as Python ints.

The weights are cut one layer at a time. :func:`compact` gathers them into a model in memory;
:func:`compact_to_folder` writes them to a folder as they come, so a model streamed from its files
(:func:`structprune.streaming.streamed_model`) compacts while holding one layer and one output shard.

The saved folder is a Hugging Face model folder: ``config.json`` (the original config, its
``model_type`` and sizes, plus the ``structprune`` section and an ``auto_map`` naming only
``AutoModelForSequenceClassification`` or ``AutoModelForCausalLM``), ``model.safetensors`` (or shards and
``model.safetensors.index.json`` past ``max_shard_mb``), their checksums, ``modeling_structprune.py`` (a copy
of :mod:`structprune.modeling_structprune`) and the tokenizer files.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
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
from structprune.streaming import INDEX_FILE, WeightSource, source_of

MODELING_FILE = "modeling_structprune.py"
CHECKSUM_FILE = "model.safetensors.sha256"
WEIGHTS_FILE = "model.safetensors"
MAX_SHARD_MB = 2048
"""Weights files are cut into shards of at most this size (a single tensor larger than it gets a shard alone)."""


class ModelFileError(ValueError):
    """A model folder that is not a structprune model, or whose files are corrupt."""


def _index(t: torch.Tensor, dim: int, keep: list[int]) -> torch.Tensor:
    return t.index_select(dim, torch.tensor(keep, dtype=torch.long, device=t.device))


def _rows(head_ids, head_dim: int) -> list[int]:
    return [h * head_dim + d for h in head_ids for d in range(head_dim)]


class _Slicer:
    """Copies the full model's weights into the compact model's state dict, cut to the kept rows and
    columns, with kept-unit scales folded in."""

    def __init__(self, source: Mapping[str, torch.Tensor] | WeightSource):
        self.source, self.state = source, {}

    def flush(self) -> dict[str, torch.Tensor]:
        """The tensors cut since the last flush."""
        state, self.state = self.state, {}
        return state

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


def _sliced(model: PreTrainedModel | MaskedModel,
            masks: MaskSet) -> tuple[StructprunePreTrainedModel, PretrainedConfig, Iterator[dict]]:
    """The full structprune model, the compact model's config, and its weights in parts: the embeddings, each
    layer, the head (each part cut when its turn comes)."""
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
    config = copy.deepcopy(full.config)
    setattr(config, SECTION, spec)
    source = source_of(full)
    if source is None:
        source = {name: t.detach() for name, t in full.state_dict().items()}

    def parts() -> Iterator[dict[str, torch.Tensor]]:
        slicer, H = _Slicer(source), list(hidden)
        slicer.embeddings(spec, H)
        yield slicer.flush()
        for i, kept in enumerate(kept_layers):
            slicer.layer(i, kept, gates, spec, H)
            yield slicer.flush()
        slicer.head(spec, H)
        yield slicer.flush()

    return full, config, parts()


def compact(model: PreTrainedModel | MaskedModel, masks: MaskSet) -> StructprunePreTrainedModel:
    """The physically pruned model that gives the same outputs as ``MaskedModel(model, masks)``.

    Args:
        model: a Hugging Face classifier or causal LM, a full-size structprune model, or a MaskedModel.
        masks: frozen masks for the dense model; validated first (a mismatch raises ``MaskError``).
    """
    full, config, parts = _sliced(model, masks)
    state = {name: t for part in parts for name, t in part.items()}
    out = model_class(config)(config)
    out.load_state_dict(state, strict=True)
    word = state["embeddings.word.weight"]
    out.to(device=word.device, dtype=word.dtype)
    return out.train(full.training)


def compact_to_folder(model: PreTrainedModel | MaskedModel, masks: MaskSet, directory: str | os.PathLike,
                      tokenizer=None, overwrite: bool = False, max_shard_mb: float = MAX_SHARD_MB) -> Path:
    """Write the folder :func:`save` would write for ``compact(model, masks)``, one layer at a time: the process
    holds one layer of ``model`` (all of it when ``model`` is in memory) and at most one shard of the output.

    A model streamed from its files keeps each tensor's dtype as stored.
    """
    _, config, parts = _sliced(model, masks)
    return _write_folder(config, parts, directory, tokenizer, overwrite, max_shard_mb)


def save(model: StructprunePreTrainedModel, directory: str | os.PathLike, tokenizer=None,
         overwrite: bool = False, max_shard_mb: float = MAX_SHARD_MB) -> Path:
    """Write a model folder loadable by :func:`from_pretrained` and by transformers' Auto classes.

    The folder is written to a temporary name and renamed; an existing non-empty folder is
    refused unless ``overwrite``. Weights past ``max_shard_mb`` go to shards with an index, as transformers writes.
    """
    if not isinstance(model, StructprunePreTrainedModel):
        raise TypeError(f"save() takes a structprune model (from compact()), got {type(model).__name__}")
    return _write_folder(model.config, [model.state_dict()], directory, tokenizer, overwrite, max_shard_mb)


def _write_folder(config: PretrainedConfig, parts: Iterable[dict[str, torch.Tensor]], directory: str | os.PathLike,
                  tokenizer, overwrite: bool, max_shard_mb: float) -> Path:
    if max_shard_mb <= 0:
        raise ValueError(f"max_shard_mb must be positive, got {max_shard_mb}")
    if tokenizer is None:
        warnings.warn(f"saving {directory} without a tokenizer: the folder cannot be evaluated or exported on its "
                      "own; pass the model's tokenizer (save(model, folder, tokenizer))", stacklevel=3)
    config = copy.deepcopy(config)
    cls = model_class(config)
    auto = "AutoModelForCausalLM" if issubclass(cls, GenerationMixin) else "AutoModelForSequenceClassification"
    config.auto_map = {auto: f"{Path(MODELING_FILE).stem}.{cls.__name__}"}
    config.architectures = [cls.__name__]
    with atomic_dir(directory, overwrite=overwrite, marker=CHECKSUM_FILE) as tmp:
        config.save_pretrained(tmp)
        shutil.copyfile(modeling_structprune.__file__, tmp / MODELING_FILE)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        files = _write_weights(parts, tmp, int(max_shard_mb * 2**20))
        (tmp / CHECKSUM_FILE).write_text("".join(f"{sha256_file(tmp / f)}  {f}\n" for f in files))
    return Path(directory)


def _write_weights(parts: Iterable[dict[str, torch.Tensor]], folder: Path, max_bytes: int) -> list[str]:
    """Save the tensors of ``parts`` as they come, a shard whenever the next tensor would pass ``max_bytes``: one
    ``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` and their index. Returns the files written."""
    shards: list[tuple[str, list[str]]] = []
    buffer: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        name = f"shard-{len(shards) + 1:05d}.safetensors"
        save_file(buffer, str(folder / name), metadata={"format": "pt"})
        shards.append((name, list(buffer)))
        buffer.clear()

    for part in parts:
        for name, t in part.items():
            t = t.detach().contiguous().cpu()
            nbytes = t.numel() * t.element_size()
            if buffer and size + nbytes > max_bytes:
                flush()
                size = 0
            buffer[name], size, total = t, size + nbytes, total + nbytes
    if buffer or not shards:
        flush()
    if len(shards) == 1:
        (folder / shards[0][0]).rename(folder / WEIGHTS_FILE)
        return [WEIGHTS_FILE]
    files = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    weight_map = {}
    for (shard, names), file in zip(shards, files):
        (folder / shard).rename(folder / file)
        weight_map |= dict.fromkeys(names, file)
    (folder / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                indent=2) + "\n")
    return files


def _check_weights(directory: Path) -> None:
    """Compare the weights files with the checksums :func:`save` recorded (folders of other origin have none)."""
    recorded = directory / CHECKSUM_FILE
    if not recorded.is_file():
        return
    for line in recorded.read_text().splitlines():
        expected, _, file = line.partition("  ")
        path = directory / file
        if not path.is_file() or sha256_file(path) != expected:
            raise ModelFileError(f"{path} differs from the checksum structprune recorded when it saved the model "
                                 f"({CHECKSUM_FILE}): the file is missing, corrupt or truncated; save the model again")


def _check_section(config_path: Path, section: object, in_memory: bool) -> None:
    """The ``structprune`` section has the shape :class:`ModelStructure` reads (and, ``in_memory``, a size this
    machine holds)."""
    try:
        structure = ModelStructure.from_spec(section)
        sizes = [structure.hidden_size, structure.head_dim] + [n for layer in structure.layers
                                                               for n in (layer.heads, layer.kv_heads, layer.ffn)]
        if structure.hidden_size < 1 or structure.head_dim < 1 or min(sizes) < 0 or not structure.layers:
            raise ValueError("sizes must be positive")
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ModelFileError(f"{config_path}: its '{SECTION}' section is damaged ({err!r}); re-save the model") from None
    if not in_memory:
        return
    try:
        check_memory(str(config_path.parent), declared_params(structure, section))
    except ValueError as err:
        raise ModelFileError(str(err)) from None


def read_config(directory: str | os.PathLike, in_memory: bool = True) -> PretrainedConfig:
    """The config of a folder written by :func:`save` or by ``structprune export`` (JSON only); ``in_memory``: refuse
    a model larger than this machine's memory."""
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
    _check_section(config_path, raw[SECTION], in_memory)
    config = AutoConfig.for_model(**raw)
    config._attn_implementation = "eager"
    return config


def empty_model(directory: str | os.PathLike) -> StructprunePreTrainedModel:
    """A weightless (meta-device) model of a folder's config: its shapes and inputs, without loading weights."""
    config = read_config(directory)
    with torch.device("meta"):
        return model_class(config)(config)


def from_pretrained(directory: str | os.PathLike, dtype: torch.dtype | None = None) -> StructprunePreTrainedModel:
    """Load a folder written by :func:`save` (one weights file or shards). Reads JSON and safetensors only; runs no
    code from it."""
    config = read_config(directory)
    try:
        source = WeightSource(directory)
    except FileNotFoundError as err:
        raise ModelFileError(f"{err}; {directory} is not a structprune model folder") from None
    except OSError as err:
        raise ModelFileError(f"{err}; save the model again") from err
    _check_weights(Path(directory))
    try:
        model = model_class(config)(config)
    except ValueError as err:
        raise ModelFileError(f"{directory}: {err}") from None
    expected = model.state_dict()
    names = set(source.files)
    if names != set(expected):
        missing, extra = sorted(set(expected) - names), sorted(names - set(expected))
        raise ModelFileError(f"{directory}'s weights do not match its config: missing {missing[:5]}, "
                             f"unexpected {extra[:5]}")
    try:
        state = source.tensors(sorted(names))
    except OSError as err:
        raise ModelFileError(f"{err}; save the model again") from err
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise ModelFileError(f"{directory}: {name} has shape {list(tensor.shape)}, config says "
                                 f"{list(expected[name].shape)}")
    model.load_state_dict(state, strict=True)
    model.to(dtype or next(iter(state.values())).dtype)
    return model.eval()
