"""Transfer learning for structured pruning: ``l0`` helped by auxiliary tasks under limited target data.

:func:`prune` is the ``transfer`` method (:mod:`~structprune.transfer.method`); :func:`transfer_search` chooses
its settings for one target by a budgeted sweep (:mod:`~structprune.transfer.search`). The auxiliary sources are
in :mod:`~structprune.transfer.sources`, the couplings in :mod:`~structprune.transfer.joint`,
:mod:`~structprune.transfer.separate_masks`, :mod:`~structprune.transfer.sequential` and
:mod:`~structprune.transfer.intermediate`, the cosine guard in :mod:`~structprune.transfer.guard`.

The names below load on first use, so importing :mod:`structprune.transfer.config` imports no torch.
"""

from importlib import import_module

_EXPORTS = {
    "COUPLINGS": "structprune.transfer.config",
    "GUARDS": "structprune.transfer.config",
    "SCHEDULES": "structprune.transfer.config",
    "TRANSFERS": "structprune.transfer.config",
    "TransferConfig": "structprune.transfer.config",
    "prune": "structprune.transfer.method",
    "SearchResult": "structprune.transfer.search",
    "transfer_search": "structprune.transfer.search",
    "MLM": "structprune.transfer.sources",
    "AuxData": "structprune.transfer.sources",
    "AuxSource": "structprune.transfer.sources",
    "is_file_source": "structprune.transfer.sources",
    "load_auxiliary": "structprune.transfer.sources",
    "parse_aux": "structprune.transfer.sources",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'structprune.transfer' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
