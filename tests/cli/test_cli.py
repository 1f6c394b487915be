"""The ``structprune`` command line: the prune -> compact -> export -> bench / eval chain on a tiny
random BERT, and a clear one-line error (exit status 1, no traceback) for every kind of bad input."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

from structprune.cli import build_parser, main

WORDS = ["good", "great", "fine", "fun", "bad", "awful", "poor", "dull", "the", "movie", "film", "plot", "was", "is", "very", "not"]
SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


def cli(*args: object) -> tuple[int, str, str]:
    """Run ``structprune ARGS`` in-process; (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def ok(*args: object) -> str:
    code, out, err = cli(*args)
    assert code == 0, err
    return out


def make_model(directory: Path, layers: int = 2, num_labels: int = 2) -> Path:
    """A tiny random BERT classifier with a word-level tokenizer, saved as a Hugging Face folder."""
    directory.mkdir(parents=True)
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(tokens)}, model_max_length=64)
    assert len(tokenizer) == len(tokens)  # transformers 5 ignores vocab_file here and builds a 5-token tokenizer
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, num_labels=num_labels)
    BertForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_task(path: Path, rows: int = 40, labels: int = 2) -> Path:
    """A small TSV task file (header ``sentence<TAB>label``)."""
    lines = ["sentence\tlabel"]
    for i in range(rows):
        positive = i % labels
        lines.append(f"the {'movie' if i % 3 else 'film'} was {'very ' * (i % 2)}{WORDS[i % 4 + 4 * (1 - positive)]}"
                     f"\t{positive}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict[str, Path]:
    """The chain run once: prune, compact, export dense and pruned."""
    root = tmp_path_factory.mktemp("cli")
    paths = {"root": root, "model": make_model(root / "model"), "task": write_task(root / "task.tsv")}
    paths |= {name: root / name for name in ("masks", "pruned", "onnx-dense", "onnx-pruned")}
    ok("prune", "--model", paths["model"], "--task", paths["task"], "--target-sparsity", 0.5, "--out", paths["masks"],
       "--calib-batches", 2, "--batch-size", 8, "--max-length", 16)
    ok("compact", paths["masks"], "--model", paths["model"], "--out", paths["pruned"])
    ok("export", paths["model"], "--out", paths["onnx-dense"])
    ok("export", paths["pruned"], "--out", paths["onnx-pruned"])
    return paths


def copy(work: dict[str, Path], name: str, to: str) -> Path:
    target = work["root"] / to
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(work[name], target)
    return target


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_chain_writes_masks_model_and_onnx(work):
    summary = json.loads((work["masks"] / "masks.json").read_text())
    assert 0.5 <= summary["summary"]["param_sparsity"] <= 0.51
    assert summary["meta"]["method"] == "taylor" and summary["meta"]["num_labels"] == 2
    config = json.loads((work["pruned"] / "config.json").read_text())
    assert config["structprune"]["layers"] == [
        {"heads": layer["heads"], "kv_heads": layer["kv_heads"], "kv_map": None, "ffn": layer["ffn"]}
        for layer in summary["summary"]["layers"]]
    for name in ("onnx-dense", "onnx-pruned"):
        assert (work[name] / "model.onnx").is_file() and (work[name] / "tokenizer.json").is_file()


@pytest.mark.parametrize("backend", ["ort", "torch"])
def test_bench_prints_measured_and_ideal_speedup(work, backend):
    dense, pruned = (("onnx-dense", "onnx-pruned") if backend == "ort" else ("model", "pruned"))
    csv = work["root"] / f"bench-{backend}.csv"
    out = ok("bench", "--dense", work[dense], "--pruned", work[pruned], "--backend", backend, "--batch", 2,
             "--seq", 16, "--warmup", 1, "--repeats", 3, "--csv", csv)
    assert "FLOPs-ideal" in out and "dense" in out and "pruned" in out
    rows = csv.read_text().splitlines()
    assert len(rows) == 3 and "flops_ideal_speedup" in rows[0]


def test_eval_gives_the_same_metrics_for_the_model_and_its_onnx_export(work):
    on_model = ok("eval", work["pruned"], "--task", work["task"], "--max-length", 16)
    on_onnx = ok("eval", work["onnx-pruned"], "--task", work["task"], "--max-length", 16)
    assert "accuracy" in on_model and on_model == on_onnx


def test_overwrite_replaces_an_existing_output(work):
    target = copy(work, "masks", "masks-again")
    ok("prune", "--model", work["model"], "--task", work["task"], "--method", "magnitude", "--target-sparsity", 0.3,
       "--out", target, "--overwrite", "--max-length", 16)
    assert json.loads((target / "masks.json").read_text())["meta"]["method"] == "magnitude"


def test_the_command_runs_from_the_shell(work):
    result = subprocess.run(
        [sys.executable, "-m", "structprune.cli", "bench", "--dense", str(work["onnx-dense"]), "--pruned",
         str(work["onnx-pruned"]), "--seq", "8", "--batch", "1", "--repeats", "2"],
        capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "speedup" in result.stdout


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"benchmark data folder {SHARED_DATA} is absent")
def test_prune_and_eval_on_a_real_task(work):
    masks = work["root"] / "masks-sst2"
    ok("prune", "--model", work["model"], "--task", "sst2", "--train-size", 32, "--target-sparsity", 0.4,
       "--out", masks, "--calib-batches", 1, "--max-length", 32)
    assert json.loads((masks / "masks.json").read_text())["meta"]["task"] == "sst2"
    out = ok("eval", work["model"], "--task", "sst2", "--split", "dev", "--train-size", 64, "--max-length", 32)
    assert out.startswith("sst2 dev (64 examples): accuracy")


def test_every_option_is_explained():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # the subcommand parsers
    assert set(commands) == {"prune", "compact", "export", "bench", "doctor", "eval", "demo", "finetune", "latency-table",
                             "transfer-search"}
    for name, sub in commands.items():
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help text"
    code, out, _ = cli("prune", "--help")
    assert code == 0 and "--target-sparsity" in out


@pytest.fixture(scope="module")
def bad_inputs(work) -> dict[str, tuple[list[object], str]]:
    """Case name -> (arguments, a fragment of the expected error message)."""
    model, task, masks = work["model"], work["task"], work["masks"]
    prune = ["prune", "--model", model, "--task", task, "--max-length", 16]
    new = work["root"] / "never-written"
    empty_task = work["root"] / "empty.tsv"
    empty_task.write_text("sentence\tlabel\n")
    three_labels = write_task(work["root"] / "three.tsv", labels=3)
    corrupt_masks = copy(work, "masks", "corrupt-masks")
    truncate(corrupt_masks / "masks.safetensors")
    corrupt_summary = copy(work, "masks", "corrupt-summary")
    (corrupt_summary / "masks.json").write_text("{not json")
    corrupt_weights = copy(work, "pruned", "corrupt-weights")
    truncate(corrupt_weights / "model.safetensors")
    corrupt_config = copy(work, "pruned", "corrupt-config")
    (corrupt_config / "config.json").write_text('{"structprune": ')
    corrupt_hf = copy(work, "model", "corrupt-hf")
    truncate(corrupt_hf / "model.safetensors")
    corrupt_onnx = copy(work, "onnx-pruned", "corrupt-onnx")
    truncate(corrupt_onnx / "model.onnx")
    other = make_model(work["root"] / "other-model", layers=3)
    return {
        "unknown task": ([*prune[:3], "--task", "no-such-task", "--target-sparsity", 0.5, "--out", new],
                         "unknown task"),
        "unknown method": ([*prune, "--method", "tylor", "--target-sparsity", 0.5, "--out", new],
                           "unknown pruning method 'tylor'"),
        "sparsity 1": ([*prune, "--target-sparsity", 1.0, "--out", new], "outside [0, 1)"),
        "negative sparsity": ([*prune, "--target-sparsity", -0.1, "--out", new], "outside [0, 1)"),
        "output exists": ([*prune, "--target-sparsity", 0.5, "--out", masks], "--overwrite"),
        "empty data set": ([*prune[:3], "--task", empty_task, "--target-sparsity", 0.5, "--out", new],
                           "no examples"),
        "labels do not fit the model": ([*prune[:3], "--task", three_labels, "--target-sparsity", 0.5, "--out", new],
                                        "3 labels"),
        "missing model": (["prune", "--model", work["root"] / "nowhere", "--task", task, "--target-sparsity", 0.5,
                           "--out", new], "cannot load"),
        "corrupt Hugging Face weights": ([*prune[:2], corrupt_hf, *prune[3:], "--target-sparsity", 0.5,
                                          "--out", new], "cannot load"),
        "masks of another model": (["compact", masks, "--model", other, "--out", new], "shape"),
        "corrupt mask tensors": (["compact", corrupt_masks, "--model", model, "--out", new], "corrupt"),
        "corrupt mask summary": (["compact", corrupt_summary, "--model", model, "--out", new], "not valid JSON"),
        "not a mask folder": (["compact", model, "--model", model, "--out", new], "not a structprune mask folder"),
        "corrupt model weights": (["export", corrupt_weights, "--out", new], "corrupt or truncated"),
        "corrupt model config": (["export", corrupt_config, "--out", new], "not valid JSON"),
        "ONNX labels do not fit the task": (["eval", work["onnx-pruned"], "--task", three_labels], "3 labels"),
        "corrupt ONNX (eval)": (["eval", corrupt_onnx, "--task", task, "--max-length", 16], "corrupt or truncated"),
        "corrupt ONNX (bench)": (["bench", "--dense", work["onnx-dense"], "--pruned", corrupt_onnx, "--seq", 16],
                                 "corrupt or truncated"),
        "bench on a non-export folder": (["bench", "--dense", work["root"], "--pruned", work["onnx-pruned"]],
                                         "config.json is missing"),
    }


CASES = ["unknown task", "unknown method", "sparsity 1", "negative sparsity", "output exists", "empty data set",
         "labels do not fit the model", "missing model", "corrupt Hugging Face weights", "masks of another model",
         "corrupt mask tensors", "corrupt mask summary", "not a mask folder", "corrupt model weights",
         "corrupt model config", "ONNX labels do not fit the task", "corrupt ONNX (eval)", "corrupt ONNX (bench)", "bench on a non-export folder"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gets_a_clear_error(work, bad_inputs, case):
    args, message = bad_inputs[case]
    code, _, err = cli(*args)
    assert code == 1
    assert "error:" in err and message in err
    assert "Traceback" not in err
    assert not (work["root"] / "never-written").exists()


def test_bad_arguments_exit_with_status_2():
    code, _, err = cli("prune", "--model", "x")
    assert code == 2 and "required" in err
