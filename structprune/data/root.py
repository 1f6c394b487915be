"""Locating the benchmark data folder.

The folder is not part of the package. It is, in this order: the ``data_dir`` argument, the
``STRUCTPRUNE_DATA_DIR`` environment variable, ``../shared/data`` relative to the current working
directory (the checkout one runs in). It holds one sub-folder per dataset (``SST-2/``, ``RTE/``,
...) laid out as that folder's README describes.
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "STRUCTPRUNE_DATA_DIR"


def default_data_dir() -> Path:
    """``../shared/data`` relative to the current working directory, as an absolute path."""
    return Path.cwd().parent / "shared" / "data"


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The benchmark data folder: ``data_dir``, else ``$STRUCTPRUNE_DATA_DIR``, else the default.

    Raises ``FileNotFoundError`` naming the folder, which of the three gave it, and the remedies.
    """
    env = os.environ.get(DATA_DIR_ENV)
    if data_dir is not None:
        candidate, origin = Path(data_dir), "the data_dir argument"
    elif env:
        candidate, origin = Path(env), f"the {DATA_DIR_ENV} environment variable"
    else:
        candidate = default_data_dir()
        origin = "the default, ../shared/data relative to the current working directory"
    candidate = candidate.expanduser()
    if candidate.is_dir():
        return candidate
    raise FileNotFoundError(
        f"task data folder {candidate} (from {origin}) does not exist. It is looked up in this "
        f"order: 1) the data_dir argument, 2) the {DATA_DIR_ENV} environment variable, "
        f"3) ../shared/data relative to the current working directory ({default_data_dir()}). "
        f"Pass data_dir (--data-dir), set {DATA_DIR_ENV}, or run from a checkout that has "
        "../shared/data beside it; the folder holds SST-2/, RTE/, ... (see its README)."
    )
