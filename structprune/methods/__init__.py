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
from collections.abc import Callable
from importlib import import_module

METHODS: dict[str, str] = {
    "attribution": "structprune.methods.attribution",
    "fisher": "structprune.methods.fisher",
    "head_importance": "structprune.methods.head_importance",
    "l0": "structprune.methods.l0",
    "magnitude": "structprune.methods.magnitude",
    "taylor": "structprune.methods.taylor",
    "transfer": "structprune.methods.transfer",
}
"""Every pruning method by name: the module whose ``prune`` implements it."""


def list_methods() -> list[str]:
    return sorted(METHODS)


def get_method(name: str) -> Callable:
    """The ``prune`` function of method ``name``, or a ``ValueError`` listing the methods."""
    if name not in METHODS:
        close = difflib.get_close_matches(name, list(METHODS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown pruning method {name!r}.{hint} Available methods: {', '.join(list_methods())}")
    return import_module(METHODS[name]).prune
