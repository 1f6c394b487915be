"""``transfer-search``: the sweep's order, budget and choice, and the command (through the CLI)."""

from __future__ import annotations

import json

import pytest

from structprune.cli.common import TaskArgs
from structprune.transfer import TransferConfig
from structprune.transfer.search import BASELINE, SearchResult, run_name, sweep
from tests.cli.test_cli import make_model, ok, write_task
from tests.transfer.transfer_support import spy_prune_teacher


def test_sweep_order_follows_the_best_coupling_and_stops_at_the_budget():
    def scorer(best: str):
        def score(config):
            name = run_name(config)
            return {"score": 60.0 if name == best else 50.0 if config is None else 40.0, "achieved": 0.5}
        return score

    # the base's coupling first: the default (intermediate), or the one given
    assert [r["name"] for r in sweep(scorer("x"), TransferConfig(), 40, budget_runs=3)] == [
        BASELINE, "intermediate/both/start", "joint/both/start"]
    base = TransferConfig(coupling="separate-masks", aux_weight=0.7)
    runs = sweep(scorer("separate-masks/both/start"), base, prune_steps=40, budget_runs=20)
    assert [r["name"] for r in runs] == [
        BASELINE, "separate-masks/both/start", "joint/both/start", "sequential/both/start", "intermediate/both/start",
        "separate-masks/both/after:10", "separate-masks/both/anneal", "separate-masks/both/warmup",
        "separate-masks/weights/start", "separate-masks/masks/start"]
    assert all(r["config"].aux_weight == 0.7 for r in runs[1:])
    runs = sweep(scorer("sequential/both/start"), base, prune_steps=40, budget_runs=20)
    assert [r["name"] for r in runs[4:]] == ["intermediate/both/start", "sequential/weights/start",
                                             "sequential/masks/start"]
    runs = sweep(scorer("intermediate/both/start"), base, prune_steps=40, budget_runs=20)
    assert [r["name"] for r in runs[4:]] == ["intermediate/both/start"]  # nothing else to vary
    runs = sweep(scorer("joint/both/start"), base, prune_steps=40, budget_runs=6)
    assert [r["name"] for r in runs[3:]] == ["sequential/both/start", "intermediate/both/start",
                                             "joint/both/after:10"]
    assert [r["name"] for r in sweep(scorer("x"), base, 40, budget_runs=2)] == [BASELINE,
                                                                              "separate-masks/both/start"]
    assert [r["name"] for r in sweep(scorer("x"), base, 40, budget_runs=9, budget_minutes=0)] == [BASELINE]
    # ties go to the earlier run: the baseline beats transfer settings that do no better
    result = SearchResult("t", "accuracy", sweep(lambda c: {"score": 50.0, "achieved": 0.5}, base, 40, 3))
    assert result.choice["name"] == BASELINE
    # min_confidence: only runs that beat the baseline that surely compete with it
    runs = [{"name": BASELINE, "score": 50.0, "confidence": None}, {"name": "a", "score": 52.0, "confidence": 0.7},
            {"name": "b", "score": 51.0, "confidence": 0.95}]
    assert [SearchResult("t", "accuracy", runs, min_confidence=m).choice["name"] for m in (0.0, 0.9, 0.99)] == [
        "a", "b", BASELINE]
    with pytest.raises(ValueError, match="budget_runs must be >= 1"):
        sweep(scorer("x"), base, 40, budget_runs=0)


def test_cli_transfer_search_intermediate_distils_from_its_retargeted_model(tmp_path, monkeypatch):
    taught_by_start = spy_prune_teacher(monkeypatch)
    model_dir = make_model(tmp_path / "model")
    task = write_task(tmp_path / "task.tsv", rows=40)
    ok("transfer-search", "--model", model_dir, "--task", task, "--aux", "mlm", "--coupling", "intermediate",
       "--aux-epochs", 0.5, "--target-sparsity", 0.3, "--budget-runs", 2, "--batch-size", 8, "--max-steps", 2,
       "--max-length", 32, "--seq-len", 16, "--out", tmp_path / "search.json")
    runs = json.loads((tmp_path / "search.json").read_text())["runs"]
    assert [r["name"] for r in runs] == [BASELINE, "intermediate/both/start"]
    assert taught_by_start == [True]


def test_cli_transfer_search_writes_runs_and_the_choice(tmp_path):
    model_dir = make_model(tmp_path / "model")
    task = write_task(tmp_path / "task.tsv", rows=40)
    out = ok("transfer-search", "--model", model_dir, "--task", task, "--aux", "mlm", "--target-sparsity", 0.3,
             "--budget-runs", 2, "--batch-size", 8, "--max-steps", 2, "--max-length", 32, "--seq-len", 16,
             "--out", tmp_path / "search.json")
    assert "<- choice" in out and BASELINE in out and "P(> l0)" in out
    result = json.loads((tmp_path / "search.json").read_text())
    assert [r["name"] for r in result["runs"]] == [BASELINE, "intermediate/both/start"]  # the default coupling
    assert result["runs"][0]["confidence"] is None and 0.0 <= result["runs"][1]["confidence"] <= 1.0
    assert result["choice"]["score"] == max(r["score"] for r in result["runs"])
    rows = len(TaskArgs(str(task), "train").load())  # the task file's rows but its held-out 20%
    assert rows < 40 and result["setup"]["search_train"] + result["setup"]["search_dev"] == rows
    assert result["setup"]["search_dev"] == round(0.2 * rows)
    assert result["setup"]["aux"] == {"mlm": {"split": "train", "kept": rows, "removed": 0}}


def test_cli_transfer_search_refuses_a_confidence_outside_0_1(tmp_path):
    from tests.cli.test_cli import cli
    code, _, err = cli("transfer-search", "--model", tmp_path / "m", "--task", "sst2", "--aux", "mlm",
                       "--target-sparsity", 0.3, "--budget-runs", 2, "--min-confidence", 1.5, "--out", tmp_path / "s")
    assert code == 1 and "--min-confidence is a probability in [0, 1], got 1.5" in err
