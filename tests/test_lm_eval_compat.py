"""structprune.likelihood against lm-evaluation-harness: a compact structprune model saved with its tokenizer
loads in lm-eval's HFLM (trust_remote_code), and lm-eval's simple_evaluate on local PIQA- and WinoGrande-format
files gives the same log-likelihoods, acc and acc_norm as :func:`multiple_choice` on the same items read by
structprune's readers. Skipped without lm-eval (`pip install lm-eval`)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from structprune.arch import from_hf
from structprune.arch.structure import ModelStructure
from structprune.compaction import compact, from_pretrained, save
from structprune.data.lm import load_items
from structprune.likelihood import multiple_choice
from structprune.maskset import uniform_masks
from tests.test_likelihood import TEXT, make_lm, make_tokenizer

pytest.importorskip("lm_eval", reason="needs `pip install lm-eval`")

ITEMS = 24
PIQA_YAML = """task: piqa_local
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {path}
output_type: multiple_choice
validation_split: validation
doc_to_text: "Question: {{{{goal}}}}\\nAnswer:"
doc_to_target: label
doc_to_choice: "{{{{[sol1, sol2]}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""
WINOGRANDE_YAML = """task: winogrande_local
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {path}
output_type: multiple_choice
validation_split: validation
doc_to_text: gold
doc_to_target: continuation
doc_to_choice: context_options
metric_list:
  - metric: acc
"""


def _phrase(rng: random.Random, words: list[str], low: int, high: int) -> str:
    start = rng.randrange(len(words) - high)
    return " ".join(words[start:start + rng.randint(low, high)])


def _write_sets(root: Path) -> None:
    """PIQA (staged files for structprune, one labelled JSONL for lm-eval) and WinoGrande (llm-foundry format)."""
    rng, words = random.Random(0), TEXT.split()
    piqa = [{"goal": _phrase(rng, words, 2, 6), "sol1": _phrase(rng, words, 1, 9), "sol2": _phrase(rng, words, 1, 9),
             "label": rng.randint(0, 1)} for _ in range(ITEMS)]
    (root / "PIQA").mkdir()
    (root / "PIQA" / "valid.jsonl").write_text("".join(json.dumps({k: d[k] for k in ("goal", "sol1", "sol2")}) + "\n"
                                                       for d in piqa))
    (root / "PIQA" / "valid-labels.lst").write_text("".join(f"{d['label']}\n" for d in piqa))
    (root / "piqa_local.jsonl").write_text("".join(json.dumps(d) + "\n" for d in piqa))
    wino = []
    for _ in range(ITEMS):
        prefix = _phrase(rng, words, 2, 5)
        wino.append({"context_options": [f"{prefix} {_phrase(rng, words, 1, 2)}", f"{prefix} {_phrase(rng, words, 1, 2)}"],
                     "continuation": _phrase(rng, words, 2, 5), "gold": rng.randint(0, 1)})
    (root / "WINOGRANDE").mkdir()
    (root / "WINOGRANDE" / "winogrande.jsonl").write_text("".join(json.dumps(d) + "\n" for d in wino))
    (root / "piqa_local.yaml").write_text(PIQA_YAML.format(path=root / "piqa_local.jsonl"))
    (root / "winogrande_local.yaml").write_text(WINOGRANDE_YAML.format(path=root / "WINOGRANDE" / "winogrande.jsonl"))


@pytest.fixture(scope="module")
def compact_folder(tmp_path_factory) -> Path:
    """A compact (half the heads and neurons) tiny Llama, saved with its tokenizer."""
    full = from_hf(make_lm(seed=2))
    masks = uniform_masks(ModelStructure.from_spec(full.spec), 0.5, 0.5)
    return save(compact(full, masks).eval(), tmp_path_factory.mktemp("compact") / "model", make_tokenizer())


def test_simple_evaluate_matches_multiple_choice(compact_folder: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    _write_sets(tmp_path)
    lm = HFLM(pretrained=str(compact_folder), trust_remote_code=True, batch_size=5, device="cpu", dtype="float32")
    out = simple_evaluate(model=lm, tasks=["piqa_local", "winogrande_local"], log_samples=True, bootstrap_iters=0,
                          task_manager=TaskManager(include_path=str(tmp_path)))
    tokenizer = make_tokenizer()
    ours = {"piqa_local": load_items("piqa", data_dir=tmp_path),
            "winogrande_local": load_items("winogrande", data_dir=tmp_path)}
    reloaded = from_pretrained(compact_folder).eval()
    for task, items in ours.items():
        result = multiple_choice(lm.model, tokenizer, items, batch_size=7, progress=False)
        samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
        theirs = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
        assert [list(s) for s in result.scores] == [pytest.approx(t, abs=1e-4) for t in theirs]
        metrics = out["results"][task]
        assert result.acc == pytest.approx(100 * metrics["acc,none"])
        if "acc_norm,none" in metrics:
            assert result.acc_norm == pytest.approx(100 * metrics["acc_norm,none"])
        again = multiple_choice(reloaded, tokenizer, items, progress=False)
        assert torch.allclose(torch.tensor(again.scores), torch.tensor(result.scores), atol=1e-4)
    assert out["results"]["piqa_local"]["acc,none"] != out["results"]["piqa_local"]["acc_norm,none"]
