"""A learned-pruning run killed (SIGKILL) while it writes its final output folder, in either export, resumes to the
same masks, weights and accuracy as an uninterrupted run, and leaves no temporary behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from structprune.compaction import CHECKSUM_FILE
from tests.cli.test_cli import make_model, write_task

REPO = Path(__file__).resolve().parents[2]


def _args(model: Path, task: Path, out: Path, checkpoints: Path) -> list[str]:
    return [sys.executable, "-m", "structprune.cli", "prune", "--method", "l0", "--model", str(model), "--task",
            str(task), "--target-sparsity", "0.3", "--batch-size", "16", "--max-steps", "3", "--seq-len", "16",
            "--max-length", "32", "--out", str(out), "--checkpoint-dir", str(checkpoints)]


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def _outcome(out: Path) -> dict:
    results = json.loads((out / "results.json").read_text())
    return {"masks": (out / "masks" / "masks.safetensors").read_bytes(),
            "weights": (out / "pruned" / CHECKSUM_FILE).read_text(),
            "accuracy": (results["dense"]["accuracy"], results["pruned"]["accuracy"],
                         results["pruned"]["accuracy_onnx"])}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("killed-output")
    model, task = make_model(root / "model"), write_task(root / "task.tsv", rows=32)
    subprocess.run(_args(model, task, root / "reference", root / "reference-ckpt"), check=True, env=_env(),
                   timeout=600, capture_output=True)
    return root, model, task, _outcome(root / "reference")


@pytest.mark.parametrize("stage", ["onnx-dense", "onnx-pruned"])
def test_a_run_killed_while_exporting_resumes_to_the_same_output(setup, stage):
    root, model, task, reference = setup
    work = root / stage
    work.mkdir()
    out = work / "out"
    args = _args(model, task, out, work / "ckpt")
    process = subprocess.Popen(args, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list(work.glob(f".out.*.tmp/{stage}")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert list(work.glob(".out.*.tmp")) and not out.exists()
    subprocess.run(args, check=True, env=_env(), timeout=600, capture_output=True)
    assert _outcome(out) == reference
    assert sorted(p.name for p in work.iterdir()) == ["ckpt", "out"]
