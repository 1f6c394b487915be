"""The VADER corpora: four human-rated sentiment corpora obtained from PyPI.

They ship inside the source distribution of ``vaderSentiment==3.3.2`` (MIT licence; Hutto &
Gilbert, ICWSM 2014), so a demo runs on a machine that lacks the benchmark folder.
:func:`fetch_vader` downloads, checks (sha256) and caches them; :func:`vader_rows` reads one part
of the seeded split of a corpus (``load_vader`` and the ``vader-*`` tasks build on it).
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

from structprune.data.readers import read_lines
from structprune.data.splits import carve
from structprune.data.tasks import Row, float_label

CACHE_ENV = "STRUCTPRUNE_CACHE"

VADER_REQUIREMENT = "vaderSentiment==3.3.2"
VADER_SDIST = "vaderSentiment-3.3.2.tar.gz"
VADER_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
VADER_THRESHOLD = 0.5
"""Default polarity threshold: mean rating > +0.5 is positive, < -0.5 negative, the rest dropped."""
VADER_FILES: Mapping[str, str] = MappingProxyType(
    {
        "tweets": "tweets_GroundTruth.txt",
        "movies": "movieReviewSnippets_GroundTruth.txt",
        "amazon": "amazonReviewSnippets_GroundTruth.txt",
        "nyt": "nytEditorialSnippets_GroundTruth.txt",
    }
)
VADER_SOURCE = f"PyPI sdist {VADER_REQUIREMENT} (hutto_ICWSM_2014), cached by fetch_vader()"
_VADER_INNER_ARCHIVE = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
_VADER_INNER_FOLDER = "hutto_ICWSM_2014"


class VaderDownloadError(RuntimeError):
    """pip could not download the vaderSentiment source archive (no network or no index)."""


def vader_cache_dir() -> Path:
    """``$STRUCTPRUNE_CACHE/vader``, or ``~/.cache/structprune/vader`` when that is unset."""
    root = os.environ.get(CACHE_ENV)
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "structprune") / "vader"


def fetch_vader(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    archive: str | os.PathLike[str] | None = None,
) -> Path:
    """The folder holding the four VADER ``*_GroundTruth.txt`` corpora, downloading them if needed.

    If ``cache_dir`` (default :func:`vader_cache_dir`) already holds the four files, nothing is
    downloaded. Otherwise ``pip download`` fetches the archive (or ``archive`` names a copy of it,
    for machines without network), its sha256 must equal :data:`VADER_SHA256`, and the four files
    are extracted into a temporary folder beside ``cache_dir`` that is then renamed into place, so
    the cache is never half-written.

    Raises :class:`VaderDownloadError` when pip fails and ``ValueError`` on a checksum mismatch
    (nothing is cached then).
    """
    target = Path(cache_dir).expanduser() if cache_dir is not None else vader_cache_dir()
    if all((target / name).is_file() for name in VADER_FILES.values()):
        return target
    with tempfile.TemporaryDirectory(prefix="structprune-vader-") as tmp:
        sdist = Path(archive) if archive is not None else pip_download(Path(tmp))
        _check_sha256(sdist)
        _install_vader(sdist, target)
    return target


def pip_download(dest: Path) -> Path:
    """Download the vaderSentiment sdist into ``dest`` with pip; the archive's path."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        "--disable-pip-version-check",
        VADER_REQUIREMENT,
        "-d",
        str(dest),
    ]
    advice = (
        f"Check access to the package index, or download {VADER_SDIST} elsewhere and call "
        "fetch_vader(archive=<path>)."
    )
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    except subprocess.TimeoutExpired:
        raise VaderDownloadError(f"`{' '.join(cmd)}` took over 600 s. {advice}") from None
    if proc.returncode != 0:
        raise VaderDownloadError(
            f"`{' '.join(cmd)}` failed (exit {proc.returncode}): "
            f"{proc.stderr.strip()[-2000:]}\n{advice}"
        )
    sdist = dest / VADER_SDIST
    if not sdist.is_file():
        found = sorted(p.name for p in dest.iterdir())
        raise VaderDownloadError(
            f"pip succeeded but did not save {VADER_SDIST} (found {found}). {advice}"
        )
    return sdist


def _check_sha256(path: Path) -> None:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != VADER_SHA256:
        raise ValueError(
            f"{path} has sha256 {digest.hexdigest()}, expected {VADER_SHA256}: it is not the "
            f"published {VADER_SDIST} (corrupt or altered). Nothing was cached; download it again."
        )


def _member_bytes(archive: tarfile.TarFile, name: str) -> bytes:
    member = archive.extractfile(name)
    if member is None:
        raise ValueError(f"{name} in {archive.name} is not a regular file")
    return member.read()


def _install_vader(sdist: Path, target: Path) -> None:
    """Extract the four corpora from ``sdist`` into ``target`` via a temporary sibling folder."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-partial-", dir=target.parent))
    try:
        with tarfile.open(sdist, "r:gz") as outer:
            inner_bytes = _member_bytes(outer, _VADER_INNER_ARCHIVE)
        with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
            for name in VADER_FILES.values():
                (staging / name).write_bytes(_member_bytes(inner, f"{_VADER_INNER_FOLDER}/{name}"))
        if not target.exists():
            try:
                staging.rename(target)
                return
            except OSError:  # another process created it meanwhile: fall through to file moves
                pass
        target.mkdir(exist_ok=True)
        for path in staging.iterdir():
            os.replace(path, target / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def vader_rows(
    folder: Path, corpus: str, part: str, threshold: float, regression: bool
) -> list[Row]:
    """One part of a VADER corpus: ratings as labels, or 0/1 polarity with near-zero rows dropped.

    The seeded split is made on all rows before thresholding, so a sentence stays in the same part
    whatever the threshold and in both the polarity and the regression variant.
    """
    path = folder / VADER_FILES[corpus]
    pool = []
    for i, line in enumerate(read_lines(path), 1):
        fields = line.split("\t")
        if len(fields) != 3:
            raise ValueError(
                f"{path}:{i}: expected id<TAB>rating<TAB>text, found {len(fields)} fields; delete "
                f"{folder} to fetch the corpus again"
            )
        pool.append(Row(fields[2].strip(), None, fields[1].strip(), f"{path}:{i}"))
    rows = carve(pool, ("dev", "test"))[part]
    if regression:
        return rows
    return [
        row._replace(label="1" if float_label(row) > 0 else "0")
        for row in rows
        if abs(float_label(row)) > threshold
    ]
