"""Hostile model folders (structprune.loading): no remote code, no pickle, no degenerate tokenizer, no untrained
head where a trained one is expected, and no metric from NaN outputs. Each case runs through the command line
and must end in a one-line error (exit 1, no traceback) that says what was wrong."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

from structprune.evaluation import evaluate
from structprune.maskset import MaskError, MaskSet
from tests.cli.test_cli import WORDS, cli, make_model, write_task


def _refused(args, message: str) -> str:
    code, _, err = cli(*args)
    assert code == 1 and message in err and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    return {"root": root, "model": make_model(root / "model"), "task": write_task(root / "task.tsv")}


def test_a_folder_asking_for_remote_code_is_refused_and_its_code_never_runs(folders, tmp_path):
    evil = tmp_path / "evil"
    evil.mkdir()
    ran = tmp_path / "the-code-ran"
    (evil / "config.json").write_text(json.dumps({"model_type": "evil", "architectures": ["EvilModel"],
                                                  "auto_map": {"AutoConfig": "evil.EvilConfig",
                                                               "AutoModelForSequenceClassification": "evil.EvilModel"}}))
    (evil / "evil.py").write_text(f"open({str(ran)!r}, 'w').write('x')\n")
    for command in (["eval", evil, "--task", folders["task"]], ["export", evil, "--out", tmp_path / "o"],
                    ["prune", "--model", evil, "--task", folders["task"], "--target-sparsity", 0.5, "--out",
                     tmp_path / "m"]):
        err = _refused(command, "asks to run its own Python code")
        assert "never runs code from a model folder" in err
    assert not ran.exists()


def test_pickle_weights_are_refused_in_one_line_without_suggesting_the_unsafe_flag(folders, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    config = json.loads((folders["model"] / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config))
    torch.save({"x": torch.zeros(1)}, folder / "pytorch_model.bin")
    err = _refused(["export", folder, "--out", tmp_path / "o"], "pytorch_model.bin")
    assert "safetensors" in err and "weights_only=False" not in err and len(err.strip().splitlines()) == 1


def test_a_model_folder_without_tokenizer_files_is_refused(folders, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((folders["model"] / name).read_bytes())
    _refused(["eval", bare, "--task", folders["task"]], "has no tokenizer files")


def test_a_degenerate_tokenizer_is_refused(folders, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "model.safetensors"):
        (broken / name).write_bytes((folders["model"] / name).read_bytes())
    (broken / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizerFast(vocab_file=str(broken / "vocab.txt")).save_pretrained(broken)  # 5 tokens in transformers 5
    _refused(["eval", broken, "--task", folders["task"]], "has only 5 tokens")


def test_an_untrained_head_is_an_error_where_a_trained_model_is_expected(folders, tmp_path):
    base = tmp_path / "base"
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(base)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (base / name).write_bytes((folders["model"] / name).read_bytes())
    masks = tmp_path / "masks"
    code, _, err = cli("prune", "--model", folders["model"], "--task", folders["task"], "--target-sparsity", 0.5,
                       "--out", masks, "--calib-batches", 1, "--max-length", 16)
    assert code == 0, err
    _refused(["compact", masks, "--model", base, "--out", tmp_path / "small"], "no trained classification head")
    _refused(["export", base, "--out", tmp_path / "onnx"], "no trained classification head")
    code, out, err = cli("finetune", "--model", base, "--task", folders["task"], "--epochs", 1, "--max-length", 16,
                         "--out", tmp_path / "dense", "--eval-split", "")
    assert code == 0 and "notice:" in err and "it is trained here" in err


def test_mask_scales_beyond_any_sane_range_are_refused():
    with pytest.raises(MaskError, match="beyond the 10000"):
        MaskSet({"head": torch.ones(2, 4)}, {"head": torch.full((2, 4), 1e38)})


def test_no_metric_is_reported_from_nan_outputs(folders):
    from structprune.data import encode, load_file
    from structprune.loading import load_model, load_tokenizer

    model = load_model(str(folders["model"]), 2)
    with torch.no_grad():
        model.head.out.weight.fill_(float("nan"))
    data = load_file(folders["task"], text_columns=["sentence"], label_column="label")
    encoded = encode(data, load_tokenizer(folders["model"]), 16)
    with pytest.raises(FloatingPointError, match="NaN or infinite for 40 of 40 examples"):
        evaluate(model, encoded, data.task)
