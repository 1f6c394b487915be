"""The LLM pruning benchmark's quick run (a tiny random Llama with SmolLM2's tokenizer): a dense row and one row per
pruned model with finite perplexity, accuracies in percent and positive speedups; nothing left behind; ``--resume``
measures nothing twice."""

from __future__ import annotations

import csv
import math
import sys
import tempfile
from pathlib import Path

import pytest

from structprune.methods import method_options

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_llm_pruning

LIBRARY_TEMPORARIES = (".ses", "torchinductor_")


def _files(folder: Path) -> set[tuple[str, int]]:
    return {(str(p.relative_to(folder)), p.stat().st_mtime_ns) for p in folder.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts}


def _left_behind(scratch: Path) -> list[str]:
    """What is in the temporary folder, but for what importing the libraries creates there (onnxruntime's ``.ses``
    file and torch's empty ``torchinductor_<user>`` folder, outside the script's control)."""
    return [p.name for p in scratch.iterdir()
            if not p.name.startswith(LIBRARY_TEMPORARIES) or (p.is_dir() and any(p.iterdir()))]


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_variants_name_registered_methods_and_their_options():
    for label, (method, options) in bench_llm_pruning.VARIANTS.items():
        assert set(options) <= set(method_options(method)), label
    assert set(bench_llm_pruning.DEFAULT_VARIANTS) <= set(bench_llm_pruning.VARIANTS)


def test_quick_run_rows_and_no_leftovers(tmp_path, monkeypatch, smollm2_folder, data_dir):
    scratch = tmp_path / "scratch"  # the run's (and its subprocesses') temporary folder
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    benchmarks = bench_llm_pruning.RESULTS.parent
    before = _files(benchmarks)
    out = tmp_path / "out"
    argv = ["--quick", "--no-pin", "--methods", "magnitude,flap", "--sparsities", "0.3", "--data-dir", str(data_dir),
            "--out", str(out / "llm_pruning.csv"), "--plot", str(out / "llm_pruning.png")]
    assert bench_llm_pruning.main(argv) == 0

    rows = _rows(out / "llm_pruning.csv")
    assert [(r["label"], r["target_sparsity"]) for r in rows] == [("dense", "0.0"), ("magnitude", "0.3"),
                                                                  ("flap", "0.3")]
    for r in rows:
        assert math.isfinite(float(r["perplexity"])) and float(r["perplexity"]) > 1
        scores = [float(r[f"{task}_{metric}"]) for task, metric in bench_llm_pruning.TASK_METRICS.items()]
        assert all(0 <= s <= 100 for s in scores)
        assert float(r["zero_shot_avg"]) == pytest.approx(sum(scores) / len(scores), abs=0.01)
        assert float(r["prefill_speedup"]) > 0 and float(r["decode_speedup"]) > 0
        assert r["model"].startswith("tiny random") and r["quick"] == "True" and r["cpu"]
    for r in rows[1:]:
        assert float(r["achieved_sparsity"]) == pytest.approx(0.3, abs=0.05)
        assert int(r["params"]) < int(rows[0]["params"])
        assert float(r["prune_seconds"]) >= 0 and float(r["peak_rss_mb"]) > 0
        assert float(r["decode_pruned_ms"]) > 0 and float(r["prefill_ideal"]) > 1
    assert {p.name for p in out.iterdir()} == {"llm_pruning.csv", "llm_pruning.png"}
    assert _left_behind(scratch) == []  # work folder, ONNX graphs and compact models removed
    assert _files(benchmarks) == before  # nothing written into the repository's benchmarks/ (results/ included)

    assert bench_llm_pruning.main([*argv, "--resume"]) == 0  # every pair is done: nothing measured, nothing added
    assert len(_rows(out / "llm_pruning.csv")) == 3
    assert _left_behind(scratch) == []


def test_quick_run_to_a_decode_speedup_reads_the_latency_table(tmp_path, smollm2_folder, data_dir):
    """A speed target prunes to the table's prediction and reports the measured speedup beside it. The table is
    written here: a table measured on a 2-layer toy model is noise (its LM head is most of each step)."""
    from structprune.costs import LatencyTable

    table = tmp_path / "table.json"
    quick = {"arch": "llama", "layers": 2, "heads": 9, "ffn": 96, "hidden": 72}  # bench_llm_pruning.quick_model
    LatencyTable("onnxruntime-cpu", 1, 16, 1, quick, 1.0, tuple(0.1 * h for h in range(10)), (0, 48, 96),
                 (0.0, 0.5, 1.0), {}, "decode").save(table)
    out = tmp_path / "out"
    argv = ["--quick", "--no-pin", "--methods", "shortgpt", "--sparsities", "", "--speedups", "1.25",
            "--latency-table", str(table), "--data-dir", str(data_dir), "--out", str(out / "llm_pruning.csv"),
            "--plot", str(out / "llm_pruning.png")]
    assert bench_llm_pruning.main(argv) == 0
    dense, row = _rows(out / "llm_pruning.csv")
    assert dense["target_speedup"] == "" and (row["label"], row["target_sparsity"], row["target_speedup"]) == (
        "shortgpt", "", "1.25")
    assert float(row["predicted_decode_speedup"]) >= 1.25 and float(row["decode_speedup"]) > 0
    assert row["removed_sublayers"] == "attn 1, ffn 1" and row["tuning_steps"] == "0"
    with pytest.raises(SystemExit):
        bench_llm_pruning.parse_args(["--speedups", "0.8"])
