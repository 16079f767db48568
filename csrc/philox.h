// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
// SC'11): a counter-based generator, so a draw is a pure function of
// (seed, counter) and needs no state between calls or threads.
//
// Shared by the CPU sampler (plain C++) and the CUDA sampler (device code):
// the same seed gives the same uniform per row on both, so the CPU and GPU
// samplers pick the same token up to floating-point rounding of the masses.
// Plain C++ plus the CUDA qualifiers when nvcc compiles it; no torch.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define FUSELM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FUSELM_HOST_DEVICE inline
#endif

namespace fuselm {

struct Philox4x32 {
  uint32_t v[4];
};

FUSELM_HOST_DEVICE void philox_mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * b;
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

// Ten rounds of Philox4x32 on counter `ctr` under the 64-bit key `key`.
FUSELM_HOST_DEVICE Philox4x32 philox4x32_10(Philox4x32 ctr, uint64_t key) {
  uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    philox_mulhilo(0xD2511F53u, ctr.v[0], hi0, lo0);
    philox_mulhilo(0xCD9E8D57u, ctr.v[2], hi1, lo1);
    ctr = Philox4x32{{hi1 ^ ctr.v[1] ^ k0, lo1, hi0 ^ ctr.v[3] ^ k1, lo0}};
    k0 += 0x9E3779B9u;  // Weyl sequence key schedule
    k1 += 0xBB67AE85u;
  }
  return ctr;
}

// A uniform float in [0, 1) for (seed, row): 24 random bits, so every value is exact.
FUSELM_HOST_DEVICE float philox_uniform(uint64_t seed, uint64_t row) {
  const Philox4x32 out = philox4x32_10(
      Philox4x32{{static_cast<uint32_t>(row), static_cast<uint32_t>(row >> 32), 0u, 0u}}, seed);
  return static_cast<float>(out.v[0] >> 8) * (1.0f / 16777216.0f);
}

}  // namespace fuselm
