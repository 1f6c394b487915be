"""The transfer benchmark's table: rows of another ``l0`` controller are labelled, and each method's gain is taken
against ``l0`` run with its own controller."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_transfer


def test_rows_of_each_controller_are_compared_with_l0_under_the_same_controller(tmp_path):
    base = {"task": "cr", "train_size": "1000", "device": "cpu", "target": "0.8", "aux": "sst2-full",
            "transfer": "both", "schedule": "start", "guard": "cosine", "revision": str(bench_transfer.REVISION)}
    hold, old = {"controller": "hold"}, {}  # rows from before the setting existed ran the Lagrangian
    rows = [
        base | {"method": "dense", "target": "0", "accuracy": "90", "settings": "{}"},
        base | {"method": "l0", "accuracy": "80", "settings": json.dumps(hold)},
        base | {"method": "l0", "accuracy": "70", "settings": json.dumps(old)},
        base | {"method": "intermediate", "accuracy": "81", "settings": json.dumps({"l0": hold})},
        base | {"method": "intermediate", "accuracy": "75", "settings": json.dumps({"l0": old})},
    ]
    with (tmp_path / "t.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = {line.split(" | ")[4]: line for line in bench_transfer.table(tmp_path / "t.csv").splitlines()[2:]}
    assert lines["l0"].endswith("| 80.0 |  |") and lines["l0 (lagrangian)"].endswith("| 70.0 |  |")
    assert lines["intermediate (sst2-full)"].endswith("| 81.0 | +1.0 |")
    assert lines["intermediate (sst2-full; controller lagrangian)"].endswith("| 75.0 | +5.0 |")
