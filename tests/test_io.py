"""Atomic writes: the mode a plain write gives, no temporary outliving a killed run, and --overwrite replacing
only folders structprune wrote, never a protected folder or one holding an input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from structprune.io import MARKER, OutputExistsError, atomic_dir, atomic_file, check_output_dir


def _expected() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def test_atomic_dir_files_get_the_umask_mode_even_from_safetensors(tmp_path):
    out = tmp_path / "model"
    with atomic_dir(out, marker="info.json") as tmp:
        save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))  # safetensors creates 0600 files
        (tmp / "sub").mkdir()
        (tmp / "sub" / "info.txt").write_text("x")
        (tmp / "info.json").write_text("{}")
    for name in ("model.safetensors", "sub/info.txt", "info.json"):
        assert (out / name).stat().st_mode & 0o777 == _expected(), name


def test_atomic_file_gets_the_umask_mode_after_the_writer(tmp_path):
    path = tmp_path / "heads.safetensors"
    with atomic_file(path) as tmp:
        save_file({"w": torch.zeros(2)}, str(tmp))
    assert path.stat().st_mode & 0o777 == _expected()
    assert not list(tmp_path.glob(".*.tmp"))


def _own_folder(path):
    with atomic_dir(path) as tmp:
        (tmp / "a.txt").write_text("mine")
    return path


@pytest.mark.parametrize("where", [".", "..", "home", "root"])
def test_overwrite_never_replaces_the_current_folder_its_parents_home_or_root(tmp_path, monkeypatch, where):
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("user data")
    monkeypatch.chdir(work)
    home = tmp_path / "home"
    home.mkdir()
    (home / MARKER).write_text("")  # even if structprune had written it
    monkeypatch.setenv("HOME", str(home))
    target = {".": Path("."), "..": Path(".."), "home": Path.home(), "root": Path("/")}[where]
    with pytest.raises(OutputExistsError, match="refusing to replace"):
        check_output_dir(target, overwrite=True)
    assert (work / "keep.txt").read_text() == "user data"


def test_overwrite_replaces_only_a_folder_structprune_wrote(tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputExistsError, match="structprune did not write it"):
        with atomic_dir(user, overwrite=True) as tmp:
            (tmp / "x").write_text("x")
    assert (user / "thesis.tex").read_text() == "years of work"
    own = _own_folder(tmp_path / "own")
    assert (own / MARKER).is_file()
    with atomic_dir(own, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("new")
    assert sorted(p.name for p in own.iterdir()) == [MARKER, "b.txt"]


def test_overwrite_never_replaces_a_folder_holding_an_input(tmp_path):
    own = _own_folder(tmp_path / "own")
    model = own / "model"
    model.mkdir()
    with pytest.raises(OutputExistsError, match="holds an input of this run"):
        check_output_dir(own, overwrite=True, inputs=(model,))
    with pytest.raises(OutputExistsError, match="holds an input of this run"):
        check_output_dir(own, overwrite=True, inputs=(own,))


def test_the_cli_refuses_to_overwrite_its_own_input(tmp_path):
    from tests.cli.test_cli import cli, make_model, write_task

    model = make_model(tmp_path / "model")
    (model / MARKER).write_text("")  # even a folder structprune wrote
    code, _, err = cli("prune", "--model", model, "--task", write_task(tmp_path / "t.tsv"), "--target-sparsity", 0.5,
                       "--out", model, "--overwrite")
    assert code == 1 and "holds an input of this run" in err and (model / "config.json").is_file()


KILLED = """
import os, sys, time
from pathlib import Path
from structprune.io import atomic_dir, atomic_file
target = Path(sys.argv[1])
if sys.argv[2] == "dir":
    with atomic_dir(target) as tmp:
        (tmp / "big.bin").write_bytes(os.urandom(1 << 20))
        print("ready", flush=True)
        time.sleep(60)
else:
    with atomic_file(target) as tmp:
        tmp.write_bytes(os.urandom(1 << 20))
        print("ready", flush=True)
        time.sleep(60)
"""


@pytest.mark.parametrize("kind", ["dir", "file"])
def test_temporaries_of_a_killed_run_are_removed_by_the_next_run(tmp_path, kind):
    target = tmp_path / ("out" if kind == "dir" else "checkpoint.pt")
    child = subprocess.Popen([sys.executable, "-c", KILLED, str(target), kind], stdout=subprocess.PIPE, text=True,
                             env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    assert child.stdout.readline().strip() == "ready"
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # the killed run left its temporary
    if kind == "dir":
        with atomic_dir(target) as tmp:
            (tmp / "a.txt").write_text("done")
    else:
        with atomic_file(target) as tmp:
            tmp.write_text("done")
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]
