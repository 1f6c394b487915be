"""Pruning methods behind one registry and one signature.

Every method is a function ``prune(model, task_data, budget, **options) ->``
:class:`~structprune.methods.result.PruneResult`:

* ``model``: a Hugging Face classification model of a supported architecture, a full-size
  structprune model, or a :class:`~structprune.masked_model.MaskedModel`;
* ``task_data``: encoded task tensors from :func:`structprune.data.encode` (``input_ids``,
  ``attention_mask``, ``labels``...); methods that need no data accept ``None``;
* ``budget``: a :class:`~structprune.budget.Budget` (or a float, read as a parameter sparsity).

Scoring methods give every head and FFN neuron an importance and hand it to the one budgeted
selection (:mod:`structprune.methods.selection`) and result builder (:mod:`structprune.methods.result`).
Learned methods (``l0``, ``transfer``) train hard-concrete gates instead. Method modules load on
first use.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import import_module


@dataclass(frozen=True)
class Method:
    """A registry entry: where the method lives and what it declares about itself (all by name, so reading
    the registry imports nothing)."""

    module: str
    """Module whose ``prune(model, task_data, budget, **options)`` implements the method."""
    summary: str
    options: str
    """``module:attribute`` of its ``keyword -> Option`` mapping (:mod:`structprune.methods.options`)."""
    learned: bool = False
    """Trains weights (the result carries them): it takes ``teacher`` and ``checkpoint_dir``, and its output is
    the whole pipeline (:mod:`structprune.pipeline`), not a masks folder alone."""
    inputs: str | None = None
    """``module:attribute`` of a function building extra inputs from the user's data (e.g. auxiliary tasks)."""
    settings: str | None = None
    """``module:attribute`` of a function that checks the options together (builds the method's config), so
    that bad settings fail before any work."""
    streams: bool = False
    """Scores a model streamed from its files, one layer resident at a time (:mod:`structprune.streaming`)."""


def _resolve(reference: str):
    module, attribute = reference.split(":")
    return getattr(import_module(module), attribute)


_OPTIONS = "structprune.methods.options:"

METHODS: Mapping[str, Method] = {
    "block_influence": Method("structprune.methods.block_influence", "remove layers or sublayers of least block "
                              "influence, ShortGPT (training-free, forward passes only)", _OPTIONS + "BLOCK_INFLUENCE",
                              streams=True),
    "attribution": Method("structprune.methods.attribution", "integrated-gradients attribution of gates "
                          "(training-free)", _OPTIONS + "ATTRIBUTION"),
    "fisher": Method("structprune.methods.fisher", "Fisher mask search and mask tuning, Kwon et al. 2022 "
                     "(training-free)", _OPTIONS + "FISHER"),
    "expert": Method("structprune.methods.expert", "customised expert: units relevant to language, domain and task "
                     "corpora by output change, Cus-Prun (training-free, forward passes only)", _OPTIONS + "EXPERT",
                     inputs="structprune.methods.expert:expert_inputs",
                     settings="structprune.methods.expert:check_options", streams=True),
    "flap": Method("structprune.methods.flap", "fluctuation of output-projection inputs with bias compensation, FLAP "
                   "(training-free, forward passes only)", _OPTIONS + "FLAP", streams=True),
    "head_importance": Method("structprune.methods.head_importance", "iterative head importance, Michel et al. "
                              "2019 (training-free)", _OPTIONS + "HEAD_IMPORTANCE"),
    "l0": Method("structprune.methods.l0", "learned hard-concrete masks with distillation, CoFiPruning",
                 _OPTIONS + "L0", learned=True, settings=_OPTIONS + "l0_settings"),
    "magnitude": Method("structprune.methods.magnitude", "weight magnitude (no data)", _OPTIONS + "MAGNITUDE"),
    "sprint": Method("structprune.methods.sprint", "remove whole sublayers by measured latency and tunability, "
                     "tuning the rest briefly after each removal, SPRINT (causal LMs; returns tuned weights)",
                     _OPTIONS + "SPRINT"),
    "taylor": Method("structprune.methods.taylor", "first-order Taylor importance", _OPTIONS + "TAYLOR"),
    "transfer": Method("structprune.transfer", "l0 helped by auxiliary tasks under limited data",
                       "structprune.transfer.config:OPTIONS", learned=True,
                       inputs="structprune.transfer.sources:method_inputs",
                       settings="structprune.transfer.config:check_options"),
}
"""Every pruning method by name."""


def list_methods() -> list[str]:
    return sorted(METHODS)


def method(name: str) -> Method:
    """The registry entry of ``name``, or a ``ValueError`` listing the methods."""
    if name not in METHODS:
        close = difflib.get_close_matches(name, list(METHODS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown pruning method {name!r}.{hint} Available methods: {', '.join(list_methods())}")
    return METHODS[name]


def get_method(name: str) -> Callable:
    """The ``prune`` function of method ``name``."""
    return import_module(method(name).module).prune


def method_options(name: str) -> Mapping:
    """``keyword -> Option`` of method ``name``: the settings a user can give it (imports no torch)."""
    return _resolve(method(name).options)


def check_settings(name: str, options: Mapping[str, object]) -> None:
    """Raise ``ValueError`` when method ``name``'s options do not fit together (before any work)."""
    entry = method(name)
    if entry.settings is not None:
        _resolve(entry.settings)(options)


def is_learned(name: str) -> bool:
    return method(name).learned


def inputs_builder(name: str) -> Callable | None:
    """The function building method ``name``'s extra inputs from the user's data, if it has one."""
    entry = method(name)
    return None if entry.inputs is None else _resolve(entry.inputs)
