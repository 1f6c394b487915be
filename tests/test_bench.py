"""Unit tests of the latency protocol (structprune.bench): fast, no model export, fake clocks."""

from __future__ import annotations

import contextlib
import csv
import os
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from structprune import bench


class FakeClock:
    """A clock that advances by the next scripted duration each time a timed call runs."""

    def __init__(self, durations: list[float]):
        self.durations = list(durations)
        self.now = 0.0
        self.calls: list[str] = []

    def __call__(self) -> float:
        return self.now

    def work(self, name: str, duration: float | None = None):
        """A callable taking ``duration`` seconds, or the next scripted duration when not given."""
        def fn() -> None:
            self.calls.append(name)
            self.now += duration if duration is not None else self.durations.pop(0)
        return fn


def test_time_callable_stats_and_counts():
    durations = [9.0, 9.0, 0.003, 0.001, 0.002, 0.005, 0.004]  # two warm-up calls, then five timed
    clock = FakeClock(durations)
    stats = bench.time_callable(clock.work("f"), warmup=2, repeats=5, clock=clock)
    assert len(clock.calls) == 7
    assert stats.n == 5
    assert stats.median_ms == pytest.approx(3.0)
    assert stats.mean_ms == pytest.approx(3.0)
    assert stats.p10_ms == pytest.approx(np.percentile([1, 2, 3, 4, 5], 10))
    assert stats.p90_ms == pytest.approx(np.percentile([1, 2, 3, 4, 5], 90))
    assert stats.p10_ms <= stats.median_ms <= stats.p90_ms


def test_min_time_adds_rounds_until_reached_and_max_repeats_caps():
    clock = FakeClock([0.1] * 100)
    assert bench.time_callable(clock.work("f"), warmup=0, repeats=1, min_time=0.5, clock=clock).n == 5
    clock = FakeClock([0.1] * 100)
    assert bench.time_callable(clock.work("f"), warmup=0, repeats=1, min_time=5.0, max_repeats=7,
                               clock=clock).n == 7


def test_time_interleaved_runs_round_robin():
    clock = FakeClock([0.002, 0.001] * 4)
    stats = bench.time_interleaved({"a": clock.work("a"), "b": clock.work("b")}, warmup=1, repeats=3, clock=clock)
    assert clock.calls == ["a", "b"] * 4
    assert stats["a"].n == stats["b"].n == 3
    assert stats["a"].median_ms == pytest.approx(2.0)
    assert stats["b"].median_ms == pytest.approx(1.0)


def test_turns_last_turn_time_and_settle_pauses_between_turns():
    clock = FakeClock([0.1, 0.3] + [0.1, 0.1, 0.1, 0.3] * 2)  # warm-ups, then two rounds
    pauses = []
    stats = bench.time_interleaved({"a": clock.work("a"), "b": clock.work("b")}, warmup=1, repeats=2,
                                   turn_time=0.25, settle=0.1, clock=clock, sleep=pauses.append)
    assert clock.calls == ["a", "b"] + ["a", "a", "a", "b"] * 2
    assert (stats["a"].n, stats["b"].n) == (6, 2)
    assert pauses == [0.1] * 4


def test_a_function_at_max_repeats_sits_out_while_others_finish():
    clock = FakeClock([])
    stats = bench.time_interleaved({"a": clock.work("a", 0.001), "b": clock.work("b", 1.0)}, warmup=0, repeats=1,
                                   min_time=2.5, max_repeats=4, turn_time=0.0025, clock=clock)
    assert clock.calls == ["a", "a", "a", "b", "a", "b", "b"]
    assert (stats["a"].n, stats["b"].n) == (4, 3)


@pytest.mark.parametrize("kwargs", [{"repeats": 0}, {"warmup": -1}, {"repeats": 5, "max_repeats": 2},
                                    {"min_time": -1.0}, {"turn_time": -1.0}, {"settle": -0.1}])
def test_time_interleaved_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError):
        bench.time_interleaved({"f": lambda: None}, **kwargs)


def test_empty_inputs_are_errors():
    with pytest.raises(ValueError, match="at least one"):
        bench.time_interleaved({})
    with pytest.raises(ValueError, match="empty"):
        bench.LatencyStats.from_seconds([])


def test_time_callable_real_clock():
    stats = bench.time_callable(lambda: sum(range(100)), warmup=1, repeats=4)
    assert stats.n == 4 and 0 < stats.p10_ms <= stats.median_ms <= stats.p90_ms


def test_torch_latency_uses_and_restores_thread_count():
    before = torch.get_num_threads()
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append((torch.get_num_threads(), torch.is_inference_mode_enabled()))
            return x + 1

    target = 1 if before != 1 else 2
    stats = bench.torch_latency(Probe(), {"x": torch.zeros(2)}, threads=target, warmup=1, repeats=3)
    assert stats.n == 3
    assert seen == [(target, True)] * 4
    assert torch.get_num_threads() == before


def test_ort_latency_feeds_graph_inputs_only():
    runs = []
    fake_session = SimpleNamespace(
        get_inputs=lambda: [SimpleNamespace(name="input_ids"), SimpleNamespace(name="attention_mask")],
        get_outputs=lambda: [SimpleNamespace(name="logits")],
        run=lambda outputs, feed: runs.append((outputs, sorted(feed), type(feed["input_ids"]))),
    )
    inputs = {"input_ids": torch.ones(1, 4, dtype=torch.long), "attention_mask": torch.ones(1, 4, dtype=torch.long),
              "token_type_ids": torch.zeros(1, 4, dtype=torch.long)}
    stats = bench.ort_latency(fake_session, inputs, warmup=2, repeats=3)
    assert stats.n == 3 and len(runs) == 5
    assert runs[0] == (["logits"], ["attention_mask", "input_ids"], np.ndarray)
    with pytest.raises(ValueError, match="attention_mask"):
        bench.ort_forward(fake_session, {"input_ids": inputs["input_ids"]})


def _append_many(path, worker: int) -> None:
    for i in range(15):
        bench.append_csv(path, [{"worker": worker, "i": i}])


def test_append_csv_from_processes_side_by_side_loses_no_row(tmp_path):
    import multiprocessing

    path = tmp_path / "rows.csv"
    workers = [multiprocessing.get_context("spawn").Process(target=_append_many, args=(path, w)) for w in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert all(w.exitcode == 0 for w in workers)
    with path.open() as f:
        rows = list(csv.DictReader(f))
    assert sorted((int(r["worker"]), int(r["i"])) for r in rows) == [(w, i) for w in range(4) for i in range(15)]
    assert [p.name for p in tmp_path.iterdir()] == ["rows.csv"]


def test_append_csv_creates_appends_and_unions_header(tmp_path):
    path = tmp_path / "sub" / "results.csv"
    bench.append_csv(path, [{"model": "a", "ms": 1.5}])
    bench.append_csv(path, [{"model": "b", "ms": 2.0, "backend": "ort"}, {"ms": 3.0, "model": "c"}])
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["model", "ms", "backend"]
        rows = list(reader)
    assert rows == [{"model": "a", "ms": "1.5", "backend": ""}, {"model": "b", "ms": "2.0", "backend": "ort"},
                    {"model": "c", "ms": "3.0", "backend": ""}]
    assert os.listdir(path.parent) == ["results.csv"]  # no temporary file left behind
    assert path.stat().st_mode & 0o777 == 0o644


def test_machine_info_keys():
    info = bench.machine_info()
    for key in ("cpu", "cores", "cores_allowed", "python", "torch", "transformers", "onnxruntime", "date_utc"):
        assert key in info and info[key] not in ("", None)
    assert info["torch"] == torch.__version__
    assert info["date_utc"].endswith("Z")


def test_machine_info_names_the_gpu_only_when_cuda_is_in_use(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *device: "Fake GPU 80GB")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    assert bench.machine_info("cuda")["gpu"] == "Fake GPU 80GB" and bench.machine_info("cuda")["cuda"] == "12.8"
    assert bench.machine_info()["gpu"] == "Fake GPU 80GB"  # no device named: whatever torch sees
    on_cpu = bench.machine_info("cpu")  # a CPU run on a GPU machine
    assert on_cpu["gpu"] == on_cpu["cuda"] == "" and on_cpu["cpu"]
    rows = bench.csv_rows({"dense": bench.LatencyStats(1.0, 1.0, 1.0, 1.0, 3)}, {"device": "cpu"}, "cpu")
    assert rows[0]["gpu"] == "" and rows[0]["median_ms"] == 1.0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.machine_info()["gpu"] == bench.machine_info()["cuda"] == ""


def test_cuda_graph_warms_up_on_a_side_stream_captures_once_and_replays(monkeypatch):
    events = []

    @contextlib.contextmanager
    def scope(enter: str, leave: str, *_):
        events.append(enter)
        yield
        events.append(leave)

    stream = SimpleNamespace(wait_stream=lambda other: events.append("wait"))
    monkeypatch.setattr(torch.cuda, "Stream", lambda: stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: scope("side stream", "main stream"))
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: SimpleNamespace(replay=lambda: events.append("replay")))
    monkeypatch.setattr(torch.cuda, "graph", lambda g: scope("capture", "captured"))

    def forward() -> int:
        events.append("forward")
        return events.count("forward")

    replay = bench.cuda_graph(forward, warmup=2)
    assert events == ["wait", "side stream", "forward", "forward", "main stream", "wait", "capture", "forward",
                      "captured"]
    assert replay() == 3 and replay() == 3  # the captured call's output; forward itself never runs again
    assert events[-2:] == ["replay", "replay"] and events.count("forward") == 3


def test_an_ort_session_on_cuda_needs_the_cuda_provider(monkeypatch, tmp_path):
    from structprune.export import check_provider, session

    cpu_only = ["AzureExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr("onnxruntime.get_available_providers", lambda: cpu_only)
    with pytest.raises(ValueError, match=r"has only \['AzureExecutionProvider', 'CPUExecutionProvider'\]; install "
                                         "onnxruntime-gpu") as err:
        session(tmp_path / "nowhere", device="cuda")  # the provider is checked before the file
    assert "CUDAExecutionProvider" in str(err.value) and "pip uninstall" in str(err.value)
    check_provider("cpu")
    with pytest.raises(ValueError, match="'tpu' is not one of cpu, cuda"):
        check_provider("tpu")

    # the provider is there but cannot start (no CUDA libraries): ONNX Runtime falls back to the CPU
    monkeypatch.setattr("onnxruntime.get_available_providers", lambda: ["CUDAExecutionProvider", *cpu_only])
    fell_back = SimpleNamespace(get_providers=lambda: ["CPUExecutionProvider"])
    monkeypatch.setattr("onnxruntime.InferenceSession", lambda *args, **kwargs: fell_back)
    (tmp_path / "model.onnx").write_bytes(b"")
    with pytest.raises(ValueError, match="could not start CUDAExecutionProvider"):
        session(tmp_path, device="cuda")


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this platform")
def test_pin_cpus_pins_the_first_allowed_cpus():
    before = os.sched_getaffinity(0)
    try:
        chosen = bench.pin_cpus(1)
        assert chosen == (min(before),) and os.sched_getaffinity(0) == {min(before)}
    finally:
        os.sched_setaffinity(0, before)
    with pytest.raises(ValueError):
        bench.pin_cpus(0)


def test_other_cpu_load_and_wait_for_quiet_report_a_load():
    with bench.OtherCpuLoad() as load:
        time.sleep(0.3)  # /proc/stat counts 10 ms ticks: a short window would be all quantisation error
    if bench.busy_cpu_seconds() is None:
        pytest.skip("no /proc/stat on this platform")
    assert load.cores is not None and 0.0 <= load.cores <= (os.cpu_count() or 1) + 0.5
    waited, cores = bench.wait_for_quiet(max_cores=float("inf"), sample_s=0.01, timeout_s=10.0)
    assert waited < 5.0 and cores is not None
    waited, _ = bench.wait_for_quiet(max_cores=-1.0, sample_s=0.01, timeout_s=0.05)  # never quiet: times out
    assert 0.05 <= waited < 5.0


def test_peak_memory_resets_and_then_follows_an_allocation():
    bench.reset_peak_memory()
    before, peak = bench.memory_mb(), bench.memory_mb("VmHWM")
    assert peak - before < 16  # reset: the peak starts at what is resident now
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    assert bench.memory_mb("VmHWM") - before >= 60
    del block
    with pytest.raises(RuntimeError, match="VmNothing"):
        bench.memory_mb("VmNothing")
