"""Tests of structprune.data.vader and the vader-* tasks: fetching, checking and caching the
corpora, and their split and threshold.

The corpus is downloaded from PyPI once per test module into a temporary cache; the tests that
need it skip when pip cannot reach the package index.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from structprune.data import (
    CACHE_ENV,
    VADER_FILES,
    VADER_REQUIREMENT,
    VADER_SDIST,
    VaderDownloadError,
    fetch_vader,
    load_task,
    load_vader,
)
from structprune.data.vader import pip_download

VADER_ROWS = {"tweets": 4200, "movies": 10605, "amazon": 3708, "nyt": 5190}


@pytest.fixture(scope="module")
def vader_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("structprune-cache")
    try:
        fetch_vader(root / "vader")
    except VaderDownloadError as err:
        pytest.skip(f"cannot download {VADER_REQUIREMENT} from the package index: {err}")
    return root


@pytest.fixture
def vader_env(vader_root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point $STRUCTPRUNE_CACHE at the session's downloaded corpus and forbid further downloads."""
    monkeypatch.setenv(CACHE_ENV, str(vader_root))

    def no_network(*args, **kwargs):
        raise AssertionError("the cached corpus must not be downloaded again")

    monkeypatch.setattr(subprocess, "run", no_network)
    return vader_root


def test_fetch_vader_downloads_verifies_and_caches(vader_env: Path) -> None:
    folder = fetch_vader()
    assert folder == vader_env / "vader"
    assert sorted(p.name for p in folder.iterdir()) == sorted(VADER_FILES.values())
    assert not [p for p in vader_env.iterdir() if p.name.startswith(".")]  # no staging left
    raw = (folder / VADER_FILES["tweets"]).read_bytes()
    assert b"\r\n" in raw and not raw.endswith(b"\n")


@pytest.mark.parametrize("corpus", sorted(VADER_ROWS))
def test_vader_row_counts_and_threshold(vader_env: Path, corpus: str) -> None:
    splits = ("train", "dev", "test")
    rated = {split: load_task(f"vader-{corpus}-regression", split) for split in splits}
    assert sum(len(part) for part in rated.values()) == VADER_ROWS[corpus]
    for split, part in rated.items():
        assert all(-4 <= r <= 4 for r in part.labels)
        kept = [(t, r) for t, r in zip(part.text_a, part.labels, strict=True) if abs(r) > 0.5]
        polar = load_task(f"vader-{corpus}", split)
        assert polar.text_a == [t for t, _ in kept]  # same split, near-zero ratings dropped
        assert polar.labels == [int(r > 0) for _, r in kept]
    assert not set(rated["train"].text_a) & set(rated["test"].text_a)


def test_load_vader_threshold_and_subset(vader_env: Path) -> None:
    default = load_vader("tweets")
    strict = load_vader("tweets", threshold=2.0)
    assert len(strict) < len(default)
    assert set(strict.text_a) <= set(default.text_a)
    assert len(load_vader("amazon", "dev", train_size=100, seed=3)) == 100
    with pytest.raises(ValueError, match="threshold"):
        load_vader("tweets", threshold=5)
    with pytest.raises(ValueError, match="unknown VADER corpus 'imdb'"):
        load_vader("imdb")


def test_fetch_vader_rejects_a_wrong_archive(tmp_path: Path) -> None:
    fake = tmp_path / VADER_SDIST
    fake.write_bytes(b"not the real archive")
    target = tmp_path / "cache" / "vader"
    with pytest.raises(ValueError, match="sha256"):
        fetch_vader(target, archive=fake)
    assert not target.exists()
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_fetch_vader_reports_pip_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_pip(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and VADER_REQUIREMENT in cmd
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="No matching distribution")

    monkeypatch.setattr(subprocess, "run", failing_pip)
    with pytest.raises(VaderDownloadError, match=r"(?s)No matching distribution.*archive="):
        fetch_vader(tmp_path / "vader")
    assert not (tmp_path / "vader").exists()


def test_fetch_vader_installs_from_a_local_archive(vader_root: Path, tmp_path: Path) -> None:
    """A partly filled cache folder is completed by moving files in, not by replacing the folder."""
    target = tmp_path / "vader"
    target.mkdir()
    keep = target / "notes.txt"
    keep.write_text("user file")
    shutil.copy(vader_root / "vader" / VADER_FILES["nyt"], target)
    sdist = _download_sdist_or_skip(tmp_path)
    fetch_vader(target, archive=sdist)
    assert keep.read_text() == "user file"
    assert all((target / f).is_file() for f in VADER_FILES.values())


def _download_sdist_or_skip(tmp_path: Path) -> Path:
    """The real sdist, downloaded again (the session fixture keeps only the extracted files)."""
    try:
        return pip_download(tmp_path)
    except VaderDownloadError as err:
        pytest.skip(f"cannot download {VADER_REQUIREMENT}: {err}")
