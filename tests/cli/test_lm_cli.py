"""The command line on a causal LM: prune on calibration text -> compact -> export (KV cache) -> eval -> bench on a
tiny random Llama, and the errors of LM-specific bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import BertTokenizerFast, LlamaConfig, LlamaForCausalLM

from structprune.compaction import from_pretrained
from structprune.maskset import MaskSet
from tests.cli.test_cli import WORDS, cli, ok


def make_causal_folder(directory: Path) -> Path:
    """A tiny random Llama causal LM (GQA, tied head) with a word-level tokenizer, as a Hugging Face folder."""
    directory.mkdir(parents=True)
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(tokens)}, model_max_length=256)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokens), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=48, max_position_embeddings=256,
                         tie_word_embeddings=True, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_text(path: Path, sentences: int = 200) -> Path:
    lines = [f"the {WORDS[i % 4]} {'movie' if i % 3 else 'film'} was {'very ' * (i % 2)}{WORDS[(i * 7) % 8]}"
             for i in range(sentences)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lm-cli")
    paths = {"model": make_causal_folder(root / "model"), "text": write_text(root / "text.txt")}
    paths |= {name: root / name for name in ("masks", "pruned", "onnx-dense", "onnx-pruned")}
    task = f"text:{paths['text']}"
    out = ok("prune", "--model", paths["model"], "--task", task, "--method", "taylor", "--target-sparsity", 0.4,
             "--max-length", 16, "--train-size", 12, "--out", paths["masks"])
    assert "parameter sparsity" in out
    ok("compact", paths["masks"], "--model", paths["model"], "--out", paths["pruned"])
    ok("export", paths["model"], "--out", paths["onnx-dense"])
    ok("export", paths["pruned"], "--out", paths["onnx-pruned"])
    return paths | {"task": Path(task)}


def test_masks_record_the_calibration_text(lm):
    meta = json.loads((lm["masks"] / "masks.json").read_text())["meta"]
    assert meta["task"].startswith("text:") and meta["examples"] == 12 and "num_labels" not in meta
    config = json.loads((lm["pruned"] / "config.json").read_text())
    assert config["auto_map"] == {"AutoModelForCausalLM": "modeling_structprune.LlamaStructpruneForCausalLM"}
    onnx = json.loads((lm["onnx-pruned"] / "config.json").read_text())
    assert onnx["structprune_onnx"]["layout"] == "text-generation-with-past"


def test_compact_recovers_by_distillation_on_the_calibration_text(lm, tmp_path):
    out = ok("compact", lm["masks"], "--model", lm["model"], "--out", tmp_path / "recovered", "--recover", 3)
    assert "recovery: 3 steps" in out and "distillation loss" in out
    ok("eval", tmp_path / "recovered", "--task", str(lm["task"]), "--window", 32, "--limit", 2)
    code, _, err = cli("compact", lm["masks"], "--model", lm["model"], "--out", tmp_path / "bad", "--recover", 0)
    assert code == 2 and "--recover" in err


def test_eval_reports_perplexity_of_dense_and_pruned(lm):
    for name in ("model", "pruned"):
        out = ok("eval", lm[name], "--task", str(lm["task"]), "--window", 32, "--limit", 3)
        assert "perplexity" in out and "windows 3" in out


def test_bench_times_prefill_and_decode(lm, tmp_path):
    csv = tmp_path / "lm.csv"
    out = ok("bench", "--dense", lm["onnx-dense"], "--pruned", lm["onnx-pruned"], "--prompt", 16, "--context", 16,
             "--batch", 1, "--repeats", 2, "--warmup", 1, "--csv", csv)
    assert "prefill" in out and "decode" in out
    rows = csv.read_text().splitlines()
    assert len(rows) == 3 and "ideal_speedup" in rows[0]


def test_bench_on_torch_takes_the_hugging_face_folder_as_dense(lm):
    out = ok("bench", "--dense", lm["model"], "--pruned", lm["pruned"], "--backend", "torch", "--prompt", 16,
             "--context", 16, "--batch", 1, "--repeats", 2, "--warmup", 1)
    assert "prefill" in out and "decode" in out and "torch" in out


@pytest.mark.parametrize("args, message", [
    (("prune", "--method", "l0"), "prune a causal LM with a training-free method"),
    (("eval-onnx",), "is an ONNX export; score the model folder"),
    (("bench-cuda",), "cuda"),
])
def test_bad_lm_input_is_a_clear_error(lm, tmp_path, args, message):
    if args[0] == "prune":
        command = ["prune", "--model", lm["model"], "--task", str(lm["task"]), "--target-sparsity", 0.3,
                   "--out", tmp_path / "m", *args[1:]]
    elif args[0] == "eval-onnx":
        command = ["eval", lm["onnx-pruned"], "--task", str(lm["task"])]
    else:
        command = ["bench", "--dense", lm["model"], "--pruned", lm["pruned"], "--backend", "torch", "--device", "cuda"]
    if args[0] == "bench-cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, _, err = cli(*command)
    assert code == 1 and message in err, err
    assert "Traceback" not in err


def test_a_task_without_calibration_text_is_refused_for_pruning(lm, tmp_path):
    code, _, err = cli("prune", "--model", lm["model"], "--task", "piqa", "--target-sparsity", 0.3,
                       "--out", tmp_path / "m")
    assert code == 1 and "has no calibration text" in err


def test_expert_and_flap_prune_a_causal_lm_and_compact(lm, tmp_path):
    domain = write_text(tmp_path / "domain.txt", sentences=80)
    ok("prune", "--model", lm["model"], "--task", lm["task"], "--method", "expert", "--expert",
       f"domain=text:{domain}", "--target-sparsity", 0.3, "--max-length", 16, "--train-size", 8,
       "--calib-examples", 6, "--out", tmp_path / "expert")
    meta = json.loads((tmp_path / "expert" / "masks.json").read_text())["meta"]
    assert meta["options"]["corpora"] == [f"domain=text:{domain}"] and "reference" in meta["relevance"]
    ok("prune", "--model", lm["model"], "--task", lm["task"], "--method", "flap", "--target-sparsity", 0.3,
       "--max-length", 16, "--train-size", 8, "--out", tmp_path / "flap")
    assert json.loads((tmp_path / "flap" / "masks.json").read_text())["shifts"] == ["attn", "ffn"]
    ok("compact", tmp_path / "flap", "--model", lm["model"], "--out", tmp_path / "flap-model")
    assert json.loads((tmp_path / "flap-model" / "config.json").read_text())["structprune"]["ffn_out_bias"]
    ok("prune", "--model", lm["model"], "--task", lm["task"], "--method", "flap", "--refit", "--target-sparsity",
       0.3, "--max-length", 16, "--train-size", 8, "--out", tmp_path / "refit")
    assert (tmp_path / "refit" / "weights.safetensors").is_file()  # the refitted projections travel with the masks
    out = ok("compact", tmp_path / "refit", "--model", lm["model"], "--out", tmp_path / "refit-model")
    assert "compacting the weights flap changed" in out
    refit, plain = (from_pretrained(tmp_path / name).state_dict() for name in ("refit-model", "flap-model"))
    assert refit.keys() == plain.keys() and not torch.equal(refit["layers.0.ffn.down.weight"],
                                                            plain["layers.0.ffn.down.weight"])
    code, _, err = cli("prune", "--model", lm["model"], "--task", lm["task"], "--method", "expert", "--expert",
                       "dialect=x", "--target-sparsity", 0.3, "--out", tmp_path / "bad")
    assert code != 0 and "DIMENSION=SOURCE" in err and not (tmp_path / "bad").exists()


def test_sprint_saves_its_tuned_weights_and_compact_uses_them(lm, tmp_path):
    ok("prune", "--model", lm["model"], "--task", lm["task"], "--method", "sprint", "--target-sparsity", 0.2,
       "--max-length", 16, "--train-size", 8, "--calib-examples", 4, "--candidates", 1, "--probe-steps", 1,
       "--tune-steps", 1, "--out", tmp_path / "sprint")
    assert (tmp_path / "sprint" / "weights.safetensors").is_file()
    out = ok("compact", tmp_path / "sprint", "--model", lm["model"], "--out", tmp_path / "sprint-model")
    assert "compacting the weights sprint changed" in out
    config = json.loads((tmp_path / "sprint-model" / "config.json").read_text())["structprune"]
    assert any(layer["heads"] == 0 or layer["ffn"] == 0 for layer in config["layers"])


def test_stream_scores_from_the_files_into_the_same_masks(lm, tmp_path):
    args = ["--task", lm["task"], "--method", "flap", "--target-sparsity", 0.3, "--max-length", 16, "--train-size", 12]
    ok("prune", "--model", lm["model"], *args, "--out", tmp_path / "held")
    ok("prune", "--model", lm["model"], *args, "--stream", "--out", tmp_path / "streamed")
    held, streamed = (MaskSet.load(tmp_path / name) for name in ("held", "streamed"))
    assert all(torch.equal(held.masks[k], streamed.masks[k]) for k in held.masks)
    code, _, err = cli("prune", "--model", lm["model"], *args[:3], "taylor", *args[4:], "--stream",
                       "--out", tmp_path / "bad")
    assert code != 0 and "block_influence, expert, flap" in err and not (tmp_path / "bad").exists()
    ok("compact", tmp_path / "held", "--model", lm["model"], "--out", tmp_path / "held-model")
    ok("compact", tmp_path / "streamed", "--model", lm["model"], "--stream", "--out", tmp_path / "streamed-model")
    held, streamed = (from_pretrained(tmp_path / name).state_dict() for name in ("held-model", "streamed-model"))
    assert held.keys() == streamed.keys() and all(torch.equal(held[k], streamed[k]) for k in held)
    assert (tmp_path / "streamed-model" / "tokenizer_config.json").is_file()
    code, _, err = cli("compact", tmp_path / "streamed", "--model", lm["model"], "--stream", "--recover", 2,
                       "--out", tmp_path / "bad")
    assert code != 0 and "compact without --stream" in err and not (tmp_path / "bad").exists()
