"""``structprune prune --method transfer``: the output folder with the sources and removed counts, intermediate's
checkpoints and teacher, and bad sources refused."""

from __future__ import annotations

import json

from structprune.cli.common import TaskArgs
from tests.cli.test_cli import make_model, ok, write_task
from tests.transfer.transfer_support import spy_prune_teacher


def _aux_file(path):
    """Five labelled sentences; two are target sentences of write_task (case and spaces changed)."""
    rows = [("The  FILM was bad", 0), ("the plot is fun", 1), ("the plot is not fun", 0),
            ("the Film  was very FUN", 1), ("a dull plot", 0)]
    path.write_text("sentence\tlabel\n" + "".join(f"{text}\t{label}\n" for text, label in rows))
    return path


def test_cli_prune_transfer_writes_the_folder_with_sources_and_removed_counts(tmp_path):
    model_dir = make_model(tmp_path / "model")
    task = write_task(tmp_path / "task.tsv", rows=32)
    aux = _aux_file(tmp_path / "aux.tsv")
    out = ok("prune", "--method", "transfer", "--model", model_dir, "--task", task, "--aux", f"mlm,{aux}:0.5",
             "--coupling", "separate-masks", "--transfer", "masks", "--schedule", "anneal", "--target-sparsity", 0.3,
             "--batch-size", 16, "--max-steps", 2, "--seq-len", 16, "--max-length", 32, "--out", tmp_path / "tr",
             "--checkpoint-dir", tmp_path / "ckpt")
    assert "removed as duplicates" in out and "parameter sparsity" in out
    folder = tmp_path / "tr"
    for name in ("masks/masks.json", "pruned/config.json", "onnx-pruned/model.onnx", "report.md", "transfer-log.json"):
        assert (folder / name).is_file(), name
    log = json.loads((folder / "transfer-log.json").read_text())
    trained_on = len(TaskArgs(str(task), "train").load())  # a task file trains on all but its held-out 20%
    assert trained_on < 32 and log["aux_dedup"] == {"mlm": {"split": "train", "kept": trained_on, "removed": 0},
                                                    str(aux): {"split": "train", "kept": 3, "removed": 2}}
    assert (log["coupling"], log["transfer"], log["schedule"]) == ("separate-masks", "masks", "anneal")
    assert [s["factor"] for s in log["aux_steps"]] == [1.0, 0.5]
    report = (folder / "report.md").read_text()
    assert "3 examples used, 2 removed as duplicates" in report and "Coupling separate-masks" in report
    assert json.loads((folder / "masks" / "masks.json").read_text())["meta"]["method"] == "transfer"
    assert (tmp_path / "ckpt" / "transfer" / "prune" / "checkpoint.pt").is_file()


def test_cli_prune_transfer_intermediate_checkpoints_each_phase(tmp_path, monkeypatch):
    taught_by_start = spy_prune_teacher(monkeypatch)
    model_dir = make_model(tmp_path / "model")
    task = write_task(tmp_path / "task.tsv", rows=32)
    ok("prune", "--method", "transfer", "--model", model_dir, "--task", task, "--aux", "mlm", "--coupling",
       "intermediate", "--aux-epochs", 0.5, "--retarget-epochs", 2, "--target-sparsity", 0.3, "--batch-size", 16,
       "--max-steps", 2, "--seq-len", 16, "--max-length", 32, "--out", tmp_path / "tr", "--checkpoint-dir",
       tmp_path / "ckpt")
    log = json.loads((tmp_path / "tr" / "transfer-log.json").read_text())
    assert (log["coupling"], log["retarget_epochs"], len(log["aux_steps"])) == ("intermediate", 2, 1)
    for phase in ("aux", "retarget", "prune", "finetune"):
        assert (tmp_path / "ckpt" / "transfer" / phase / "checkpoint.pt").is_file(), phase
    assert taught_by_start == [True]  # the retargeted model teaches, not the dense model fine-tuned first


def test_cli_transfer_refuses_bad_sources(tmp_path):
    from tests.cli.test_cli import cli
    model_dir = make_model(tmp_path / "model")
    task = write_task(tmp_path / "task.tsv", rows=16)
    base = ["prune", "--method", "transfer", "--model", model_dir, "--task", task, "--target-sparsity", 0.3,
            "--out", tmp_path / "out"]
    code, _, err = cli(*base)
    assert code == 1 and "needs auxiliary sources: --aux" in err and "Traceback" not in err
    code, _, err = cli(*base, "--aux", "mnli,nosuch")
    assert code == 1 and "unknown task 'nosuch'" in err
    code, _, err = cli(*base, "--aux", "mlm", "--coupling", "joint", "--transfer", "weights")
    assert code == 1 and "coupling 'joint' shares both weights and mask" in err
    assert not (tmp_path / "out").exists()
