"""Adapter for post-LayerNorm encoders: BERT, RoBERTa, ELECTRA and MiniLM (BERT weights)."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from structprune.arch.mapping import activation_name, module_state
from structprune.modeling_structprune import FORMAT_VERSION

MODEL_TYPES = ("bert", "roberta", "electra")
CLASSIFIER = {"bert": "bert_pooler", "roberta": "roberta", "electra": "electra"}


def _check(config) -> None:
    kind = getattr(config, "position_embedding_type", "absolute") or "absolute"
    if kind != "absolute":
        raise ValueError(
            f"{config.model_type}: position_embedding_type={kind!r} is not supported (only 'absolute')"
        )
    if getattr(config, "is_decoder", False):
        raise ValueError(f"{config.model_type}: decoder (is_decoder=True) BERT models are not supported")


def spec(hf_model: PreTrainedModel) -> dict:
    """The full-size ``structprune`` spec of a BERT-family sequence-classification model."""
    config = hf_model.config
    _check(config)
    heads = config.num_attention_heads
    project = config.model_type == "electra" and config.embedding_size != config.hidden_size
    dropout = config.hidden_dropout_prob
    classifier_dropout = getattr(config, "classifier_dropout", None)
    return {
        "format_version": FORMAT_VERSION,
        "family": "bert",
        "arch": config.model_type,
        "hidden_size": config.hidden_size,
        "head_dim": config.hidden_size // heads,
        "layers": [{"heads": heads, "kv_heads": heads, "kv_map": None, "ffn": config.intermediate_size}
                   for _ in range(config.num_hidden_layers)],
        "gated_ffn": False,
        "qkv_bias": True,
        "o_bias": True,
        "ffn_bias": True,
        "activation": activation_name(config.hidden_act, config.model_type),
        "norm_eps": config.layer_norm_eps,
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_position_embeddings,
        "type_vocab_size": config.type_vocab_size,
        "pad_token_id": config.pad_token_id,
        "position_style": "roberta" if config.model_type == "roberta" else "absolute",
        "embedding_size": getattr(config, "embedding_size", config.hidden_size),
        "embedding_project": project,
        "classifier": CLASSIFIER[config.model_type],
        "classifier_hidden": config.hidden_size,
        "num_labels": config.num_labels,
        "hidden_dropout": dropout,
        "classifier_dropout": dropout if classifier_dropout is None else classifier_dropout,
    }


def state_dict(hf_model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """Weights of a BERT-family classification model under structprune's names."""
    base = hf_model.base_model
    emb = base.embeddings
    state = {}
    state |= module_state("embeddings.word", emb.word_embeddings)
    state |= module_state("embeddings.position", emb.position_embeddings)
    if getattr(emb, "token_type_embeddings", None) is not None:
        state |= module_state("embeddings.token_type", emb.token_type_embeddings)
    state |= module_state("embeddings.norm", emb.LayerNorm)
    if getattr(base, "embeddings_project", None) is not None:
        state |= module_state("embeddings.project", base.embeddings_project)
    for i, layer in enumerate(base.encoder.layer):
        p = f"layers.{i}"
        attn = layer.attention
        state |= module_state(f"{p}.attn.q", attn.self.query)
        state |= module_state(f"{p}.attn.k", attn.self.key)
        state |= module_state(f"{p}.attn.v", attn.self.value)
        state |= module_state(f"{p}.attn.o", attn.output.dense)
        state |= module_state(f"{p}.attn_norm", attn.output.LayerNorm)
        state |= module_state(f"{p}.ffn.up", layer.intermediate.dense)
        state |= module_state(f"{p}.ffn.down", layer.output.dense)
        state |= module_state(f"{p}.ffn_norm", layer.output.LayerNorm)
    model_type = hf_model.config.model_type
    if model_type == "bert":
        if getattr(base, "pooler", None) is None:
            raise ValueError("bert: the model has no pooler; load it with AutoModelForSequenceClassification")
        state |= module_state("head.dense", base.pooler.dense)
        state |= module_state("head.out", hf_model.classifier)
    else:
        state |= module_state("head.dense", hf_model.classifier.dense)
        state |= module_state("head.out", hf_model.classifier.out_proj)
    return state
