"""Transfer learning for structured pruning: ``l0`` helped by auxiliary tasks under limited target data.

:func:`prune` is the ``transfer`` method (:mod:`~structprune.transfer.method`); :func:`transfer_search` chooses
its settings for one target by a budgeted sweep (:mod:`~structprune.transfer.search`). The auxiliary sources are
in :mod:`~structprune.transfer.sources`, the couplings in :mod:`~structprune.transfer.joint`,
:mod:`~structprune.transfer.separate_masks`, :mod:`~structprune.transfer.sequential` and
:mod:`~structprune.transfer.intermediate`, the cosine guard in :mod:`~structprune.transfer.guard`.

The names below load on first use, so importing :mod:`structprune.transfer.config` imports no torch.
"""

from structprune.lazy import exports

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


__getattr__, __dir__ = exports("structprune.transfer", _EXPORTS)
