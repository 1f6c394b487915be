"""Tests of structprune.data.root: where the benchmark data folder is looked up.

Order: the data_dir argument, then $STRUCTPRUNE_DATA_DIR, then ../shared/data relative to the
current working directory. Every test sets the environment and the working directory through
monkeypatch, so nothing leaks into other tests.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from structprune.data import DATA_DIR_ENV, default_data_dir, load_task, resolve_data_dir
from tests.data.data_support import fake_data_dir


def test_data_dir_resolution_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    explicit = fake_data_dir(tmp_path / "explicit", ["sentence\tlabel", "good\t1", "bad\t0"])
    env = fake_data_dir(tmp_path / "env", ["sentence\tlabel", "fine\t1"])
    monkeypatch.setenv(DATA_DIR_ENV, str(env))
    assert len(load_task("sst2", data_dir=explicit)) == 2
    assert load_task("sst2").text_a == ["fine"]
    monkeypatch.delenv(DATA_DIR_ENV)
    checkout = tmp_path / "nowhere" / "checkout"  # its ../shared/data does not exist
    checkout.mkdir(parents=True)
    monkeypatch.chdir(checkout)
    assert default_data_dir() == Path.cwd().parent / "shared" / "data"
    assert default_data_dir().resolve() == (tmp_path / "nowhere" / "shared" / "data").resolve()
    with pytest.raises(FileNotFoundError) as err:
        load_task("sst2")
    message = str(err.value)
    assert "data_dir" in message and DATA_DIR_ENV in message and "nowhere" in message
    with pytest.raises(FileNotFoundError, match=r"missing.*data_dir argument"):
        load_task("sst2", data_dir=tmp_path / "missing")


def test_default_is_shared_data_beside_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    shared = fake_data_dir(tmp_path / "shared" / "data", ["sentence\tlabel", "from cwd\t1"])
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    monkeypatch.chdir(checkout)
    assert resolve_data_dir().resolve() == shared.resolve()
    assert load_task("sst2").text_a == ["from cwd"]
    env = fake_data_dir(tmp_path / "env", ["sentence\tlabel", "from env\t1"])
    monkeypatch.setenv(DATA_DIR_ENV, str(env))  # the environment variable beats the default
    assert resolve_data_dir() == env
    assert load_task("sst2").text_a == ["from env"]
    assert load_task("sst2", data_dir=shared).text_a == ["from cwd"]  # the argument beats both
    monkeypatch.chdir(tmp_path)  # the default moves with the working directory
    assert default_data_dir() == Path.cwd().parent / "shared" / "data"


def test_error_names_the_source_of_the_missing_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "gone"))
    with pytest.raises(FileNotFoundError, match=rf"gone \(from the {DATA_DIR_ENV} environment"):
        resolve_data_dir()
    monkeypatch.delenv(DATA_DIR_ENV)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    with pytest.raises(FileNotFoundError) as err:
        resolve_data_dir()
    message = str(err.value)
    assert "from the default, ../shared/data relative to the current working directory" in message
    assert str(default_data_dir()) in message
    assert "run from a checkout that has" in message and f"set {DATA_DIR_ENV}" in message
