// Declarations of the CPU kernels registered as torch.ops.structprune.* (see ops.cpp).
//
// Semantics follow structprune/reference.py exactly: a unit (FFN neuron, attention head)
// whose gate is exactly 0 is removed, so the kernels never compute it and give it (its
// weights and its gate) a gradient of exactly 0.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <array>
#include <optional>
#include <tuple>

namespace structprune {

// (y, up_pre, gate_pre): y = down(act(up(x)) * gate), or down(act(x @ w_gate^T) * up(x) * gate)
// when w_gate is set; up_pre / gate_pre are the [tokens, alive] pre-activations of the alive
// neurons that gated_ffn_bwd takes (gate_pre is empty without w_gate).
std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_ffn_fwd(const at::Tensor& x,
                         const at::Tensor& w_up,
                         const std::optional<at::Tensor>& b_up,
                         const at::Tensor& w_down,
                         const std::optional<at::Tensor>& b_down,
                         const std::optional<at::Tensor>& neuron_gate,
                         c10::string_view activation,
                         const std::optional<at::Tensor>& w_gate);

// Gradients (x, w_up, b_up, w_down, b_down, neuron_gate, w_gate). An entry whose
// output_mask flag is false, or whose input is absent, is an empty tensor of shape [0].
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gated_ffn_bwd(const at::Tensor& grad_out,
              const at::Tensor& x,
              const at::Tensor& w_up,
              const std::optional<at::Tensor>& b_up,
              const at::Tensor& w_down,
              const std::optional<at::Tensor>& b_down,
              const std::optional<at::Tensor>& neuron_gate,
              c10::string_view activation,
              const std::optional<at::Tensor>& w_gate,
              const at::Tensor& up_pre,
              const at::Tensor& gate_pre,
              std::array<bool, 7> output_mask);

// (out [B,H,Sq,D], lse [B,H,Sq]): gated attention output and the log-sum-exp of each
// query row over the keys it may see (-inf for a row that sees none).
std::tuple<at::Tensor, at::Tensor> masked_attention_fwd(
    const at::Tensor& q,
    const at::Tensor& k,
    const at::Tensor& v,
    const std::optional<at::Tensor>& head_gate,
    const std::optional<at::Tensor>& key_padding_mask,
    bool causal,
    double scale);

// Gradients (q, k, v, head_gate); the last is an empty tensor of shape [0] without a gate.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> masked_attention_bwd(
    const at::Tensor& grad_out,
    const at::Tensor& q,
    const at::Tensor& k,
    const at::Tensor& v,
    const std::optional<at::Tensor>& head_gate,
    const std::optional<at::Tensor>& key_padding_mask,
    bool causal,
    double scale,
    const at::Tensor& out,
    const at::Tensor& lse);

}  // namespace structprune
