"""The one cost model: what a structure costs, counted, expected under gates, or measured.

Every budget, selection, report and ideal speedup reads its costs here:

* :func:`count_params`, :func:`count_flops`: exact counts of a (pruned) :class:`ModelStructure`;
* :func:`expected_cost`: their expectation when every unit is kept independently with a probability
  (hard-concrete gates), differentiable, equal to the counts when the probabilities are 0 or 1;
* :func:`flops_ideal_speedup`: the speedup if latency scaled with counted FLOPs;
* causal LMs: :func:`prefill_flops` (to the first token) and :func:`decode_bytes` (memory read per decoded
  token: weights touched and the key/value cache), with their ideal speedups;
* :class:`LatencyTable`: latency measured per sublayer on a backend (``structprune latency-table``);
* :class:`CostModel`: the cost of structures of one model in one unit (``params``, ``flops`` or
  ``latency``), which budgets and the greedy selection use.

Counting rules. Parameters are those of attention and FFN projections (weights and biases); embeddings,
norms and the classification head are excluded, as in CoFiPruning. FLOPs count a multiply-add as 2, per
example of length ``seq_len``: projections, attention scores and context, FFN, and the ELECTRA embedding
projection. A removed sublayer costs nothing, its output bias included; with grouped-query attention a
key/value head is paid for while any query head of its group is kept. The exact and the expected counts
go through the same formulas (``_attention_params`` ... ``_ffn_macs``), so they cannot drift apart.
Bytes read per decoded token and the key/value cache size (:func:`decode_bytes`, :func:`kv_cache_bytes`)
go through the same formulas (:func:`count_params`, ``_kv_cache_values``); budgets do not use them.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch

from structprune.arch.structure import LayerStructure, ModelStructure
from structprune.io import atomic_write_text

KINDS = ("params", "flops", "latency")
TIE_MS = 1e-6
"""Slope a latency table adds per head / neuron, so that every unit has a positive latency cost."""
LATENCY_FORMAT_VERSION = 1


def _attention_params(q, kv, alive, D, spec: dict):
    """Parameters of an attention sublayer with ``q`` query and ``kv`` key/value dims; ``alive`` is 1 for a
    present sublayer, or the probability that any of its heads is kept (its output bias goes with the last
    head). Works on ints and on tensors alike, as do the other formulas."""
    return (2 * q + 2 * kv) * D + (q + 2 * kv) * spec["qkv_bias"] + D * alive * spec["o_bias"]


def _attention_macs(q, kv, D, S: int):
    return S * D * (2 * q + 2 * kv) + 2 * S * S * q  # q, o, k, v projections; scores and context


def _ffn_params(width, alive, D, gated: bool, spec: dict):
    out_bias = spec["ffn_bias"] if spec.get("ffn_out_bias") is None else spec["ffn_out_bias"]
    return (3 if gated else 2) * width * D + width * spec["ffn_bias"] + D * alive * out_bias


def _ffn_macs(width, D, S: int, gated: bool):
    return S * D * width * (3 if gated else 2)


def _embedding_macs(D, S: int, spec: dict):
    return S * spec["embedding_size"] * D if spec.get("embedding_project") else 0


def count_params(structure: ModelStructure, spec: dict) -> int:
    """Parameters of attention and FFN projections (weights + biases) of a structure."""
    D, hd = structure.hidden_size, structure.head_dim
    return sum((_attention_params(layer.heads * hd, layer.kv_heads * hd, 1, D, spec) if layer.heads else 0)
               + (_ffn_params(layer.ffn, 1, D, structure.gated_ffn, spec) if layer.ffn else 0)
               for layer in structure.layers)


def count_flops(structure: ModelStructure, spec: dict, seq_len: int) -> int:
    """Forward FLOPs of one example of length ``seq_len`` (2 per multiply-add)."""
    D, hd, S = structure.hidden_size, structure.head_dim, seq_len
    macs = _embedding_macs(D, S, spec) + sum(
        (_attention_macs(layer.heads * hd, layer.kv_heads * hd, D, S) if layer.heads else 0)
        + (_ffn_macs(layer.ffn, D, S, structure.gated_ffn) if layer.ffn else 0) for layer in structure.layers)
    return 2 * macs


def expected_cost(structure: ModelStructure, spec: dict, probs: Mapping[str, torch.Tensor],
                  seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expected (parameters, FLOPs) of the compacted model under independent keep probabilities.

    ``probs`` holds ``P(unit kept)`` per mask name (``attn_layer``, ``head``, ``ffn_layer``, ``neuron``,
    ``hidden``; an absent name keeps everything). Every count is a sum of products of independent factors,
    so its expectation is the same sum of products of expectations, and "any unit of a group kept" has
    probability ``1 - prod(1 - p)``. Differentiable in ``probs``.
    """
    ref = next(iter(probs.values()))
    one = torch.ones((), dtype=ref.dtype, device=ref.device)
    hd, S = structure.head_dim, seq_len
    D = probs["hidden"].sum() if "hidden" in probs else one * structure.hidden_size
    params, macs = one * 0.0, one * 0.0 + _embedding_macs(D, S, spec)
    for i, layer in enumerate(structure.layers):
        if layer.heads:
            p_layer = probs["attn_layer"][i] if "attn_layer" in probs else one
            p_head = probs["head"][i, :layer.heads] if "head" in probs else one.expand(layer.heads)
            q = hd * p_layer * p_head.sum()
            if layer.kv_map is None:  # multi-head attention: one key/value head per query head
                kv = q
            else:
                kv_alive = [1 - torch.prod(1 - p_head[[h for h, g in enumerate(layer.kv_map) if g == group]])
                            for group in sorted(set(layer.kv_map))]
                kv = hd * p_layer * torch.stack(kv_alive).sum()
            params = params + _attention_params(q, kv, p_layer * (1 - torch.prod(1 - p_head)), D, spec)
            macs = macs + _attention_macs(q, kv, D, S)
        if layer.ffn:
            p_layer = probs["ffn_layer"][i] if "ffn_layer" in probs else one
            p_neuron = probs["neuron"][i, :layer.ffn] if "neuron" in probs else one.expand(layer.ffn)
            f = p_layer * p_neuron.sum()
            params = params + _ffn_params(f, p_layer * (1 - torch.prod(1 - p_neuron)), D, structure.gated_ffn, spec)
            macs = macs + _ffn_macs(f, D, S, structure.gated_ffn)
    return params, 2 * macs


def check_memory(what: str, params: float, bytes_per_param: int = 4) -> None:
    """Refuse a model whose declared size would not fit in this machine's memory, before anything is allocated."""
    try:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # a platform without these counters: nothing to compare with
        return
    needed = params * bytes_per_param
    if needed > 0.9 * available:
        raise ValueError(f"{what} declares about {params:,.0f} parameters ({needed / 2**30:,.1f} GiB at "
                         f"{bytes_per_param} bytes each), more than this machine's {available / 2**30:,.1f} GiB of "
                         "memory; its config is wrong, or it needs a larger machine")


def declared_params(structure: ModelStructure, spec: dict) -> int:
    """Parameters a structprune config declares: the counted projections plus the embeddings."""
    vocab = int(spec.get("vocab_size", 0)) + int(spec.get("max_position_embeddings", 0) or 0)
    return count_params(structure, spec) + vocab * max(structure.hidden_size, int(spec.get("embedding_size", 0)))


def flops_ideal_speedup(dense_structure: ModelStructure, pruned_structure: ModelStructure, spec: dict,
                        seq_len: int) -> float:
    """Speedup if latency scaled with counted FLOPs: ``count_flops(dense) / count_flops(pruned)``."""
    return _ratio(count_flops(dense_structure, spec, seq_len), count_flops(pruned_structure, spec, seq_len),
                  "FLOPs (every sublayer removed)")


def _lm_head_params(D, spec: dict):
    return spec["vocab_size"] * D


def _kv_cache_values(kv, tokens: int, batch: int):
    return 2 * kv * tokens * batch  # keys and values of ``kv`` dims per cached token


def prefill_flops(structure: ModelStructure, spec: dict, prompt: int) -> int:
    """FLOPs to the first token of a causal LM: :func:`count_flops` over the prompt, plus the LM head on
    the last position only (the one whose logits pick the token; embeddings are a lookup, no FLOPs)."""
    return count_flops(structure, spec, prompt) + 2 * _lm_head_params(structure.hidden_size, spec)


def kv_cache_bytes(structure: ModelStructure, tokens: int, batch: int = 1, bytes_per_value: int = 4) -> int:
    """Bytes of the key/value cache of ``batch`` sequences of ``tokens`` tokens (layers with attention only)."""
    hd = structure.head_dim
    return bytes_per_value * sum(_kv_cache_values(layer.kv_heads * hd, tokens, batch)
                                 for layer in structure.layers if layer.heads)


def decode_bytes(structure: ModelStructure, spec: dict, context: int, batch: int = 1,
                 bytes_per_value: int = 4) -> int:
    """Bytes one decoding step of a causal LM reads (one new token in each of ``batch`` sequences).

    Decoding is bound by memory traffic, not FLOPs: each step reads every projection weight and bias
    (:func:`count_params`, once for the whole batch), the LM head (vocabulary x hidden, tied or not), and
    the key/value cache of the ``context`` earlier tokens plus the new one, per sequence. Norm weights and
    the embedding rows looked up are under 0.1% and not counted; activations stay in cache. A sliding-window
    layer is counted with its whole cache, as the dense attention reads it.
    """
    weights = count_params(structure, spec) + _lm_head_params(structure.hidden_size, spec)
    return bytes_per_value * weights + kv_cache_bytes(structure, context + 1, batch, bytes_per_value)


def _ratio(dense: float, pruned: float, what: str) -> float:
    if pruned <= 0:
        raise ValueError(f"the pruned structure has no counted {what}; its ideal speedup is unbounded")
    return dense / pruned


def prefill_ideal_speedup(dense_structure: ModelStructure, pruned_structure: ModelStructure, spec: dict,
                          prompt: int) -> float:
    """Time-to-first-token speedup if prefill latency scaled with :func:`prefill_flops`."""
    return _ratio(prefill_flops(dense_structure, spec, prompt), prefill_flops(pruned_structure, spec, prompt),
                  "prefill FLOPs")


def decode_ideal_speedup(dense_structure: ModelStructure, pruned_structure: ModelStructure, spec: dict,
                         context: int, batch: int = 1) -> float:
    """Per-token decoding speedup if a step's latency scaled with :func:`decode_bytes` (same dtype for both)."""
    return _ratio(decode_bytes(dense_structure, spec, context, batch),
                  decode_bytes(pruned_structure, spec, context, batch), "bytes per decoded token")


@dataclass(frozen=True)
class LatencyTable:
    """Measured latency (ms) of one model's sublayers at one input shape on one backend.

    Predicts any pruned structure of that model: ``base_ms`` (embeddings, norms and the classifier or LM
    head: the model with every sublayer removed) plus, per layer, ``attn_ms[h]`` (an attention sublayer with
    ``h`` heads) and ``ffn_ms`` at the measured ``ffn_widths``, interpolated linearly in between (the
    piecewise-linear shape of Kwon et al., 2022). :func:`structprune.latency.measure_table` measures one.

    ``phase`` says what one timed call was (one of :attr:`PHASES`): ``"forward"`` (classifiers): one forward
    pass of ``batch`` examples of ``seq_len`` tokens; ``"prefill"`` (causal LMs): ``batch`` prompts of
    ``seq_len`` tokens from an empty key/value cache, to the first token; ``"decode"`` (causal LMs): one
    decoding step of ``batch`` sequences with ``seq_len`` tokens already in the cache (ms per token).
    Files written before tables had a phase load as ``"forward"``.
    """

    PHASES = ("forward", "prefill", "decode")

    backend: str
    batch: int
    seq_len: int
    threads: int
    model: dict
    base_ms: float
    attn_ms: tuple[float, ...]
    ffn_widths: tuple[int, ...]
    ffn_ms: tuple[float, ...]
    machine: dict
    phase: str = "forward"

    def __post_init__(self) -> None:
        if self.phase not in self.PHASES:
            raise ValueError(f"latency table phase {self.phase!r} is not one of {self.PHASES}")

    @staticmethod
    def signature(structure: ModelStructure) -> dict:
        """What a table records of the model it was measured for."""
        return {"arch": structure.arch, "layers": structure.num_layers, "heads": structure.max_heads,
                "ffn": structure.max_ffn, "hidden": structure.hidden_size}

    def check(self, structure: ModelStructure) -> None:
        """Raise ``ValueError`` when the table was measured for a model of another shape."""
        if self.model != self.signature(structure):
            raise ValueError(f"the latency table was measured for {self.model}, not for this model "
                             f"({self.signature(structure)}); measure a table for this model "
                             "(structprune latency-table)")

    def attention(self, heads: int) -> float:
        return self.attn_ms[heads] + TIE_MS * heads

    def ffn(self, width: int) -> float:
        widths, values = self.ffn_widths, self.ffn_ms
        if not 0 <= width <= widths[-1]:
            raise ValueError(f"FFN width {width} is outside the table's range 0..{widths[-1]}")
        j = min(max(bisect.bisect_right(widths, width) - 1, 0), len(widths) - 2)
        frac = (width - widths[j]) / (widths[j + 1] - widths[j])
        return values[j] + frac * (values[j + 1] - values[j]) + TIE_MS * width

    def layer(self, heads: int, width: int) -> float:
        """Predicted latency of one layer with ``heads`` heads and ``width`` FFN neurons."""
        return self.attention(heads) + self.ffn(width)

    def estimate(self, structure: ModelStructure) -> float:
        """Predicted latency (ms) of a (pruned) structure of the table's model."""
        return self.base_ms + sum(self.layer(layer.heads, layer.ffn) for layer in structure.layers)

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({"format_version": LATENCY_FORMAT_VERSION, **asdict(self)}, indent=2))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> LatencyTable:
        """Read a table file (cached per path and modification time, so a re-measured file is read again)."""
        path = Path(path).resolve()
        return _load_table(str(path), path.stat().st_mtime_ns if path.is_file() else None)


@lru_cache(maxsize=8)
def _load_table(path: str, mtime: int | None) -> LatencyTable:
    try:
        info = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"latency table {path} does not exist; measure one first "
                         "(structprune.latency.measure_table or `structprune latency-table`)") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"latency table {path} is not valid JSON ({err}); measure it again") from None
    if not isinstance(info, dict) or info.pop("format_version", None) != LATENCY_FORMAT_VERSION:
        raise ValueError(f"{path} is not a structprune latency table (format {LATENCY_FORMAT_VERSION})")
    try:
        for key in ("attn_ms", "ffn_widths", "ffn_ms"):
            info[key] = tuple(float(v) if key != "ffn_widths" else int(v) for v in info[key])
        return LatencyTable(**info)  # no "phase" (files written before it): "forward"; another value: refused
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"latency table {path} is damaged ({err}); measure it again") from None


class CostModel:
    """The cost of structures of one model in one unit: parameters, FLOPs at ``seq_len``, or the latency a
    measured :class:`LatencyTable` predicts (``latency_table``: its file)."""

    def __init__(self, structure: ModelStructure, spec: dict, kind: str = "params", seq_len: int = 128,
                 latency_table: str | os.PathLike | None = None):
        if kind not in KINDS:
            raise ValueError(f"cost kind {kind!r} is not one of {KINDS}")
        self.structure, self.spec, self.kind, self.seq_len = structure, spec, kind, seq_len
        self.table = None
        if kind == "latency":
            self.table = LatencyTable.load(latency_table)
            self.table.check(structure)
        self.total = self.of(structure)

    def of(self, structure: ModelStructure) -> float:
        """The cost of ``structure`` (a pruned form of the model)."""
        if self.table is not None:
            return self.table.estimate(structure)
        if self.kind == "params":
            return count_params(structure, self.spec)
        return count_flops(structure, self.spec, self.seq_len)

    def layer(self, heads: int, kv_heads: int, ffn: int) -> float:
        """The cost of one layer of these counts (terms outside layers cancel in every difference taken)."""
        one = LayerStructure(heads, kv_heads, None, ffn)
        return self.of(dataclasses.replace(self.structure, layers=(one,)))

    def reduction(self, structure: ModelStructure) -> float:
        """The fraction of the model's cost that ``structure`` removes."""
        return 1.0 - self.of(structure) / self.total
