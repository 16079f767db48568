// Element types of the CUDA kernels: float32, float16 (__half), bfloat16
// (__nv_bfloat16), their float32 conversions (round to nearest even), and a
// 16-byte pack of elements for vectorized loads and stores. CUDA headers only.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

namespace fuselm {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// N elements moved together: one 16-byte access for a full aligned pack of 16-bit
// or 32-bit elements (two for N float32 weights of a 16-bit row).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Elements per 16-byte pack.
template <typename T>
constexpr int pack_size() { return 16 / static_cast<int>(sizeof(T)); }

// Pack number `pack` of a row with `cols` elements. ALIGNED: the row start is
// 16-byte aligned, so a full pack is one vector load; a partial last pack and
// every pack of an unaligned row are read element by element (missing -> 0).
template <typename T, int N, bool ALIGNED>
__device__ __forceinline__ Pack<T, N> load_pack(const T* row, int64_t pack, int64_t cols) {
  const int64_t base = pack * N;
  if (ALIGNED && base + N <= cols) return *reinterpret_cast<const Pack<T, N>*>(row + base);
  Pack<T, N> p;
#pragma unroll
  for (int j = 0; j < N; ++j) p.v[j] = base + j < cols ? row[base + j] : from_float<T>(0.f);
  return p;
}

template <typename T, int N, bool ALIGNED>
__device__ __forceinline__ void store_pack(T* row, int64_t pack, int64_t cols, const Pack<T, N>& p) {
  const int64_t base = pack * N;
  if (ALIGNED && base + N <= cols) {
    *reinterpret_cast<Pack<T, N>*>(row + base) = p;
    return;
  }
#pragma unroll
  for (int j = 0; j < N; ++j)
    if (base + j < cols) row[base + j] = p.v[j];
}

inline bool aligned_to(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

}  // namespace fuselm
