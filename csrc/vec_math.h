// Elementwise math that the compiler can vectorise, for the CPU kernels' inner loops.
//
// std::exp is a library call, so a loop over it runs one element at a time; in attention
// the exponentials of the softmax then cost more than the matrix products. fast_exp is a
// branch-free float exp (range reduction to 2^n * e^r with |r| <= ln2/2, a degree-6
// polynomial for e^r: relative error below 2e-7, i.e. about 1 ulp), written with plain
// arithmetic and a bit cast so that `#pragma omp simd` loops over it become vector code.
// Doubles keep std::exp: they serve gradcheck, where accuracy is the point.
//
// STRUCTPRUNE_MULTIVERSION compiles a hot function for AVX-512, AVX2 and baseline x86-64
// and picks one when the library loads (GCC target_clones), so the extension is fast on
// the machine it runs on without being built with -march=native.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define STRUCTPRUNE_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define STRUCTPRUNE_MULTIVERSION
#endif

// Inlined into each multiversioned caller, so that it is compiled for the caller's target.
#if defined(__GNUC__)
#define STRUCTPRUNE_INLINE __attribute__((always_inline)) inline
#else
#define STRUCTPRUNE_INLINE inline
#endif

namespace structprune {

STRUCTPRUNE_INLINE float fast_exp(float x) {
  constexpr float kLog2e = 1.4426950408889634f;
  constexpr float kLn2 = 0.6931471805599453f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float n = (x * kLog2e + kRound) - kRound;
  const float r = x - n * kLn2;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return p * two_n;
}

STRUCTPRUNE_INLINE double fast_exp(double x) {
  return std::exp(x);
}

// erf by Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7) on top of fast_exp.
STRUCTPRUNE_INLINE float fast_erf(float x) {
  const float ax = x < 0.0f ? -x : x;
  const float t = 1.0f / (1.0f + 0.3275911f * ax);
  float p = 1.061405429f;
  p = p * t - 1.453152027f;
  p = p * t + 1.421413741f;
  p = p * t - 0.284496736f;
  p = p * t + 0.254829592f;
  const float y = 1.0f - p * t * fast_exp(-ax * ax);
  return x < 0.0f ? -y : y;
}

STRUCTPRUNE_INLINE double fast_erf(double x) {
  return std::erf(x);
}

// tanh(x) = sign(x) (1 - 2 / (e^{2|x|} + 1)); absolute error about 1e-7 in float.
STRUCTPRUNE_INLINE float fast_tanh(float x) {
  const float ax = x < 0.0f ? -x : x;
  const float y = 1.0f - 2.0f / (fast_exp(2.0f * ax) + 1.0f);
  return x < 0.0f ? -y : y;
}

STRUCTPRUNE_INLINE double fast_tanh(double x) {
  return std::tanh(x);
}

}  // namespace structprune
