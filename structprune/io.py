"""Atomic file and folder writes: nothing is ever left half-written on disk."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


class OutputExistsError(FileExistsError):
    """The output folder already holds something and overwriting was not asked for."""


def _umask_mode(mode: int) -> int:
    """``mode`` as the process umask would leave it (mkstemp / mkdtemp create private 0600 / 0700)."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it into place."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for a writer (e.g. ``torch.save``); on success it is
    synced and renamed onto ``path``, on error removed, so ``path`` is never half-written."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode(0o666))  # after the writer: some (safetensors) recreate the file as 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def check_output_dir(directory: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse a non-empty output folder unless ``overwrite``; return it as a Path."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise OutputExistsError(f"{directory} exists and is not a folder; choose another output path")
    if directory.is_dir() and any(directory.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"{directory} already exists and is not empty; choose another folder or pass "
            "overwrite=True (--overwrite on the command line) to replace it"
        )
    return directory


@contextlib.contextmanager
def atomic_dir(directory: str | os.PathLike, overwrite: bool = False, marker: str | None = None) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``directory`` in one rename.

    The folder is checked before any work starts (see :func:`check_output_dir`). On error the
    temporary folder is removed and ``directory`` is left as it was. ``marker`` is a file the
    caller must have written, checked before the swap.
    """
    directory = check_output_dir(directory, overwrite).absolute()
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.", suffix=".tmp"))
    os.chmod(tmp, _umask_mode(0o777))
    try:
        yield tmp
        if marker is not None and not (tmp / marker).exists():
            raise RuntimeError(f"internal error: {marker} was not written to {directory}")
        for file in tmp.rglob("*"):  # the mode a plain write gives; safetensors and mkstemp create 0600
            if file.is_file() and not file.is_symlink():
                os.chmod(file, _umask_mode(0o666))
        if directory.exists():
            old = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.", suffix=".old"))
            os.replace(directory, old / "content")
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
