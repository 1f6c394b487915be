"""Mask tuning (Kwon et al., 2022): layer-wise least-squares rescaling of the kept heads and neurons.

After a mask is chosen, every kept head and neuron gets a real-valued scale so that each pruned
sublayer reproduces the output of the teacher's sublayer (the dense model by default) on the
calibration data. Layer by layer, first the attention then the FFN sublayer:

* the *target* is the teacher's residual sum at that point (``x + attention(x)`` before the
  LayerNorm of a post-LN model; the residual stream after the sublayer in a pre-LN model),
  computed on the teacher's own hidden states;
* the *student* runs on its own hidden states (earlier layers already rescaled), so errors of
  earlier layers are corrected, not compounded;
* with ``a_j`` the output of kept unit ``j`` (a head's o-projection slice applied to its context,
  a neuron's activation times its down-projection column), the scales ``s`` minimise
  ``sum_tokens || sum_j s_j a_j - (target - bias - residual) ||^2`` over real tokens (in the last
  layer's FFN, only the tokens the classifier reads). The normal equations ``(A^T A) s = A^T b``
  are accumulated over batches (in float64) and solved with SciPy's LSMR for the deviation
  ``d = s - 1`` with damping 1 (pulling scales towards 1) and an iteration cap of
  ``5 * min(m, n)``. SciPy's default cap, ``min(m, n)``, stops early on small head systems and the
  scales silently stay at 1; Kwon et al.'s code used ``5 * min(m, n)`` too.

A fit is *applied* only when LSMR converged (``istop`` 0-2) and every scale lies within
``[-max_scale, max_scale]``; otherwise the sublayer keeps scales of 1 and its :class:`SublayerFit`
says why. Scales of removed units are 0 (they are masked anyway). Weights are never changed: the
scales go into :attr:`MaskSet.scales`, which the masked model multiplies in and ``compact()``
folds into the o-proj and down-proj columns.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from scipy.sparse.linalg import lsmr
from tqdm.auto import tqdm

from structprune.arch.structure import ModelStructure
from structprune.masked_model import effective_gates
from structprune.maskset import MaskSet
from structprune.modeling_structprune import (
    LAYER_GATES,
    StructpruneForSequenceClassification,
)
from structprune.precision import bf16_autocast

ACCEPTED_ISTOP = (0, 1, 2)
"""LSMR stop codes of a solution: x = 0 is exact, Ax = b solved, or least squares solved."""


@dataclass
class SublayerFit:
    """What tuning did to one sublayer: its least-squares error before (scales 1) and after."""

    layer: int
    sublayer: str
    units: int
    error_before: float
    error_after: float
    lsmr_istop: int
    lsmr_iterations: int
    applied: bool


@dataclass
class _System:
    """Normal equations of one sublayer, accumulated over batches."""

    ata: torch.Tensor
    atb: torch.Tensor
    btb: float = 0.0

    def add(self, ata: torch.Tensor, atb: torch.Tensor, btb: torch.Tensor) -> None:
        self.ata += ata.double()
        self.atb += atb.double()
        self.btb += float(btb)

    def error(self, s: torch.Tensor) -> float:
        return float(self.btb - 2 * s @ self.atb + s @ self.ata @ s)


def eager_copy(model: StructpruneForSequenceClassification) -> StructpruneForSequenceClassification:
    """``model`` itself when it runs the plain torch path, else a copy that does.

    Tuning reads the inputs of the o- and down-projections with hooks, so those must be called as
    modules (the fused kernels of a MaskedModel bypass them).
    """
    if all((layer.attn is None or layer.attn.attention_fn is None) and (layer.ffn is None or layer.ffn.ffn_fn is None)
           for layer in model.layers):
        return model
    eager = copy.deepcopy(model)
    for layer in eager.layers:
        if layer.attn is not None:
            layer.attn.attention_fn = None
        if layer.ffn is not None:
            layer.ffn.ffn_fn = None
    return eager


class _Capture:
    """Hooks recording what one layer's sublayers see and produce during one call."""

    def __init__(self, layer: torch.nn.Module):
        self.values: dict[str, torch.Tensor] = {}
        self.handles = [
            layer.attn.register_forward_hook(lambda m, a, out: self._put("attn_out", out)),
            layer.ffn.register_forward_pre_hook(lambda m, a: self._put("ffn_in", a[0])),
            layer.ffn.register_forward_hook(lambda m, a, out: self._put("ffn_out", out)),
            layer.ffn.down.register_forward_pre_hook(lambda m, a: self._put("activation", a[0])),
        ]

    def _put(self, name: str, value: torch.Tensor) -> None:
        self.values[name] = value

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


class _Runner:
    """Runs single layers of ``model`` under given gates, and the sums every fit needs.

    With ``bf16`` the layers run under bf16 autocast and every value comes back in fp32, so the
    least-squares sums stay in full precision.
    """

    def __init__(self, model: StructpruneForSequenceClassification, bf16: bool = False):
        self.model = model
        self.bf16 = bf16

    def _autocast(self):
        return bf16_autocast(self.model.embeddings.word.weight.device, self.bf16)

    def inputs(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, object, object]:
        """Hidden states entering layer 0, the attention context and the rotary table of a batch."""
        return self.model.layer_inputs(batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids"))

    def layer(self, i: int, x: torch.Tensor, ctx, rope, gates: Mapping[str, torch.Tensor]):
        """Layer ``i``'s output and the captured sublayer values (layer gates applied to the outputs)."""
        layer = self.model.layers[i]
        layer_gates = {name: gates[name][i] for name in LAYER_GATES if name in gates}
        capture = _Capture(layer)
        try:
            with self._autocast():
                out = layer(x, ctx, rope, layer_gates)
        finally:
            capture.close()
        v = {name: value.float() for name, value in capture.values.items()}
        out = out.float()
        v["attn_out"] = v["attn_out"] * layer_gates.get("attn_layer", 1.0)
        v["ffn_out"] = v["ffn_out"] * layer_gates.get("ffn_layer", 1.0)
        v["attn_sum"] = x + v["attn_out"]
        v["ffn_residual"] = v["ffn_in"] if layer.post_ln else v["attn_sum"]
        v["ffn_sum"] = v["ffn_residual"] + v["ffn_out"]
        return out, v

    def contexts(self, i: int, x: torch.Tensor, ctx, rope, head_gate: torch.Tensor) -> torch.Tensor:
        """The per-head attention contexts (o-projection input) of layer ``i``, without running its FFN."""
        layer = self.model.layers[i]
        captured = []
        handle = layer.attn.o.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
        try:
            with self._autocast():
                layer.attn(x if layer.post_ln else layer.attn_norm(x), ctx, rope, head_gate)
        finally:
            handle.remove()
        return captured[0].float()

    def rows(self, batch: Mapping[str, torch.Tensor], classifier_only: bool) -> torch.Tensor:
        """Boolean ``[B, S]`` mask of the tokens a fit uses: real tokens, or those the head reads (a causal
        LM's reads them all)."""
        ids = batch["input_ids"]
        real = batch.get("attention_mask", torch.ones_like(ids)).bool()
        if not classifier_only or self.model.spec.get("task") == "causal_lm":
            return real
        picked = torch.zeros_like(real)
        if self.model.head.style == "last_token":
            positions = torch.arange(ids.shape[1], device=ids.device)
            picked[torch.arange(ids.shape[0]), (positions * ids.ne(self.model.head.pad)).argmax(-1)] = True
        else:
            picked[:, 0] = True
        return picked


def _solve(system: _System, damping: float, max_scale: float) -> tuple[torch.Tensor, int, int, bool]:
    """Scales ``s = 1 + d`` from LSMR on ``ata d = atb - ata 1``; whether they are usable."""
    n = system.ata.shape[0]
    ones = torch.ones(n, dtype=torch.float64)
    a = system.ata.numpy()
    rhs = (system.atb - system.ata @ ones).numpy()
    d, istop, itn = lsmr(a, rhs, damp=damping, maxiter=5 * n)[:3]
    s = torch.from_numpy(np.asarray(d)) + 1.0
    ok = istop in ACCEPTED_ISTOP and bool(torch.isfinite(s).all()) and float(s.abs().max()) <= max_scale
    return s, int(istop), int(itn), ok


def _fit(system: _System, layer: int, name: str, damping: float, max_scale: float) -> tuple[torch.Tensor, SublayerFit]:
    n = system.ata.shape[0]
    ones = torch.ones(n, dtype=torch.float64)
    s, istop, itn, ok = _solve(system, damping, max_scale)
    scales = s if ok else ones
    return scales, SublayerFit(layer, name, n, system.error(ones), system.error(scales), istop, itn, ok)


def _gates(masks: MaskSet, structure: ModelStructure, dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
    return {name: g.to(device=device, dtype=dtype) for name, g in effective_gates(masks.gates(structure)).items()}


def _fit_heads(runner: _Runner, i: int, heads: list[int], head_gate: torch.Tensor, batches: list, contexts: list,
               student_x: list, targets: list, max_heads: int, hd: int, damping: float,
               max_scale: float) -> tuple[torch.Tensor, SublayerFit]:
    """Scales of layer ``i``'s kept ``heads`` whose attention output best reconstructs ``targets``."""
    layer = runner.model.layers[i]
    w_o = layer.attn.o.weight.t().reshape(max_heads, hd, -1)[heads]  # [k, hd, D]
    system = _System(torch.zeros(len(heads), len(heads), dtype=torch.float64),
                     torch.zeros(len(heads), dtype=torch.float64))
    for batch, (_, ctx, rope), sx, t_attn in zip(batches, contexts, student_x, targets):
        rows = runner.rows(batch, False)
        context = runner.contexts(i, sx, ctx, rope, head_gate)[rows]
        context = context.reshape(-1, max_heads, hd)[:, heads]  # [T, k, hd]
        a = torch.einsum("tkd,kdo->kto", context, w_o).reshape(len(heads), -1)
        bias = layer.attn.o.bias if layer.attn.o.bias is not None else 0.0
        b = (t_attn[rows] - bias - sx[rows]).reshape(-1)
        system.add(a @ a.t(), a @ b, b @ b)
    return _fit(system, i, "attention", damping, max_scale)


def _fit_neurons(runner: _Runner, i: int, neurons: list[int], gates: dict[str, torch.Tensor], batches: list,
                 contexts: list, student_x: list, targets: list, last: bool, damping: float,
                 max_scale: float) -> tuple[torch.Tensor, SublayerFit]:
    """Scales of layer ``i``'s kept ``neurons`` whose FFN output best reconstructs ``targets``."""
    layer = runner.model.layers[i]
    w_d = layer.ffn.down.weight[:, neurons]  # [D, k]
    gram = (w_d.t() @ w_d).double()
    system = _System(torch.zeros(len(neurons), len(neurons), dtype=torch.float64),
                     torch.zeros(len(neurons), dtype=torch.float64))
    for batch, (_, ctx, rope), sx, t_ffn in zip(batches, contexts, student_x, targets):
        _, v = runner.layer(i, sx, ctx, rope, gates)
        rows = runner.rows(batch, last)
        h = v["activation"][rows][:, neurons]  # [T, k]
        bias = layer.ffn.down.bias if layer.ffn.down.bias is not None else 0.0
        b = t_ffn[rows] - bias - v["ffn_residual"][rows]  # [T, D]
        system.add(gram * (h.t() @ h).double(), (h * (b @ w_d)).sum(0), (b * b).sum())
    return _fit(system, i, "ffn", damping, max_scale)


@torch.no_grad()
def tune_scales(model: StructpruneForSequenceClassification, masks: MaskSet,
                batches: list[dict[str, torch.Tensor]], teacher: MaskSet | None = None, damping: float = 1.0,
                max_scale: float = 10.0, bf16: bool = False,
                progress: bool = False) -> tuple[MaskSet, list[SublayerFit]]:
    """``masks`` with tuned ``scales`` for its kept heads and neurons, and a fit record per sublayer.

    Args:
        model: the dense full-size model the masks are for (its weights are not changed).
        batches: calibration batches (:func:`structprune.methods.calibration.calibration_batches`).
        teacher: masks whose sublayer outputs are reconstructed (``None``: the dense model).
        damping: LSMR damping of the deviation from 1.
        max_scale: fits with a scale beyond this in magnitude are not applied.
        bf16: run the layers under bf16 autocast (:mod:`structprune.precision`); the sums are
            still accumulated in fp32 and float64.
    """
    model = eager_copy(model)
    was_training = model.training
    model.eval()
    structure = ModelStructure.from_spec(model.spec)
    weight = model.embeddings.word.weight
    teacher = teacher if teacher is not None else MaskSet.ones(structure, ("head", "neuron"))
    teacher_gates = _gates(teacher, structure, weight.dtype, weight.device)
    binary = MaskSet({name: masks.masks[name] for name in ("head", "neuron")})
    scales = {name: masks.masks[name].clone() for name in ("head", "neuron")}
    runner = _Runner(model, bf16)
    fits: list[SublayerFit] = []
    hd = structure.head_dim
    try:
        contexts = [runner.inputs(batch) for batch in batches]
        teacher_x = [x for x, _, _ in contexts]
        student_x = list(teacher_x)
        last = structure.num_layers - 1
        for i in tqdm(range(structure.num_layers), desc="mask tuning", unit="layer", disable=not progress):
            heads = masks.masks["head"][i].nonzero().flatten().tolist()
            neurons = masks.masks["neuron"][i].nonzero().flatten().tolist()
            targets, next_teacher = [], []
            for batch, (_, ctx, rope), tx in zip(batches, contexts, teacher_x):
                out, v = runner.layer(i, tx, ctx, rope, teacher_gates)
                targets.append((v["attn_sum"], v["ffn_sum"]))
                next_teacher.append(out)

            def student_gates() -> dict[str, torch.Tensor]:
                current = MaskSet(binary.masks, {name: scales[name] for name in scales})
                return _gates(current, structure, weight.dtype, weight.device)

            def binary_at(gates: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
                """``gates`` with layer ``i``'s ``name`` gates reset to the 0/1 mask (unscaled unit outputs)."""
                out = dict(gates)
                out[name] = gates[name].clone()
                out[name][i] = masks.masks[name][i].to(out[name])
                return out

            if heads:
                s, fit = _fit_heads(runner, i, heads, masks.masks["head"][i].to(weight), batches, contexts,
                                    student_x, [t for t, _ in targets], structure.max_heads, hd, damping, max_scale)
                scales["head"][i, heads] = s.float()
                fits.append(fit)
            if neurons:
                s, fit = _fit_neurons(runner, i, neurons, binary_at(student_gates(), "neuron"), batches, contexts,
                                      student_x, [t for _, t in targets], i == last, damping, max_scale)
                scales["neuron"][i, neurons] = s.float()
                fits.append(fit)
            gates = student_gates()
            student_x = [runner.layer(i, sx, ctx, rope, gates)[0]
                         for (_, ctx, rope), sx in zip(contexts, student_x)]
            teacher_x = next_teacher
    finally:
        model.train(was_training)
    tuned = MaskSet(dict(masks.masks), scales, dict(masks.meta))
    return tuned, fits

