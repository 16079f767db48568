// Temperature / top-k / top-p / min-p sampling without sorting, one block per row.
//
// Draws token i of a row with probability proportional to
//   e_i = exp(l_i / t - max_j l_j / t)     for kept i, 0 otherwise,
// where i is kept when (as runtime/reference.sampling_probs, ties kept):
//   top-k: l_i / t >= the k-th largest l / t
//   top-p: l_i / t >= c, c the largest value such that the mass of the kept
//          tokens strictly above c is < top_p * (mass of the top-k set)
//   min-p: e_i >= min_p   (e of the most probable token is exactly 1)
// Rows with t == 0 or top_k == 1, and rows whose max is not finite (NaN/inf,
// where the reference has no distribution), return the argmax (first index).
//
// Both thresholds are found by radix select on the order-preserving 32-bit key
// of l / t (11 + 11 + 10 bits, a 2048-bin shared histogram per round): top-k
// counts, top-p sums masses in 2^-40 fixed point so the sums are exact integers
// and the search is deterministic. The token is then drawn by inverse transform
// with one Philox uniform u per row: each warp sums its contiguous chunk, the
// chunk holding u * Z is found, and that warp scans it 32 at a time.
//
// Work per row of V logits (element size e): ~V*e bytes from DRAM, then up to
// 7 more passes from L2 (top-k and top-p rounds skip when off), ~10 FLOPs and
// one exp per element per pass. CUDA headers only (no torch).
#pragma once
#include <cuda_runtime.h>

#include "dtype.cuh"
#include "philox.h"
#include "reduce.cuh"

namespace fuselm {

constexpr int kSampleThreads = 1024;
constexpr int kSampleWarps = kSampleThreads / kWarp;
constexpr int kRadixBins = 2048;  // 11 bits per round
constexpr float kMassScale = 1099511627776.0f;  // 2^40: e in [0, 1] -> exact integer sums

struct SampleArgs {
  const void* logits;  // [rows, vocab], row stride in elements, unit column stride
  int64_t row_stride;
  int64_t rows;
  int64_t vocab;
  // Per-row parameters; a stride of 0 shares one value between all rows.
  const float* temperature;
  int64_t temperature_stride;
  const int64_t* top_k;
  int64_t top_k_stride;
  const float* top_p;
  int64_t top_p_stride;
  const float* min_p;
  int64_t min_p_stride;
  const int64_t* seed;  // one value, read on the device (no host sync)
  int64_t* out;         // [rows]
};

// Monotone float -> uint32 map: a < b  <=>  key(a) < key(b) (-0 and +0 map alike).
__device__ __forceinline__ uint32_t order_key(float f) {
  const uint32_t u = __float_as_uint(f == 0.f ? 0.f : f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Round `round` of a 32-bit radix select: shift and bin mask of that digit.
__device__ __forceinline__ int radix_shift(int round) { return round == 0 ? 21 : (round == 1 ? 10 : 0); }
__device__ __forceinline__ uint32_t radix_mask(int round) { return round == 2 ? 0x3ffu : 0x7ffu; }

// One row's view of the logits, scaled by 1/temperature like the reference.
template <typename T>
struct Row {
  const T* l;
  int64_t vocab;
  float t;  // temperature > 0
  float m;  // max of l / t
  __device__ __forceinline__ float scaled(int64_t i) const { return to_float(l[i]) / t; }
  __device__ __forceinline__ float mass(float lt) const { return expf(lt - m); }
  // The mass of token i if it is inside the row and survives top-k/top-p (its order key) and min-p, else 0.
  __device__ __forceinline__ float kept_mass(int64_t i, int64_t end, uint32_t min_key, float min_p) const {
    if (i >= end) return 0.f;
    const float lt = scaled(i);
    const float e = mass(lt);
    return order_key(lt) < min_key || e < min_p ? 0.f : e;
  }
};

// Find, from the top bin down, the bin b where `above + sum(hist[> b]) < target <=
// above + sum(hist[>= b])` (target compared as double so masses may be fractional).
// Thread j owns bins n-1-2j and n-2-2j. Returns b (or -1 when the total is below
// target) and sets *above_b = above + sum(hist[> b]), *in_b = hist[b]. Ends with a barrier.
__device__ int find_bin(const unsigned long long* hist, int n_bins, unsigned long long above, double target,
                        unsigned long long* scan_smem, unsigned long long* above_b, unsigned long long* in_b) {
  __shared__ int s_bin;
  __shared__ unsigned long long s_above, s_in;
  const int hi = n_bins - 1 - 2 * static_cast<int>(threadIdx.x);
  const unsigned long long own = (hi >= 0 ? hist[hi] : 0ull) + (hi >= 1 ? hist[hi - 1] : 0ull);
  if (threadIdx.x == 0) s_bin = -1;
  unsigned long long total;
  unsigned long long run = above + block_exclusive_scan(own, scan_smem, &total);
  for (int b = hi; b >= 0 && b >= hi - 1; --b) {
    const unsigned long long next = run + hist[b];
    if (static_cast<double>(run) < target && target <= static_cast<double>(next)) {
      s_bin = b;
      s_above = run;
      s_in = hist[b];
    }
    run = next;
  }
  __syncthreads();
  const int bin = s_bin;
  *above_b = s_above;
  *in_b = s_in;
  __syncthreads();
  return bin;
}

// The key of the k-th largest l / t (1 <= k < vocab), ties counted.
template <typename T>
__device__ uint32_t top_k_key(const Row<T>& r, int64_t k, unsigned long long* hist, unsigned long long* scan_smem) {
  uint32_t prefix = 0, prefix_mask = 0;
  unsigned long long above = 0;
  for (int round = 0; round < 3; ++round) {
    const int shift = radix_shift(round);
    const uint32_t mask = radix_mask(round);
    for (int b = threadIdx.x; b < kRadixBins; b += blockDim.x) hist[b] = 0;
    __syncthreads();
    for (int64_t i = threadIdx.x; i < r.vocab; i += blockDim.x) {
      const uint32_t key = order_key(r.scaled(i));
      if ((key & prefix_mask) == prefix) atomicAdd(&hist[(key >> shift) & mask], 1ull);
    }
    __syncthreads();
    unsigned long long above_b, in_b;
    const int bin = find_bin(hist, static_cast<int>(mask) + 1, above, static_cast<double>(k), scan_smem, &above_b, &in_b);
    prefix |= static_cast<uint32_t>(bin) << shift;
    prefix_mask |= mask << shift;
    // When the whole bin is needed, every key in it is kept: its lower bound is the threshold.
    if (above_b + in_b == static_cast<unsigned long long>(k)) break;
    above = above_b;
  }
  return prefix;
}

// The key c of the top-p cutoff among keys >= min_key (top_p < 1):
// mass(keys > c) < top_p * Z <= mass(keys >= c), Z the mass of all keys >= min_key.
template <typename T>
__device__ uint32_t top_p_key(const Row<T>& r, float top_p, uint32_t min_key, unsigned long long* hist,
                              unsigned long long* scan_smem) {
  uint32_t prefix = 0, prefix_mask = 0;
  unsigned long long above = 0;
  double target = 0.0;
  for (int round = 0; round < 3; ++round) {
    const int shift = radix_shift(round);
    const uint32_t mask = radix_mask(round);
    for (int b = threadIdx.x; b < kRadixBins; b += blockDim.x) hist[b] = 0;
    __syncthreads();
    for (int64_t i = threadIdx.x; i < r.vocab; i += blockDim.x) {
      const float lt = r.scaled(i);
      const uint32_t key = order_key(lt);
      if (key >= min_key && (key & prefix_mask) == prefix) {
        const unsigned long long fixed = __float2ull_rn(r.mass(lt) * kMassScale);
        if (fixed) atomicAdd(&hist[(key >> shift) & mask], fixed);
      }
    }
    __syncthreads();
    if (round == 0) {
      unsigned long long part = 0, z;
      for (int b = threadIdx.x; b < kRadixBins; b += blockDim.x) part += hist[b];
      block_exclusive_scan(part, scan_smem, &z);
      target = fmax(static_cast<double>(top_p) * static_cast<double>(z), 1.0);  // top_p <= 0 keeps the max
    }
    unsigned long long above_b, in_b;
    const int bin = find_bin(hist, static_cast<int>(mask) + 1, above, target, scan_smem, &above_b, &in_b);
    // The parent bin holds the target and its sub-bins split its mass exactly, so a bin is
    // always found (the row's max has mass 2^40 and 1 <= target < Z).
    prefix |= static_cast<uint32_t>(bin) << shift;
    prefix_mask |= mask << shift;
    above = above_b;
  }
  return prefix;
}

// torch.argmax's order: NaN above everything, then larger values, then the first index.
__device__ __forceinline__ bool argmax_beats(float v, int64_t i, float best, int64_t best_i) {
  const bool v_nan = v != v, best_nan = best != best;
  if (v_nan != best_nan) return v_nan;
  if (!v_nan && v != best) return v > best;
  return i < best_i;
}

template <typename T>
__global__ void __launch_bounds__(kSampleThreads, 1) sample_kernel(SampleArgs a) {
  __shared__ unsigned long long hist[kRadixBins];
  __shared__ unsigned long long scan_smem[kWarp + 1];
  __shared__ float f_smem[kWarp];
  __shared__ float warp_total[kSampleWarps];
  __shared__ int64_t warp_last[kSampleWarps];
  __shared__ int s_warp;
  __shared__ float s_start, s_target;

  const int64_t row = blockIdx.x;
  const int64_t vocab = a.vocab;
  const T* l = static_cast<const T*>(a.logits) + row * a.row_stride;
  const float t = a.temperature[row * a.temperature_stride];
  const int64_t k = a.top_k[row * a.top_k_stride];
  const float top_p = a.top_p[row * a.top_p_stride];
  const float min_p = fminf(a.min_p[row * a.min_p_stride], 1.f);  // <= 1: the max token always stays
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;

  // Pass 1: argmax of the raw logits, in torch.argmax's order.
  float best = -INFINITY;
  int64_t best_i = vocab;
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
    const float v = to_float(l[i]);
    if (argmax_beats(v, i, best, best_i)) {
      best = v;
      best_i = i;
    }
  }
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    const float v = __shfl_xor_sync(kFullMask, best, offset);
    const int64_t i = __shfl_xor_sync(kFullMask, best_i, offset);
    if (argmax_beats(v, i, best, best_i)) {
      best = v;
      best_i = i;
    }
  }
  if (lane == 0) {
    f_smem[warp] = best;
    warp_last[warp] = best_i;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kSampleWarps; ++w) {
      if (argmax_beats(f_smem[w], warp_last[w], best, best_i)) {
        best = f_smem[w];
        best_i = warp_last[w];
      }
    }
    f_smem[0] = best;
    warp_last[0] = best_i;
  }
  __syncthreads();
  const float l_max = f_smem[0];
  const int64_t argmax = warp_last[0];
  __syncthreads();
  const float m = l_max / t;  // division by t > 0 is monotone: max(l / t) == max(l) / t
  if (t == 0.f || k == 1 || !isfinite(m)) {
    if (threadIdx.x == 0) a.out[row] = argmax;
    return;
  }
  const Row<T> r{l, vocab, t, m};

  uint32_t min_key = 0;
  if (k > 1 && k < vocab) min_key = top_k_key(r, k, hist, scan_smem);
  if (top_p < 1.f) min_key = top_p_key(r, top_p, min_key, hist, scan_smem);

  // Inverse transform. Warp w owns the contiguous chunk [w * chunk, (w + 1) * chunk).
  const int64_t chunk = ((vocab + kSampleWarps - 1) / kSampleWarps + kWarp - 1) / kWarp * kWarp;
  const int64_t begin = warp * chunk, end = min(vocab, begin + chunk);
  float run = 0.f;
  int64_t last = -1;
  for (int64_t base = begin; base < end; base += kWarp) {
    const float e = r.kept_mass(base + lane, end, min_key, min_p);
    const float incl = warp_inclusive_scan(e);
    run += __shfl_sync(kFullMask, incl, kWarp - 1);
    const unsigned kept = __ballot_sync(kFullMask, e > 0.f);
    if (kept) last = base + (kWarp - 1 - __clz(kept));
  }
  if (lane == 0) {
    warp_total[warp] = run;
    warp_last[warp] = last;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float z = 0.f;
    for (int w = 0; w < kSampleWarps; ++w) z += warp_total[w];
    const uint64_t seed = static_cast<uint64_t>(*a.seed);
    const float target = philox_uniform(seed, static_cast<uint64_t>(row)) * z;
    // The warp whose running mass first passes the target; else the last with a kept token.
    float start = 0.f;
    int chosen = -1;
    for (int w = 0; w < kSampleWarps && chosen < 0; ++w) {
      if (warp_last[w] >= 0 && start + warp_total[w] > target) chosen = w;
      else start += warp_total[w];
    }
    if (chosen < 0) {
      for (int w = kSampleWarps - 1; w >= 0 && chosen < 0; --w)
        if (warp_last[w] >= 0) chosen = w;
      start = -INFINITY;  // nothing passes in the scan below: its last kept token is taken
    }
    s_warp = chosen;
    s_start = start;
    s_target = target;
  }
  __syncthreads();
  if (warp != s_warp) return;
  const float target = s_target;
  run = s_start;
  for (int64_t base = begin; base < end; base += kWarp) {
    const float e = r.kept_mass(base + lane, end, min_key, min_p);
    const float incl = warp_inclusive_scan(e);
    const unsigned passed = __ballot_sync(kFullMask, e > 0.f && run + incl > target);
    if (passed) {
      if (lane == 0) a.out[row] = base + __ffs(passed) - 1;
      return;
    }
    run += __shfl_sync(kFullMask, incl, kWarp - 1);
  }
  if (lane == 0) a.out[row] = warp_last[warp];
}

// Launch on `stream`; the caller checks the launch (C10_CUDA_KERNEL_LAUNCH_CHECK).
template <typename T>
inline void launch_sample(const SampleArgs& a, cudaStream_t stream) {
  if (a.rows == 0) return;
  sample_kernel<T><<<static_cast<unsigned>(a.rows), kSampleThreads, 0, stream>>>(a);
}

}  // namespace fuselm
