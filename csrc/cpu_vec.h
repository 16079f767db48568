// Row kernels of the CPU implementations: float32 loops the compiler
// vectorizes, defined in cpu_vec.cpp (which includes no ATen, so it compiles
// in a second or two).
//
// cpu_vec.cpp builds each of them for AVX-512, AVX2 and the x86-64 baseline
// (GCC target_clones); the loader picks the best one for the machine, so the
// cached build stays portable while the loops use the widest vectors.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace fuselm::cpu {

// dst[i] = float(src[i])
void to_float(const float* src, float* dst, int64_t n);
void to_float(const c10::Half* src, float* dst, int64_t n);
void to_float(const c10::BFloat16* src, float* dst, int64_t n);
// dst[i] = T(src[i]), rounded to nearest even
void from_float(const float* src, float* dst, int64_t n);
void from_float(const float* src, c10::Half* dst, int64_t n);
void from_float(const float* src, c10::BFloat16* dst, int64_t n);

// a[i] += b[i]
void add(float* a, const float* b, int64_t n);
// sum(x), sum(x^2), sum((x - mean)^2), accumulated in float64
double sum(const float* x, int64_t n);
double sum_squares(const float* x, int64_t n);
double sum_squared_deviations(const float* x, int64_t n, float mean);
// out[i] = (h[i] - mean) * rstd * w[i] (+ b[i]); b may be null
void normalize(const float* h, const float* w, const float* b, float mean, float rstd, float* out, int64_t n);

// Whether x holds a NaN; max(x) for NaN-free x.
bool any_nan(const float* x, int64_t n);
float max(const float* x, int64_t n);
// x[i] = x[i] / t   (division, as the reference)
void divide(float* x, int64_t n, float t);
// x[i] = exp(x[i] - m), 0 where x[i] - m < -87.3 (below float's normal range)
void exp_shifted(float* x, int64_t n, float m);
// out[i] = silu(a[i]) * b[i], silu(a) = a / (1 + e^-a)
void silu_mul(const float* a, const float* b, float* out, int64_t n);
// out[i] = x[i] / 2 * (1 + tanh(sqrt(2 / pi) * (x[i] + 0.044715 x[i]^3)))
void gelu_tanh(const float* x, float* out, int64_t n);
// sum of the x[i] >= threshold, in float64
double sum_at_least(const float* x, int64_t n, float threshold);

}  // namespace fuselm::cpu
