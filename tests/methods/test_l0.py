"""The ``l0`` method: both controllers reach the target, distillation, bad input, aligned widths (``multiple_of``),
exact resume after a real kill, DDP with two gloo processes, and the ``prune --method l0`` / ``finetune`` commands."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from structprune.arch import from_hf
from structprune.arch.structure import ModelStructure
from structprune.budget import Budget
from structprune.cli.common import TaskArgs
from structprune.compaction import compact, from_pretrained
from structprune.data import get_task
from structprune.data.encoding import model_inputs, trim_padding
from structprune.finetune import mark_task
from structprune.methods import distill, l0
from structprune.methods.distill import (
    LayerDistillation,
    TeacherCache,
    prediction_loss,
    teacher_layers,
)
from tests.cli.test_cli import cli, make_model, ok, write_task
from tests.methods.test_methods import encoded_data

REPO = Path(__file__).resolve().parents[2]
VOCAB = 100


def tiny_bert(num_labels: int = 2) -> BertForSequenceClassification:
    """Two layers, 4 heads, FFN 64, hidden 32, no dropout (so runs compare exactly)."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32, num_labels=num_labels,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config).eval()


FAST = l0.L0Config(prune_epochs=30, finetune_epochs=2, batch_size=16, gate_lr=0.1, lambda_lr=0.1, lr=1e-3,
                   checkpoint_every=None)


@pytest.mark.parametrize("budget,granularities", [
    (Budget(0.5), l0.L0Config.granularities),
    (Budget(0.7), ("head", "neuron")),
    (Budget(0.4, "flops", seq_len=16), ("attn_layer", "head", "ffn_layer", "neuron")),
], ids=["params-0.5-all", "params-0.7-heads-neurons", "flops-0.4"])
@pytest.mark.parametrize("controller", ["hold", "lagrangian"])
def test_controller_drives_expected_sparsity_to_the_target(budget, granularities, controller):
    model = tiny_bert()
    config = dataclasses.replace(FAST, granularities=granularities, controller=controller)
    result = l0.prune(model, encoded_data(2, rows=64), budget, config=config)
    trace = result.log["sparsity_trace"]
    assert len(trace["target"]) == len(trace["sparsity"]) == result.log["prune_steps"]
    assert trace["target"][-1] == budget.target and trace["target"][0] < budget.target  # warmed up, then held
    assert result.log["lambdas"][1] > 0  # the quadratic multiplier only ever grows under ascent
    if controller == "hold":  # the end of the phase trains at the target: the gates are put there after each step
        warmup = round(config.warmup_share * result.log["prune_steps"])
        gaps = [abs(s - t) for s, t in zip(trace["sparsity"][warmup:], trace["target"][warmup:])]
        assert gaps and max(gaps) < 1e-4 and abs(result.log["expected_sparsity_end"] - budget.target) < 1e-4
    else:
        assert abs(result.log["expected_sparsity_end"] - budget.target) < 0.03
    assert abs(result.log["achieved"] - budget.target) <= 0.01
    assert set(result.masks.masks) == set(granularities)
    structure = ModelStructure.from_spec(from_hf(model).spec)
    pruned = compact(from_hf(model), result.masks)
    pruned.load_state_dict(result.weights)  # the weights are the fine-tuned compact model's
    assert result.log["summary"] == result.masks.summary(structure, from_hf(model).spec, seq_len=budget.seq_len)


def test_teacher_cache_gives_the_live_teachers_outputs():
    teacher = from_hf(tiny_bert()).eval()
    data = encoded_data(2, rows=24, seq=10)
    layers = teacher_layers(len(teacher.layers))
    cache = TeacherCache(teacher, data, layers, batch_size=5)  # batches padded differently from the lookup's
    rows = torch.tensor([7, 0, 13, 21])
    batch = trim_padding({name: value[rows] for name, value in data.items()} | {"row": rows})
    logits, states = TeacherCache.outputs(teacher, batch, model_inputs(batch))  # not attached: a forward pass
    cache.attach(teacher)
    cached_logits, cached_states = TeacherCache.outputs(teacher, batch, model_inputs(batch))
    torch.testing.assert_close(cached_logits, logits, rtol=1e-5, atol=1e-6)
    for t in layers:
        real = batch["attention_mask"].bool()
        torch.testing.assert_close(cached_states[t][real], states[t][real], rtol=1e-5, atol=1e-6)


def test_l0_trains_on_the_cached_teacher_when_it_fits():
    setup = l0.learned_setup(tiny_bert(), encoded_data(2), 0.5, FAST, None)
    assert torch.equal(setup.data["row"], torch.arange(24))
    row = trim_padding({name: value[:1] for name, value in setup.data.items()})
    with torch.no_grad():
        real = setup.teacher(**model_inputs(row)).logits
    other = {"input_ids": torch.full((1, 4), 7)}  # the cache answers by row index, whatever the inputs
    torch.testing.assert_close(TeacherCache.outputs(setup.teacher, {"row": torch.tensor([0])}, other)[0], real,
                               rtol=1e-5, atol=1e-6)
    assert not torch.allclose(TeacherCache.outputs(setup.teacher, {}, other)[0], real)


def test_model_is_left_unchanged():
    model = tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    l0.prune(model, encoded_data(2, rows=32), 0.3, config=dataclasses.replace(FAST, max_steps=3))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_unreachable_target_is_refused_before_training():
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"cannot be reached by gating only head: removing all of them gives at most"):
        l0.prune(tiny_bert(), encoded_data(2), 0.9, config=l0.L0Config(granularities=("head",)))
    assert time.perf_counter() - start < 5


def test_multiple_of_aligns_the_extracted_masks_and_the_compact_model():
    model = tiny_bert()  # FFN 64, hidden 32
    result = l0.prune(model, encoded_data(2, rows=64), 0.5, config=FAST, max_steps=10, multiple_of=4)
    summary = result.log["summary"]
    widths = [layer["ffn"] for layer in summary["layers"]]
    assert all(width % 4 == 0 for width in widths) and summary["hidden"] % 4 == 0, (widths, summary["hidden"])
    assert summary["hidden"] < 32 and any(0 < width < 64 for width in widths)  # pruned, not just left whole
    assert abs(result.log["achieved"] - 0.5) <= 0.01
    assert result.log["multiple_of"] == 4 and result.masks.meta["options"]["multiple_of"] == 4
    small = compact(from_hf(model), result.masks)
    small.load_state_dict(result.weights)
    structure = ModelStructure.from_spec(small.spec)
    assert [layer.ffn for layer in structure.layers] == widths and structure.hidden_size == summary["hidden"]


def test_bad_multiple_of_is_refused_before_training():
    with pytest.raises(ValueError, match="multiple_of must be a whole number >= 1, got 0"):
        l0.L0Config(multiple_of=0)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"multiple_of must be a whole number between 1 and 32 \(the widest FFN has "
                                         r"64 neurons, the hidden size is 32\), got 48"):
        l0.prune(tiny_bert(), encoded_data(2), 0.5, config=FAST, multiple_of=48)
    assert time.perf_counter() - start < 5


def test_teacher_for_other_labels_or_task_is_refused():
    student = from_hf(tiny_bert())
    with pytest.raises(ValueError, match="teacher has 3 outputs but the student has 2"):
        l0.prune(tiny_bert(), encoded_data(2), 0.5, teacher=tiny_bert(num_labels=3))
    teacher = from_hf(tiny_bert())
    mark_task(teacher, get_task("rte"))
    with pytest.raises(ValueError, match="fine-tuned on 'rte', not on 'sst2'"):
        distill.check_teacher(teacher, student, "sst2", get_task("sst2").label_names)
    mark_task(teacher, get_task("sst2"))
    distill.check_teacher(teacher, student, "sst2", get_task("sst2").label_names)
    with pytest.raises(ValueError, match="labels .* differ from the task's"):
        distill.check_teacher(teacher, student, None, ("no", "yes"))
    with pytest.raises(ValueError, match="labels range over 0..2 but the model has 2 outputs"):
        l0.prune(tiny_bert(), encoded_data(3), 0.5)


def test_prediction_and_layer_distillation():
    logits = torch.randn(4, 3)
    assert float(prediction_loss(logits, logits, 2.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(prediction_loss(logits, logits.flip(0), 2.0)) > 0
    assert teacher_layers(12) == (3, 6, 9, 12) and teacher_layers(6) == (1, 3, 4, 6) and teacher_layers(2) == (1, 2)
    layers = LayerDistillation(8, 8, num_student_layers=4, layers=(2, 4))
    teacher = [torch.randn(2, 5, 8) for _ in range(5)]
    # student layer 1 (0-based) reproduces teacher layer 4; layer 0 reproduces teacher layer 2
    student = [torch.zeros(2, 5, 8), teacher[2], teacher[4], torch.randn(2, 5, 8), torch.randn(2, 5, 8)]
    mask = torch.ones(2, 5)
    loss, mapping = layers(student, teacher, mask)
    assert mapping == [0, 1] and float(loss.detach()) == pytest.approx(0.0, abs=1e-6)
    # hidden dims removed: the compact student's states lack them and the restricted map gives the same loss
    kept = [0, 2, 3, 5, 7]
    zeroed = [s.clone() for s in student]
    for s in zeroed:
        s[..., [1, 4, 6]] = 0
    full_loss, _ = layers(zeroed, teacher, mask)
    small_loss, _ = layers.restrict(kept)([s[..., kept] for s in zeroed], teacher, mask)
    assert float(small_loss) == pytest.approx(float(full_loss), rel=1e-6)


RUN_SCRIPT = """
import json, sys, torch
sys.path.insert(0, {repo!r})
from tests.methods.test_l0 import tiny_bert
from tests.methods.test_methods import encoded_data
from structprune.compaction import compact
from structprune.arch import from_hf
from structprune.budget import Budget
from structprune import transfer
from structprune.methods import l0
from structprune.train import digest, init_distributed
torch.set_num_threads(1)
out, checkpoints, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
method, _, coupling = (sys.argv[4] if len(sys.argv) > 4 else "l0").partition(":")
rank, world = init_distributed()
config = l0.L0Config(prune_epochs=steps / 4, finetune_epochs=1.5, batch_size=16, gate_lr=0.1, lambda_lr=0.1,
                     lr=1e-3, checkpoint_every=1)
data = encoded_data(2, rows=64)
checkpoint_dir = None if checkpoints == "-" else checkpoints
if method == "transfer":
    from tests.transfer.transfer_support import toy_aux
    result = transfer.prune(tiny_bert(), data, Budget(0.5), aux=[toy_aux()],
                            config=transfer.TransferConfig(l0=config, coupling=coupling or "separate-masks",
                                                           guard="cosine"),
                            checkpoint_dir=checkpoint_dir)
else:
    result = l0.prune(tiny_bert(), data, Budget(0.5), config=config, checkpoint_dir=checkpoint_dir)
model = compact(from_hf(tiny_bert()), result.masks)
model.load_state_dict(result.weights)
with torch.inference_mode():
    logits = model(data["input_ids"], data["attention_mask"]).logits
record = {{"masks": {{k: v.tolist() for k, v in result.masks.masks.items()}}, "weights": digest(result.weights),
          "logits": logits.tolist(), "prune_losses": result.log["prune_losses"],
          "finetune_losses": result.log["finetune_losses"], "achieved": result.log["achieved"]}}
if method == "transfer":
    record["aux_steps"] = result.log["aux_steps"]
with open(f"{{out}}.rank{{rank}}.json", "w") as f:
    json.dump(record, f)
"""
"""A pruning run of ``argv[4]`` (``l0``, the default, ``transfer`` or ``transfer:COUPLING``; transfer's coupling
defaults to separate-masks) for ``argv[3]`` steps on 64 rows, with checkpoints after every step in ``argv[2]``
(``-``: none); each process writes its masks, weight digest, logits and losses (and the transfer ``aux_steps``)
to ``{argv[1]}.rank{rank}.json``. The ``run_script`` fixture (tests/conftest.py) writes it to a file."""


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def _record(out: Path, rank: int = 0) -> dict:
    return json.loads(Path(f"{out}.rank{rank}.json").read_text())


def run_once(run_script: Path, out: Path, steps: int, method: str = "l0") -> dict:
    """One uninterrupted run of RUN_SCRIPT without checkpoints; its record."""
    subprocess.run([sys.executable, str(run_script), str(out), "-", str(steps), method], check=True, env=_env(),
                   timeout=600)
    return _record(out)


@pytest.fixture(scope="module")
def uninterrupted(run_script, tmp_path_factory) -> dict:
    return run_once(run_script, tmp_path_factory.mktemp("l0-ref") / "ref", 40)


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.is_file() else 0


def kill_and_resume(run_script: Path, folder: Path, steps: int, phase: str, at_step: int, method: str = "l0") -> dict:
    """SIGKILL a run of RUN_SCRIPT once ``phase`` has logged ``at_step`` steps to its checkpoint folder, run it
    again with the same arguments (it resumes from the checkpoints) and return the resumed run's record."""
    out, checkpoints = folder / "run", folder / "ckpt"
    args = [sys.executable, str(run_script), str(out), str(checkpoints), str(steps), method]
    process = subprocess.Popen(args, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = checkpoints / phase / "log.jsonl"
    deadline = time.monotonic() + 300
    while _lines(log) < at_step and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    subprocess.run(args, check=True, env=_env(), timeout=600)
    return _record(out)


def assert_same_run(resumed: dict, reference: dict) -> None:
    """Every recorded quantity of two runs (masks, weight digest, logits, losses, ...) is identical."""
    assert resumed.keys() == reference.keys()
    for key, value in reference.items():
        assert resumed[key] == value, f"{key} differs"


@pytest.mark.parametrize("phase,at_step", [("prune", 15), ("finetune", 3)])
def test_killed_run_resumes_to_identical_masks_and_metrics(run_script, uninterrupted, tmp_path, phase, at_step):
    assert_same_run(kill_and_resume(run_script, tmp_path, 40, phase, at_step), uninterrupted)
    assert abs(uninterrupted["achieved"] - 0.5) <= 0.01


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(run_script: Path, folder: Path, steps: int, method: str = "l0") -> list[dict]:
    """RUN_SCRIPT in two gloo processes started by ``torch.distributed.run``; the record of each rank."""
    out = folder / "ddp"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
                    f"--master_port={_free_port()}", str(run_script), str(out), str(folder / "ckpt"), str(steps),
                    method], check=True, env=_env(), timeout=600, capture_output=True)
    return [_record(out, rank) for rank in (0, 1)]


def assert_matches_one_process(one: dict, ranks: list[dict]) -> None:
    """The two processes of a DDP run end with the same masks and weights, their losses track one process's
    and they meet the budget."""
    assert ranks[0]["masks"] == ranks[1]["masks"] and ranks[0]["weights"] == ranks[1]["weights"]
    # each process takes half of every batch; the weighted, averaged gradient is the one-process gradient
    single, double = torch.tensor(one["prune_losses"]), torch.tensor(ranks[0]["prune_losses"])
    assert torch.allclose(single[:10], double[:10], atol=1e-4)
    assert torch.allclose(single, double, atol=5e-2)
    assert abs(ranks[0]["achieved"] - 0.5) <= 0.01


def test_ddp_two_gloo_processes_match_one_process(run_script, uninterrupted, tmp_path):
    assert_matches_one_process(uninterrupted, run_two_processes(run_script, tmp_path, 40))


def test_cli_finetune_then_prune_l0_writes_everything(tmp_path):
    model_dir = make_model(tmp_path / "model")
    task = write_task(tmp_path / "task.tsv", rows=48)
    out = ok("finetune", "--model", model_dir, "--task", task, "--epochs", 2, "--batch-size", 16, "--max-length", 32,
             "--out", tmp_path / "dense", "--eval-split", "")
    assert f"fine-tuned on {len(TaskArgs(str(task), 'train').load())} task examples" in out  # all but the held-out
    assert json.loads((tmp_path / "dense" / "config.json").read_text())["finetuned_task"] == "task"
    out = ok("prune", "--method", "l0", "--model", tmp_path / "dense", "--task", task, "--target-sparsity", 0.5,
             "--batch-size", 16, "--prune-epochs", 20, "--finetune-epochs", 1, "--gate-lr", 0.1, "--lambda-lr", 0.1,
             "--controller", "hold", "--seq-len", 16, "--max-length", 32, "--out", tmp_path / "l0")
    assert "parameter sparsity" in out
    folder = tmp_path / "l0"
    for name in ("masks/masks.json", "pruned/config.json", "onnx-dense/model.onnx", "onnx-pruned/model.onnx",
                 "report.md", "results.json", "l0-log.json"):
        assert (folder / name).is_file(), name
    results = json.loads((folder / "results.json").read_text())
    assert abs(results["param_sparsity"] - 0.5) <= 0.01
    assert results["sparsity_trace"]["sparsity"][-1] == pytest.approx(0.5, abs=1e-4)  # held on the budget
    assert "Expected sparsity of the gates at the end of pruning: 0.500 (target 0.500)" in (
        folder / "report.md").read_text()
    assert results["pruned"]["accuracy"] == pytest.approx(results["pruned"]["accuracy_onnx"])
    assert not (folder / "dense").exists()  # the given model was already fine-tuned on the task: it is the teacher
    assert from_pretrained(folder / "pruned").config.finetuned_task == "task"
    assert (tmp_path / "l0-checkpoints" / "l0" / "prune" / "checkpoint.pt").is_file()


def test_cli_l0_refuses_a_teacher_of_another_task(tmp_path):
    model_dir = make_model(tmp_path / "model")
    task = write_task(tmp_path / "task.tsv", rows=16)
    ok("finetune", "--model", model_dir, "--task", task, "--epochs", 1, "--max-length", 32, "--out",
       tmp_path / "teacher", "--eval-split", "")
    config_path = tmp_path / "teacher" / "config.json"
    config = json.loads(config_path.read_text())
    config["finetuned_task"] = "rte"
    config_path.write_text(json.dumps(config))
    code, _, err = cli("prune", "--method", "l0", "--model", model_dir, "--teacher", tmp_path / "teacher", "--task",
                       task, "--target-sparsity", 0.5, "--out", tmp_path / "out")
    assert code == 1 and "teacher was fine-tuned on 'rte', not on 'task'" in err and "Traceback" not in err


def test_cli_l0_fine_tunes_the_teacher_when_the_model_is_not(tmp_path):
    model_dir = make_model(tmp_path / "model")
    task = write_task(tmp_path / "task.tsv", rows=32)
    ok("prune", "--method", "l0", "--model", model_dir, "--task", task, "--target-sparsity", 0.3, "--batch-size", 16,
       "--max-steps", 2, "--seq-len", 16, "--max-length", 32, "--out", tmp_path / "l0",
       "--checkpoint-dir", tmp_path / "ckpt")
    dense = from_pretrained(tmp_path / "l0" / "dense")
    assert dense.config.finetuned_task == "task"
    assert (tmp_path / "ckpt" / "dense" / "checkpoint.pt").is_file()
    assert "fine-tuned here" in (tmp_path / "l0" / "report.md").read_text()
