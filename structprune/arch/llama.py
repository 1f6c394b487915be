"""Adapter for pre-RMSNorm decoders: Llama, Qwen2 and Mistral (GQA, SwiGLU, rotary positions)."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from structprune.arch.mapping import activation_name, module_state
from structprune.modeling_structprune import FORMAT_VERSION

MODEL_TYPES = ("llama", "qwen2", "mistral")


def spec(hf_model: PreTrainedModel) -> dict:
    """The full-size ``structprune`` spec of a Llama-family sequence-classification model."""
    config = hf_model.config
    if config.pad_token_id is None:
        raise ValueError(
            f"{config.model_type}: sequence classification needs config.pad_token_id to find the last "
            "token of each sequence; set it (e.g. model.config.pad_token_id = tokenizer.eos_token_id)"
        )
    backbone = hf_model.model
    attn = backbone.layers[0].self_attn
    mlp = backbone.layers[0].mlp
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = attn.q_proj.out_features // heads
    rotary = backbone.rotary_emb
    window = getattr(config, "sliding_window", None)
    if not getattr(config, "use_sliding_window", True):  # Qwen2 stores a window it does not use
        window = None
    if getattr(rotary, "rope_type", "default") == "dynamic":
        raise ValueError(f"{config.model_type}: dynamic RoPE scaling is not supported")
    return {
        "format_version": FORMAT_VERSION,
        "family": "llama",
        "arch": config.model_type,
        "hidden_size": config.hidden_size,
        "head_dim": head_dim,
        "layers": [{"heads": heads, "kv_heads": kv_heads,
                    "kv_map": None if heads == kv_heads else [h // (heads // kv_heads) for h in range(heads)],
                    "ffn": config.intermediate_size} for _ in range(config.num_hidden_layers)],
        "gated_ffn": True,
        "qkv_bias": attn.q_proj.bias is not None,
        "o_bias": attn.o_proj.bias is not None,
        "ffn_bias": mlp.up_proj.bias is not None,
        "activation": activation_name(config.hidden_act, config.model_type),
        "norm_eps": config.rms_norm_eps,
        "vocab_size": config.vocab_size,
        "pad_token_id": config.pad_token_id,
        "rope_inv_freq": rotary.inv_freq.float().tolist(),
        "rope_attention_scaling": float(rotary.attention_scaling),
        "sliding_window": window,
        "classifier": "last_token",
        "classifier_hidden": config.hidden_size,
        "classifier_bias": hf_model.score.bias is not None,
        "num_labels": config.num_labels,
        "hidden_dropout": 0.0,
        "classifier_dropout": 0.0,
    }


def state_dict(hf_model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """Weights of a Llama-family classification model under structprune's names."""
    backbone = hf_model.model
    state = module_state("embeddings.word", backbone.embed_tokens)
    for i, layer in enumerate(backbone.layers):
        p = f"layers.{i}"
        attn, mlp = layer.self_attn, layer.mlp
        state |= module_state(f"{p}.attn.q", attn.q_proj)
        state |= module_state(f"{p}.attn.k", attn.k_proj)
        state |= module_state(f"{p}.attn.v", attn.v_proj)
        state |= module_state(f"{p}.attn.o", attn.o_proj)
        state |= module_state(f"{p}.attn_norm", layer.input_layernorm)
        state |= module_state(f"{p}.ffn.gate", mlp.gate_proj)
        state |= module_state(f"{p}.ffn.up", mlp.up_proj)
        state |= module_state(f"{p}.ffn.down", mlp.down_proj)
        state |= module_state(f"{p}.ffn_norm", layer.post_attention_layernorm)
    state |= module_state("final_norm", backbone.norm)
    state |= module_state("head.out", hf_model.score)
    return state
