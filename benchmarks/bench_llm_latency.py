"""Latency of pruned causal LMs on CPU: time to first token (prefill) and time per output token (decode).

Models: random weights with the shapes of published configs (latency does not depend on the weights):
SmolLM2-135M (hidden 576, 30 layers, 9 heads in 3 key/value groups, FFN 1536), Qwen2.5-0.5B (hidden 896,
24 layers, 14 heads in 2 groups, FFN 4864, q/k/v biases) and Llama-3.2-1B (hidden 2048, 16 layers, 32 heads
in 8 groups, FFN 8192; not in the default run: about 5 GB per fp32 copy, and the run holds four).

Pruned variant: half of the query heads removed as whole key/value groups (a group goes with all its
query heads, so the key/value cache halves too) and half of the FFN neurons of every layer, the first units
kept. SmolLM2 has 3 groups per layer, which do not halve: its layers alternate between keeping 1 and 2
groups, so that exactly half of the heads and groups is removed over the model. The dense baseline is
``compact()`` with all-ones masks; both are exported once with :func:`structprune.export.export` and
served by :func:`structprune.export.session` with 2 intra-op threads; torch eager runs under
``inference_mode`` with 2 threads, the process pinned to the first 2 CPUs.

Phases (:mod:`structprune.decode_bench`): prefill of one prompt of 128, 512 and 2048 tokens (time to first
token, against the FLOPs-ideal speedup of :func:`structprune.costs.prefill_flops`), and one decoding step at
batch 1 and 8 with 512 tokens already in the key/value cache (time per output token, against the
bytes-ideal speedup of :func:`structprune.costs.decode_bytes`). In each phase the four contenders (torch and
ONNX Runtime, dense and pruned) are timed in alternating turns, so speedups and the torch-vs-ORT comparison
are measured side by side.

Usage::

    python benchmarks/bench_llm_latency.py            # SmolLM2 and Qwen2.5-0.5B shapes, appends to the CSV, plots
    python benchmarks/bench_llm_latency.py --quick    # smoke run: SmolLM2 widths with 2 layers, tiny shapes, temp folder
    python benchmarks/bench_llm_latency.py --models llama-3.2-1b --backends ort
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from structprune import bench
from structprune.arch import from_hf
from structprune.arch.structure import ModelStructure
from structprune.compaction import compact
from structprune.decode_bench import (
    OrtLM,
    Phase,
    TorchLM,
    check_positions,
    measure_phase,
    results_table,
)
from structprune.export import export, session
from structprune.maskset import MaskSet, mask_shapes
from structprune.report import save_figure

RESULTS = Path(__file__).resolve().parent / "results"
BACKENDS = ("torch", "ort")
PROMPTS, DECODE_BATCHES, CONTEXT = (128, 512, 2048), (1, 8), 512
QUICK_PROMPTS, QUICK_BATCHES, QUICK_CONTEXT = (16, 32), (1, 2), 16
TARGET_PREFILL, TARGET_DECODE = (512, 0.9), (1, 0.85)
"""Targets on ONNX Runtime: prefill speedup >= 0.9x FLOPs-ideal at prompt 512; decode per-token speedup >=
0.85x bytes-ideal at batch 1; and the dense model's ORT decode step no slower than torch eager's at batch 1."""


@dataclass(frozen=True)
class ModelCase:
    """A published config to build with random weights."""

    name: str
    model_cls: type
    config: PretrainedConfig


MODELS = {
    "smollm2-135m": ModelCase("smollm2-135m", LlamaForCausalLM, LlamaConfig(
        vocab_size=49152, hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        head_dim=64, intermediate_size=1536, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
        tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)),
    "qwen2.5-0.5b": ModelCase("qwen2.5-0.5b", Qwen2ForCausalLM, Qwen2Config(
        vocab_size=151936, hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
        intermediate_size=4864, max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
        tie_word_embeddings=True, use_sliding_window=False)),
    "llama-3.2-1b": ModelCase("llama-3.2-1b", LlamaForCausalLM, LlamaConfig(
        vocab_size=128256, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
        head_dim=64, intermediate_size=8192, max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192}, tie_word_embeddings=True)),
}
DEFAULT_MODELS = ("smollm2-135m", "qwen2.5-0.5b")


def kv_group_masks(structure: ModelStructure, neuron_keep: float = 0.5) -> MaskSet:
    """Half of the key/value groups (with all their query heads) and ``1 - neuron_keep`` of the FFN removed.

    Layer ``i`` keeps its first ``G // 2`` groups, plus one more in odd layers when ``G`` is odd, so that half
    of all groups is kept over an even number of layers.
    """
    shapes = mask_shapes(structure)
    head, neuron = torch.zeros(shapes["head"]), torch.zeros(shapes["neuron"])
    for i, layer in enumerate(structure.layers):
        groups = layer.kv_map or tuple(range(layer.heads))
        keep = layer.kv_heads // 2 + (layer.kv_heads % 2) * (i % 2)
        head[i, : layer.heads] = torch.tensor([float(g < max(keep, 1)) for g in groups])
        neuron[i, : max(1, round(layer.ffn * neuron_keep))] = 1
    return MaskSet({"head": head, "neuron": neuron}, meta={"method": "kv-groups-half", "neuron_keep": neuron_keep})


def build(case: ModelCase, quick: bool, seed: int = 0) -> torch.nn.Module:
    """The full-size structprune causal LM of ``case`` with seeded random weights (2 layers when ``quick``)."""
    config = case.config
    if quick:
        fields = {k: v for k, v in config.to_dict().items() if k != "layer_types"}  # per-layer list, rebuilt
        config = config.__class__(**(fields | {"num_hidden_layers": 2}))
    torch.manual_seed(seed)
    hf = case.model_cls(config).eval()
    return from_hf(hf).eval()


def prepare(case: ModelCase, workdir: Path, args: argparse.Namespace) -> dict:
    """Dense and pruned models, exported once: their runners per (backend, variant), structures and sparsity."""
    full = build(case, args.quick)
    structure = ModelStructure.from_spec(full.spec)
    masks = {"dense": MaskSet.ones(structure), "pruned": kv_group_masks(structure)}
    runners, structures = {}, {}
    for variant, mask in masks.items():
        model = compact(full, mask).eval()
        structures[variant] = ModelStructure.from_spec(model.spec)
        if "ort" in args.backends:
            result = export(model, workdir / f"{case.name}-{variant}", threads=args.threads)
            runners[("ort", variant)] = OrtLM(session(result.directory, threads=args.threads))
            print(f"  {case.name} / {variant}: exported (parity {result.max_abs_diff:.1e})", flush=True)
        if "torch" in args.backends:
            runners[("torch", variant)] = TorchLM(model)
    pruned = structures["pruned"]
    info = {"head_sparsity": 1 - sum(layer.heads for layer in pruned.layers) / (
                structure.num_layers * structure.max_heads),
            "kv_head_sparsity": 1 - sum(layer.kv_heads for layer in pruned.layers) / (
                structure.num_layers * structure.max_kv_heads),
            "neuron_sparsity": 1 - sum(layer.ffn for layer in pruned.layers) / (
                structure.num_layers * structure.max_ffn)}
    return {"spec": full.spec, "runners": runners, "structures": structures, "info": info}


def timed_phase(prepared: dict, phase: Phase, args: argparse.Namespace, timing: dict) -> list:
    """One phase on every runner once the machine is quiet; again (up to ``--retries`` times) when other
    processes took more than ``--max-other-cores``; the attempt with the least outside load is kept."""
    dense, pruned = prepared["structures"]["dense"], prepared["structures"]["pruned"]
    ideal = phase.ideal_speedup(dense, pruned, prepared["spec"])
    best = None
    for attempt in range(1, args.retries + 2):
        waited, _ = bench.wait_for_quiet(args.max_other_cores, timeout_s=args.max_wait)
        with bench.torch_threads(args.threads):
            results = measure_phase(prepared["runners"], phase, prepared["spec"]["vocab_size"], ideal,
                                    lambda calls: bench.time_interleaved(calls, **timing))
        cores = results[0].other_cores
        if best is None or (cores is not None and cores < best[0][0].other_cores):
            best = (results, {"attempt": attempt, "waited_s": round(waited, 1)})
        if cores is None or cores <= args.max_other_cores or attempt > args.retries:
            break
        print(f"  other processes used {cores:.2f} cores during the timing; timing again", flush=True)
    return [(r, best[1]) for r in best[0]]


def measure(case: ModelCase, prepared: dict, args: argparse.Namespace, context: dict) -> list[dict]:
    """Every phase of one model; one CSV row per (phase, backend)."""
    prompts, batches, cached = ((QUICK_PROMPTS, QUICK_BATCHES, QUICK_CONTEXT) if args.quick
                                else (PROMPTS, DECODE_BATCHES, CONTEXT))
    phases = [Phase("prefill", 1, p) for p in prompts] + [Phase("decode", b, cached) for b in batches]
    check_positions(phases, prepared["spec"].get("max_position_embeddings"))
    dense = prepared["structures"]["dense"]
    shape = {"model": case.name, "weights": "random (seed 0)", "layers": dense.num_layers, "hidden": dense.hidden_size,
             "heads": dense.max_heads, "kv_heads": dense.max_kv_heads, "ffn": dense.max_ffn,
             "vocab": prepared["spec"]["vocab_size"], "pruning": "half of the KV groups, half of the FFN"}
    shape |= {k: round(v, 4) for k, v in prepared["info"].items()}
    rows = []
    for phase in phases:
        results = timed_phase(prepared, phase, args, context["timing"])
        for line in results_table([r for r, _ in results]).splitlines()[1:-1]:
            print(f"  {case.name:<13} {line}", flush=True)
        rows += [context["row"] | shape | result.row() | quality for result, quality in results]
    return rows


def _find(rows: list[dict], model: str, phase: str, backend: str, batch: int, tokens: int | None = None) -> dict | None:
    return next((r for r in rows if (r["model"], r["phase"], r["backend"], r["batch"]) == (model, phase, backend, batch)
                 and tokens in (None, r["tokens"])), None)


def target_checks(rows: list[dict]) -> list[str]:
    """PASS / FAIL lines for the targets (see :data:`TARGET_PREFILL`), per model, where their rows exist."""
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        checks = (("prefill", 1, TARGET_PREFILL[0], TARGET_PREFILL[1]),
                  ("decode", TARGET_DECODE[0], CONTEXT, TARGET_DECODE[1]))
        for phase, batch, tokens, target in checks:
            row = _find(rows, model, phase, "ort", batch, tokens)
            if row is not None:
                verdict = "PASS" if row["ratio"] >= target else "FAIL"
                lines.append(f"{verdict} {model}: ORT {phase} batch {batch} tokens {row['tokens']}: speedup "
                             f"{row['speedup']:.2f}x vs {row['ideal_kind']}-ideal {row['ideal_speedup']:.2f}x -> "
                             f"ratio {row['ratio']:.2f} (target >= {target})")
        ort, eager = (_find(rows, model, "decode", backend, 1, CONTEXT) for backend in ("ort", "torch"))
        if ort is not None and eager is not None:
            verdict = "PASS" if ort["dense_median_ms"] <= eager["dense_median_ms"] else "FAIL"
            lines.append(f"{verdict} {model}: dense decode batch 1, ORT {ort['dense_median_ms']:.2f} ms vs torch eager "
                         f"{eager['dense_median_ms']:.2f} ms per token (target: ORT no slower)")
    return lines or [(f"no target rows in this run (targets: ORT prefill at prompt {TARGET_PREFILL[0]}; ORT and torch "
                     f"decode at batch {TARGET_DECODE[0]}, context {CONTEXT})")]


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Speedup over dense: prefill against prompt length, decode against batch; measured per backend, ideal dashed."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot written")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    colors = dict(zip(dict.fromkeys(r["model"] for r in rows), ("tab:blue", "tab:orange", "tab:green", "tab:red")))
    for ax, phase, x, label in ((axes[0], "prefill", "tokens", "prompt tokens (batch 1)"),
                                (axes[1], "decode", "batch", "decode batch (context cached)")):
        for model, color in colors.items():
            mine = sorted((r for r in rows if r["model"] == model and r["phase"] == phase), key=lambda r: r[x])
            ideal = {r[x]: r["ideal_speedup"] for r in mine}
            ax.plot(list(ideal), list(ideal.values()), "--", color=color, alpha=0.6, label=f"{model} ideal")
            for backend, style in (("ort", "o-"), ("torch", "s:")):
                points = [r for r in mine if r["backend"] == backend]
                if points:
                    ax.plot([r[x] for r in points], [r["speedup"] for r in points], style, color=color,
                            label=f"{model} {'ONNX Runtime' if backend == 'ort' else 'torch eager'}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r[x] for r in rows if r["phase"] == phase}))
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel(label)
        ax.set_ylabel("speedup over dense (x)")
        ax.set_title(f"{phase}: {'FLOPs' if phase == 'prefill' else 'bytes'}-ideal dashed")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    print(f"plot: {path}")


def timing_for(quick: bool) -> dict[str, float | int]:
    """The protocol of :data:`structprune.bench.TIMING`; a smoke run takes 2 timed calls of each contender."""
    if quick:
        return {"warmup": 1, "repeats": 2, "min_time": 0.0, "max_repeats": 2, "turn_time": 0.0, "settle": 0.1}
    return dict(bench.TIMING)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: the models' widths with 2 layers, prompts {QUICK_PROMPTS}, decode batches "
                             f"{QUICK_BATCHES} at context {QUICK_CONTEXT}, 2 timed calls; writes into a temporary "
                             "folder unless --out / --plot are given")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=None,
                        help=f"models to time (default: {' '.join(DEFAULT_MODELS)}; --quick: smollm2-135m)")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--out", type=Path, default=None, help=f"CSV to append to (default {RESULTS / 'llm_latency.csv'})")
    parser.add_argument("--plot", type=Path, default=None, help=f"plot path (default {RESULTS / 'llm_latency.png'})")
    parser.add_argument("--threads", type=int, default=bench.CPU_THREADS, help="torch and ORT intra-op threads")
    parser.add_argument("--no-pin", action="store_true", help="do not pin the process to the first --threads CPUs")
    parser.add_argument("--max-other-cores", type=float, default=0.1,
                        help="CPU cores other processes may use during a timing before it is repeated")
    parser.add_argument("--max-wait", type=float, default=None,
                        help="seconds to wait for a quiet machine before each timing (default 60; --quick 0)")
    parser.add_argument("--retries", type=int, default=None,
                        help="timing attempts after the first on a busy machine (default 2; --quick 0)")
    args = parser.parse_args(argv)
    args.models = args.models or (["smollm2-135m"] if args.quick else list(DEFAULT_MODELS))
    args.max_wait = (0.0 if args.quick else 60.0) if args.max_wait is None else args.max_wait
    args.retries = (0 if args.quick else 2) if args.retries is None else args.retries
    if args.retries < 0 or args.max_wait < 0 or args.max_other_cores < 0 or args.threads < 1:
        parser.error("--retries, --max-wait and --max-other-cores must be >= 0, --threads >= 1")
    quick_dir = Path(tempfile.gettempdir()) / "structprune-bench-quick"
    args.out = args.out or (quick_dir if args.quick else RESULTS) / "llm_latency.csv"
    args.plot = args.plot or (quick_dir if args.quick else RESULTS) / "llm_latency.png"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    pinned = bench.pin_cpus(args.threads) if not args.no_pin else ()
    info = bench.machine_info()
    timing = timing_for(args.quick)
    row = {"run_id": info["date_utc"], "script_args": " ".join(sys.argv[1:] if argv is None else argv),
           "quick": args.quick, "threads": args.threads, "pinned_cpus": " ".join(map(str, pinned)),
           "dtype": "fp32"} | info | {f"timing_{k}": v for k, v in timing.items()}
    print(f"machine: {info['cpu']}, {info['cores']} cores, pinned to {pinned or 'nothing'}, {args.threads} threads; "
          f"torch {info['torch']}, transformers {info['transformers']}, onnxruntime {info['onnxruntime']}; "
          f"load average {os.getloadavg() if hasattr(os, 'getloadavg') else 'n/a'}")
    print(f"  {'model':<13} " + results_table([]).splitlines()[0], flush=True)
    rows: list[dict] = []
    for name in args.models:
        case = MODELS[name]
        print(f"{case.name}: building, compacting{' and exporting' if 'ort' in args.backends else ''}", flush=True)
        with tempfile.TemporaryDirectory(prefix="structprune-llm-bench-") as workdir:
            prepared = prepare(case, Path(workdir), args)
            model_rows = measure(case, prepared, args, {"row": row, "timing": timing})
            del prepared
        bench.append_csv(args.out, model_rows)
        rows += model_rows
    print(f"rows appended to {args.out}")
    print(results_table([]).splitlines()[-1])
    plot(rows, args.plot, f"{info['cpu']}, {args.threads} threads, fp32, torch {info['torch']}, "
                          f"onnxruntime {info['onnxruntime']}, {info['date_utc']}")
    for line in target_checks(rows):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
