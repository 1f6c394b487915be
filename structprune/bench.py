"""Latency protocol shared by ``structprune bench`` and the scripts in ``benchmarks/``.

The rules:

* a latency is the **median** of repeated timed calls after warm-up calls, timed with
  :func:`time.perf_counter`; p10 / p90 and the count are reported beside it;
* a speedup is a ratio measured **side by side in one run**: :func:`time_interleaved` gives the
  contenders alternating turns, so a slow drift in machine load hits the dense baseline and the
  pruned models alike instead of biasing their ratio;
* CPU figures use 2 threads: ``torch.set_num_threads(2)`` for torch eager (under
  ``torch.inference_mode``) and ``intra_op_num_threads=2`` for ONNX Runtime (build the session
  with ``structprune.export.session(path, threads=2)``); :func:`pin_cpus` optionally pins the
  process to the first cores;
* the dense baseline runs through the same path as the pruned model (``compact()`` with
  all-ones masks, the same exporter and session options), and the FLOPs-ideal speedup comes from
  :func:`structprune.costs.flops_ideal_speedup`;
* torch on CUDA is timed with CUDA events (:func:`cuda_stats`: rounds of :func:`time_cuda`, the
  contenders alternating), optionally replaying a captured CUDA graph (:func:`cuda_graph`); ONNX
  Runtime on CUDA with :func:`time_interleaved`, since its ``run`` returns host arrays and so
  waits for the device (the input and output copies are part of the call).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import fcntl
import io
import os
import platform
import time
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from structprune.io import atomic_write_text

CPU_THREADS = 2
"""Thread count of every CPU latency figure (torch intra-op threads, ORT intra-op threads)."""

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
"""The dtypes torch models are timed in, by their command-line names."""

TIMING = {"warmup": 1, "repeats": 3, "min_time": 1.5, "max_repeats": 300, "turn_time": 0.5, "settle": 0.1}
"""The timing protocol of every latency figure (arguments of :func:`time_interleaved`): one warm-up
call each, then turns of ~0.5 s after a 0.1 s pause, until each callable has >= 3 calls and >= 1.5 s
of timed calls (at most 300); the median is reported."""


@dataclass(frozen=True)
class LatencyStats:
    """Summary of timed calls, in milliseconds."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    n: int

    @classmethod
    def from_seconds(cls, samples: Sequence[float]) -> LatencyStats:
        """Statistics of per-call durations given in seconds."""
        if not samples:
            raise ValueError("no timed calls: cannot summarise an empty sample")
        ms = np.asarray(samples, dtype=np.float64) * 1e3
        p10, median, p90 = np.percentile(ms, [10, 50, 90])
        return cls(float(median), float(p10), float(p90), float(ms.mean()), len(ms))


def time_interleaved(fns: Mapping[str, Callable[[], object]], warmup: int = 1, repeats: int = 5,
                     min_time: float = 0.0, max_repeats: int = 1000, turn_time: float = 0.0, settle: float = 0.0,
                     clock: Callable[[], float] = time.perf_counter,
                     sleep: Callable[[float], None] = time.sleep) -> dict[str, LatencyStats]:
    """Time several callables in alternating turns and summarise each one's calls.

    Each function is first called ``warmup`` times untimed (allocations, caches, lazy
    initialisation). Then rounds follow; in a round every function gets one *turn* of timed calls,
    repeated until the turn's timed calls reach ``turn_time`` seconds (at least one call). Rounds
    go on until every function has at least ``repeats`` calls and ``min_time`` seconds of timed
    calls, or ``max_repeats`` calls. Cheap calls thus get many samples and expensive ones few,
    within a predictable time.

    With several functions, ``settle`` seconds are slept before each turn. ONNX Runtime's worker
    threads keep spinning for tens of milliseconds after a run: a session timed right after
    another one shares the cores with those spinning threads and looks up to 3x slower. A pause
    of 0.1 s lets them go to sleep.

    Args:
        fns: name -> zero-argument callable; results are discarded.
        clock, sleep: the time source (seconds) and the pause; the real ones unless testing.
    """
    if not fns:
        raise ValueError("time_interleaved needs at least one function to time")
    if warmup < 0 or repeats < 1 or max_repeats < repeats or min(min_time, turn_time, settle) < 0:
        raise ValueError(f"need warmup >= 0, 1 <= repeats <= max_repeats and non-negative times; got "
                         f"warmup={warmup}, repeats={repeats}, max_repeats={max_repeats}, min_time={min_time}, "
                         f"turn_time={turn_time}, settle={settle}")
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}

    def finished(name: str) -> bool:
        n = len(samples[name])
        return n >= max_repeats or (n >= repeats and sum(samples[name]) >= min_time)

    while not all(finished(name) for name in fns):
        for name, fn in fns.items():
            if len(samples[name]) >= max_repeats:
                continue
            if settle and len(fns) > 1:
                sleep(settle)
            turn = 0.0
            while True:
                start = clock()
                fn()
                elapsed = clock() - start
                samples[name].append(elapsed)
                turn += elapsed
                if turn >= turn_time or len(samples[name]) >= max_repeats:
                    break
    return {name: LatencyStats.from_seconds(values) for name, values in samples.items()}


def time_cuda(fns: Mapping[Hashable, Callable[[], object]], rounds: int = 3, warmup_ms: float = 25.0,
              rep_ms: float = 100.0) -> dict[Hashable, float]:
    """Median milliseconds per call of CUDA callables, timed with CUDA events.

    Each round times every function with ``triton.testing.do_bench`` (its median over
    ``rep_ms`` of calls after ``warmup_ms`` of warm-up; it clears the L2 cache between calls);
    the functions alternate within a round, and the median over ``rounds`` is reported.
    """
    from triton.testing import do_bench

    if not fns:
        raise ValueError("time_cuda needs at least one function to time")
    samples: dict[Hashable, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    return {name: float(np.median(values)) for name, values in samples.items()}


def cuda_stats(calls: Mapping[Hashable, Callable[[], object]], rounds: int = 5) -> dict[Hashable, LatencyStats]:
    """Per-call latency of CUDA callables: ``rounds`` rounds of :func:`time_cuda` (CUDA events, the callables
    alternating), summarised over the rounds' medians."""
    samples: dict[Hashable, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, ms in time_cuda(calls, rounds=1).items():
            samples[name].append(ms / 1e3)
    return {name: LatencyStats.from_seconds(values) for name, values in samples.items()}


def cuda_graph(fn: Callable[[], object], warmup: int = 3) -> Callable[[], object]:
    """``fn`` captured in a :class:`torch.cuda.CUDAGraph`; a call replays it and returns the captured output.

    ``fn`` must only launch CUDA work on fixed shapes, without host synchronisation (a forward on inputs
    already on the device). It runs ``warmup`` times on a side stream first, as capture requires (lazy
    initialisation, cuBLAS workspaces, ``torch.compile``'s compilation). The output, in the graph's memory
    pool, is overwritten by every replay.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = fn()

    def replay() -> object:
        graph.replay()
        return output

    return replay


def time_callable(fn: Callable[[], object], warmup: int = 1, repeats: int = 5, min_time: float = 0.0,
                  max_repeats: int = 1000, clock: Callable[[], float] = time.perf_counter) -> LatencyStats:
    """Latency of one zero-argument callable: ``warmup`` untimed calls, then timed calls until at
    least ``repeats`` calls and ``min_time`` seconds, at most ``max_repeats`` calls."""
    return time_interleaved({"fn": fn}, warmup, repeats, min_time, max_repeats, clock=clock)["fn"]


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(threads)``, restoring the previous count after."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def torch_forward(model: torch.nn.Module, inputs: Mapping[str, torch.Tensor]) -> Callable[[], object]:
    """A zero-argument callable running ``model(**inputs)`` in eval mode under ``inference_mode``."""
    model.eval()
    inputs = dict(inputs)

    def forward() -> object:
        with torch.inference_mode():
            return model(**inputs)

    return forward


def ort_forward(session, inputs: Mapping[str, torch.Tensor | np.ndarray]) -> Callable[[], object]:
    """A zero-argument callable running an ONNX Runtime session on ``inputs``.

    Inputs the graph does not take are dropped (e.g. ``token_type_ids`` of a RoBERTa graph); the
    arrays are converted to numpy once, outside the timed call.
    """
    names = [i.name for i in session.get_inputs()]
    missing = [n for n in names if n not in inputs]
    if missing:
        raise ValueError(f"the ONNX graph needs inputs {missing}, which were not given (got {sorted(inputs)})")
    feed = {n: inputs[n].numpy() if isinstance(inputs[n], torch.Tensor) else np.asarray(inputs[n]) for n in names}
    outputs = [o.name for o in session.get_outputs()]
    return lambda: session.run(outputs, feed)


def torch_latency(model: torch.nn.Module, inputs: Mapping[str, torch.Tensor], threads: int = CPU_THREADS,
                  **timing) -> LatencyStats:
    """Torch eager latency of ``model(**inputs)`` with ``threads`` intra-op threads.

    ``timing`` goes to :func:`time_callable` (``warmup``, ``repeats``, ``min_time``...). The
    previous torch thread count is restored afterwards.
    """
    with torch_threads(threads):
        return time_callable(torch_forward(model, inputs), **timing)


def ort_latency(session, inputs: Mapping[str, torch.Tensor | np.ndarray], **timing) -> LatencyStats:
    """ONNX Runtime latency of ``session`` on ``inputs``.

    The thread count is a session option: create the session with
    ``structprune.export.session(path, threads=CPU_THREADS)``. ``timing`` goes to
    :func:`time_callable`.
    """
    return time_callable(ort_forward(session, inputs), **timing)


def pin_cpus(count: int = CPU_THREADS) -> tuple[int, ...]:
    """Pin this process to the first ``count`` CPUs it may run on; the CPUs used, or ``()``.

    Call it before any thread pool starts (threads inherit the affinity of their creator). On
    platforms without ``os.sched_setaffinity`` (macOS, Windows) nothing is pinned.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if not hasattr(os, "sched_setaffinity"):
        return ()
    chosen = tuple(sorted(os.sched_getaffinity(0))[:count])
    os.sched_setaffinity(0, chosen)
    return chosen


def memory_mb(field: str = "VmRSS") -> float:
    """This process's resident memory now (``VmRSS``) or its peak (``VmHWM``) in MiB, from ``/proc/self/status``.

    ``VmHWM`` is the process's own since its last ``exec`` or :func:`reset_peak_memory` (``getrusage``'s
    ``ru_maxrss`` is not: a child keeps its parent's size at the fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}; memory is measured on Linux only")


def reset_peak_memory() -> None:
    """Start ``VmHWM`` afresh at the current resident memory (Linux)."""
    Path("/proc/self/clear_refs").write_text("5")


def _cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo, else what :mod:`platform` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _version(*packages: str) -> str:
    """The version of the first of ``packages`` (distributions of one module) that is installed."""
    for package in packages:
        with contextlib.suppress(metadata.PackageNotFoundError):
            return metadata.version(package)
    return "not installed"


def machine_info(device: str | None = None) -> dict[str, str | int]:
    """Where and with what a measurement ran, for every CSV row and table header.

    ``device``: where it ran. The GPU fields (``gpu``: the device name, ``cuda``: torch's CUDA version) are
    filled for ``"cuda"`` and empty for ``"cpu"``; for ``None``, whenever torch sees a GPU.
    """
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    cuda = torch.cuda.is_available() if device is None else device == "cuda"
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count() or 0,
        "cores_allowed": len(affinity) if affinity is not None else os.cpu_count() or 0,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if cuda else "",
        "cuda": (torch.version.cuda or "") if cuda else "",
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "onnxruntime": _version("onnxruntime", "onnxruntime-gpu"),
        "onnx": _version("onnx"),
        "numpy": np.__version__,
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def load_average() -> float | None:
    """The 1-minute load average (``None`` where the OS has none), recorded beside timings."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def busy_cpu_seconds() -> float | None:
    """CPU seconds every process together has spent busy since boot (Linux ``/proc/stat``), else ``None``.

    Busy is user + nice + system + irq + softirq + steal (guest time is already inside user).
    """
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        ticks = [int(v) for v in fields[1:9]]
        return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


class OtherCpuLoad:
    """Context manager measuring how many cores *other* processes kept busy during the block.

    Machine-wide busy CPU time (:func:`busy_cpu_seconds`) minus this process's own CPU time (all
    its threads, ONNX Runtime's included), divided by the wall time. On a 2-core machine a value
    near 1 means another process held a core the benchmark wanted, and with 2 threads synchronising
    at every operator that can multiply latencies; record it beside every timing. ``/proc/stat``
    counts clock ticks (10 ms), so use it over blocks of a second or more. ``cores`` is ``None``
    where ``/proc/stat`` does not exist.
    """

    def __init__(self) -> None:
        self.cores: float | None = None

    def __enter__(self) -> OtherCpuLoad:
        self._busy, self._own, self._wall = busy_cpu_seconds(), time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        busy, wall = busy_cpu_seconds(), time.perf_counter() - self._wall
        if busy is None or self._busy is None or wall <= 0:
            return
        other = (busy - self._busy) - (time.process_time() - self._own)
        self.cores = max(0.0, other / wall)


def wait_for_quiet(max_cores: float = 0.2, sample_s: float = 1.0,
                   timeout_s: float = 60.0) -> tuple[float, float | None]:
    """Sleep until other processes use at most ``max_cores`` over a ``sample_s`` window, or ``timeout_s`` passes.

    Returns the seconds waited and the last measured load (``None`` where it cannot be measured, in
    which case nothing is waited for). The caller times its block either way and records the load.
    """
    start = time.perf_counter()
    while True:
        with OtherCpuLoad() as load:
            time.sleep(sample_s)
        waited = time.perf_counter() - start
        if load.cores is None or load.cores <= max_cores or waited >= timeout_s:
            return waited, load.cores


def append_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, object]]) -> Path:
    """Append ``rows`` to a CSV file, atomically; the header is the union of old and new columns.

    The existing rows are read, the whole file is written to a temporary file beside ``path``
    and renamed over it, so an interrupted run never leaves a truncated CSV. Columns keep their
    first-seen order; a row without some column leaves that cell empty. The file keeps its
    permissions (a new one gets ``0o644``: the temporary file is private until renamed). Appends
    from processes running side by side take turns (a lock on the folder), so none loses another's rows.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        old_rows: list[dict[str, str]] = []
        header: list[str] = []
        mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
        if path.exists():
            with path.open(newline="") as f:
                reader = csv.DictReader(f)
                header = list(reader.fieldnames or [])
                old_rows = list(reader)
        for row in rows:
            header += [key for key in row if key not in header]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=header, restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(old_rows)
        writer.writerows(rows)
        atomic_write_text(path, buffer.getvalue())
        os.chmod(path, mode)
    finally:
        os.close(folder)  # and with it the lock
    return path


def speedup_table(stats: Mapping[str, LatencyStats], ideal: float, header: str) -> str:
    """A dense-vs-pruned latency table (``stats`` keyed ``dense`` and ``pruned``), the measured and ideal speedup."""
    lines = [header, f"{'model':<8} {'median ms':>10} {'p10 ms':>9} {'p90 ms':>9}"]
    lines += [f"{name:<8} {s.median_ms:>10.2f} {s.p10_ms:>9.2f} {s.p90_ms:>9.2f}" for name, s in stats.items()]
    lines.append(f"speedup: measured {stats['dense'].median_ms / stats['pruned'].median_ms:.2f}x, "
                 f"FLOPs-ideal {ideal:.2f}x")
    return "\n".join(lines)


def load_warning(cores: float | None, max_cores: float = 0.2) -> str | None:
    """What to tell the user when other processes used more than ``max_cores`` while timing."""
    if cores is None or cores <= max_cores:
        return None
    return (f"warning: other processes kept {cores:.2f} cores busy while timing; the latencies are inflated and "
            "noisy, measure again on a quiet machine")


def csv_rows(stats: Mapping[str, LatencyStats], settings: Mapping[str, object],
             device: str | None = None) -> list[dict[str, object]]:
    """One CSV row per timed model: machine (:func:`machine_info` of ``device``), ``settings`` and its statistics."""
    machine = machine_info(device)
    return [machine | dict(settings) | {"model": name} | dataclasses.asdict(s) for name, s in stats.items()]
