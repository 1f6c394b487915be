"""The training-free methods and latency budgets from the command line."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForSequenceClassification

from structprune.arch import from_hf
from structprune.arch.structure import ModelStructure
from structprune.budget import Budget
from structprune.compaction import from_pretrained
from structprune.costs import LatencyTable
from structprune.maskset import MaskSet
from structprune.methods.selection import max_reduction
from tests.cli.test_cli import cli, make_model, ok, write_task


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("training-free-cli")
    return {"root": root, "model": make_model(root / "model"), "task": write_task(root / "task.tsv", rows=48)}


@pytest.mark.parametrize("method, extra", [
    ("fisher", ["--calib-examples", 32]),
    ("fisher", ["--tune-examples", 8, "--no-bf16"]),
    ("fisher", ["--tune-examples", "all", "--bf16"]),
    ("attribution", ["--steps", 2, "--objective", "entropy"]),
    ("attribution", ["--scope", "layer", "--tune"]),
    ("head_importance", ["--objective", "pseudo"]),
])
def test_prune_then_compact(setup, method, extra):
    name = f"{method}-{len(extra)}-{'-'.join(map(str, extra[:2]))}"
    masks_dir, pruned_dir = setup["root"] / f"masks-{name}", setup["root"] / f"pruned-{name}"
    out = ok("prune", "--model", setup["model"], "--task", setup["task"], "--method", method, "--budget-kind", "flops",
             "--target-sparsity", 0.3, "--out", masks_dir, "--batch-size", 8, "--max-length", 16, *extra)
    assert "FLOPs reduction 0.3" in out
    info = json.loads((masks_dir / "masks.json").read_text())
    assert info["meta"]["method"] == method
    if method == "fisher" or "--tune" in extra:
        assert info["scales"] == ["head", "neuron"]
    if "--tune-examples" in extra:
        options = info["meta"]["options"]
        assert options["tune_examples"] == (None if "all" in extra else 8)
        assert options["bf16"] is ("--bf16" in extra)
    ok("compact", masks_dir, "--model", setup["model"], "--out", pruned_dir)
    assert from_pretrained(pruned_dir) is not None


def test_latency_table_then_latency_budget(setup):
    table = setup["root"] / "table.json"
    out = ok("latency-table", "--model", setup["model"], "--out", table, "--batch", 2, "--seq", 16, "--ffn-points", 2)
    assert "latency table written" in out
    spec = from_hf(AutoModelForSequenceClassification.from_pretrained(setup["model"])).spec
    structure = ModelStructure.from_spec(spec)
    # The reachable reduction depends on the measured table (0.26 on a busy 2-core machine, 0.098 on another):
    # ask for half of what this one allows, at most 0.15.
    target = round(min(0.15, max_reduction(structure, spec, Budget(0.5, "latency", latency_table=table)) / 2), 3)
    masks_dir = setup["root"] / "masks-latency"
    ok("prune", "--model", setup["model"], "--task", setup["task"], "--method", "fisher", "--budget-kind", "latency",
       "--latency-table", table, "--target-sparsity", target, "--out", masks_dir, "--batch-size", 8, "--max-length", 16)
    info = json.loads((masks_dir / "masks.json").read_text())
    assert info["meta"]["budget"]["kind"] == "latency"
    # Which units go depends on the measured (noisy) table, so check the budget rather than which units
    # were removed: the table predicts the pruned model at least `target` faster.
    lookup = LatencyTable.load(table)
    pruned = MaskSet.load(masks_dir).resolve(structure)
    assert 1.0 - lookup.estimate(pruned) / lookup.estimate(structure) >= target
    code, _, err = cli("latency-table", "--model", setup["model"], "--out", table)
    assert code == 1 and "already exists" in err
    code, _, err = cli("prune", "--model", setup["model"], "--task", setup["task"], "--method", "fisher",
                       "--budget-kind", "latency", "--target-sparsity", 0.3, "--out", setup["root"] / "x")
    assert code == 1 and "latency_table" in err


@pytest.mark.parametrize("value", ["0", "-3", "some"])
def test_tune_examples_must_be_a_positive_count_or_all(setup, value):
    code, _, err = cli("prune", "--model", setup["model"], "--task", setup["task"], "--method", "fisher",
                       "--target-sparsity", 0.3, "--out", setup["root"] / "never", "--tune-examples", value)
    assert code == 2 and "positive number of examples or 'all'" in err
