"""``expert``: prune a general LLM into a customised expert (Cus-Prun, Zhao et al., ACL Findings 2025).

An expert is placed along up to three dimensions, ``language``, ``domain`` and ``task``, each described by a
calibration corpus (``corpora``). Units are kept by how much the layer output changes, on the expert's corpora, when
they are removed and replaced by their mean output (the bias compensation of :mod:`structprune.methods.flap`):
per corpus, that change is FLAP's fluctuation score (the variance of what a unit feeds its output projection times
the squared norm of its weights, standardised within each layer and kind; forward passes only, one layer at a time),
and a unit's expert score is its mean over the expert's corpora (``combine="max"``: the largest, keeping what any one
dimension needs). Units go lowest score first, across layers and kinds, until the budget is met; the removed units'
mean outputs over the expert's corpora become output biases (``compensate``). No post-training.

Cus-Prun scores a unit by its uncompensated output change, ``||W_o[:, h] x_h||^2`` for a head and
``||W_down[:, j]||^2 x_j^2`` for a neuron, summed over the corpus. That is what the report measures; as the ranking it
lost to the compensated score on SmolLM2 (BENCHMARKS.md, "Customised experts").

``task_data`` is the reference text (e.g. general text): without ``corpora`` the units are scored on it alone, which
is ``flap`` (the general-calibration baseline at the same budget); with them it only enters the relevance report.

The report (``relevance`` in the log and the masks' metadata) says which units serve which corpus: per corpus and
layer, the heads and neurons whose output change there (a share of the layer's total over heads and neurons, exact
per head) is at least :data:`SPECIFIC` times their mean share on the other corpora (the reference included).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from transformers import PreTrainedModel

from structprune.budget import Budget, as_budget
from structprune.masked_model import MaskedModel
from structprune.methods.calibration import calibration_batches
from structprune.methods.channel_stats import (
    LayerStats,
    channel_stats,
    merged,
    neuron_change,
)
from structprune.methods.flap import bias_reserve, check_refit, compensated, flap_scores
from structprune.methods.result import PruneResult, prune_by_importance
from structprune.methods.selection import DEFAULT_TOLERANCE
from structprune.methods.setup import PruningInputs, dense_model
from structprune.modeling_structprune import StructprunePreTrainedModel

DIMENSIONS = ("language", "domain", "task")
COMBINE = ("mean", "max")
REFERENCE = "reference"
"""The report's name for ``task_data``."""
SPECIFIC = 2.0
"""A unit is specific to a corpus when its relevance there is at least this many times its mean elsewhere."""

Tensors = Mapping[str, torch.Tensor]


def relevance(model: StructprunePreTrainedModel, stats: list[LayerStats]) -> dict[str, torch.Tensor]:
    """``head [L, H]`` and ``neuron [L, F]``: the output change when the unit is removed, as a share of its layer's
    total over all heads and neurons."""
    L = len(model.layers)
    head = torch.zeros(L, max((layer.attn.heads for layer in model.layers if layer.attn), default=0),
                       dtype=torch.float64)
    neuron = torch.zeros(L, max((layer.ffn.down.in_features for layer in model.layers if layer.ffn), default=0),
                         dtype=torch.float64)
    for i, (layer, layer_stats) in enumerate(zip(model.layers, stats)):
        if layer.attn is not None:
            head[i, :layer.attn.heads] = layer_stats.head_change
        if layer.ffn is not None:
            neuron[i, :layer.ffn.down.in_features] = neuron_change(layer_stats)
    total = (head.sum(1) + neuron.sum(1)).clamp_min(1e-30)[:, None]
    return {"head": head / total, "neuron": neuron / total}


def combined(scores: Mapping[str, Tensors], how: str) -> dict[str, torch.Tensor]:
    """The expert score of each unit over the corpora's relevances."""
    stack = {kind: torch.stack([s[kind] for s in scores.values()]) for kind in ("head", "neuron")}
    return {kind: s.mean(0) if how == "mean" else s.amax(0) for kind, s in stack.items()}


def relevance_report(scores: Mapping[str, Tensors]) -> dict[str, dict]:
    """Per corpus: how many heads / neurons of each layer are specific to it (see :data:`SPECIFIC`), and the
    five most specific units as ``[layer, index, ratio]``."""
    report = {}
    for name, own in scores.items():
        others = [s for other, s in scores.items() if other != name]
        if not others:
            continue
        entry = {}
        for kind in ("head", "neuron"):
            ratio = own[kind] / torch.stack([s[kind] for s in others]).mean(0).clamp_min(1e-12)
            specific = ratio >= SPECIFIC
            top = torch.topk(ratio.flatten(), min(5, ratio.numel()))
            width = ratio.shape[1]
            entry[kind] = {"specific_per_layer": specific.sum(1).tolist(), "specific": int(specific.sum()),
                           "top": [[int(k) // width, int(k) % width, round(float(v), 3)]
                                   for k, v in zip(top.indices, top.values)]}
        report[name] = entry
    return report


def prune(model: PreTrainedModel | MaskedModel, task_data: Tensors | None, budget: Budget | float, *,
          corpora: Mapping[str, Tensors] | None = None, combine: str = "mean", compensate: bool = True,
          refit: bool = False,
          batch_size: int = 8, max_examples: int | None = 128, seed: int = 0, min_heads: int = 1,
          min_neurons: int = 1, tolerance: float = DEFAULT_TOLERANCE, multiple_of: int = 1,
          device: torch.device | str | None = None, progress: bool = False) -> PruneResult:
    """Masks keeping the heads and neurons the expert's corpora need (see the module doc).

    Args:
        model: a causal LM (or classifier) of a supported architecture, a full-size structprune model or a MaskedModel.
        task_data: the reference text's encoded windows (``input_ids``, ``attention_mask``); may be ``None`` when
            ``corpora`` are given.
        budget: parameters, FLOPs or latency to remove (a float: parameters).
        corpora: ``name -> encoded windows`` of each expert dimension (e.g. ``{"language=xquad-de": ...}``).
        combine: ``mean`` or ``max`` of the corpora's scores; compensate: replace removed units by their mean
            output over the expert's corpora (output shifts, biases once compacted).
        refit: compensate by the least-squares refit of :mod:`~structprune.methods.refit` on the expert's corpora
            (the result carries the full-size model's weights).
        batch_size, max_examples, seed: the calibration batches of each corpus.
        min_heads, min_neurons, tolerance, multiple_of: the selection's (:func:`~structprune.methods.selection.select_units`).
        device: run each layer there in turn (the model may stay on the CPU).
        progress: accepted for the methods' common signature.
    """
    if combine not in COMBINE:
        raise ValueError(f"expert: combine {combine!r} is not one of {COMBINE}")
    texts = dict(corpora or {})
    reference = task_data is not None and len(task_data.get("input_ids", ())) > 0
    if not texts and not reference:
        raise ValueError("expert needs calibration text: corpora for the expert's dimensions, or task_data")
    for name, data in texts.items():
        if len(data.get("input_ids", ())) == 0:
            raise ValueError(f"expert: corpus {name!r} has no examples")
    budget, full = as_budget(budget), dense_model(model)
    check_refit("expert", refit, compensate, full)
    found: dict[str, list[LayerStats]] = {}  # per corpus
    expert: list[list[LayerStats]] = []  # the expert corpora's together: the means compensation restores

    def importance(inputs: PruningInputs) -> tuple[dict[str, torch.Tensor], dict]:
        inputs.full.eval()
        for name, data in (texts | ({REFERENCE: task_data} if reference else {})).items():
            batches = calibration_batches({k: v for k, v in data.items() if k in ("input_ids", "attention_mask")},
                                          batch_size, max_examples, seed)
            gram = refit and (name != REFERENCE or not texts)  # the refit reads the expert's corpora
            found[name] = channel_stats(inputs.full, batches, device, gram=gram)
        scoring = [name for name in found if name != REFERENCE] or [REFERENCE]
        expert.append(merged([found[name] for name in scoring]))
        shares = {name: relevance(inputs.full, stats) for name, stats in found.items()}
        scores = {name: flap_scores(inputs.full, found[name], "fluctuation") for name in scoring}
        return combined(scores, combine), {"relevance": relevance_report(shares), "corpora": scoring}

    options = {"combine": combine, "compensate": compensate, "refit": refit, "corpora": sorted(texts),
               "batch_size": batch_size, "max_examples": max_examples, "seed": seed, "min_heads": min_heads,
               "min_neurons": min_neurons, "tolerance": tolerance, "multiple_of": multiple_of}

    def refine(inputs: PruningInputs, result: PruneResult) -> None:
        if compensate:
            compensated("expert", inputs, result, expert[0], budget, options)
        result.masks.meta["relevance"] = result.log["relevance"]

    return prune_by_importance("expert", full, bias_reserve(budget, full) if compensate else budget, importance,
                               options, refine, per_cost=False)


def parse_expert(spec: str) -> list[tuple[str, str]]:
    """``"language=xquad-de,domain=pubmed"`` -> ``[("language", "xquad-de"), ("domain", "pubmed")]``."""
    pairs = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        dimension, _, source = part.partition("=")
        if dimension.strip() not in DIMENSIONS or not source.strip():
            raise ValueError(f"--expert takes DIMENSION=SOURCE pairs separated by commas, with DIMENSION one of "
                             f"{', '.join(DIMENSIONS)}; got {part!r} (e.g. language=xquad-de,domain=pubmed,task=sst2)")
        pairs.append((dimension.strip(), source.strip()))
    if len({d for d, _ in pairs}) != len(pairs):
        raise ValueError(f"--expert names a dimension twice: {spec!r}")
    return pairs


def corpus_text(source: str, data_dir=None) -> str:
    """The calibration text of ``source``: a language-model task's calibration split (``text:FILE``: the file), or
    the training sentences of a classification task, one example per paragraph."""
    from structprune.data import load_task
    from structprune.data.lm import LM_TASKS, TEXT_PREFIX, get_lm_task, load_text

    if source.startswith(TEXT_PREFIX) or source.lower() in LM_TASKS:
        task = get_lm_task(source)
        if task.kind != "perplexity" or (task.calibration is None and not source.startswith(TEXT_PREFIX)):
            usable = [name for name, t in LM_TASKS.items() if t.calibration]
            raise ValueError(f"--expert source {source!r} has no calibration text; use one of {', '.join(usable)}, "
                             "text:FILE or a classification task")
        return load_text(source, task.calibration, data_dir=data_dir)
    data = load_task(source, "train", data_dir=data_dir)
    pairs = zip(data.text_a, data.text_b) if data.text_b is not None else ((a,) for a in data.text_a)
    return "\n\n".join(" ".join(texts) for texts in pairs)


def expert_inputs(options: Mapping[str, object], train, target_eval, tokenizer, *, max_length: int = 128,
                  data_dir=None, **_) -> tuple[dict, dict, dict]:
    """The registry's inputs builder: ``expert`` (the ``--expert`` string) loaded into ``corpora`` (windows of
    ``max_length`` tokens, as many as ``max_examples``, drawn with ``seed``)."""
    from structprune.likelihood import text_windows

    options = dict(options)
    spec = options.pop("expert", None)
    if not spec:
        return options, {}, {}
    count, seed = options.get("max_examples") or 128, options.get("seed", 0)
    corpora = {f"{dimension}={source}": text_windows(tokenizer, corpus_text(source, data_dir), max_length, count, seed)
               for dimension, source in parse_expert(spec)}
    sizes = {name: len(data["input_ids"]) for name, data in corpora.items()}
    used = "; ".join(f"{name}: {n} windows of {max_length} tokens" for name, n in sizes.items())
    return options | {"corpora": corpora}, {"expert": used}, {"expert_windows": sizes}


def check_options(options: Mapping[str, object]) -> None:
    """The registry's settings check: a malformed ``--expert`` fails before any loading."""
    if options.get("expert"):
        parse_expert(str(options["expert"]))
