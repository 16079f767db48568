// Warp and block reductions and scans for one-block-per-row kernels.
//
// Every result is a fixed tree over the threads of one block (shuffles inside
// a warp, then warp 0 over the warp totals), so the order in which a row's
// values are combined depends only on the block size: the same row gives the
// same bits whatever else runs in the batch. CUDA headers only, no torch.
#pragma once
#include <cuda_runtime.h>

namespace fuselm {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

struct Sum {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};

template <typename T, typename Op>
__device__ __forceinline__ T warp_reduce(T v, Op op) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v = op(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

// Reduce v over the block; every thread gets the result. `smem` holds 32 values
// and may be reused right after the call returns (it ends with a barrier).
template <typename T, typename Op>
__device__ T block_reduce(T v, Op op, T identity, T* smem) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int n_warps = (blockDim.x + kWarp - 1) / kWarp;
  v = warp_reduce(v, op);
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  if (warp == 0) {
    T w = lane < n_warps ? smem[lane] : identity;
    w = warp_reduce(w, op);
    if (lane == 0) smem[0] = w;
  }
  __syncthreads();
  const T result = smem[0];
  __syncthreads();
  return result;
}

// Inclusive prefix sum over the lanes of a warp.
template <typename T>
__device__ __forceinline__ T warp_inclusive_scan(T v) {
  const int lane = threadIdx.x % kWarp;
  for (int offset = 1; offset < kWarp; offset *= 2) {
    const T up = __shfl_up_sync(kFullMask, v, offset);
    if (lane >= offset) v += up;
  }
  return v;
}

// Exclusive prefix sum of v over the threads of the block (in thread order);
// *total receives the block total. For integer types, where `incl - v` is
// exact. `smem` holds 33 values; ends with a barrier.
template <typename T>
__device__ T block_exclusive_scan(T v, T* smem, T* total) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int n_warps = (blockDim.x + kWarp - 1) / kWarp;
  const T incl = warp_inclusive_scan(v);
  if (lane == kWarp - 1) smem[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    const T w = lane < n_warps ? smem[lane] : T(0);
    const T w_incl = warp_inclusive_scan(w);
    smem[lane] = w_incl - w;  // exclusive prefix of the warp totals
    if (lane == kWarp - 1) smem[kWarp] = w_incl;
  }
  __syncthreads();
  const T result = smem[warp] + incl - v;
  *total = smem[kWarp];
  __syncthreads();
  return result;
}

}  // namespace fuselm
