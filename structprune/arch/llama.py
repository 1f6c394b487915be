"""Adapter for pre-RMSNorm decoders: Llama, Qwen2, Qwen3 and Mistral (GQA, SwiGLU, rotary positions),
as sequence classifiers (``*ForSequenceClassification``) or causal LMs (``*ForCausalLM``)."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from structprune.arch.mapping import activation_name, module_state
from structprune.modeling_structprune import FORMAT_VERSION

MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def _is_causal_lm(hf_model: PreTrainedModel) -> bool:
    return getattr(hf_model, "lm_head", None) is not None


def _sliding_layers(config) -> tuple[int | None, list[bool]]:
    """The attention window and which layers use it (Qwen2/3 store a window they may not use)."""
    window = getattr(config, "sliding_window", None)
    layers = config.num_hidden_layers
    if not getattr(config, "use_sliding_window", True) or not window:
        return None, [False] * layers
    types = getattr(config, "layer_types", None)
    if types is None:
        return window, [True] * layers
    sliding = [t == "sliding_attention" for t in types]
    return (window, sliding) if any(sliding) else (None, sliding)


def _tied(hf_model: PreTrainedModel) -> bool:
    head, embedding = hf_model.lm_head.weight, hf_model.model.embed_tokens.weight
    return head is embedding or (head.device.type != "meta" and head.data_ptr() == embedding.data_ptr())


def _head(hf_model: PreTrainedModel) -> dict:
    config = hf_model.config
    if _is_causal_lm(hf_model):
        return {"task": "causal_lm", "tie_word_embeddings": _tied(hf_model)}
    if config.pad_token_id is None:
        raise ValueError(
            f"{config.model_type}: sequence classification needs config.pad_token_id to find the last "
            "token of each sequence; set it (e.g. model.config.pad_token_id = tokenizer.eos_token_id)"
        )
    return {"task": "sequence_classification", "classifier": "last_token", "classifier_hidden": config.hidden_size,
            "classifier_bias": hf_model.score.bias is not None, "num_labels": config.num_labels,
            "classifier_dropout": 0.0}


def spec(hf_model: PreTrainedModel) -> dict:
    """The full-size ``structprune`` spec of a Llama-family classifier or causal LM."""
    config = hf_model.config
    backbone = hf_model.model
    attn = backbone.layers[0].self_attn
    mlp = backbone.layers[0].mlp
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = attn.q_proj.out_features // heads
    rotary = backbone.rotary_emb
    rope_type = getattr(rotary, "rope_type", "default")
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"{config.model_type}: RoPE scaling {rope_type!r} is not supported; supported: {ROPE_TYPES}")
    window, sliding = _sliding_layers(config)
    kv_map = None if heads == kv_heads else [h // (heads // kv_heads) for h in range(heads)]
    return {
        "format_version": FORMAT_VERSION,
        "family": "llama",
        "arch": config.model_type,
        "hidden_size": config.hidden_size,
        "head_dim": head_dim,
        "layers": [{"heads": heads, "kv_heads": kv_heads, "kv_map": kv_map, "ffn": config.intermediate_size,
                    "sliding": s} for s in sliding],
        "gated_ffn": True,
        "qkv_bias": attn.q_proj.bias is not None,
        "o_bias": attn.o_proj.bias is not None,
        "qk_norm": getattr(attn, "q_norm", None) is not None,
        "ffn_bias": mlp.up_proj.bias is not None,
        "activation": activation_name(config.hidden_act, config.model_type),
        "norm_eps": config.rms_norm_eps,
        "vocab_size": config.vocab_size,
        "pad_token_id": config.pad_token_id,
        "max_position_embeddings": config.max_position_embeddings,
        "rope_inv_freq": rotary.inv_freq.float().tolist(),
        "rope_attention_scaling": float(rotary.attention_scaling),
        "sliding_window": window,
        "hidden_dropout": 0.0,
    } | _head(hf_model)


def state_dict(hf_model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """Weights of a Llama-family model under structprune's names."""
    backbone = hf_model.model
    state = module_state("embeddings.word", backbone.embed_tokens)
    for i, layer in enumerate(backbone.layers):
        p = f"layers.{i}"
        attn, mlp = layer.self_attn, layer.mlp
        for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "o_proj"),
                             ("q_norm", "q_norm"), ("k_norm", "k_norm")):
            if getattr(attn, theirs, None) is not None:
                state |= module_state(f"{p}.attn.{ours}", getattr(attn, theirs))
        state |= module_state(f"{p}.attn_norm", layer.input_layernorm)
        state |= module_state(f"{p}.ffn.gate", mlp.gate_proj)
        state |= module_state(f"{p}.ffn.up", mlp.up_proj)
        state |= module_state(f"{p}.ffn.down", mlp.down_proj)
        state |= module_state(f"{p}.ffn_norm", layer.post_attention_layernorm)
    state |= module_state("final_norm", backbone.norm)
    if not _is_causal_lm(hf_model):
        state |= module_state("head.out", hf_model.score)
    elif not _tied(hf_model):
        state |= module_state("lm_head", hf_model.lm_head)
    return state
