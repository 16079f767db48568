// Vectorized float32 row kernels of the CPU ops (declared in cpu_vec.h).
//
// Each function is built for AVX-512, AVX2 and the x86-64 baseline with GCC's
// target_clones and picked at load time; reductions use `omp simd` (compiled
// with -fopenmp-simd: vector lanes only, no OpenMP runtime), which lets the
// compiler split a sum across lanes.
#include "cpu_vec.h"

#include <cmath>
#include <cstring>

#include "cpu_clones.h"

namespace fuselm::cpu {

namespace {

template <typename T>
inline void convert(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <typename T>
inline void convert_back(const float* src, T* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

// exp(x) for x <= 0 (Cephes expf: range reduction by ln 2, degree-6 polynomial,
// ~1 ulp), branch-free so loops over it vectorize without a vector libm.
inline float exp_nonpositive(float x) {
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln 2)
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;             // x - n ln 2, two-part ln 2
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t e = static_cast<int32_t>(n < -126.f ? -126.f : n) + 127;  // 2^n as float bits
  const uint32_t bits = static_cast<uint32_t>(e) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x < -87.3f ? 0.f : p * scale;
}

}  // namespace

CLONES void to_float(const float* src, float* dst, int64_t n) { convert(src, dst, n); }
CLONES void to_float(const c10::Half* src, float* dst, int64_t n) { convert(src, dst, n); }
CLONES void to_float(const c10::BFloat16* src, float* dst, int64_t n) { convert(src, dst, n); }
CLONES void from_float(const float* src, float* dst, int64_t n) { convert_back(src, dst, n); }
CLONES void from_float(const float* src, c10::Half* dst, int64_t n) { convert_back(src, dst, n); }
CLONES void from_float(const float* src, c10::BFloat16* dst, int64_t n) { convert_back(src, dst, n); }

CLONES void add(float* a, const float* b, int64_t n) {
  for (int64_t i = 0; i < n; ++i) a[i] += b[i];
}

CLONES double sum(const float* x, int64_t n) {
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += x[i];
  return s;
}

CLONES double sum_squares(const float* x, int64_t n) {
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += static_cast<double>(x[i]) * x[i];
  return s;
}

CLONES double sum_squared_deviations(const float* x, int64_t n, float mean) {
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) {
    const float d = x[i] - mean;  // in float32, as the reference
    s += static_cast<double>(d) * d;
  }
  return s;
}

CLONES void normalize(const float* h, const float* w, const float* b, float mean, float rstd, float* out,
                      int64_t n) {
  if (b) {
    for (int64_t i = 0; i < n; ++i) out[i] = (h[i] - mean) * rstd * w[i] + b[i];
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = (h[i] - mean) * rstd * w[i];
  }
}

CLONES bool any_nan(const float* x, int64_t n) {
  int nan = 0;
#pragma omp simd reduction(| : nan)
  for (int64_t i = 0; i < n; ++i) nan |= x[i] != x[i];
  return nan != 0;
}

CLONES float max(const float* x, int64_t n) {
  float m = -INFINITY;
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

CLONES void divide(float* x, int64_t n, float t) {
  for (int64_t i = 0; i < n; ++i) x[i] = x[i] / t;
}

CLONES void exp_shifted(float* x, int64_t n, float m) {
  for (int64_t i = 0; i < n; ++i) x[i] = exp_nonpositive(x[i] - m);
}

CLONES void silu_mul(const float* a, const float* b, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float t = exp_nonpositive(-std::fabs(a[i]));  // e^-|a|: no overflow on either side
    const float sigmoid = a[i] >= 0.f ? 1.f / (1.f + t) : t / (1.f + t);
    out[i] = a[i] * sigmoid * b[i];
  }
}

CLONES void gelu_tanh(const float* x, float* out, int64_t n) {
  constexpr float k = 0.7978845608028654f;  // sqrt(2 / pi)
  for (int64_t i = 0; i < n; ++i) {
    const float z = k * (x[i] + 0.044715f * x[i] * x[i] * x[i]);
    const float t = exp_nonpositive(-2.f * std::fabs(z));  // tanh(|z|) = (1 - t) / (1 + t)
    const float tanh_abs = (1.f - t) / (1.f + t);
    out[i] = 0.5f * x[i] * (1.f + (z >= 0.f ? tanh_abs : -tanh_abs));
  }
}

CLONES double sum_at_least(const float* x, int64_t n, float threshold) {
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) {
    const float keep = x[i] >= threshold ? 1.f : 0.f;  // x is finite: a product, not a branch
    s += static_cast<double>(x[i] * keep);
  }
  return s;
}

}  // namespace fuselm::cpu
