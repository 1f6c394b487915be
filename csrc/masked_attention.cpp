// Softmax attention with a per-head output gate on CPU, forward and backward.
//
// Work is split over (batch, alive head) pairs with at::parallel_for; a head whose gate is
// exactly 0 is never computed (its output and all its gradients are 0). Within a pair the
// queries are processed in blocks of kQueryBlock rows so the score matrix held per thread
// is [kQueryBlock, Sk] rather than [Sq, Sk]. The forward pass saves only the gated output
// and one log-sum-exp per query row; the backward pass recomputes the probabilities.
//
// Masking matches reference.py: masked scores take the dtype's lowest finite value, so they
// get probability exactly 0 unless a query sees no key at all, in which case its row is
// uniform over every key. Such a row is marked by lse = -inf. Masked scores receive no
// gradient (masked_fill semantics).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "ops.h"
#include "vec_math.h"

namespace structprune {
namespace {

constexpr int64_t kQueryBlock = 128;

struct AttnShape {
  int64_t batch, heads, kv_heads, q_len, k_len, head_dim;
  int64_t group() const { return heads / kv_heads; }
};

std::string shape_str(const at::Tensor& t) {
  return c10::str(t.sizes());
}

AttnShape check_attention_inputs(const at::Tensor& q,
                                 const at::Tensor& k,
                                 const at::Tensor& v,
                                 const std::optional<at::Tensor>& head_gate,
                                 const std::optional<at::Tensor>& key_padding_mask,
                                 bool causal) {
  for (const auto& [t, name] : {std::pair{&q, "q"}, std::pair{&k, "k"}, std::pair{&v, "v"}}) {
    TORCH_CHECK(t->device().is_cpu(), "masked_attention (C++ CPU kernel): ", name, " is on ",
                t->device(), ", expected cpu");
    TORCH_CHECK(t->dim() == 4, "masked_attention: ", name,
                " must be 4-d [B, heads, S, D], got shape ", shape_str(*t));
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), "masked_attention: ", name, " has dtype ",
                t->scalar_type(), " but q has dtype ", q.scalar_type(), "; cast them to one dtype");
  }
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
              "masked_attention (C++ CPU kernel): q has dtype ", q.scalar_type(),
              "; only float32 and float64 are supported");
  AttnShape s{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3)};
  TORCH_CHECK(k.sizes() == v.sizes(), "masked_attention: k has shape ", shape_str(k),
              " but v has shape ", shape_str(v), "; they must match");
  TORCH_CHECK(k.size(0) == s.batch && k.size(3) == s.head_dim, "masked_attention: q has shape ",
              shape_str(q), " but k has shape ", shape_str(k), "; batch and head dim must match");
  TORCH_CHECK(s.kv_heads > 0 && s.heads % s.kv_heads == 0, "masked_attention: query heads (",
              s.heads, ") must be a multiple of key/value heads (", s.kv_heads, ")");
  TORCH_CHECK(!causal || s.q_len == s.k_len, "masked_attention: causal attention needs as many ",
              "queries as keys, got q shape ", shape_str(q), " and k shape ", shape_str(k));
  if (head_gate) {
    const at::Tensor& g = *head_gate;
    TORCH_CHECK(g.device().is_cpu(), "masked_attention (C++ CPU kernel): head_gate is on ",
                g.device(), ", expected cpu");
    TORCH_CHECK(at::isFloatingType(g.scalar_type()), "masked_attention: head_gate has dtype ",
                g.scalar_type(), "; expected a floating-point dtype");
    const bool per_head = g.dim() == 1 && g.size(0) == s.heads;
    const bool per_batch_head = g.dim() == 2 && g.size(0) == s.batch && g.size(1) == s.heads;
    TORCH_CHECK(per_head || per_batch_head, "masked_attention: head_gate has shape ", shape_str(g),
                ", expected [", s.heads, "] or [", s.batch, ", ", s.heads, "] for q of shape ",
                shape_str(q));
  }
  if (key_padding_mask) {
    const at::Tensor& m = *key_padding_mask;
    TORCH_CHECK(m.device().is_cpu(), "masked_attention (C++ CPU kernel): key_padding_mask is on ",
                m.device(), ", expected cpu");
    TORCH_CHECK(m.dim() == 2 && m.size(0) == s.batch && m.size(1) == s.k_len,
                "masked_attention: key_padding_mask has shape ", shape_str(m), ", expected [",
                s.batch, ", ", s.k_len, "] for k of shape ", shape_str(k));
  }
  return s;
}

// The gate of every (batch, head) pair as a contiguous [B, H] tensor in `dtype`, or an
// undefined tensor when there is no gate.
at::Tensor pair_gates(const std::optional<at::Tensor>& head_gate,
                      const AttnShape& s,
                      at::ScalarType dtype) {
  if (!head_gate) return at::Tensor();
  return head_gate->to(dtype).expand({s.batch, s.heads}).contiguous();
}

// Flat indices b * H + h of the pairs whose gate is not exactly 0.
template <typename T>
std::vector<int64_t> alive_pairs(const at::Tensor& gates, const AttnShape& s) {
  std::vector<int64_t> pairs;
  const int64_t n = s.batch * s.heads;
  const T* g = gates.defined() ? gates.const_data_ptr<T>() : nullptr;
  for (int64_t p = 0; p < n; ++p) {
    if (!g || g[p] != T(0)) pairs.push_back(p);
  }
  return pairs;
}

// Which keys query row `row` may see: keys before `limit` (causality) that are not padding.
struct KeyVisibility {
  const bool* key_ok;  // [Sk] for this batch element, or null (no padding)
  int64_t k_len;
  bool causal;

  int64_t limit(int64_t row) const { return causal ? std::min(k_len, row + 1) : k_len; }
};

// The loops below are written for `omp simd` vectorisation: no calls but fast_exp, the
// padding test as a select, the causal limit as a loop bound.

// One query row in place: raw scores q.k in p[0:Sk] become probabilities. Returns the row's
// log-sum-exp, or -inf for a row that sees no key (then uniform over every key).
template <typename T>
STRUCTPRUNE_INLINE T softmax_row(T* p, int64_t lim, int64_t sk, const bool* key_ok, T scale) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  T m = kNegInf;
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < lim; ++j) {
    const T s = p[j] * scale;
    p[j] = s;
    const T visible = (key_ok == nullptr || key_ok[j]) ? s : kNegInf;
    m = visible > m ? visible : m;
  }
  if (m == kNegInf) {
    std::fill(p, p + sk, T(1) / static_cast<T>(sk));
    return kNegInf;
  }
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < lim; ++j) {
    const T e = (key_ok == nullptr || key_ok[j]) ? fast_exp(p[j] - m) : T(0);
    p[j] = e;
    sum += e;
  }
  std::fill(p + lim, p + sk, T(0));
  const T inv = T(1) / sum;
#pragma omp simd
  for (int64_t j = 0; j < lim; ++j) p[j] *= inv;
  return m + std::log(sum);
}

// One query row in place: raw scores in p[0:Sk] become the probabilities that the row's
// log-sum-exp `lse` (from softmax_row) describes.
template <typename T>
STRUCTPRUNE_INLINE void probability_row(T* p, int64_t lim, int64_t sk, const bool* key_ok, T scale, T lse) {
  if (std::isinf(lse) && lse < 0) {
    std::fill(p, p + sk, T(1) / static_cast<T>(sk));
    return;
  }
#pragma omp simd
  for (int64_t j = 0; j < lim; ++j) {
    p[j] = (key_ok == nullptr || key_ok[j]) ? fast_exp(p[j] * scale - lse) : T(0);
  }
  std::fill(p + lim, p + sk, T(0));
}

// One query row in place: dp[0:Sk] holding dO.V^T becomes dL/d(raw score) =
// scale * P * (g * dp - D) on visible keys and 0 elsewhere, where D = rowsum(dO * O) for
// the gated output O (equal to rowsum(dO_u * O_u) for the ungated output O_u and its
// gradient dO_u = g * dO). Masked keys have P = 0; a row that sees no key gets no gradient
// (masked_fill semantics). Returns D.
template <typename T>
STRUCTPRUNE_INLINE T score_grad_row(T* dp, const T* p, const T* d_out, const T* out, int64_t lim, int64_t sk,
                        int64_t head_dim, T gate, T scale, bool sees_no_key) {
  T d = 0;
#pragma omp simd reduction(+ : d)
  for (int64_t c = 0; c < head_dim; ++c) d += d_out[c] * out[c];
  if (sees_no_key) lim = 0;
#pragma omp simd
  for (int64_t j = 0; j < lim; ++j) dp[j] = p[j] * (gate * dp[j] - d) * scale;
  std::fill(dp + lim, dp + sk, T(0));
  return d;
}

// The float rows are compiled once per instruction set (see vec_math.h); doubles, which
// only serve gradient checks, are not.
STRUCTPRUNE_MULTIVERSION
float softmax_row_f32(float* p, int64_t lim, int64_t sk, const bool* key_ok, float scale) {
  return softmax_row<float>(p, lim, sk, key_ok, scale);
}
STRUCTPRUNE_MULTIVERSION
void probability_row_f32(float* p, int64_t lim, int64_t sk, const bool* key_ok, float scale,
                         float lse) {
  probability_row<float>(p, lim, sk, key_ok, scale, lse);
}
STRUCTPRUNE_MULTIVERSION
float score_grad_row_f32(float* dp, const float* p, const float* d_out, const float* out,
                         int64_t lim, int64_t sk, int64_t head_dim, float gate, float scale,
                         bool sees_no_key) {
  return score_grad_row<float>(dp, p, d_out, out, lim, sk, head_dim, gate, scale, sees_no_key);
}

template <typename T>
T softmax_row_any(T* p, int64_t lim, int64_t sk, const bool* key_ok, T scale) {
  if constexpr (std::is_same_v<T, float>) return softmax_row_f32(p, lim, sk, key_ok, scale);
  else return softmax_row<T>(p, lim, sk, key_ok, scale);
}
template <typename T>
void probability_row_any(T* p, int64_t lim, int64_t sk, const bool* key_ok, T scale, T lse) {
  if constexpr (std::is_same_v<T, float>) probability_row_f32(p, lim, sk, key_ok, scale, lse);
  else probability_row<T>(p, lim, sk, key_ok, scale, lse);
}
template <typename T>
T score_grad_row_any(T* dp, const T* p, const T* d_out, const T* out, int64_t lim, int64_t sk,
                     int64_t head_dim, T gate, T scale, bool sees_no_key) {
  if constexpr (std::is_same_v<T, float>) {
    return score_grad_row_f32(dp, p, d_out, out, lim, sk, head_dim, gate, scale, sees_no_key);
  } else {
    return score_grad_row<T>(dp, p, d_out, out, lim, sk, head_dim, gate, scale, sees_no_key);
  }
}

// A [rows, Sk] block of raw scores for the query rows starting at row0 becomes
// probabilities; their log-sum-exps go to lse[0:rows].
template <typename T>
void softmax_rows(T* p, T* lse, int64_t rows, int64_t row0, double scale, const KeyVisibility& kv) {
  for (int64_t i = 0; i < rows; ++i) {
    lse[i] = softmax_row_any<T>(p + i * kv.k_len, kv.limit(row0 + i), kv.k_len, kv.key_ok,
                                static_cast<T>(scale));
  }
}

// A [rows, Sk] block of raw scores becomes the probabilities saved by softmax_rows.
template <typename T>
void probabilities_from_lse(
    T* p, const T* lse, int64_t rows, int64_t row0, double scale, const KeyVisibility& kv) {
  for (int64_t i = 0; i < rows; ++i) {
    probability_row_any<T>(p + i * kv.k_len, kv.limit(row0 + i), kv.k_len, kv.key_ok,
                           static_cast<T>(scale), lse[i]);
  }
}

// A [rows, Sk] block of dO.V^T becomes score gradients (see score_grad_row); returns sum_i D_i.
template <typename T>
double score_grads(T* dp,
                   const T* p,
                   const T* d_out,
                   const T* out,
                   const T* lse,
                   int64_t rows,
                   int64_t row0,
                   int64_t head_dim,
                   T gate,
                   double scale,
                   const KeyVisibility& kv) {
  double total = 0;
  for (int64_t i = 0; i < rows; ++i) {
    const bool sees_no_key = std::isinf(lse[i]) && lse[i] < 0;
    total += static_cast<double>(score_grad_row_any<T>(
        dp + i * kv.k_len, p + i * kv.k_len, d_out + i * head_dim, out + i * head_dim,
        kv.limit(row0 + i), kv.k_len, head_dim, gate, static_cast<T>(scale), sees_no_key));
  }
  return total;
}

// Multiply-adds per parallel task (ATen's grain size for pointwise kernels).
constexpr int64_t kGrainSize = 32768;

// Work items per task so that each task covers about kGrainSize multiply-adds; small
// problems run inline on the calling thread, without entering a parallel region.
int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, kGrainSize / std::max<int64_t>(work_per_item, 1));
}

KeyVisibility visibility(const at::Tensor& mask, int64_t b, const AttnShape& s, bool causal) {
  return {mask.defined() ? mask.const_data_ptr<bool>() + b * s.k_len : nullptr, s.k_len, causal};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> masked_attention_fwd(
    const at::Tensor& q,
    const at::Tensor& k,
    const at::Tensor& v,
    const std::optional<at::Tensor>& head_gate,
    const std::optional<at::Tensor>& key_padding_mask,
    bool causal,
    double scale) {
  const AttnShape s = check_attention_inputs(q, k, v, head_gate, key_padding_mask, causal);
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  const at::Tensor mask =
      key_padding_mask ? key_padding_mask->to(at::kBool).contiguous() : at::Tensor();
  const at::Tensor gates = pair_gates(head_gate, s, q.scalar_type());
  at::Tensor out = at::zeros(q.sizes(), q.options());
  at::Tensor lse = at::zeros({s.batch, s.heads, s.q_len}, q.options());
  const int64_t q_blocks = (s.q_len + kQueryBlock - 1) / kQueryBlock;

  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "masked_attention_fwd", [&] {
    const std::vector<int64_t> pairs = alive_pairs<scalar_t>(gates, s);
    const int64_t items = static_cast<int64_t>(pairs.size()) * q_blocks;
    const int64_t work = std::min(kQueryBlock, s.q_len) * s.k_len * s.head_dim;
    at::parallel_for(0, items, grain_for(work), [&](int64_t begin, int64_t end) {
      // Worker threads do not inherit the caller's dispatch state: keep the ATen calls
      // below out of autograd explicitly.
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      at::Tensor scores = at::empty({std::min(kQueryBlock, s.q_len), s.k_len}, q.options());
      for (int64_t item = begin; item < end; ++item) {
        const int64_t pair = pairs[item / q_blocks];
        const int64_t b = pair / s.heads, h = pair % s.heads, hk = h / s.group();
        const int64_t row0 = (item % q_blocks) * kQueryBlock;
        const int64_t rows = std::min(kQueryBlock, s.q_len - row0);
        at::Tensor p = scores.narrow(0, 0, rows);
        at::mm_out(p, qc[b][h].narrow(0, row0, rows), kc[b][hk].t());
        softmax_rows<scalar_t>(p.data_ptr<scalar_t>(), lse[b][h].data_ptr<scalar_t>() + row0, rows,
                               row0, scale, visibility(mask, b, s, causal));
        at::Tensor o = out[b][h].narrow(0, row0, rows);
        at::mm_out(o, p, vc[b][hk]);
        if (gates.defined()) o.mul_(gates.const_data_ptr<scalar_t>()[pair]);
      }
    });
  });
  return {out, lse};
}

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
    const at::Tensor& lse) {
  const AttnShape s = check_attention_inputs(q, k, v, head_gate, key_padding_mask, causal);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(),
              "masked_attention_bwd: grad_out ", shape_str(grad_out), " and out ", shape_str(out),
              " must have the shape of q ", shape_str(q));
  TORCH_CHECK(lse.dim() == 3 && lse.sizes() == q.sizes().slice(0, 3),
              "masked_attention_bwd: lse has shape ", shape_str(lse), ", expected ",
              q.sizes().slice(0, 3));
  for (const auto& [t, name] :
       {std::pair{&grad_out, "grad_out"}, std::pair{&out, "out"}, std::pair{&lse, "lse"}}) {
    TORCH_CHECK(t->scalar_type() == q.scalar_type() && t->device().is_cpu(),
                "masked_attention_bwd: ", name, " is ", t->scalar_type(), " on ", t->device(),
                ", expected ", q.scalar_type(), " on cpu");
  }
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  const at::Tensor dout = grad_out.contiguous(), outc = out.contiguous(), lsec = lse.contiguous();
  const at::Tensor mask =
      key_padding_mask ? key_padding_mask->to(at::kBool).contiguous() : at::Tensor();
  const at::Tensor gates = pair_gates(head_gate, s, q.scalar_type());

  at::Tensor dq = at::zeros(q.sizes(), q.options());
  // With GQA several query heads share one key/value head: each pair writes its own
  // [Sk, D] slice of a per-query-head buffer, summed over the group afterwards, so no two
  // threads write the same memory.
  const bool grouped = s.group() > 1;
  const std::vector<int64_t> per_head_sizes{s.batch, s.heads, s.k_len, s.head_dim};
  at::Tensor dk_heads =
      at::zeros(grouped ? at::IntArrayRef(per_head_sizes) : k.sizes(), q.options());
  at::Tensor dv_heads =
      at::zeros(grouped ? at::IntArrayRef(per_head_sizes) : v.sizes(), q.options());
  at::Tensor pair_gate_grad = at::zeros({s.batch, s.heads}, q.options().dtype(at::kDouble));

  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "masked_attention_bwd", [&] {
    const std::vector<int64_t> pairs = alive_pairs<scalar_t>(gates, s);
    double* gate_grad = pair_gate_grad.data_ptr<double>();
    const int64_t work = s.q_len * s.k_len * s.head_dim;
    at::parallel_for(
        0, static_cast<int64_t>(pairs.size()), grain_for(work), [&](int64_t begin, int64_t end) {
          at::AutoDispatchBelowADInplaceOrView below_autograd;
          const int64_t block_rows = std::min(kQueryBlock, s.q_len);
          at::Tensor p_buf = at::empty({block_rows, s.k_len}, q.options());
          at::Tensor dp_buf = at::empty({block_rows, s.k_len}, q.options());
          for (int64_t item = begin; item < end; ++item) {
            const int64_t pair = pairs[item];
            const int64_t b = pair / s.heads, h = pair % s.heads, hk = h / s.group();
            const scalar_t g =
                gates.defined() ? gates.const_data_ptr<scalar_t>()[pair] : scalar_t(1);
            const at::Tensor k_bh = kc[b][hk], v_bh = vc[b][hk];
            at::Tensor dk_bh = dk_heads[b][grouped ? h : hk];
            at::Tensor dv_bh = dv_heads[b][grouped ? h : hk];
            const KeyVisibility kv = visibility(mask, b, s, causal);
            double d_sum = 0;
            for (int64_t row0 = 0; row0 < s.q_len; row0 += kQueryBlock) {
              const int64_t rows = std::min(kQueryBlock, s.q_len - row0);
              const at::Tensor q_blk = qc[b][h].narrow(0, row0, rows);
              const at::Tensor do_blk = dout[b][h].narrow(0, row0, rows);
              at::Tensor p = p_buf.narrow(0, 0, rows);
              at::Tensor dp = dp_buf.narrow(0, 0, rows);
              at::mm_out(p, q_blk, k_bh.t());
              probabilities_from_lse<scalar_t>(p.data_ptr<scalar_t>(),
                                               lsec[b][h].const_data_ptr<scalar_t>() + row0, rows,
                                               row0, scale, kv);
              dv_bh.addmm_(p.t(), do_blk, /*beta=*/1, /*alpha=*/g);  // dV += P^T (g dO)
              at::mm_out(dp, do_blk, v_bh.t());
              d_sum +=
                  score_grads<scalar_t>(dp.data_ptr<scalar_t>(), p.const_data_ptr<scalar_t>(),
                                        do_blk.const_data_ptr<scalar_t>(),
                                        outc[b][h].const_data_ptr<scalar_t>() + row0 * s.head_dim,
                                        lsec[b][h].const_data_ptr<scalar_t>() + row0, rows, row0,
                                        s.head_dim, g, scale, kv);
              at::Tensor dq_blk = dq[b][h].narrow(0, row0, rows);
              at::mm_out(dq_blk, dp, k_bh);
              dk_bh.addmm_(dp.t(), q_blk);
            }
            // dL/dg = sum(dO * O_u) = sum(dO * O) / g, with g != 0 for an alive pair.
            gate_grad[pair] = d_sum / static_cast<double>(g);
          }
        });
  });

  at::Tensor dk = grouped
                      ? dk_heads.view({s.batch, s.kv_heads, s.group(), s.k_len, s.head_dim}).sum(2)
                      : dk_heads;
  at::Tensor dv = grouped
                      ? dv_heads.view({s.batch, s.kv_heads, s.group(), s.k_len, s.head_dim}).sum(2)
                      : dv_heads;
  at::Tensor dgate = at::empty({0}, q.options());
  if (head_gate) {
    at::Tensor per_gate = head_gate->dim() == 1 ? pair_gate_grad.sum(0) : pair_gate_grad;
    dgate = per_gate.to(head_gate->scalar_type());
  }
  return {dq, dk, dv, dgate};
}

}  // namespace structprune
