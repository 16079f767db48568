// Fused RMSNorm / LayerNorm over the last dim, optionally with the residual add.
//
//   h = x                          or  h = round_to_T(x + residual)   (also written out)
//   rms_norm:   y = h * rsqrt(mean(h^2) + eps) * weight
//   layer_norm: y = (h - mean(h)) * rsqrt(mean((h - mean)^2) + eps) * weight (+ bias)
//
// Statistics and y in float32, y rounded to T; y comes from the rounded h,
// exactly as runtime/reference.py. weight and bias are of type W: T or float32. Bytes moved for M rows of N columns with
// element size e: read M*N*e (x) [+ M*N*e residual] + N*e weight [+ bias],
// write M*N*e (y) [+ M*N*e h]; a few FLOPs per element, so bandwidth bound.
// The second (and LayerNorm's third) pass re-reads the row from L1/L2.
//
// One block per row. Thread t owns the 16-byte packs t, t + blockDim, ... in
// both the vectorized and the element-wise (unaligned) path, and the block
// size depends only on N, so a row's reduction order never depends on the
// batch or on its address: batch invariant and bitwise reproducible.
// CUDA headers only (no torch), so `nvcc -c` checks it anywhere.
#pragma once
#include <cuda_runtime.h>

#include "dtype.cuh"
#include "reduce.cuh"

namespace fuselm {

struct NormArgs {
  const void* x;              // [rows, cols] with row stride x_row_stride (elements), unit column stride
  int64_t x_row_stride;
  const void* residual;       // nullptr: no residual
  int64_t residual_row_stride;
  const void* weight;         // [cols], element type W
  const void* bias;           // [cols] of W, or nullptr (layer_norm only)
  void* y;                    // [rows, cols] contiguous
  void* h;                    // [rows, cols] contiguous, written when residual is given
  int64_t rows;
  int64_t cols;
  float eps;
  bool rms;                   // true: RMSNorm, false: LayerNorm
};

template <typename T, typename W, int N, bool ALIGNED>
__global__ void __launch_bounds__(1024) norm_kernel(NormArgs a) {
  __shared__ float smem[kWarp];
  const int64_t row = blockIdx.x;
  const int64_t cols = a.cols;
  const int64_t n_packs = (cols + N - 1) / N;
  const T* x = static_cast<const T*>(a.x) + row * a.x_row_stride;
  const T* residual = a.residual ? static_cast<const T*>(a.residual) + row * a.residual_row_stride : nullptr;
  const W* weight = static_cast<const W*>(a.weight);
  const W* bias = static_cast<const W*>(a.bias);
  T* y = static_cast<T*>(a.y) + row * cols;
  T* h = residual ? static_cast<T*>(a.h) + row * cols : nullptr;
  // Passes after the first read h back: this thread wrote those packs itself.
  const T* h_in = residual ? h : x;

  // Pass 1: h (rounded to T and stored when fused), sum(h) or sum(h^2).
  float acc = 0.f;
  for (int64_t i = threadIdx.x; i < n_packs; i += blockDim.x) {
    Pack<T, N> hv = load_pack<T, N, ALIGNED>(x, i, cols);
    if (residual) {
      const Pack<T, N> rv = load_pack<T, N, ALIGNED>(residual, i, cols);
#pragma unroll
      for (int j = 0; j < N; ++j) hv.v[j] = from_float<T>(to_float(hv.v[j]) + to_float(rv.v[j]));
      store_pack<T, N, ALIGNED>(h, i, cols, hv);
    }
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const float f = to_float(hv.v[j]);  // missing tail elements are 0 and add nothing
      acc += a.rms ? f * f : f;
    }
  }
  const float stat = block_reduce(acc, Sum(), 0.f, smem) / static_cast<float>(cols);

  float mean = 0.f, rstd;
  if (a.rms) {
    rstd = rsqrtf(stat + a.eps);
  } else {
    // Two-pass variance, as the reference: no cancellation for large means.
    mean = stat;
    float acc2 = 0.f;
    for (int64_t i = threadIdx.x; i < n_packs; i += blockDim.x) {
      const Pack<T, N> hv = load_pack<T, N, ALIGNED>(h_in, i, cols);
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const float d = to_float(hv.v[j]) - mean;
        if (i * N + j < cols) acc2 += d * d;
      }
    }
    rstd = rsqrtf(block_reduce(acc2, Sum(), 0.f, smem) / static_cast<float>(cols) + a.eps);
  }

  // Last pass: y = (h - mean) * rstd * weight (+ bias), in the reference's order.
  for (int64_t i = threadIdx.x; i < n_packs; i += blockDim.x) {
    const Pack<T, N> hv = load_pack<T, N, ALIGNED>(h_in, i, cols);
    const Pack<W, N> wv = load_pack<W, N, ALIGNED>(weight, i, cols);
    Pack<T, N> out;
    if (bias) {
      const Pack<W, N> bv = load_pack<W, N, ALIGNED>(bias, i, cols);
#pragma unroll
      for (int j = 0; j < N; ++j)
        out.v[j] = from_float<T>((to_float(hv.v[j]) - mean) * rstd * to_float(wv.v[j]) + to_float(bv.v[j]));
    } else {
#pragma unroll
      for (int j = 0; j < N; ++j) out.v[j] = from_float<T>((to_float(hv.v[j]) - mean) * rstd * to_float(wv.v[j]));
    }
    store_pack<T, N, ALIGNED>(y, i, cols, out);
  }
}

// Threads per row: one 16-byte pack each up to 1024 threads, whole warps.
// Depends on cols and the element size only (batch invariance).
template <typename T>
inline int norm_threads(int64_t cols) {
  const int64_t packs = (cols + pack_size<T>() - 1) / pack_size<T>();
  const int64_t warps = (packs + kWarp - 1) / kWarp;
  return static_cast<int>(warps < 1 ? kWarp : (warps > 32 ? 1024 : warps * kWarp));
}

// Launch on `stream` (W: T or float); the caller checks the launch (C10_CUDA_KERNEL_LAUNCH_CHECK).
template <typename T, typename W>
inline void launch_norm(const NormArgs& a, cudaStream_t stream) {
  constexpr int N = pack_size<T>();
  constexpr size_t w_pack = sizeof(W) * N;  // bytes of a weight pack (32 for float weights of 16-bit x)
  if (a.rows == 0) return;
  const bool aligned = aligned_to(a.x, 16) && a.x_row_stride % N == 0 && aligned_to(a.y, 16) && a.cols % N == 0 &&
                       aligned_to(a.weight, w_pack) && (a.bias == nullptr || aligned_to(a.bias, w_pack)) &&
                       (a.residual == nullptr || (aligned_to(a.residual, 16) && aligned_to(a.h, 16) &&
                                                  a.residual_row_stride % N == 0));
  const dim3 grid(static_cast<unsigned>(a.rows)), block(norm_threads<T>(a.cols));
  if (aligned)
    norm_kernel<T, W, N, true><<<grid, block, 0, stream>>>(a);
  else
    norm_kernel<T, W, N, false><<<grid, block, 0, stream>>>(a);
}

}  // namespace fuselm
