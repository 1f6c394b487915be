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


def test_masks_made_for_another_model_of_the_same_shape_are_refused_unless_forced(folders, tmp_path):
    other = make_model(tmp_path / "other")  # same shapes, other weights
    masks = tmp_path / "masks"
    assert cli("prune", "--model", folders["model"], "--task", folders["task"], "--target-sparsity", 0.5, "--out",
               masks, "--calib-batches", 1, "--max-length", 16)[0] == 0
    _refused(["compact", masks, "--model", other, "--out", tmp_path / "small"], "was made for the model")
    code, _, err = cli("compact", masks, "--model", other, "--out", tmp_path / "small", "--force")
    assert code == 0, err


def test_weights_corrupted_inside_a_valid_container_are_refused(folders, tmp_path):
    from safetensors.torch import load_file, save_file

    from structprune.compaction import CHECKSUM_FILE

    saved = tmp_path / "saved"
    assert cli("compact", _masks(folders, tmp_path), "--model", folders["model"], "--out", saved)[0] == 0
    assert (saved / CHECKSUM_FILE).is_file()
    tensors = load_file(saved / "model.safetensors")
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1.0  # still a valid safetensors file
    save_file(tensors, str(saved / "model.safetensors"), metadata={"format": "pt"})
    _refused(["export", saved, "--out", tmp_path / "o"], "differs from the checksum")


def _masks(folders, tmp_path):
    masks = tmp_path / "m"
    assert cli("prune", "--model", folders["model"], "--task", folders["task"], "--target-sparsity", 0.5, "--out",
               masks, "--calib-batches", 1, "--max-length", 16)[0] == 0
    return masks


@pytest.mark.parametrize("summary", [[], {"masks": [], "scales": [], "meta": []}, {"masks": "head", "scales": []}])
def test_a_masks_summary_of_the_wrong_shape_is_refused(folders, tmp_path, summary):
    masks = _masks(folders, tmp_path)
    (masks / "masks.json").write_text(json.dumps(summary))
    _refused(["compact", masks, "--model", folders["model"], "--out", tmp_path / "s"], "shape of a masks summary")


@pytest.mark.parametrize("change", [{"hidden_size": 1_000_000}, {"layers": "many"}, {"hidden_size": -4}])
def test_a_damaged_or_enormous_structprune_config_is_refused_before_allocating(folders, tmp_path, change):
    saved = tmp_path / "saved"
    assert cli("compact", _masks(folders, tmp_path), "--model", folders["model"], "--out", saved)[0] == 0
    config = json.loads((saved / "config.json").read_text())
    config["structprune"] |= change
    (saved / "config.json").write_text(json.dumps(config))
    err = _refused(["export", saved, "--out", tmp_path / "o"], "")
    assert "damaged" in err or "GiB" in err


def test_a_hugging_face_config_of_a_billion_layers_is_refused_before_allocating(folders, tmp_path):
    huge = tmp_path / "huge"
    huge.mkdir()
    config = json.loads((folders["model"] / "config.json").read_text()) | {"num_hidden_layers": 10**9}
    (huge / "config.json").write_text(json.dumps(config))
    (huge / "model.safetensors").write_bytes((folders["model"] / "model.safetensors").read_bytes())
    _refused(["export", huge, "--out", tmp_path / "o"], "more than this machine's")


def test_a_teacher_of_another_architecture_is_refused_before_training(folders, tmp_path):
    from structprune.arch import from_hf
    from structprune.methods.distill import check_teacher
    from tests.conftest import make_hf

    with pytest.raises(ValueError, match="take different inputs"):
        check_teacher(from_hf(make_hf("llama")), from_hf(make_hf("bert")))


def test_a_list_where_masks_are_expected_is_a_clear_error():
    from structprune.compaction import compact
    from structprune.masked_model import MaskedModel
    from tests.conftest import make_hf

    with pytest.raises(TypeError, match="masks must be a MaskSet"):
        compact(make_hf("bert"), [1, 0])
    with pytest.raises(TypeError, match="masks must be a MaskSet"):
        MaskedModel(make_hf("bert"), [1, 0])


def test_a_nan_gate_is_refused_by_the_ops():
    from structprune import ops

    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(ValueError, match="head_gate holds NaN"):
        ops.masked_attention(q, q, q, torch.tensor([1.0, float("nan")]))
    x, w = torch.randn(2, 4), torch.randn(3, 4)
    with pytest.raises(ValueError, match="neuron_gate holds NaN"):
        ops.gated_ffn(x, w, None, w.t().contiguous(), None, torch.tensor([1.0, float("inf"), 0.0]))


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "expected a whole number >= 1"),
    (["--calib-batches", "-1"], "expected a whole number >= 1"),
    (["--max-length", "0"], "expected a whole number >= 1"),
    (["--seed", "-3"], "expected a whole number >= 0"),
    (["--method", "l0", "--lr", "-1"], "must be > 0"),
    (["--method", "l0", "--grad-accum", "0"], "expected a whole number >= 1"),
])
def test_bad_settings_fail_before_any_work(folders, tmp_path, args, message):
    code, _, err = cli("prune", "--model", folders["model"], "--task", folders["task"], "--target-sparsity", 0.5,
                       "--out", tmp_path / "never", *args)
    assert code in (1, 2) and message in err and "Traceback" not in err
    assert not (tmp_path / "never").exists() and not (tmp_path / "never-checkpoints").exists()


def test_threads_and_the_backend_variable_are_checked(folders, tmp_path, monkeypatch):
    code, _, err = cli("export", folders["model"], "--out", tmp_path / "o", "--threads", "-1")
    assert code == 2 and "expected a whole number >= 1" in err
    monkeypatch.setenv("STRUCTPRUNE_BACKEND", "bogus")
    _refused(["export", folders["model"], "--out", tmp_path / "o"], "STRUCTPRUNE_BACKEND='bogus' is not one of")
