"""The mask-bank benchmark's logic (bank build and round trip, rows, Markdown) on a tiny multi-task model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import make_hf, make_inputs

from structprune import bench
from structprune.arch import from_hf
from structprune.arch.structure import ModelStructure
from structprune.budget import Budget
from structprune.data import get_task
from structprune.evaluation import evaluate
from structprune.multitask.maskbank import BANK_FOLDER
from structprune.multitask.model import MultiTaskModel

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_maskbank  # noqa: E402

TASKS = {"sst2": 2, "trec": 6}  # real task specs (their metrics), tiny random data


def _encoded(model, labels: int, seed: int) -> dict[str, torch.Tensor]:
    data = make_inputs(model, batch=16, seq=10, seed=seed)
    data["labels"] = data["input_ids"][:, 1] % labels
    return data


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    hf = make_hf("bert")
    model = MultiTaskModel(from_hf(hf), TASKS).eval()
    tasks = {name: bench_maskbank.Task(get_task(name), _encoded(hf, n, seed), "test", _encoded(hf, n, seed + 10))
             for seed, (name, n) in enumerate(TASKS.items())}
    unpruned = {name: evaluate(model.task_model(name), task.evaluation, task.spec)["accuracy"]
                for name, task in tasks.items()}
    built = bench_maskbank.build_timed_bank(model, tasks, Budget(0.4, "flops", seq_len=16))
    folder = tmp_path_factory.mktemp("model")
    bank = bench_maskbank.saved_bank(folder, built)
    rows = list(bench_maskbank.task_rows(model, bank, tasks, unpruned, 0.4, "tiny"))
    return model, tasks, unpruned, bank, folder, rows


def test_bank_is_timed_saved_and_read_back(scored):
    _, _, _, bank, folder, _ = scored
    assert (folder / BANK_FOLDER / "trec" / "masks.safetensors").is_file()
    for name in TASKS:
        info = bank.info[name]  # read back from bank.json
        assert info["method"] == "fisher" and info["build_seconds"] > 0
        assert info["budget"] == {"target": 0.4, "kind": "flops", "seq_len": 16, "latency_table": None}
    assert not bench_maskbank.same_masks(bank.masks["sst2"], bank.masks["trec"])


def test_rows_cover_every_pair_with_own_mask_overlap_one(scored):
    model, tasks, unpruned, bank, _, rows = scored
    assert [(r["task"], r["mask_task"]) for r in rows] == [(t, m) for t in TASKS for m in TASKS]
    structure = ModelStructure.from_spec(model.encoder.spec)
    for r in rows:
        assert r["model"] == "tiny" and r["reduction"] == "0.4" and r["metric"] == "accuracy"
        assert r["unpruned_accuracy"] == unpruned[r["task"]]
        assert r["delta"] == pytest.approx(r["accuracy"] - r["unpruned_accuracy"])
        assert r["flops_reduction"] == pytest.approx(0.4, abs=0.05)
        assert r["eval_examples"] == 16 and r["calibration_examples"] == 16
        assert r["kept_heads"] == sum(int(k.split("/")[0]) for k in r["kept"].split())
        assert r["kept_neurons"] == sum(int(k.split("/")[1]) for k in r["kept"].split())
        if r["task"] == r["mask_task"]:
            assert r["jaccard_heads"] == r["jaccard_neurons"] == 1.0
            # the own-mask score through the gated (uncompacted) model: compaction changes nothing
            masked = bank.apply(model, r["task"]).eval()
            task = tasks[r["task"]]
            assert r["accuracy"] == pytest.approx(evaluate(masked, task.evaluation, task.spec)["accuracy"])
        else:
            heads = [bank.masks[name].masks["head"].bool() for name in (r["task"], r["mask_task"])]
            neurons = [bank.masks[name].masks["neuron"].bool() for name in (r["task"], r["mask_task"])]
            for value, (a, b) in ((r["jaccard_heads"], heads), (r["jaccard_neurons"], neurons)):
                assert value == pytest.approx(float((a & b).sum() / (a | b).sum()))
            assert r["jaccard_neurons"] < 1.0
        assert structure.num_layers == len(r["kept"].split())


def test_markdown_tables_latest_row_per_cell(scored, tmp_path, capsys):
    rows = scored[-1]
    path = tmp_path / "maskbank.csv"
    stale = rows[0] | {"accuracy": -1.0}
    bench.append_csv(path, [stale] + rows)
    assert set(bench_maskbank.latest_rows(path)) == {("tiny", r["task"], r["mask_task"], "0.4") for r in rows}
    assert bench_maskbank.main(["--markdown", "--csv", str(path)]) == 0
    text = capsys.readouterr().out.strip()
    assert text == bench_maskbank.markdown(path)
    own_table, cross = text.split("\n\n", 1)
    own_lines = own_table.splitlines()[2:]
    assert [line.split(" | ")[1] for line in own_lines] == list(TASKS)
    for line, r in zip(own_lines, (r for r in rows if r["task"] == r["mask_task"])):
        assert f"| {r['accuracy']:.1f} | {r['delta']:+.1f} |" in line and "-1.0" not in line
    matrix = cross.splitlines()[2:]
    assert matrix[0] == "| task \\ mask | sst2 | trec |"
    body = matrix[2:]
    assert [line.split(" | ")[0] for line in body] == ["| sst2", "| trec"]
    for line, task in zip(body, TASKS):
        cells = line.strip("| ").split(" | ")[1:]
        assert len(cells) == len(TASKS)
        for cell, mask in zip(cells, TASKS):
            assert cell.startswith("**") == (task == mask)
            if task == mask:
                assert cell.endswith("J 1.00/1.00")
