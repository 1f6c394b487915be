"""The repository layout does not shadow installed packages: ``kernels/`` (the Triton kernels, imported as
``structprune.kernels``) must not be importable as a top-level package ``kernels``, the name of a PyPI package
that transformers 5 depends on and imports, and that registers a setuptools plugin."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_top_level_kernels_is_not_ours_from_the_repository_root():
    probe = ("import importlib.util, json; s = importlib.util.find_spec('kernels'); "
             "print(json.dumps(None if s is None else [s.origin, list(s.submodule_search_locations or [])]))")
    found = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    spec = json.loads(found.stdout)
    if spec is not None:
        origin, locations = spec
        # A regular package from site-packages, or (no such package installed) a namespace that only lists ours.
        assert origin is None or not Path(origin).resolve().is_relative_to(ROOT / "kernels"), origin
        assert origin is not None or locations == [str(ROOT / "kernels")]


def test_structprune_kernels_is_the_kernels_folder():
    from structprune.kernels import gated_ffn, masked_attention

    for module in (gated_ffn, masked_attention):
        assert Path(module.__file__).resolve().parent == (ROOT / "kernels").resolve()
