// Gated feed-forward block on CPU, forward and backward, with work proportional to the
// alive neurons.
//
// Neurons whose gate is exactly 0 are removed: their rows of w_up / w_gate and columns of
// w_down are never read. The alive slices are gathered once, the GEMMs run on them, and the
// weight gradients are scattered back with exact zeros for the dead units. The forward pass
// returns the pre-activations of the alive neurons ([tokens, alive], the up projection and,
// for SwiGLU, the gate projection) for the backward pass, which so needs no GEMM beyond the
// four of the gradients; that is less memory than autograd over the torch ops keeps.
// The pointwise passes (activation, its derivative, the gate) are vectorised (vec_math.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "ops.h"
#include "vec_math.h"

namespace structprune {
namespace {

enum class Activation { Gelu, GeluTanh, Relu, Silu };

Activation parse_activation(c10::string_view name) {
  if (name == "gelu") return Activation::Gelu;
  if (name == "gelu_tanh") return Activation::GeluTanh;
  if (name == "relu") return Activation::Relu;
  if (name == "silu") return Activation::Silu;
  TORCH_CHECK(false, "gated_ffn: unknown activation '", std::string(name.data(), name.size()),
              "'; expected one of gelu, gelu_tanh, relu, silu");
}

// Calls f with the activation as a compile-time constant, so the pointwise loops below
// are specialised (and vectorisable) per activation.
template <typename F>
void with_activation(Activation a, F&& f) {
  switch (a) {
    case Activation::Gelu:
      return f(std::integral_constant<Activation, Activation::Gelu>{});
    case Activation::GeluTanh:
      return f(std::integral_constant<Activation, Activation::GeluTanh>{});
    case Activation::Relu:
      return f(std::integral_constant<Activation, Activation::Relu>{});
    case Activation::Silu:
      return f(std::integral_constant<Activation, Activation::Silu>{});
  }
}

// act(z) and, when grad is non-null, act'(z); the same formulas as torch's kernels
// (GELU in its exact erf form, as BERT uses).
// The activation's value and derivative at z.
template <typename T>
struct ActivationAt {
  T value;
  T grad;
};

template <Activation A, typename T>
STRUCTPRUNE_INLINE ActivationAt<T> activate(T z) {
  if constexpr (A == Activation::Gelu) {
    const T cdf = T(0.5) * (T(1) + fast_erf(z * T(M_SQRT1_2)));
    const T pdf = T(0.5 * M_2_SQRTPI * M_SQRT1_2) * fast_exp(T(-0.5) * z * z);
    return {z * cdf, cdf + z * pdf};
  } else if constexpr (A == Activation::GeluTanh) {
    constexpr T kBeta = T(M_SQRT2 * M_2_SQRTPI * 0.5);
    constexpr T kKappa = T(0.044715);
    const T t = fast_tanh(kBeta * (z + kKappa * z * z * z));
    return {T(0.5) * z * (T(1) + t),
            T(0.5) * (T(1) + t) + T(0.5) * z * (T(1) - t * t) * kBeta * (T(1) + T(3) * kKappa * z * z)};
  } else if constexpr (A == Activation::Relu) {
    return {z > T(0) ? z : T(0), z > T(0) ? T(1) : T(0)};
  } else {
    const T sig = T(1) / (T(1) + fast_exp(-z));
    return {z * sig, sig * (T(1) + z * (T(1) - sig))};
  }
}

struct FfnShape {
  int64_t tokens;   // product of x's leading dims
  int64_t d_in;     // D
  int64_t neurons;  // F
  int64_t d_out;    // D_out
};

std::string shape_str(const at::Tensor& t) {
  return c10::str(t.sizes());
}

void check_operand(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "gated_ffn (C++ CPU kernel): ", name, " is on ", t.device(),
              ", expected cpu");
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "gated_ffn: ", name, " has dtype ",
              t.scalar_type(), " but x has dtype ", x.scalar_type(), "; cast them to one dtype");
}

FfnShape check_ffn_inputs(const at::Tensor& x,
                          const at::Tensor& w_up,
                          const std::optional<at::Tensor>& b_up,
                          const at::Tensor& w_down,
                          const std::optional<at::Tensor>& b_down,
                          const std::optional<at::Tensor>& gate,
                          const std::optional<at::Tensor>& w_gate) {
  TORCH_CHECK(x.device().is_cpu(), "gated_ffn (C++ CPU kernel): x is on ", x.device(),
              ", expected cpu");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "gated_ffn (C++ CPU kernel): x has dtype ", x.scalar_type(),
              "; only float32 and float64 are supported");
  TORCH_CHECK(x.dim() >= 1, "gated_ffn: x must have shape [..., D], got a 0-d tensor");
  FfnShape s{};
  s.d_in = x.size(-1);
  s.tokens = 1;
  for (int64_t i = 0; i + 1 < x.dim(); ++i) s.tokens *= x.size(i);
  check_operand(w_up, x, "w_up");
  TORCH_CHECK(w_up.dim() == 2 && w_up.size(1) == s.d_in, "gated_ffn: w_up has shape ",
              shape_str(w_up), " but x has shape ", shape_str(x), "; expected w_up [F, ", s.d_in,
              "]");
  s.neurons = w_up.size(0);
  check_operand(w_down, x, "w_down");
  TORCH_CHECK(w_down.dim() == 2 && w_down.size(1) == s.neurons, "gated_ffn: w_down has shape ",
              shape_str(w_down), " but w_up has shape ", shape_str(w_up),
              "; expected w_down [D_out, ", s.neurons, "]");
  s.d_out = w_down.size(0);
  if (b_up) {
    check_operand(*b_up, x, "b_up");
    TORCH_CHECK(b_up->dim() == 1 && b_up->size(0) == s.neurons, "gated_ffn: b_up has shape ",
                shape_str(*b_up), ", expected [", s.neurons, "] (F from w_up ", shape_str(w_up),
                ")");
  }
  if (b_down) {
    check_operand(*b_down, x, "b_down");
    TORCH_CHECK(b_down->dim() == 1 && b_down->size(0) == s.d_out, "gated_ffn: b_down has shape ",
                shape_str(*b_down), ", expected [", s.d_out, "] (D_out from w_down ",
                shape_str(w_down), ")");
  }
  if (gate) {
    TORCH_CHECK(gate->device().is_cpu(), "gated_ffn (C++ CPU kernel): neuron_gate is on ",
                gate->device(), ", expected cpu");
    TORCH_CHECK(at::isFloatingType(gate->scalar_type()), "gated_ffn: neuron_gate has dtype ",
                gate->scalar_type(), "; expected a floating-point dtype");
    TORCH_CHECK(gate->dim() == 1 && gate->size(0) == s.neurons, "gated_ffn: neuron_gate has shape ",
                shape_str(*gate), ", expected [", s.neurons, "] (F from w_up ", shape_str(w_up),
                ")");
  }
  if (w_gate) {
    check_operand(*w_gate, x, "w_gate");
    TORCH_CHECK(w_gate->sizes() == w_up.sizes(), "gated_ffn: w_gate has shape ", shape_str(*w_gate),
                " but w_up has shape ", shape_str(w_up), "; they must match");
  }
  return s;
}

// The FFN restricted to its alive neurons. `index` is undefined when every neuron is
// alive, in which case the weights are the caller's tensors (no copy).
struct AliveFfn {
  at::Tensor index;   // [Fa] int64
  at::Tensor w_up;    // [Fa, D]
  at::Tensor b_up;    // [Fa] or undefined
  at::Tensor w_down;  // [D_out, Fa]
  at::Tensor w_gate;  // [Fa, D] or undefined
  at::Tensor gate;    // [Fa] in x's dtype, or undefined (all ones)
  int64_t count = 0;
};

AliveFfn gather_alive(const at::Tensor& x,
                      const at::Tensor& w_up,
                      const std::optional<at::Tensor>& b_up,
                      const at::Tensor& w_down,
                      const std::optional<at::Tensor>& gate,
                      const std::optional<at::Tensor>& w_gate) {
  AliveFfn a;
  a.w_up = w_up;
  a.b_up = b_up ? *b_up : at::Tensor();
  a.w_down = w_down;
  a.w_gate = w_gate ? *w_gate : at::Tensor();
  a.count = w_up.size(0);
  if (!gate) {
    a.gate = at::ones({a.count}, x.options());
    return a;
  }
  a.gate = gate->to(x.scalar_type()).contiguous();
  at::Tensor index = at::nonzero(*gate != 0).view({-1});
  if (index.numel() == a.count) return a;
  a.index = index;
  a.count = index.numel();
  a.w_up = w_up.index_select(0, index);
  if (a.b_up.defined()) a.b_up = a.b_up.index_select(0, index);
  a.w_down = w_down.index_select(1, index);
  if (a.w_gate.defined()) a.w_gate = a.w_gate.index_select(0, index);
  a.gate = a.gate.index_select(0, index);
  return a;
}

// [tokens, Fa] = x2 @ w_up^T (+ b_up): the up pre-activation of the alive neurons.
at::Tensor up_projection(const at::Tensor& x2, const AliveFfn& a) {
  return a.b_up.defined() ? at::addmm(a.b_up, x2, a.w_up.t()) : at::mm(x2, a.w_up.t());
}

// Elements per parallel task, the value ATen's own pointwise kernels use.
constexpr int64_t kGrainSize = 32768;

// Units of work per task so that each task covers about kGrainSize elements; smaller
// problems run inline on the calling thread, without entering a parallel region.
int64_t grain_for(int64_t elements_per_unit) {
  return std::max<int64_t>(1, kGrainSize / std::max<int64_t>(elements_per_unit, 1));
}

// In place: h <- act(h) * gate, or h <- act(z) * h * gate when z (the gate-projection
// pre-activation of a gated FFN) is given. gate may be null (all ones).
// One row of the hidden layer: h = act(up) * gate, or act(z) * up * gate (SwiGLU).
template <typename T, Activation A>
STRUCTPRUNE_INLINE void hidden_forward_row(T* h, const T* up, const T* z, const T* gate, int64_t cols) {
  if (z) {
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) h[c] = activate<A, T>(z[c]).value * up[c] * gate[c];
  } else {
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) h[c] = activate<A, T>(up[c]).value * gate[c];
  }
}

// One row of the backward pass. In: up / z the pre-activations, dh = dL/dh. Out: h the
// gated hidden act * gate (for dW_down), dh <- dL/d(up pre-activation) in place, dz =
// dL/dz; gate_acc += dh * act and bias_acc += dL/d(up) (column sums, for the gate and
// up-bias gradients).
template <typename T, Activation A>
STRUCTPRUNE_INLINE void hidden_backward_row(const T* up, const T* z, T* dh, const T* gate, T* h,
                                            T* dz, T* gate_acc, T* bias_acc, int64_t cols) {
  if (z) {
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) {
      const ActivationAt<T> s = activate<A, T>(z[c]);
      const T u = up[c], d = dh[c], g = gate[c];
      const T a = s.value * u;
      const T da = d * g;
      const T du = da * s.value;
      dz[c] = da * u * s.grad;
      gate_acc[c] += d * a;
      bias_acc[c] += du;
      dh[c] = du;
      h[c] = a * g;
    }
  } else {
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) {
      const ActivationAt<T> s = activate<A, T>(up[c]);
      const T d = dh[c], g = gate[c];
      const T du = d * g * s.grad;
      gate_acc[c] += d * s.value;
      bias_acc[c] += du;
      dh[c] = du;
      h[c] = s.value * g;
    }
  }
}

// Float rows compiled per instruction set (see vec_math.h); doubles serve gradient checks.
#define STRUCTPRUNE_FLOAT_ROWS(A)                                                            \
  STRUCTPRUNE_MULTIVERSION void hidden_forward_row_f32_##A(                                 \
      float* h, const float* up, const float* z, const float* gate, int64_t cols) {          \
    hidden_forward_row<float, Activation::A>(h, up, z, gate, cols);                          \
  }                                                                                          \
  STRUCTPRUNE_MULTIVERSION void hidden_backward_row_f32_##A(                                \
      const float* up, const float* z, float* dh, const float* gate, float* h, float* dz,    \
      float* gacc, float* bacc, int64_t cols) {                                              \
    hidden_backward_row<float, Activation::A>(up, z, dh, gate, h, dz, gacc, bacc, cols);     \
  }
STRUCTPRUNE_FLOAT_ROWS(Gelu)
STRUCTPRUNE_FLOAT_ROWS(GeluTanh)
STRUCTPRUNE_FLOAT_ROWS(Relu)
STRUCTPRUNE_FLOAT_ROWS(Silu)
#undef STRUCTPRUNE_FLOAT_ROWS

template <typename T, Activation A>
void forward_row(T* h, const T* up, const T* z, const T* gate, int64_t cols) {
  if constexpr (std::is_same_v<T, float>) {
    if constexpr (A == Activation::Gelu) return hidden_forward_row_f32_Gelu(h, up, z, gate, cols);
    if constexpr (A == Activation::GeluTanh) return hidden_forward_row_f32_GeluTanh(h, up, z, gate, cols);
    if constexpr (A == Activation::Relu) return hidden_forward_row_f32_Relu(h, up, z, gate, cols);
    if constexpr (A == Activation::Silu) return hidden_forward_row_f32_Silu(h, up, z, gate, cols);
  } else {
    hidden_forward_row<T, A>(h, up, z, gate, cols);
  }
}

template <typename T, Activation A>
void backward_row(const T* up, const T* z, T* dh, const T* gate, T* h, T* dz, T* gacc, T* bacc,
                  int64_t cols) {
  if constexpr (std::is_same_v<T, float>) {
    if constexpr (A == Activation::Gelu) return hidden_backward_row_f32_Gelu(up, z, dh, gate, h, dz, gacc, bacc, cols);
    if constexpr (A == Activation::GeluTanh) return hidden_backward_row_f32_GeluTanh(up, z, dh, gate, h, dz, gacc, bacc, cols);
    if constexpr (A == Activation::Relu) return hidden_backward_row_f32_Relu(up, z, dh, gate, h, dz, gacc, bacc, cols);
    if constexpr (A == Activation::Silu) return hidden_backward_row_f32_Silu(up, z, dh, gate, h, dz, gacc, bacc, cols);
  } else {
    hidden_backward_row<T, A>(up, z, dh, gate, h, dz, gacc, bacc, cols);
  }
}

// Rows per task of the pointwise passes; the backward pass keeps one row of column sums
// per task, summed afterwards (deterministic for a given shape).
constexpr int64_t kRowsPerTask = 64;

template <typename T, Activation A>
void hidden_forward(T* h, const T* up, const T* z, const T* gate, int64_t rows, int64_t cols) {
  at::parallel_for(0, rows, grain_for(cols), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t o = r * cols;
      forward_row<T, A>(h + o, up + o, z ? z + o : nullptr, gate, cols);
    }
  });
}

// Returns [tasks, 2, cols] partial column sums: gate gradient, up-bias gradient.
template <typename T, Activation A>
at::Tensor hidden_backward(const T* up, const T* z, T* dh, const T* gate, T* h, T* dz,
                           int64_t rows, int64_t cols, const at::TensorOptions& options) {
  const int64_t tasks = (rows + kRowsPerTask - 1) / kRowsPerTask;
  at::Tensor partial = at::zeros({tasks, 2, cols}, options);
  T* acc = partial.data_ptr<T>();
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      T* gacc = acc + t * 2 * cols;
      for (int64_t r = t * kRowsPerTask; r < std::min(rows, (t + 1) * kRowsPerTask); ++r) {
        const int64_t o = r * cols;
        backward_row<T, A>(up + o, z ? z + o : nullptr, dh + o, gate, h + o, dz ? dz + o : nullptr,
                           gacc, gacc + cols, cols);
      }
    }
  });
  return partial;
}

// A gradient computed for the alive units, placed into a zero tensor of the full size
// along `dim` (dead units get exactly 0). Returned as is when every unit is alive.
at::Tensor scatter_alive(const at::Tensor& part,
                         const at::Tensor& index,
                         int64_t dim,
                         at::IntArrayRef full_sizes) {
  if (!index.defined()) return part;
  at::Tensor full = at::zeros(full_sizes, part.options());
  full.index_copy_(dim, index, part);
  return full;
}

std::vector<int64_t> out_sizes(const at::Tensor& x, int64_t d_out) {
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
  sizes.back() = d_out;
  return sizes;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_ffn_fwd(
    const at::Tensor& x,
    const at::Tensor& w_up,
    const std::optional<at::Tensor>& b_up,
    const at::Tensor& w_down,
    const std::optional<at::Tensor>& b_down,
    const std::optional<at::Tensor>& neuron_gate,
    c10::string_view activation,
    const std::optional<at::Tensor>& w_gate) {
  const FfnShape s = check_ffn_inputs(x, w_up, b_up, w_down, b_down, neuron_gate, w_gate);
  const Activation act = parse_activation(activation);
  const auto sizes = out_sizes(x, s.d_out);
  const AliveFfn a = gather_alive(x, w_up, b_up, w_down, neuron_gate, w_gate);
  const at::Tensor x2 = x.reshape({s.tokens, s.d_in});
  at::Tensor up = up_projection(x2, a);
  at::Tensor z = a.w_gate.defined() ? at::mm(x2, a.w_gate.t()) : at::empty({0}, x.options());
  if (a.count == 0) {
    // Every neuron removed: the block contributes only its output bias.
    at::Tensor y = at::zeros({s.tokens, s.d_out}, x.options());
    if (b_down) y.add_(*b_down);
    return {y.view(sizes), up, z};
  }
  at::Tensor h = at::empty_like(up);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gated_ffn_fwd", [&] {
    with_activation(act, [&](auto tag) {
      hidden_forward<scalar_t, decltype(tag)::value>(
          h.data_ptr<scalar_t>(), up.const_data_ptr<scalar_t>(),
          a.w_gate.defined() ? z.const_data_ptr<scalar_t>() : nullptr,
          a.gate.const_data_ptr<scalar_t>(), s.tokens, a.count);
    });
  });
  at::Tensor y = b_down ? at::addmm(*b_down, h, a.w_down.t()) : at::mm(h, a.w_down.t());
  return {y.view(sizes), up, z};
}

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
              std::array<bool, 7> output_mask) {
  const FfnShape s = check_ffn_inputs(x, w_up, b_up, w_down, b_down, neuron_gate, w_gate);
  const Activation act = parse_activation(activation);
  const auto sizes = out_sizes(x, s.d_out);
  check_operand(grad_out, x, "grad_out");
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(sizes), "gated_ffn_bwd: grad_out has shape ",
              shape_str(grad_out), " but the output has shape ", at::IntArrayRef(sizes));

  const bool need_x = output_mask[0];
  const bool need_w_up = output_mask[1];
  const bool need_b_up = output_mask[2] && b_up.has_value();
  const bool need_w_down = output_mask[3];
  const bool need_b_down = output_mask[4] && b_down.has_value();
  const bool need_gate = output_mask[5] && neuron_gate.has_value();
  const bool need_w_gate = output_mask[6] && w_gate.has_value();

  const at::Tensor g2 = grad_out.reshape({s.tokens, s.d_out});
  // A fresh empty tensor per unrequested gradient: outputs of an op must not alias.
  auto absent = [&] { return at::empty({0}, x.options()); };
  at::Tensor grad_b_down = need_b_down ? g2.sum(0) : absent();

  const AliveFfn a = gather_alive(x, w_up, b_up, w_down, neuron_gate, w_gate);
  if (a.count == 0 ||
      !(need_x || need_w_up || need_b_up || need_w_down || need_gate || need_w_gate)) {
    auto zeros_if = [&](bool need, const std::optional<at::Tensor>& like) {
      return need ? at::zeros(like->sizes(), like->options()) : absent();
    };
    return {zeros_if(need_x, x),
            zeros_if(need_w_up, w_up),
            zeros_if(need_b_up, b_up),
            zeros_if(need_w_down, w_down),
            grad_b_down,
            zeros_if(need_gate, neuron_gate),
            zeros_if(need_w_gate, w_gate)};
  }

  const at::Tensor x2 = x.reshape({s.tokens, s.d_in});
  TORCH_CHECK(up_pre.dim() == 2 && up_pre.size(0) == s.tokens && up_pre.size(1) == a.count,
              "gated_ffn_bwd: up_pre has shape ", shape_str(up_pre), ", expected [", s.tokens,
              ", ", a.count, "] (the forward pass's pre-activations of the alive neurons)");
  const at::Tensor up = up_pre.contiguous();
  const at::Tensor z = a.w_gate.defined() ? gate_pre.contiguous() : at::Tensor();
  at::Tensor h = at::empty_like(up);                          // gated hidden, for dW_down
  at::Tensor dz = z.defined() ? at::empty_like(z) : at::Tensor();
  at::Tensor dh = at::mm(g2, a.w_down);                       // -> grad of up, in place
  at::Tensor sums;  // [2, Fa]: gate gradient, up-bias gradient
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gated_ffn_bwd", [&] {
    with_activation(act, [&](auto tag) {
      sums = hidden_backward<scalar_t, decltype(tag)::value>(
                 up.const_data_ptr<scalar_t>(), z.defined() ? z.const_data_ptr<scalar_t>() : nullptr,
                 dh.data_ptr<scalar_t>(), a.gate.const_data_ptr<scalar_t>(), h.data_ptr<scalar_t>(),
                 dz.defined() ? dz.data_ptr<scalar_t>() : nullptr, s.tokens, a.count, x.options())
                 .sum(0);
    });
  });
  const at::Tensor gate_grad = sums[0], b_up_grad = sums[1];

  at::Tensor grad_x = absent();
  if (need_x) {
    grad_x = at::mm(dh, a.w_up);
    if (dz.defined()) grad_x.addmm_(dz, a.w_gate);
    grad_x = grad_x.view(x.sizes());
  }
  const auto idx = a.index;
  at::Tensor grad_w_up =
      need_w_up ? scatter_alive(at::mm(dh.t(), x2), idx, 0, w_up.sizes()) : absent();
  at::Tensor grad_b_up = need_b_up ? scatter_alive(b_up_grad, idx, 0, b_up->sizes()) : absent();
  at::Tensor grad_w_down =
      need_w_down ? scatter_alive(at::mm(g2.t(), h), idx, 1, w_down.sizes()) : absent();
  at::Tensor grad_gate =
      need_gate
          ? scatter_alive(gate_grad, idx, 0, neuron_gate->sizes()).to(neuron_gate->scalar_type())
          : absent();
  at::Tensor grad_w_gate =
      need_w_gate ? scatter_alive(at::mm(dz.t(), x2), idx, 0, w_gate->sizes()) : absent();
  return {grad_x, grad_w_up, grad_b_up, grad_w_down, grad_b_down, grad_gate, grad_w_gate};
}

}  // namespace structprune
