"""``MaskSet``: frozen binary pruning masks, their resolution into a kept structure, and counting.

Mask tensors (any subset may be present; an absent one keeps everything):

* ``attn_layer [L]``, ``ffn_layer [L]``: whole attention / FFN sublayers;
* ``head [L, H]``: query heads. Grouped-query attention rule: query heads are pruned
  individually, and a key/value head is removed when every query head of its group is;
* ``neuron [L, F]``: FFN neurons (rows of up/gate, columns of down);
* ``hidden [D]``: hidden dimensions of the residual stream.

Masks hold 0/1 values. Optional ``scales`` (``head [L, H]``, ``neuron [L, F]``) are real-valued
per-unit factors for kept units (e.g. from mask tuning); compaction folds them into the o-proj and
down-proj input columns. Optional ``shifts`` (``attn [L, D]``, ``ffn [L, D]``) are added to a kept
sublayer's output (bias compensation: what the removed units contributed on average); compaction makes
them the o-proj and down-proj output biases.

A sublayer is removed when its layer mask is 0 or all of its heads / neurons are, and then it
adds nothing to the residual stream (bias included). Sparsity and FLOPs are counted by
:mod:`structprune.costs`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from structprune.arch.structure import UNIT_NAMES, LayerStructure, ModelStructure
from structprune.costs import count_flops, count_params
from structprune.io import atomic_dir, atomic_write_text

MASK_NAMES = UNIT_NAMES
SCALE_NAMES = ("head", "neuron")
SHIFT_NAMES = ("attn", "ffn")
MASKS_FILE = "masks.safetensors"
WEIGHTS_FILE = "weights.safetensors"
"""The full-size weights a method changed while choosing the masks (``sprint``, ``refit``), beside the masks."""
SUMMARY_FILE = "masks.json"
FORMAT_VERSION = 1
MAX_SCALE = 1e4
"""Largest magnitude of a kept-unit scale (mask tuning applies none beyond 10)."""


class MaskError(ValueError):
    """Masks that do not fit a model, or a mask file that cannot be read."""


def mask_shapes(structure: ModelStructure) -> dict[str, tuple[int, ...]]:
    """The shape every mask must have for a dense (uncompacted) model."""
    L = structure.num_layers
    return {
        "attn_layer": (L,),
        "head": (L, structure.max_heads),
        "ffn_layer": (L,),
        "neuron": (L, structure.max_ffn),
        "hidden": (structure.hidden_size,),
    }


@dataclass(frozen=True)
class KeptLayer:
    """Indices of the units one layer keeps (empty heads / neurons: the sublayer is removed)."""

    heads: tuple[int, ...]
    kv_heads: tuple[int, ...]
    neurons: tuple[int, ...]


@dataclass
class MaskSet:
    """Named binary masks, optional kept-unit scales and sublayer output shifts, and free-form metadata."""

    masks: dict[str, torch.Tensor]
    scales: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    shifts: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = set(self.masks) - set(MASK_NAMES)
        if unknown:
            raise MaskError(f"unknown mask names {sorted(unknown)}; expected a subset of {MASK_NAMES}")
        unknown = set(self.scales) - set(SCALE_NAMES)
        if unknown:
            raise MaskError(f"unknown scale names {sorted(unknown)}; scales exist only for {SCALE_NAMES}")
        unknown = set(self.shifts) - set(SHIFT_NAMES)
        if unknown:
            raise MaskError(f"unknown shift names {sorted(unknown)}; shifts exist only for {SHIFT_NAMES}")
        self.masks = {k: v.detach().float().cpu() for k, v in self.masks.items()}
        self.scales = {k: v.detach().float().cpu() for k, v in self.scales.items()}
        self.shifts = {k: v.detach().float().cpu() for k, v in self.shifts.items()}
        for name, shift in self.shifts.items():
            if not torch.isfinite(shift).all():
                raise MaskError(f"shift {name!r} holds non-finite values; the masks are corrupt, re-create them")
        for name, mask in self.masks.items():
            if not torch.all((mask == 0) | (mask == 1)):
                raise MaskError(f"mask {name!r} must hold only 0 and 1; put real values in scales")
        for name, scale in self.scales.items():
            if not torch.isfinite(scale).all():
                raise MaskError(f"scale {name!r} holds non-finite values")
            if scale.abs().max() > MAX_SCALE:
                raise MaskError(f"scale {name!r} holds {float(scale.abs().max()):.3g}, beyond the {MAX_SCALE:g} a kept "
                                "unit's output may be multiplied by; the masks are corrupt, re-create them")

    @classmethod
    def ones(cls, structure: ModelStructure, names: tuple[str, ...] = MASK_NAMES) -> "MaskSet":
        """Masks that keep everything."""
        shapes = mask_shapes(structure)
        return cls({name: torch.ones(shapes[name]) for name in names})

    def validate(self, structure: ModelStructure) -> None:
        """Raise :class:`MaskError` naming the mismatch if these masks do not fit ``structure``."""
        dense = all(
            layer.heads == structure.max_heads and layer.ffn == structure.max_ffn for layer in structure.layers
        )
        if not dense:
            raise MaskError(
                "masks apply to the dense model, but this model is already compacted (uneven layers); "
                "apply masks to the original model"
            )
        shapes = mask_shapes(structure)
        shift_shape = (structure.num_layers, structure.hidden_size)
        for store, kind in ((self.masks, "mask"), (self.scales, "scale"), (self.shifts, "shift")):
            for name, tensor in store.items():
                if tuple(tensor.shape) != (shift_shape if kind == "shift" else shapes[name]):
                    raise MaskError(
                        f"{kind} {name!r} has shape {list(tensor.shape)} but the model "
                        f"({structure.arch}, {structure.num_layers} layers, {structure.max_heads} heads, "
                        f"FFN {structure.max_ffn}, hidden {structure.hidden_size}) needs "
                        f"{list(shift_shape if kind == 'shift' else shapes[name])}"
                    )
        if "hidden" in self.masks and not self.masks["hidden"].any():
            raise MaskError("the hidden mask removes every hidden dimension; keep at least one")

    def gates(self, structure: ModelStructure) -> dict[str, torch.Tensor]:
        """Gate values for the masked model: ``mask * scale`` (the masked model applies the removal rules),
        and the shifts as ``attn_shift`` / ``ffn_shift``."""
        self.validate(structure)
        gates = dict(self.masks)
        for name, scale in self.scales.items():
            gates[name] = gates.get(name, torch.ones_like(scale)) * scale
        return gates | {f"{name}_shift": shift for name, shift in self.shifts.items()}

    def compact_spec(self, spec: dict) -> dict:
        """``spec`` with the output biases the shifts become after compaction."""
        return spec | ({"o_bias": True} if "attn" in self.shifts else {}) | (
            {"ffn_out_bias": True} if "ffn" in self.shifts else {})

    def kept(self, structure: ModelStructure) -> tuple[list[KeptLayer], tuple[int, ...]]:
        """Per-layer kept units and kept hidden dims, after the removed-sublayer rules."""
        self.validate(structure)
        layers = []
        for i, layer in enumerate(structure.layers):
            heads = self._alive("head", "attn_layer", i, layer.heads)
            neurons = self._alive("neuron", "ffn_layer", i, layer.ffn)
            kv_of = layer.kv_map or tuple(range(layer.heads))
            kv = tuple(sorted({kv_of[h] for h in heads}))
            layers.append(KeptLayer(heads, kv, neurons))
        hidden = self.masks.get("hidden")
        kept_hidden = tuple(range(structure.hidden_size)) if hidden is None else tuple(
            hidden.nonzero().flatten().tolist())
        return layers, kept_hidden

    def _alive(self, unit: str, layer_name: str, i: int, count: int) -> tuple[int, ...]:
        if layer_name in self.masks and self.masks[layer_name][i] == 0:
            return ()
        if unit in self.masks:
            return tuple(self.masks[unit][i].nonzero().flatten().tolist())
        return tuple(range(count))

    def resolve(self, structure: ModelStructure) -> ModelStructure:
        """The structure of the compacted model these masks produce."""
        layers, hidden = self.kept(structure)
        out = []
        for full, kept in zip(structure.layers, layers):
            kv_map = None
            if full.kv_map is not None and kept.heads:
                position = {g: j for j, g in enumerate(kept.kv_heads)}
                kv_map = tuple(position[full.kv_map[h]] for h in kept.heads)
            out.append(LayerStructure(len(kept.heads), len(kept.kv_heads), kv_map, len(kept.neurons)))
        return ModelStructure(structure.family, structure.arch, len(hidden), structure.head_dim,
                              structure.gated_ffn, tuple(out))

    def summary(self, structure: ModelStructure, spec: dict, seq_len: int = 128) -> dict:
        """Kept counts per layer, parameter sparsity and FLOPs (dense vs pruned) at ``seq_len``."""
        pruned = self.resolve(structure)
        dense_params, kept_params = count_params(structure, spec), count_params(pruned, self.compact_spec(spec))
        dense_flops, kept_flops = count_flops(structure, spec, seq_len), count_flops(pruned, spec, seq_len)
        return {
            "layers": [{"heads": layer.heads, "kv_heads": layer.kv_heads, "ffn": layer.ffn} for layer in pruned.layers],
            "hidden": pruned.hidden_size,
            "params_dense": dense_params,
            "params_kept": kept_params,
            "param_sparsity": 1.0 - kept_params / dense_params,
            "seq_len": seq_len,
            "flops_dense": dense_flops,
            "flops_kept": kept_flops,
            "flops_reduction": 1.0 - kept_flops / dense_flops,
        }

    def save(self, directory: str | os.PathLike, structure: ModelStructure | None = None,
             spec: dict | None = None, overwrite: bool = False,
             weights: dict[str, torch.Tensor] | None = None) -> Path:
        """Write ``masks.safetensors`` and ``masks.json`` (with a summary when the model is given), and the
        full-size ``weights`` the masks go with, if the method changed them (:func:`tuned_weights` reads them)."""
        tensors = {name: t.contiguous() for name, t in self.masks.items()}
        tensors |= {f"scale.{name}": t.contiguous() for name, t in self.scales.items()}
        tensors |= {f"shift.{name}": t.contiguous() for name, t in self.shifts.items()}
        info = {"format_version": FORMAT_VERSION, "masks": sorted(self.masks), "scales": sorted(self.scales),
                "shifts": sorted(self.shifts), "meta": self.meta}
        if structure is not None and spec is not None:
            info["summary"] = self.summary(structure, spec)
        with atomic_dir(directory, overwrite=overwrite, marker=SUMMARY_FILE) as tmp:
            save_file(tensors, str(tmp / MASKS_FILE), metadata={"format": "pt"})
            if weights is not None:
                save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / WEIGHTS_FILE),
                          metadata={"format": "pt"})
            atomic_write_text(tmp / SUMMARY_FILE, json.dumps(info, indent=2, sort_keys=True))
        return Path(directory)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "MaskSet":
        """Read a mask folder written by :meth:`save` (safetensors and JSON only; nothing is executed)."""
        directory = Path(directory)
        tensor_path, info_path = directory / MASKS_FILE, directory / SUMMARY_FILE
        for path in (tensor_path, info_path):
            if not path.is_file():
                raise MaskError(f"{path} is missing: {directory} is not a structprune mask folder")
        try:
            tensors = load_file(str(tensor_path))
        except (SafetensorError, OSError, ValueError) as err:
            raise MaskError(f"{tensor_path} is corrupt or truncated ({err}); re-create the masks") from err
        try:
            info = json.loads(info_path.read_text())
        except json.JSONDecodeError as err:
            raise MaskError(f"{info_path} is not valid JSON ({err}); re-create the masks") from err
        if not isinstance(info, dict) or not isinstance(info.get("meta", {}), dict) or not all(
                isinstance(info.get(key), list) and all(isinstance(n, str) for n in info[key])
                for key in ("masks", "scales")):
            raise MaskError(f"{info_path} does not have the shape of a masks summary (an object with lists 'masks' "
                            "and 'scales' and an object 'meta'); re-create the masks")
        if info.get("format_version", 0) > FORMAT_VERSION:
            raise MaskError(f"{directory} was written by a newer structprune; upgrade to read it")
        masks = {k: v for k, v in tensors.items() if "." not in k}
        scales = {k.removeprefix("scale."): v for k, v in tensors.items() if k.startswith("scale.")}
        shifts = {k.removeprefix("shift."): v for k, v in tensors.items() if k.startswith("shift.")}
        if (sorted(masks) != info.get("masks") or sorted(scales) != info.get("scales")
                or sorted(shifts) != info.get("shifts", []) or len(masks) + len(scales) + len(shifts) != len(tensors)):
            raise MaskError(f"{tensor_path} and {info_path} disagree on which masks exist; re-create the masks")
        return cls(masks, scales, info.get("meta", {}), shifts)


def tuned_weights(directory: str | os.PathLike) -> dict[str, torch.Tensor] | None:
    """The weights saved beside the masks of ``directory`` (``None`` when the method changed none)."""
    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        return None
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise MaskError(f"{path} is corrupt or truncated ({err}); re-create the masks") from err


def random_masks(structure: ModelStructure, generator: torch.Generator, keep: float = 0.5,
                 names: tuple[str, ...] = MASK_NAMES) -> MaskSet:
    """Masks keeping each unit with probability ``keep`` (for tests and benchmarks)."""
    shapes = mask_shapes(structure)
    masks = {name: (torch.rand(shapes[name], generator=generator) < keep).float() for name in names}
    if "hidden" in masks and not masks["hidden"].any():
        masks["hidden"][0] = 1.0
    return MaskSet(masks)


def uniform_masks(structure: ModelStructure, head_sparsity: float, neuron_sparsity: float) -> MaskSet:
    """Masks removing the same fraction of heads and neurons in every layer (the first units kept)."""
    for value, what in ((head_sparsity, "head"), (neuron_sparsity, "neuron")):
        if not 0.0 <= value < 1.0:
            raise MaskError(f"{what} sparsity {value} is outside [0, 1)")
    shapes = mask_shapes(structure)
    head, neuron = torch.zeros(shapes["head"]), torch.zeros(shapes["neuron"])
    # rounded first: 9 * (1 - 1/3) is 6.000000000000001 in floating point, which must keep 6 heads, not 7
    head[:, : max(1, math.ceil(round(structure.max_heads * (1 - head_sparsity), 6)))] = 1
    neuron[:, : max(1, math.ceil(round(structure.max_ffn * (1 - neuron_sparsity), 6)))] = 1
    return MaskSet({"head": head, "neuron": neuron})
