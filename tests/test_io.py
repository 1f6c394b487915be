"""Atomic writes leave files with the mode a plain write would give them, whatever the writer did."""

from __future__ import annotations

import os

import torch
from safetensors.torch import save_file

from structprune.io import atomic_dir, atomic_file


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
