"""``structprune prune --method l0|transfer --multiple-of N``: the masks, the compact model and the log keep every FFN
width and the hidden size a multiple of N."""

from __future__ import annotations

import json

import pytest

from structprune.arch.structure import ModelStructure
from structprune.compaction import from_pretrained
from tests.cli.test_cli import make_model, ok, write_task


@pytest.mark.parametrize("method,extra", [("l0", ()), ("transfer", ("--aux", "mlm", "--coupling", "joint"))])
def test_cli_learned_methods_align_to_multiple_of(tmp_path, method, extra):
    model_dir = make_model(tmp_path / "model")  # FFN 64, hidden 32
    task = write_task(tmp_path / "task.tsv", rows=32)
    ok("prune", "--method", method, *extra, "--model", model_dir, "--task", task, "--target-sparsity", 0.5,
       "--batch-size", 16, "--max-steps", 2, "--seq-len", 16, "--max-length", 32, "--multiple-of", 8,
       "--out", tmp_path / "out", "--checkpoint-dir", tmp_path / "ckpt")
    folder = tmp_path / "out"
    summary = json.loads((folder / "masks" / "masks.json").read_text())["summary"]
    widths = [layer["ffn"] for layer in summary["layers"]]
    assert all(width % 8 == 0 for width in widths) and summary["hidden"] % 8 == 0, (widths, summary["hidden"])
    assert summary["hidden"] < 32 or any(0 < width < 64 for width in widths)  # pruned, not just left whole
    assert abs(summary["param_sparsity"] - 0.5) <= 0.01
    pruned = ModelStructure.from_spec(from_pretrained(folder / "pruned").spec)
    assert ([layer.ffn for layer in pruned.layers], pruned.hidden_size) == (widths, summary["hidden"])
    assert json.loads((folder / f"{method}-log.json").read_text())["multiple_of"] == 8
