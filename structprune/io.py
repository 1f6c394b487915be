"""Atomic file and folder writes: nothing is ever left half-written on disk, no temporary outlives a run, and
``--overwrite`` replaces only what structprune wrote.

Temporaries sit beside their target as ``.<name>.<random>.tmp`` (or ``.old``); a run writing the same target
removes those a killed run left behind before it starts. Every folder :func:`atomic_dir` writes holds the
marker :data:`MARKER`; an existing folder is replaced only when it holds it (or is empty), and never when it is
the working directory, one of its parents, the home folder, a filesystem root or a folder holding an input.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

MARKER = ".structprune-output"
"""The file in every folder structprune writes, so that ``--overwrite`` knows the folder is its own."""


class OutputExistsError(FileExistsError):
    """The output folder already holds something and overwriting was not asked for, or is not allowed."""


def remove_stale_temporaries(path: Path) -> None:
    """Remove the temporaries a killed run left beside ``path`` (``.<name>.*.tmp`` / ``.old``)."""
    if not path.parent.is_dir():
        return
    for stale in path.parent.glob(f".{glob_escape(path.name)}.*"):
        if stale.suffix in (".tmp", ".old"):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    stale.unlink()


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


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
    remove_stale_temporaries(path)
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


def _protected(directory: Path) -> str | None:
    """Why ``directory`` may never be replaced, or ``None``."""
    resolved, cwd = directory.resolve(), Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        return "it is the current folder or one of its parents"
    if resolved == Path.home().resolve():
        return "it is the home folder"
    if resolved == Path(resolved.anchor):
        return "it is a filesystem root"
    return None


def check_output_dir(directory: str | os.PathLike, overwrite: bool,
                     inputs: tuple[str | os.PathLike, ...] = ()) -> Path:
    """Refuse an output folder that holds something, unless ``overwrite`` and the folder is structprune's own
    (:data:`MARKER`), is no protected folder and holds none of ``inputs``; return it as a Path."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise OutputExistsError(f"{directory} exists and is not a folder; choose another output path")
    if not directory.is_dir() or not any(directory.iterdir()):
        return directory
    if not overwrite:
        raise OutputExistsError(
            f"{directory} already exists and is not empty; choose another folder or pass "
            "overwrite=True (--overwrite on the command line) to replace it"
        )
    reason = _protected(directory)
    if reason is None and not (directory / MARKER).is_file():
        reason = "structprune did not write it (it has no " + MARKER + " file)"
    for item in inputs:
        if reason is None and Path(item).exists() and (
                Path(item).resolve() == directory.resolve() or directory.resolve() in Path(item).resolve().parents):
            reason = f"it holds an input of this run ({item})"
    if reason is not None:
        raise OutputExistsError(f"refusing to replace {directory}: {reason}; choose another output folder, or "
                                "delete it yourself")
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
    remove_stale_temporaries(directory)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.", suffix=".tmp"))
    os.chmod(tmp, _umask_mode(0o777))
    try:
        yield tmp
        if marker is not None and not (tmp / marker).exists():
            raise RuntimeError(f"internal error: {marker} was not written to {directory}")
        (tmp / MARKER).write_text("written by structprune; `--overwrite` may replace this folder\n")
        for file in tmp.rglob("*"):  # the mode a plain write gives; safetensors and mkstemp create 0600
            if file.is_file() and not file.is_symlink():
                os.chmod(file, _umask_mode(0o666))
        _swap(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap(tmp: Path, directory: Path) -> None:
    """Put the finished ``tmp`` in ``directory``'s place (the old content goes only once the new is in place)."""
    old = None
    try:
        if directory.exists():
            old = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.", suffix=".old"))
            os.replace(directory, old / "content")
        os.replace(tmp, directory)
    except OSError as err:
        if old is not None and (old / "content").exists() and not directory.exists():
            os.replace(old / "content", directory)
        raise OSError(f"cannot replace {directory}: {err.strerror or err}; check that its folder "
                      f"{directory.parent} is writable") from None
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
