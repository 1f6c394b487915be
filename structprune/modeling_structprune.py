"""The one forward implementation of structprune models, dense or physically pruned.

This module is deliberately standalone: it imports only ``torch`` and ``transformers``, because
:func:`structprune.compaction.save` copies this very file into every saved model folder as
``modeling_structprune.py``. That lets ``AutoModelForSequenceClassification.from_pretrained(dir,
trust_remote_code=True)`` load a compact model on a machine where structprune is not installed.

Two families share the code:

* ``bert``: post-LayerNorm encoders (BERT, RoBERTa, ELECTRA, MiniLM), learned absolute positions.
* ``llama``: pre-RMSNorm decoders (Llama, Qwen2, Qwen3, Mistral), rotary positions, grouped-query
  attention, SwiGLU feed-forward, optional sliding window and per-head query/key norms.

Two heads share the backbone: :class:`StructpruneForSequenceClassification` and
:class:`StructpruneForCausalLM`. The causal LM keeps a key/value cache whose per-layer shapes follow
the layer (a layer without attention keeps none) and generates through transformers' GenerationMixin.

Every shape comes from the ``structprune`` section of the config (written by the architecture
adapters of structprune): per-layer query heads, key/value heads, FFN width, and the kept hidden
size. A layer with 0 heads (or 0 FFN neurons) has no attention (or FFN) sublayer at all: it is
skipped, not multiplied by zero. In a post-LN model the LayerNorm of a removed sublayer stays
(``LN(x + 0) = LN(x)``); in a pre-LN model the residual stream passes on unchanged.

The masked model of structprune reuses these modules at full size and passes ``gates``; the
attention and FFN sublayers call an attribute (``attention_fn``, ``ffn_fn``) when it is set, so
that it can route them through fused kernels. Without gates this file computes a plain dense forward whose ONNX graph
ONNX Runtime's transformer optimizer recognises.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from itertools import accumulate

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    BertConfig,
    DynamicCache,
    ElectraConfig,
    GenerationMixin,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen3Config,
    RobertaConfig,
)
from transformers.modeling_outputs import (
    CausalLMOutputWithPast,
    SequenceClassifierOutput,
)

SECTION = "structprune"
FORMAT_VERSION = 1
LAYER_GATES = ("attn_layer", "head", "ffn_layer", "neuron", "attn_shift", "ffn_shift")


def structure_section(config: PretrainedConfig) -> dict:
    """The ``structprune`` section of a config, with a clear error if it is missing."""
    section = getattr(config, SECTION, None)
    if not isinstance(section, dict) or "layers" not in section:
        raise ValueError(
            f"config of model_type {getattr(config, 'model_type', '?')!r} has no '{SECTION}' section; "
            "it was not written by structprune (use structprune.save(model, dir))"
        )
    if section.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"this model was saved by a newer structprune (format {section['format_version']} > "
            f"{FORMAT_VERSION}); upgrade structprune to load it"
        )
    return section


ACTIVATIONS = {
    "gelu": F.gelu,  # exact erf form, as in BERT
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}
"""Every activation structprune models use, by the name their spec stores. The one table: the masked ops and
kernels take these names too."""


def activation(name: str):
    """Activation function by name (see :data:`ACTIVATIONS`)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of {tuple(ACTIVATIONS)}")
    return ACTIVATIONS[name]


@dataclass
class AttentionContext:
    """Masks of one forward pass, shared by every layer.

    ``key_padding`` is the ``[B, S]`` bool mask (True = real token) with ``causal`` for kernels, which serve only
    ``plain`` passes: no cache, and no window shorter than the sequence. The dense path's float masks are built
    from ``attention_mask`` (``[B, K]``: ``K`` keys, the ``past`` cached ones included) on first use and kept for
    the pass, so a pass on the kernels never builds them. ``cache`` holds the keys and values of earlier tokens
    (causal LM).
    """

    attention_mask: torch.Tensor
    key_padding: torch.Tensor
    causal: bool
    dtype: torch.dtype
    past: int = 0
    window: int | None = None
    cache: object | None = None
    plain: bool = True

    @functools.cached_property
    def additive(self) -> torch.Tensor:
        """``[B, 1, 1|S, K]``: 0 where a query sees a key, the dtype's most negative value elsewhere."""
        return self._additive(None)

    @functools.cached_property
    def windowed(self) -> torch.Tensor | None:
        """:attr:`additive` for sliding-window layers (``None`` without a window)."""
        return None if self.window is None else self._additive(self.window)

    def _additive(self, window: int | None) -> torch.Tensor:
        neg, mask = torch.finfo(self.dtype).min, self.attention_mask
        if not self.causal:
            return (1.0 - mask.unsqueeze(1).unsqueeze(2).to(self.dtype)) * neg
        keys = torch.arange(mask.shape[1], device=mask.device)
        queries = keys[self.past:, None]  # (S, 1): absolute positions of this pass's tokens in the cache
        blocked = (mask[:, None, None, :] == 0) | (keys > queries)  # (B, 1, S, K)
        if window is not None:
            blocked = blocked | (queries - keys >= window)
        return torch.zeros(blocked.shape, dtype=self.dtype, device=mask.device).masked_fill(blocked, neg)


class _GateProduct(torch.autograd.Function):
    """``x * gate`` in ``x``'s dtype, the gate's gradient summed in fp32.

    Under bf16 autocast an fp32 gate would promote every activation to fp32 (a third of a Fisher
    gradient pass went to those multiplies and the casts back); a gate cast to bf16 would have its
    gradient built from bf16 products, which moved the Fisher ranking enough to cost 6 points on CR
    at 70% FLOPs removed.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, gate)
        return x * gate.to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, gate = ctx.saved_tensors
        grad_x = grad * gate.to(grad.dtype) if ctx.needs_input_grad[0] else None
        grad_gate = None
        if ctx.needs_input_grad[1]:
            grad_gate = (grad.float() * x.float()).sum_to_size(gate.shape).to(gate.dtype)
        return grad_x, grad_gate


def gate_product(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``x * gate`` (broadcast); a gate of another dtype than ``x`` (autocast) keeps ``x``'s dtype."""
    return x * gate if gate.dtype == x.dtype else _GateProduct.apply(x, gate)


def eager_attention(q, k, v, head_gate, additive: torch.Tensor, scale: float, group: int = 1) -> torch.Tensor:
    """Dense softmax attention: queries ``[B, H, S, D]``, keys and values ``[B, H / group, K, D]`` (query
    heads ``h * group ... (h + 1) * group - 1`` share key/value head ``h``), ``additive`` mask ``[B, 1, 1|S, K]``."""
    if group > 1:  # (B, Hkv, g, S, D) against (B, Hkv, 1, K, D): keys and values are read, never copied per head
        B, H, S, D = q.shape
        q, k, v, additive = q.view(B, H // group, group, S, D), k.unsqueeze(2), v.unsqueeze(2), additive.unsqueeze(2)
    # Divide (not multiply) and add the mask second: the pattern ONNX Runtime's attention fusion matches.
    scores = torch.matmul(q, k.transpose(-1, -2)) / (1.0 / scale) + additive
    if scores.dtype == torch.float32:  # no Cast node, so ONNX Runtime recognises the attention pattern
        probs = torch.softmax(scores, dim=-1)
    else:
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    out = torch.matmul(probs, v)
    if group > 1:
        out = out.flatten(1, 2)
    if head_gate is not None:
        out = gate_product(out, head_gate.view(1, -1, 1, 1))
    return out


def eager_ffn(x, up, down, gate_proj, neuron_gate, act_name: str) -> torch.Tensor:
    """Dense FFN: ``down(act(up(x)))`` or ``down(act(gate(x)) * up(x))`` (SwiGLU)."""
    act = activation(act_name)
    h = act(gate_proj(x)) * up(x) if gate_proj is not None else act(up(x))
    if neuron_gate is not None:
        h = gate_product(h, neuron_gate)
    return down(h)


class Norm(nn.Module):
    """LayerNorm or RMSNorm whose statistics can be restricted to kept hidden dimensions.

    ``keep`` (a ``[D]`` 0/1 float tensor, masked model only) makes the mean/variance run over
    the kept dimensions alone, so that a model with a hidden mask equals its compacted form.
    """

    def __init__(self, dim: int, eps: float, kind: str):
        super().__init__()
        self.kind, self.eps = kind, eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if kind == "layernorm" else None

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        if self.kind == "layernorm":
            if keep is None:
                return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)
            n = keep.sum()
            mean = (x * keep).sum(-1, keepdim=True) / n
            var = (((x - mean) * keep) ** 2).sum(-1, keepdim=True) / n
            return (x - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias
        dtype = x.dtype
        xf = x.float()
        if keep is None:
            var = xf.pow(2).mean(-1, keepdim=True)
        else:
            var = (xf.pow(2) * keep).sum(-1, keepdim=True) / keep.sum()
        return self.weight * (xf * torch.rsqrt(var + self.eps)).to(dtype)


def normalise(norm: Norm, x: torch.Tensor, hidden: torch.Tensor | None) -> torch.Tensor:
    """``norm(x)``; with a hidden gate, statistics over kept dims and the output gated."""
    if hidden is None:
        return norm(x)
    return norm(x, (hidden != 0).to(x.dtype)) * hidden


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(q: torch.Tensor, k: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embedding on queries and keys; ``rope`` is ``(cos, sin)`` or ``None``."""
    if rope is None:
        return q, k
    cos, sin = rope
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class Attention(nn.Module):
    """Multi-head (or grouped-query) self-attention with ``heads`` query heads.

    ``kv_map[i]`` is the key/value head used by query head ``i``; it is ``None`` when the
    heads are standard multi-head attention (one key/value head per query head). ``cache_index``
    is the layer's slot in the key/value cache (layers without attention take none); ``sliding``
    layers attend within the model's window; ``qk_norm`` adds per-head RMSNorms on queries and keys.
    """

    def __init__(self, spec: dict, layer: dict, cache_index: int):
        super().__init__()
        hidden, bias = spec["hidden_size"], spec["qkv_bias"]
        heads, kv_heads, head_dim = layer["heads"], layer["kv_heads"], spec["head_dim"]
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.kv_map = layer.get("kv_map")
        group = heads // kv_heads
        regular = self.kv_map is None or list(self.kv_map) == [h // group for h in range(heads)]
        self.group = group if regular else None  # query heads per key/value head, when every group has as many
        self.cache_index, self.sliding = cache_index, layer.get("sliding", True)
        self.q = nn.Linear(hidden, heads * head_dim, bias=bias)
        self.k = nn.Linear(hidden, kv_heads * head_dim, bias=bias)
        self.v = nn.Linear(hidden, kv_heads * head_dim, bias=bias)
        self.o = nn.Linear(heads * head_dim, hidden, bias=spec["o_bias"])
        qk_norm = spec.get("qk_norm", False)
        self.q_norm = Norm(head_dim, spec["norm_eps"], "rmsnorm") if qk_norm else None
        self.k_norm = Norm(head_dim, spec["norm_eps"], "rmsnorm") if qk_norm else None
        self.attention_fn = None  # set by the masked model to route through structprune.ops

    def project(self, x: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries ``[B, H, S, D]`` and keys, values ``[B, Hkv, S, D]``, rotary embedding applied."""
        B, S = x.shape[0], x.shape[1]
        q = self.q(x).view(B, S, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(B, S, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(B, S, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = self.position(q, k, rope)
        return q, k, v

    def position(self, q: torch.Tensor, k: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head norms (Qwen3) and the rotary embedding on queries and keys ``[B, heads, S, D]``."""
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, k, rope)

    def forward(self, x, ctx: AttentionContext, rope, head_gate=None) -> torch.Tensor:
        if self.attention_fn is not None and ctx.plain:
            return self.attention_fn(x, self, ctx, rope, head_gate)
        return self.eager(x, ctx, rope, head_gate)

    def eager(self, x, ctx: AttentionContext, rope, head_gate=None) -> torch.Tensor:
        """The sublayer in plain torch ops, whatever ``attention_fn`` is; reads and extends ``ctx.cache``."""
        B, S = x.shape[0], x.shape[1]
        q, k, v = self.project(x, rope)
        if ctx.cache is not None:
            k, v = ctx.cache.update(k, v, self.cache_index)  # (B, Hkv, K, D)
        if self.kv_map is not None and self.group is None:  # unequal groups: one key/value head per query head
            # built per call, not a buffer: transformers 5 leaves non-persistent buffers uninitialised on load
            index = torch.tensor(self.kv_map, dtype=torch.long, device=k.device)
            k = k.index_select(1, index)
            v = v.index_select(1, index)
        mask = ctx.windowed if self.sliding and ctx.windowed is not None else ctx.additive
        out = eager_attention(q, k, v, head_gate, mask, self.head_dim**-0.5, self.group or 1)
        return self.o(out.transpose(1, 2).reshape(B, S, self.heads * self.head_dim))


class FeedForward(nn.Module):
    """FFN of ``width`` neurons; ``gated`` adds the SwiGLU gate projection."""

    def __init__(self, hidden: int, width: int, gated: bool, bias: bool, act: str, out_bias: bool | None = None):
        super().__init__()
        self.act = act
        self.up = nn.Linear(hidden, width, bias=bias)
        self.gate = nn.Linear(hidden, width, bias=False) if gated else None
        self.down = nn.Linear(width, hidden, bias=bias if out_bias is None else out_bias)
        self.ffn_fn = None  # set by the masked model to route through structprune.ops

    def forward(self, x, neuron_gate=None) -> torch.Tensor:
        if self.ffn_fn is not None:
            return self.ffn_fn(x, self, neuron_gate)
        return eager_ffn(x, self.up, self.down, self.gate, neuron_gate, self.act)


class Layer(nn.Module):
    """One transformer layer; a sublayer with 0 units is absent (``None``)."""

    def __init__(self, spec: dict, layer: dict, cache_index: int):
        super().__init__()
        hidden, eps = spec["hidden_size"], spec["norm_eps"]
        self.post_ln = spec["family"] == "bert"
        kind = "layernorm" if self.post_ln else "rmsnorm"
        self.attn = Attention(spec, layer, cache_index) if layer["heads"] > 0 else None
        self.ffn = (
            FeedForward(hidden, layer["ffn"], spec["gated_ffn"], spec["ffn_bias"], spec["activation"],
                        spec.get("ffn_out_bias"))
            if layer["ffn"] > 0 else None
        )
        # Post-LN keeps both norms even when a sublayer is gone (LN(x + 0) = LN(x)).
        self.attn_norm = Norm(hidden, eps, kind) if (self.post_ln or self.attn is not None) else None
        self.ffn_norm = Norm(hidden, eps, kind) if (self.post_ln or self.ffn is not None) else None
        self.dropout = nn.Dropout(spec.get("hidden_dropout", 0.0))

    def _sublayer(self, x, norm, block, run, layer_gate, hidden, shift=None):
        if block is None:
            return normalise(norm, x, hidden) if self.post_ln else x
        out = run(x if self.post_ln else normalise(norm, x, hidden))
        if shift is not None:  # what removed units added on average (bias compensation)
            out = out + shift
        out = self.dropout(out)
        if layer_gate is not None:
            out = out * layer_gate
        if hidden is not None:
            out = out * hidden
        # ``out + x``: ORT's attention fusion takes the first Add feeding the LayerNorm as the attention
        # output, which matters when x itself comes from an Add (ELECTRA's embedding projection).
        return normalise(norm, out + x, hidden) if self.post_ln else x + out

    def attention_block(self, x, ctx: AttentionContext, rope, gates: dict | None = None) -> torch.Tensor:
        """The residual stream after the attention sublayer (and, post-LN, its norm)."""
        g = gates or {}
        return self._sublayer(x, self.attn_norm, self.attn, lambda h: self.attn(h, ctx, rope, g.get("head")),
                              g.get("attn_layer"), g.get("hidden"), g.get("attn_shift"))

    def ffn_block(self, x, gates: dict | None = None) -> torch.Tensor:
        """The residual stream after the FFN sublayer (and, post-LN, its norm)."""
        g = gates or {}
        return self._sublayer(x, self.ffn_norm, self.ffn, lambda h: self.ffn(h, g.get("neuron")),
                              g.get("ffn_layer"), g.get("hidden"), g.get("ffn_shift"))

    def forward(self, x, ctx: AttentionContext, rope, gates: dict | None = None) -> torch.Tensor:
        return self.ffn_block(self.attention_block(x, ctx, rope, gates), gates)


class Embeddings(nn.Module):
    """Token (+ position + token type) embeddings, and the BERT-family LayerNorm / projection."""

    def __init__(self, spec: dict):
        super().__init__()
        self.spec = spec
        bert = spec["family"] == "bert"
        emb = spec["embedding_size"] if bert and spec.get("embedding_project") else spec["hidden_size"]
        self.word = nn.Embedding(spec["vocab_size"], emb)
        if bert:
            self.position = nn.Embedding(spec["max_position_embeddings"], emb)
            self.token_type = nn.Embedding(spec["type_vocab_size"], emb) if spec["type_vocab_size"] else None
            self.norm = Norm(emb, spec["norm_eps"], "layernorm")
            self.project = nn.Linear(emb, spec["hidden_size"]) if spec.get("embedding_project") else None
            self.dropout = nn.Dropout(spec.get("hidden_dropout", 0.0))

    @property
    def max_sequence_length(self) -> int | None:
        """Longest input the model covers: learned positions (RoBERTa's start after the padding id), or
        the rotary model's trained positions (``None`` when its config states none)."""
        if self.spec["family"] != "bert":
            return self.spec.get("max_position_embeddings")
        offset = self.spec["pad_token_id"] + 1 if self.spec["position_style"] == "roberta" else 0
        return self.spec["max_position_embeddings"] - offset

    def forward(self, input_ids, token_type_ids, hidden):
        x = self.word(input_ids)
        if self.spec["family"] != "bert":
            return x if hidden is None else x * hidden
        if self.spec["position_style"] == "roberta":
            pad = self.spec["pad_token_id"]
            real = input_ids.ne(pad).long()
            positions = torch.cumsum(real, dim=1) * real + pad
        else:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        x = x + self.position(positions)
        if self.token_type is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            x = x + self.token_type(token_type_ids)
        if self.project is not None:
            x = self.project(self.dropout(self.norm(x)))
            return x if hidden is None else x * hidden
        return self.dropout(normalise(self.norm, x, hidden))


class ClassificationHead(nn.Module):
    """The sequence-classification head of each architecture (reads the first or last token)."""

    def __init__(self, spec: dict):
        super().__init__()
        self.style, self.pad = spec["classifier"], spec.get("pad_token_id")
        hidden, inner, labels = spec["hidden_size"], spec["classifier_hidden"], spec["num_labels"]
        self.dropout = nn.Dropout(spec.get("classifier_dropout", 0.0))
        if self.style == "last_token":
            self.out = nn.Linear(hidden, labels, bias=spec.get("classifier_bias", False))
        else:  # bert_pooler (tanh), roberta (tanh), electra (gelu): dense on the first token, then out
            self.dense = nn.Linear(hidden, inner)
            self.out = nn.Linear(inner, labels)

    def forward(self, x, input_ids) -> torch.Tensor:
        if self.style == "last_token":
            logits = self.out(x)
            real = input_ids.ne(self.pad).to(torch.int32)
            positions = torch.arange(input_ids.shape[-1], device=x.device, dtype=torch.int32)
            last = (positions * real).argmax(-1)
            return logits[torch.arange(x.shape[0], device=x.device), last]
        first = x[:, 0] if self.style == "bert_pooler" else self.dropout(x[:, 0])
        h = self.dense(first)
        h = F.gelu(h) if self.style == "electra" else torch.tanh(h)
        return self.out(self.dropout(h))


class StructprunePreTrainedModel(PreTrainedModel):
    """The backbone every structprune model shares: embeddings, layers and (decoders) the final norm.

    ``gates`` (masked model only) is a dict of ``attn_layer [L]``, ``head [L, H]``, ``ffn_layer [L]``,
    ``neuron [L, F]``, ``hidden [D]``, and ``attn_shift`` / ``ffn_shift [L, D]`` added to a kept sublayer's
    output. Subclasses add a head.
    """

    config_class = PretrainedConfig
    base_model_prefix = "structprune"
    main_input_name = "input_ids"

    def __init__(self, config: PretrainedConfig):
        super().__init__(config)
        spec = structure_section(config)
        self.spec = spec
        self.embeddings = Embeddings(spec)
        slots = list(accumulate(int(layer["heads"] > 0) for layer in spec["layers"]))
        self.layers = nn.ModuleList(Layer(spec, layer, slot - 1) for layer, slot in zip(spec["layers"], slots))
        self.final_norm = Norm(spec["hidden_size"], spec["norm_eps"], "rmsnorm") if spec["family"] == "llama" else None

    @property
    def max_sequence_length(self) -> int | None:
        """Longest input the model accepts, cached tokens included (``None``: no limit)."""
        return self.embeddings.max_sequence_length

    def _init_weights(self, module: nn.Module) -> None:
        std = 0.02
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(0.0, std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(0.0, std)
        elif isinstance(module, Norm):
            module.weight.data.fill_(1.0)
            if module.bias is not None:
                module.bias.data.zero_()

    def _rope(self, position_ids: torch.Tensor, dtype: torch.dtype):
        """``(cos, sin)`` of shape ``[B|1, 1, S, D]`` for ``position_ids [B|1, S]``."""
        inv_freq = torch.tensor(self.spec["rope_inv_freq"], dtype=torch.float32, device=position_ids.device)
        freqs = position_ids.float()[..., None] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)
        scaling = self.spec.get("rope_attention_scaling", 1.0)
        return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)

    def _context(self, attention_mask: torch.Tensor, dtype: torch.dtype, past: int, cache) -> AttentionContext:
        if self.spec["family"] != "llama":
            return AttentionContext(attention_mask, attention_mask.bool(), False, dtype)
        window = self.spec.get("sliding_window")
        plain = cache is None and (window is None or attention_mask.shape[1] <= window)
        return AttentionContext(attention_mask, attention_mask[:, past:].bool(), True, dtype, past, window, cache,
                                plain)

    def _check_cache(self, cache, batch: int) -> int:
        """Tokens already in ``cache``, after checking it was built by a model of this shape."""
        past = cache.get_seq_length(0) if cache is not None else 0
        if not past:
            return 0
        attns = [layer.attn for layer in self.layers if layer.attn is not None]
        cached = [(layer.keys.shape[0], layer.keys.shape[1], layer.keys.shape[-1])
                  for layer in getattr(cache, "layers", ()) if getattr(layer, "keys", None) is not None]
        expected = [(batch, attn.kv_heads, attn.head_dim) for attn in attns]
        if cached and cached != expected:
            raise ValueError(f"the key/value cache holds {len(cached)} layers of (batch, kv heads, head dim) "
                             f"{sorted(set(cached))}; this model needs {len(expected)} of {sorted(set(expected))}: "
                             "the cache comes from another model or batch; start again without it")
        return past

    def layer_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     token_type_ids: torch.Tensor | None = None, hidden: torch.Tensor | None = None,
                     position_ids: torch.Tensor | None = None, cache=None) -> tuple[torch.Tensor, AttentionContext, object]:
        """What every layer reads: the states entering layer 0 ``[B, S, D]``, the attention context and the
        rotary ``(cos, sin)`` (``None`` for learned positions)."""
        B, S = input_ids.shape
        past = self._check_cache(cache, B)
        if cache is not None and attention_mask is not None and all(layer.attn is None for layer in self.layers):
            past = attention_mask.shape[-1] - S  # nothing is cached without attention: the mask says what came before
        limit = self.max_sequence_length
        if limit is not None and past + S > limit:
            raise ValueError(f"sequence length {past + S} exceeds the model's maximum of {limit} tokens; "
                             "truncate the inputs (tokenizer max_length) or generate fewer tokens")
        if attention_mask is None:
            attention_mask = torch.ones(B, past + S, dtype=torch.long, device=input_ids.device)
        elif attention_mask.shape[-1] != past + S:
            raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} tokens, but the cache holds {past} "
                             f"and the input {S}; pass a mask over all {past + S}")
        x = self.embeddings(input_ids, token_type_ids, hidden)
        return (x, *self.layer_context(attention_mask, x.dtype, past, cache, position_ids))

    def layer_context(self, attention_mask: torch.Tensor, dtype: torch.dtype, past: int = 0, cache=None,
                      position_ids: torch.Tensor | None = None) -> tuple[AttentionContext, object]:
        """The attention context and the rotary ``(cos, sin)`` (``None`` for learned positions) of a pass whose
        ``attention_mask [B, past + S]`` covers ``past`` cached tokens."""
        ctx = self._context(attention_mask, dtype, past, cache)
        if self.spec["family"] != "llama":
            return ctx, None
        if position_ids is None:
            position_ids = torch.arange(past, attention_mask.shape[-1], device=attention_mask.device).unsqueeze(0)
        return ctx, self._rope(position_ids, dtype)

    def backbone(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        gates: dict | None = None,
        position_ids: torch.Tensor | None = None,
        cache=None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The layers without a head: the final hidden states ``[B, S, D]`` the head reads (after the
        final norm), and the states after the embeddings and after each layer. Other heads (e.g. the
        auxiliary-task heads of structprune's transfer learning) read the final states exactly as the
        model's own head does. ``cache`` (decoders) holds earlier tokens; ``attention_mask`` then covers
        them too (``[B, past + S]``)."""
        g = gates or {}
        hidden = g.get("hidden")
        x, ctx, rope = self.layer_inputs(input_ids, attention_mask, token_type_ids, hidden, position_ids, cache)
        states = [x]
        for i, layer in enumerate(self.layers):
            layer_gates = {name: g[name][i] for name in LAYER_GATES if name in g}
            x = layer(x, ctx, rope, layer_gates | ({"hidden": hidden} if hidden is not None else {}))
            states.append(x)
        if self.final_norm is not None:
            x = normalise(self.final_norm, x, hidden)
        return x, states


class StructpruneForSequenceClassification(StructprunePreTrainedModel):
    """A (possibly physically pruned) transformer with a sequence-classification head.

    Inputs follow Hugging Face: ``input_ids``, ``attention_mask`` (1 = token, 0 = padding),
    ``token_type_ids`` (BERT family), ``labels``, and ``gates`` (see :class:`StructprunePreTrainedModel`).
    """

    def __init__(self, config: PretrainedConfig):
        super().__init__(config)
        self.head = ClassificationHead(self.spec)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        gates: dict | None = None,
        output_hidden_states: bool = False,
        return_dict: bool = True,
        **unused,
    ):
        x, states = self.backbone(input_ids, attention_mask, token_type_ids, gates)
        logits = self.head(x, input_ids)
        loss = None
        if labels is not None:
            if self.spec["num_labels"] == 1:
                loss = F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
            else:
                loss = F.cross_entropy(logits, labels)
        if not return_dict:
            return (loss, logits) if loss is not None else (logits,)
        return SequenceClassifierOutput(loss=loss, logits=logits,
                                        hidden_states=tuple(states) if output_hidden_states else None)


# transformers renamed the cache argument and output field from ``past_key_values`` to ``cache``.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class StructpruneForCausalLM(StructprunePreTrainedModel, GenerationMixin):
    """A (possibly physically pruned) decoder with a language-modelling head, tied to the token
    embeddings when the source model's was.

    ``labels`` are the input ids (shifted inside; -100 is ignored). The key/value cache is a
    transformers ``DynamicCache`` with one slot per layer that has attention, so ``generate()``
    works as for any Hugging Face causal LM.
    """

    def __init__(self, config: PretrainedConfig):
        super().__init__(config)
        spec = self.spec
        tied = spec.get("tie_word_embeddings", False)
        self.lm_head = None if tied else nn.Linear(spec["hidden_size"], spec["vocab_size"], bias=False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate() would size transformers' cache from the config (one global head count, sliding
        # layers that drop keys); the forward builds its own, with one slot per attention layer.
        return False

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.word

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache=None,
        past_key_values=None,
        use_cache: bool | None = None,
        labels: torch.Tensor | None = None,
        gates: dict | None = None,
        logits_to_keep: int = 0,
        output_hidden_states: bool = False,
        return_dict: bool = True,
        **unused,
    ):
        cache = cache if cache is not None else past_key_values
        if use_cache and cache is None:
            cache = DynamicCache()
        x, states = self.backbone(input_ids, attention_mask, None, gates, position_ids, cache)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        weight = self.embeddings.word.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(x, weight)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        if not return_dict:
            return tuple(t for t in (loss, logits, cache) if t is not None)
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=tuple(states) if output_hidden_states
                                      else None, **{_CACHE_FIELD: cache})


def _for_config(config_cls: type[PretrainedConfig], base: type[StructprunePreTrainedModel]) -> type:
    # transformers checks that a remote-code class names the config class it is registered for.
    name = config_cls.__name__.replace("Config", "") + base.__name__
    return type(name, (base,), {"config_class": config_cls, "__module__": __name__})


CONFIGS = {"bert": BertConfig, "roberta": RobertaConfig, "electra": ElectraConfig, "llama": LlamaConfig,
           "qwen2": Qwen2Config, "qwen3": Qwen3Config, "mistral": MistralConfig}
DECODERS = ("llama", "qwen2", "qwen3", "mistral")
TASKS = {"sequence_classification": StructpruneForSequenceClassification, "causal_lm": StructpruneForCausalLM}
"""The head each task kind of a spec (``spec["task"]``) builds; a spec without one classifies."""

BertStructpruneForSequenceClassification = _for_config(BertConfig, StructpruneForSequenceClassification)
RobertaStructpruneForSequenceClassification = _for_config(RobertaConfig, StructpruneForSequenceClassification)
ElectraStructpruneForSequenceClassification = _for_config(ElectraConfig, StructpruneForSequenceClassification)
LlamaStructpruneForSequenceClassification = _for_config(LlamaConfig, StructpruneForSequenceClassification)
Qwen2StructpruneForSequenceClassification = _for_config(Qwen2Config, StructpruneForSequenceClassification)
Qwen3StructpruneForSequenceClassification = _for_config(Qwen3Config, StructpruneForSequenceClassification)
MistralStructpruneForSequenceClassification = _for_config(MistralConfig, StructpruneForSequenceClassification)
LlamaStructpruneForCausalLM = _for_config(LlamaConfig, StructpruneForCausalLM)
Qwen2StructpruneForCausalLM = _for_config(Qwen2Config, StructpruneForCausalLM)
Qwen3StructpruneForCausalLM = _for_config(Qwen3Config, StructpruneForCausalLM)
MistralStructpruneForCausalLM = _for_config(MistralConfig, StructpruneForCausalLM)
_CLASSES = {cls.__name__: cls for cls in list(globals().values())
            if isinstance(cls, type) and issubclass(cls, StructprunePreTrainedModel) and cls.config_class is not PretrainedConfig}


def model_class(config: PretrainedConfig) -> type[StructprunePreTrainedModel]:
    """The structprune class for a config: its ``model_type`` and the task of its ``structprune`` section."""
    task = structure_section(config).get("task", "sequence_classification")
    if config.model_type not in CONFIGS or task not in TASKS:
        raise ValueError(f"no structprune model for model_type {config.model_type!r} and task {task!r}; "
                         f"supported: {sorted(CONFIGS)} x {sorted(TASKS)}")
    if task == "causal_lm" and config.model_type not in DECODERS:
        raise ValueError(f"{config.model_type!r} is an encoder; causal LMs are {DECODERS}")
    name = CONFIGS[config.model_type].__name__.replace("Config", "") + TASKS[task].__name__
    return _CLASSES[name]
