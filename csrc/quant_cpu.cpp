// CPU matmul over GGUF-quantized weights: torch.ops.fuselm.qlinear(x, tiles, fmt, n, bias, out_dtype),
// and the embedding lookup that dequantizes rows: torch.ops.fuselm.qembedding(tokens, tiles, fmt, n, k, dtype).
//
//   y[m, n] = sum_k x[m, k] * w[n, k] (+ b[n])      x [M, K] float, w [N, K] quantized, y [M, N]
//   bytes  = the tiles (N * K * bits/8 plus scales: what the GGUF file holds) + M*K*e + M*N*e
//   ops    = 2*M*N*K integer multiply-adds on 8-bit values
//
// Weights: the tile layout of runtime/quant.py (rows in tiles of 4, one contiguous record per tile;
// `Layout` below mirrors quant.tile_planes). Every format is unsigned values q with
// w = scale * q + min per group of 32 weights (16 for Q6_K).
//
// Activations are quantized once per call, as llama.cpp does: each row of x in blocks of 32 to
// int8 with one float32 scale dx (round to nearest; |x - dx q| <= dx / 2), plus dx * sum(q) per
// block and per half block for the min terms. Then, per group,
//   sum_k w x ~= scale * dx * sum(q_w * q_x) + min * dx * sum(q_x)
// with the first sum in exact integer arithmetic: vpdpbusd (unsigned weight bytes x signed
// activation bytes) on AVX512-VNNI and AVX-VNNI, maddubs + madd on AVX2, plain loops otherwise.
// One 64-byte load of a tile's block unpacks into 4 rows x 16 values for each half of the block,
// and each broadcast activation vector serves the 4 rows: a one-row Q4 dot product is bound by
// instructions, 4 rows sharing each loaded activation block by memory. Up to kMB rows of x share
// each unpacked weight block (decode batches). From kGemmRows rows on (prefill), AVX-512 machines
// instead dequantize the weight a chunk at a time and call torch's GEMM (bf16 where the CPU has it),
// which measured faster there; other paths run the integer loop over chunks of rows.
// Inputs holding inf or NaN give NaN in their output rows (an int8 block cannot hold them).
//
// Paths, chosen once per process from the CPU: avx512vnni, avxvnni, avx2, portable;
// FUSELM_QUANT_ISA=portable|avx2|avxvnni|avx512vnni caps the choice (the tests run each path).
//
// Batch invariance: below kGemmRows rows, row m's result is the same instruction sequence whatever M,
// the chunk it lands in or the thread count, so it is bitwise the same alone or in a batch.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "cpu_clones.h"
#include "cpu_vec.h"
#ifdef FUSELM_X86
#include <immintrin.h>
#endif

namespace fuselm {
namespace {

// The codes of runtime/quant.py's FORMATS.
enum Fmt : int { Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, kFormats };
constexpr const char* kFormatNames[] = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"};
constexpr int bits_of(Fmt f) { return f == Q5_0 || f == Q5_1 || f == Q5_K ? 5 : f == Q6_K ? 6 : f == Q8_0 ? 8 : 4; }
constexpr bool kquant(Fmt f) { return f == Q4_K || f == Q5_K || f == Q6_K; }
constexpr bool has_min(Fmt f) { return f == Q4_1 || f == Q5_1; }
// min = -offset * scale for the formats that store no min
constexpr float offset_of(Fmt f) { return f == Q4_0 ? 8.f : f == Q5_0 ? 16.f : f == Q8_0 ? 128.f : 32.f; }

// Calls fn(std::integral_constant<Fmt, F>{}) for f, so kernels get their format at compile time.
template <typename Fn>
ALWAYS_INLINE void dispatch_fmt(Fmt f, Fn&& fn) {
  switch (f) {
    case Q4_0: return fn(std::integral_constant<Fmt, Q4_0>{});
    case Q4_1: return fn(std::integral_constant<Fmt, Q4_1>{});
    case Q5_0: return fn(std::integral_constant<Fmt, Q5_0>{});
    case Q5_1: return fn(std::integral_constant<Fmt, Q5_1>{});
    case Q8_0: return fn(std::integral_constant<Fmt, Q8_0>{});
    case Q4_K: return fn(std::integral_constant<Fmt, Q4_K>{});
    case Q5_K: return fn(std::integral_constant<Fmt, Q5_K>{});
    case Q6_K: return fn(std::integral_constant<Fmt, Q6_K>{});
    default: TORCH_CHECK(false, "fuselm: unknown quantized format code ", static_cast<int>(f));
  }
}

constexpr int kTileRows = 4;
constexpr int64_t kTileAlign = 64;
constexpr int kMB = 8;  // rows of x per pass over a tile's blocks

// Byte offsets of a tile's planes (runtime/quant.py: tile_planes); -1 where a format has none.
struct Layout {
  int64_t nb = 0, qs = 0, qh = -1, d = -1, m = -1, dmin = -1, sc = -1, mn = -1, sc6 = -1, bytes = 0;
  Layout(Fmt f, int64_t K) : nb(K / 32) {
    const int64_t ns = K / 256;
    int64_t at = nb * (bits_of(f) == 8 ? 128 : 64);
    if (bits_of(f) == 5 || bits_of(f) == 6) {
      qh = at;
      at += nb * 16 * (bits_of(f) - 4);
    }
    d = at;
    if (!kquant(f)) {
      at += nb * 8;
      if (has_min(f)) m = at, at += nb * 8;
    } else if (f == Q6_K) {
      at += ns * 8;
      sc6 = at, at += nb * 8;
    } else {
      at += ns * 8;
      dmin = at, at += ns * 8;
      sc = at, at += nb * 4;
      mn = at, at += nb * 4;
    }
    bytes = (at + kTileAlign - 1) / kTileAlign * kTileAlign;
  }
};

int64_t block_of(Fmt f) { return kquant(f) ? 256 : 32; }

// ---------------------------------------------------------------- activations

// x quantized in blocks of 32: q [nb, M, 32] int8, dx [nb, M] the block scales, ds [nb, M] dx * the
// sum of q over the block, ds16 [nb, M, 2] over each half block (Q6_K's 16-weight groups). Block-major,
// so the rows of a pass over block b sit at constant offsets from one pointer each (row-major kept
// 3 pointers per row live and spilled them; measured).
struct Acts {
  const int8_t* q;
  const float *dx, *ds, *ds16;
  int64_t K, nb, M;
  const int8_t* qblock(int64_t b, int64_t m0) const { return q + (b * M + m0) * 32; }
  const float* dxblock(int64_t b, int64_t m0) const { return dx + b * M + m0; }
  const float* dsblock(int64_t b, int64_t m0) const { return ds + b * M + m0; }
  const float* ds16block(int64_t b, int64_t m0) const { return ds16 + (b * M + m0) * 2; }
};

// One row: float32 x [K] -> int8 q [K] and the block scales. The float rounding trick keeps the
// loops vectorizable: (v + 1.5 * 2^23) - 1.5 * 2^23 rounds v (|v| <= 127) to the nearest integer.
// Row m's blocks: q, dx, ds, ds16 point at its block 0 in Acts' layout; block b is M blocks further.
CLONES void quantize_row(const float* x, int64_t K, int64_t M, int8_t* q, float* dx, float* ds, float* ds16) {
  for (int64_t b = 0; b < K / 32; ++b) {
    const float* xb = x + 32 * b;
    float amax = 0.f;
    int bad = 0;
#pragma omp simd reduction(max : amax) reduction(| : bad)
    for (int j = 0; j < 32; ++j) {
      const float a = std::fabs(xb[j]);
      bad |= !(a <= std::numeric_limits<float>::max());  // inf or NaN
      amax = std::max(amax, a);
    }
    // amax below 127 / FLT_MAX makes 127 / amax inf: such a block is multiplied as zeros (its weight
    // in any output is below float32's resolution of the rest of the sum)
    const float d = amax / 127.f, id = d > 0.f && 127.f / amax <= std::numeric_limits<float>::max() ? 127.f / amax : 0.f;
    int8_t* qb = q + b * M * 32;
    int sums[2] = {0, 0};
    for (int h = 0; h < 2; ++h) {
      int s = 0;
#pragma omp simd reduction(+ : s)
      for (int j = 16 * h; j < 16 * h + 16; ++j) {
        const float r = ((bad ? 0.f : xb[j] * id) + 12582912.f) - 12582912.f;
        const int v = static_cast<int>(r);
        qb[j] = static_cast<int8_t>(v);
        s += v;
      }
      sums[h] = s;
    }
    const float dd = bad ? std::numeric_limits<float>::quiet_NaN() : d;
    dx[b * M] = dd;
    ds[b * M] = dd * static_cast<float>(sums[0] + sums[1]);
    ds16[b * M * 2] = dd * static_cast<float>(sums[0]);
    ds16[b * M * 2 + 1] = dd * static_cast<float>(sums[1]);
  }
}

// Scratch for the activations, reused across calls (one per calling thread): decode calls this
// op hundreds of times per token, and a fresh allocation each time costs more than the quantization.
struct ActBuffer {
  std::vector<int8_t> q;
  std::vector<float> f, x;
  Acts quantize(const at::Tensor& x2d, int64_t M, int64_t K) {
    const int64_t nb = K / 32;
    q.resize(M * K);
    f.resize(M * nb * 4);
    float *dx = f.data(), *ds = dx + M * nb, *ds16 = ds + M * nb;
    const bool direct = x2d.scalar_type() == at::kFloat;
    if (!direct) x.resize(K * at::get_num_threads());
    const int64_t ldx = x2d.stride(0);
    at::parallel_for(0, M, std::max<int64_t>(1, 65536 / K), [&](int64_t m0, int64_t m1) {
      float* tmp = direct ? nullptr : x.data() + K * at::get_thread_num();
      for (int64_t m = m0; m < m1; ++m) {
        const float* row = nullptr;
        dispatch_float(x2d.scalar_type(), [&](auto tag) {
          using T = decltype(tag);
          const T* src = x2d.const_data_ptr<T>() + m * ldx;
          if constexpr (std::is_same_v<T, float>) {
            row = src;
          } else {
            cpu::to_float(src, tmp, K);
            row = tmp;
          }
        });
        quantize_row(row, K, M, q.data() + m * 32, dx + m, ds + m, ds16 + 2 * m);
      }
    });
    return Acts{q.data(), dx, ds, ds16, K, nb, M};
  }
};

// ---------------------------------------------------------------- portable kernel

inline float half_to_float(const uint8_t* p) {
  c10::Half h;
  std::memcpy(&h, p, 2);
  return static_cast<float>(h);
}

// Scales and mins of block b for the 4 rows: [half][row] (the halves are equal but for Q6_K).
struct Scales {
  float s[2][kTileRows], m[2][kTileRows];
};

template <Fmt F>
ALWAYS_INLINE Scales scales_scalar(const uint8_t* t, const Layout& L, int64_t b) {
  Scales out;
  for (int r = 0; r < kTileRows; ++r) {
    if constexpr (!kquant(F)) {
      const float s = half_to_float(t + L.d + 8 * b + 2 * r);
      const float m = has_min(F) ? half_to_float(t + L.m + 8 * b + 2 * r) : -offset_of(F) * s;
      out.s[0][r] = out.s[1][r] = s;
      out.m[0][r] = out.m[1][r] = m;
    } else if constexpr (F == Q6_K) {
      const float d = half_to_float(t + L.d + 8 * (b / 8) + 2 * r);
      for (int h = 0; h < 2; ++h) {
        out.s[h][r] = d * static_cast<float>(static_cast<int8_t>(t[L.sc6 + 8 * b + 4 * h + r]));
        out.m[h][r] = -32.f * out.s[h][r];
      }
    } else {
      const float d = half_to_float(t + L.d + 8 * (b / 8) + 2 * r);
      const float dmin = half_to_float(t + L.dmin + 8 * (b / 8) + 2 * r);
      out.s[0][r] = out.s[1][r] = d * static_cast<float>(t[L.sc + 4 * b + r]);
      out.m[0][r] = out.m[1][r] = -(dmin * static_cast<float>(t[L.mn + 4 * b + r]));
    }
  }
  return out;
}

// The unsigned values of block b: q[r][j], j < 32 (j < 16: the block's first half).
template <Fmt F>
ALWAYS_INLINE void values_scalar(const uint8_t* t, const Layout& L, int64_t b, uint8_t (&q)[kTileRows][32]) {
  for (int r = 0; r < kTileRows; ++r)
    for (int j = 0; j < 16; ++j) {
      if constexpr (bits_of(F) == 8) {
        q[r][j] = t[L.qs + 128 * b + 16 * r + j];
        q[r][16 + j] = t[L.qs + 128 * b + 64 + 16 * r + j];
      } else {
        const uint8_t v = t[L.qs + 64 * b + 16 * r + j];
        q[r][j] = v & 15;
        q[r][16 + j] = v >> 4;
      }
    }
  if constexpr (bits_of(F) == 5 || bits_of(F) == 6) {
    constexpr int planes = bits_of(F) - 4;  // masks per half: bit 4 (and bit 5)
    for (int h = 0; h < 2; ++h)
      for (int p = 0; p < planes; ++p) {
        uint64_t mask;
        std::memcpy(&mask, t + L.qh + 16 * planes * b + 8 * (planes * h + p), 8);
        for (int r = 0; r < kTileRows; ++r)
          for (int j = 0; j < 16; ++j) q[r][16 * h + j] |= ((mask >> (16 * r + j)) & 1) << (4 + p);
      }
  }
}

struct Portable {
  static constexpr int kRows = 4;  // rows of x per pass

  template <Fmt F, int MB>
  static void tile(const uint8_t* t, const Layout& L, const Acts& a, int64_t m0, float (&out)[MB][kTileRows]) {
    float facc[MB][kTileRows] = {}, macc[MB][kTileRows] = {};
    uint8_t q[kTileRows][32];
    for (int64_t b = 0; b < L.nb; ++b) {
      values_scalar<F>(t, L, b, q);
      const Scales s = scales_scalar<F>(t, L, b);
      const int8_t* xb = a.qblock(b, m0);
      const float *dxb = a.dxblock(b, m0), *dsb = a.dsblock(b, m0), *ds16b = a.ds16block(b, m0);
      for (int m = 0; m < MB; ++m) {
        const int8_t* x = xb + 32 * m;
        const float dx = dxb[m];
        for (int r = 0; r < kTileRows; ++r) {
          int32_t dot[2] = {0, 0};
          for (int h = 0; h < 2; ++h)
            for (int j = 16 * h; j < 16 * h + 16; ++j) dot[h] += static_cast<int32_t>(q[r][j]) * x[j];
          if constexpr (F == Q6_K) {
            facc[m][r] += static_cast<float>(dot[0]) * (s.s[0][r] * dx) + static_cast<float>(dot[1]) * (s.s[1][r] * dx);
            macc[m][r] += s.m[0][r] * ds16b[2 * m] + s.m[1][r] * ds16b[2 * m + 1];
          } else {
            facc[m][r] += static_cast<float>(dot[0] + dot[1]) * (s.s[0][r] * dx);
            macc[m][r] += s.m[0][r] * dsb[m];
          }
        }
      }
    }
    for (int m = 0; m < MB; ++m)
      for (int r = 0; r < kTileRows; ++r) out[m][r] = facc[m][r] + macc[m][r];
  }
};

}  // namespace
}  // namespace fuselm

#ifdef FUSELM_X86
// ---------------------------------------------------------------- x86: shared scale loads (SSE4.1 + F16C)
#pragma GCC push_options
#pragma GCC target("sse4.1,f16c,fma")
namespace fuselm {
namespace {

inline __m128 half4(const uint8_t* p) { return _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))); }
inline __m128 u8x4(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm_cvtepi32_ps(_mm_cvtepu8_epi32(_mm_cvtsi32_si128(v)));
}
inline __m128 i8x4(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm_cvtepi32_ps(_mm_cvtepi8_epi32(_mm_cvtsi32_si128(v)));
}

// Block b's scales and mins for the 4 rows, per half (equal halves but for Q6_K).
struct Scales4 {
  __m128 s0, s1, m0, m1;
};

template <Fmt F>
inline Scales4 scales4(const uint8_t* t, const Layout& L, int64_t b) {
  Scales4 out;
  if constexpr (!kquant(F)) {
    out.s0 = half4(t + L.d + 8 * b);
    out.m0 = has_min(F) ? half4(t + L.m + 8 * b) : _mm_mul_ps(out.s0, _mm_set1_ps(-offset_of(F)));
    out.s1 = out.s0, out.m1 = out.m0;
  } else if constexpr (F == Q6_K) {
    const __m128 d = half4(t + L.d + 8 * (b / 8));
    out.s0 = _mm_mul_ps(d, i8x4(t + L.sc6 + 8 * b));
    out.s1 = _mm_mul_ps(d, i8x4(t + L.sc6 + 8 * b + 4));
    out.m0 = _mm_mul_ps(out.s0, _mm_set1_ps(-32.f));
    out.m1 = _mm_mul_ps(out.s1, _mm_set1_ps(-32.f));
  } else {
    out.s0 = _mm_mul_ps(half4(t + L.d + 8 * (b / 8)), u8x4(t + L.sc + 4 * b));
    out.m0 = _mm_sub_ps(_mm_setzero_ps(), _mm_mul_ps(half4(t + L.dmin + 8 * (b / 8)), u8x4(t + L.mn + 4 * b)));
    out.s1 = out.s0, out.m1 = out.m0;
  }
  return out;
}

inline uint64_t load_mask(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

}  // namespace
}  // namespace fuselm
#pragma GCC pop_options

// ---------------------------------------------------------------- AVX2 and AVX-VNNI (256-bit)
// A tile's block is two registers per half: rows 0-1 and rows 2-3 (16 bytes each per row).
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avxvnni")
namespace fuselm {
namespace {

// byte i = `value` where bit i of x is set (the 32 bits of two rows of a high-bit mask)
inline __m256i bits_to_bytes(uint32_t x, char value) {
  const __m256i pick = _mm256_setr_epi64x(0, 0x0101010101010101, 0x0202020202020202, 0x0303030303030303);
  const __m256i bit = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ull));
  const __m256i v = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(x)), pick), bit);
  return _mm256_and_si256(_mm256_cmpeq_epi8(v, bit), _mm256_set1_epi8(value));
}

// acc + sum over each 4 bytes of u (unsigned) * s (signed), for u <= 63 (maddubs cannot saturate)
template <bool kVnni>
inline __m256i dot_small(__m256i acc, __m256i u, __m256i s) {
  if constexpr (kVnni) return _mm256_dpbusd_avx_epi32(acc, u, s);
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
}

// dot_small(dot_small(0, u0, s0), u1, s1) in fewer instructions: without VNNI the two maddubs add in
// int16 before one madd. A lane then holds at most 2 x 2 x 31 x 128 < 2^15 (u <= 31: 5-bit weights at
// most; 8-bit ones take the signed path of the tile), and integer sums are exact: the same result.
template <bool kVnni, int kBits>
inline __m256i dot_pair(__m256i u0, __m256i s0, __m256i u1, __m256i s1) {
  if constexpr (kVnni) {
    return _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u0, s0), u1, s1);
  } else {
    static_assert(kBits <= 5, "maddubs pairs of larger weights can overflow int16");
    return _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(u0, s0), _mm256_maddubs_epi16(u1, s1)),
                             _mm256_set1_epi16(1));
  }
}

template <Fmt F>
inline void values256(const uint8_t* t, const Layout& L, int64_t b, __m256i (&lo)[2], __m256i (&hi)[2]) {
  if constexpr (bits_of(F) == 8) {
    const uint8_t* p = t + L.qs + 128 * b;
    for (int i = 0; i < 2; ++i) {
      lo[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 * i));
      hi[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 64 + 32 * i));
    }
  } else {
    const __m256i nib = _mm256_set1_epi8(15);
    for (int i = 0; i < 2; ++i) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t + L.qs + 64 * b + 32 * i));
      lo[i] = _mm256_and_si256(v, nib);
      hi[i] = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);
    }
    if constexpr (bits_of(F) == 5 || bits_of(F) == 6) {
      constexpr int planes = bits_of(F) - 4;
      const uint8_t* h = t + L.qh + 16 * planes * b;
      for (int p = 0; p < planes; ++p) {
        const uint64_t ml = load_mask(h + 8 * p), mh = load_mask(h + 8 * (planes + p));
        const char v = static_cast<char>(0x10 << p);
        for (int i = 0; i < 2; ++i) {
          lo[i] = _mm256_or_si256(lo[i], bits_to_bytes(static_cast<uint32_t>(ml >> (32 * i)), v));
          hi[i] = _mm256_or_si256(hi[i], bits_to_bytes(static_cast<uint32_t>(mh >> (32 * i)), v));
        }
      }
    }
  }
}

// 4 row scales -> two registers, rows 0-1 and rows 2-3, each scale over its row's 4 lanes
inline void spread(__m128 s, __m256 (&out)[2]) {
  const __m256 w = _mm256_castps128_ps256(s);
  out[0] = _mm256_permutevar8x32_ps(w, _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
  out[1] = _mm256_permutevar8x32_ps(w, _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3));
}

template <bool kVnni>
struct Avx2 {
  static constexpr int kRows = 2;

  template <Fmt F, int MB>
  static void tile(const uint8_t* t, const Layout& L, const Acts& a, int64_t m0, float (&out)[MB][kTileRows]) {
    __m256 facc[MB][2];
    __m128 macc[MB];
    for (int m = 0; m < MB; ++m) facc[m][0] = facc[m][1] = _mm256_setzero_ps(), macc[m] = _mm_setzero_ps();
    // Q8_0 without VNNI: the stored bytes u = q + 128 go back to signed q, and each x row meets |q| with
    // x's sign flipped where q < 0: one maddubs per half (|q| <= 128, |x| <= 127: a pair of products
    // fits int16), and a signed q needs no min term (unsigned bytes took two maddubs per half, as nibbles).
    constexpr bool kSigned = F == Q8_0 && !kVnni;
    for (int64_t b = 0; b < L.nb; ++b) {
      __m256i lo[2], hi[2];
      values256<F>(t, L, b, lo, hi);
      const Scales4 s = scales4<F>(t, L, b);
      __m256 s0[2], s1[2];
      spread(s.s0, s0);
      spread(s.s1, s1);
      __m256i alo[2], ahi[2];  // kSigned: |q|, with lo / hi holding q
      if constexpr (kSigned) {
        const __m256i bias = _mm256_set1_epi8(static_cast<char>(0x80));
        for (int i = 0; i < 2; ++i) {
          lo[i] = _mm256_xor_si256(lo[i], bias), hi[i] = _mm256_xor_si256(hi[i], bias);
          alo[i] = _mm256_abs_epi8(lo[i]), ahi[i] = _mm256_abs_epi8(hi[i]);
        }
      }
      const int8_t* xb = a.qblock(b, m0);
      const float *dxb = a.dxblock(b, m0), *dsb = a.dsblock(b, m0), *ds16b = a.ds16block(b, m0);
      for (int m = 0; m < MB; ++m) {
        const int8_t* x = xb + 32 * m;
        const __m256i xlo = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
        const __m256i xhi = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + 16)));
        const __m256 dx = _mm256_set1_ps(dxb[m]);
        for (int i = 0; i < 2; ++i) {
          if constexpr (F == Q6_K) {
            const __m256i dlo = dot_small<kVnni>(_mm256_setzero_si256(), lo[i], xlo);
            const __m256i dhi = dot_small<kVnni>(_mm256_setzero_si256(), hi[i], xhi);
            facc[m][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dlo), _mm256_mul_ps(s0[i], dx), facc[m][i]);
            facc[m][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dhi), _mm256_mul_ps(s1[i], dx), facc[m][i]);
          } else {
            __m256i d;
            if constexpr (kSigned) {
              const __m256i ones = _mm256_set1_epi16(1);
              d = _mm256_add_epi32(
                  _mm256_madd_epi16(_mm256_maddubs_epi16(alo[i], _mm256_sign_epi8(xlo, lo[i])), ones),
                  _mm256_madd_epi16(_mm256_maddubs_epi16(ahi[i], _mm256_sign_epi8(xhi, hi[i])), ones));
            } else {
              d = dot_pair<kVnni, bits_of(F)>(lo[i], xlo, hi[i], xhi);
            }
            facc[m][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_mul_ps(s0[i], dx), facc[m][i]);
          }
        }
        if constexpr (F == Q6_K) {
          macc[m] = _mm_fmadd_ps(s.m0, _mm_set1_ps(ds16b[2 * m]), macc[m]);
          macc[m] = _mm_fmadd_ps(s.m1, _mm_set1_ps(ds16b[2 * m + 1]), macc[m]);
        } else if constexpr (!kSigned) {  // a signed q has no min term
          macc[m] = _mm_fmadd_ps(s.m0, _mm_set1_ps(dsb[m]), macc[m]);
        }
      }
    }
    for (int m = 0; m < MB; ++m) {
      // lanes 0-3 / 4-7 of facc[m][0] are rows 0 / 1, of facc[m][1] rows 2 / 3
      const __m256 p = _mm256_hadd_ps(facc[m][0], facc[m][1]);
      const __m256 q = _mm256_hadd_ps(p, p);  // [r0 r2 r0 r2 | r1 r3 r1 r3]
      const __m128 rows = _mm_unpacklo_ps(_mm256_castps256_ps128(q), _mm256_extractf128_ps(q, 1));
      _mm_storeu_ps(out[m], _mm_add_ps(rows, macc[m]));
    }
  }
};

}  // namespace
}  // namespace fuselm
#pragma GCC pop_options

// ---------------------------------------------------------------- AVX512-VNNI
// A tile's block half is one register: 4 rows x 16 bytes.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c")
namespace fuselm {
namespace {

template <Fmt F>
inline void values512(const uint8_t* t, const Layout& L, int64_t b, __m512i& lo, __m512i& hi) {
  if constexpr (bits_of(F) == 8) {
    lo = _mm512_loadu_si512(t + L.qs + 128 * b);
    hi = _mm512_loadu_si512(t + L.qs + 128 * b + 64);
  } else {
    const __m512i nib = _mm512_set1_epi8(15);
    const __m512i v = _mm512_loadu_si512(t + L.qs + 64 * b);
    lo = _mm512_and_si512(v, nib);
    hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
    if constexpr (bits_of(F) == 5 || bits_of(F) == 6) {
      constexpr int planes = bits_of(F) - 4;
      const uint8_t* h = t + L.qh + 16 * planes * b;
      for (int p = 0; p < planes; ++p) {
        const __m512i v = _mm512_set1_epi8(static_cast<char>(0x10 << p));
        lo = _mm512_or_si512(lo, _mm512_maskz_mov_epi8(_cvtu64_mask64(load_mask(h + 8 * p)), v));
        hi = _mm512_or_si512(hi, _mm512_maskz_mov_epi8(_cvtu64_mask64(load_mask(h + 8 * (planes + p))), v));
      }
    }
  }
}

struct Avx512Vnni {
  static constexpr int kRows = kMB;

  template <Fmt F, int MB>
  static void tile(const uint8_t* t, const Layout& L, const Acts& a, int64_t m0, float (&out)[MB][kTileRows]) {
    const __m512i rep4 = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    __m512 facc[MB];
    __m128 macc[MB];
    for (int m = 0; m < MB; ++m) facc[m] = _mm512_setzero_ps(), macc[m] = _mm_setzero_ps();
    for (int64_t b = 0; b < L.nb; ++b) {
      __m512i lo, hi;
      values512<F>(t, L, b, lo, hi);
      const Scales4 s = scales4<F>(t, L, b);
      const __m512 s0 = _mm512_permutexvar_ps(rep4, _mm512_castps128_ps512(s.s0));
      const __m512 s1 = _mm512_permutexvar_ps(rep4, _mm512_castps128_ps512(s.s1));
      const int8_t* xb = a.qblock(b, m0);
      const float *dxb = a.dxblock(b, m0), *dsb = a.dsblock(b, m0), *ds16b = a.ds16block(b, m0);
      for (int m = 0; m < MB; ++m) {
        const int8_t* x = xb + 32 * m;
        const __m512i xlo = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
        const __m512i xhi = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + 16)));
        const __m512 dx = _mm512_set1_ps(dxb[m]);
        if constexpr (F == Q6_K) {
          const __m512i dlo = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xlo);
          const __m512i dhi = _mm512_dpbusd_epi32(_mm512_setzero_si512(), hi, xhi);
          facc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dlo), _mm512_mul_ps(s0, dx), facc[m]);
          facc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dhi), _mm512_mul_ps(s1, dx), facc[m]);
          macc[m] = _mm_fmadd_ps(s.m0, _mm_set1_ps(ds16b[2 * m]), macc[m]);
          macc[m] = _mm_fmadd_ps(s.m1, _mm_set1_ps(ds16b[2 * m + 1]), macc[m]);
        } else {
          const __m512i d = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xlo), hi, xhi);
          facc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(s0, dx), facc[m]);
          macc[m] = _mm_fmadd_ps(s.m0, _mm_set1_ps(dsb[m]), macc[m]);
        }
      }
    }
    const __m512i firsts = _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
    for (int m = 0; m < MB; ++m) {
      __m512 v = _mm512_add_ps(facc[m], _mm512_permute_ps(facc[m], 0x4E));  // + lanes (2 3 0 1) of each row
      v = _mm512_add_ps(v, _mm512_permute_ps(v, 0xB1));                     // + lanes (1 0 3 2)
      const __m128 rows = _mm512_castps512_ps128(_mm512_permutexvar_ps(firsts, v));
      _mm_storeu_ps(out[m], _mm_add_ps(rows, macc[m]));
    }
  }
};

// Tile t's 4 rows as float32 (out: 4 rows, K apart): w = scale * q + min, for the GEMM path.
template <int R>
inline __m128i lane(__m512i v) {
  if constexpr (R == 0) return _mm512_castsi512_si128(v);
  else return _mm512_extracti32x4_epi32(v, R);
}

template <int R>
inline void store_row(float* out, int64_t K, int64_t b, __m512i lo, __m512i hi, const float (&s)[2][4],
                      const float (&m)[2][4]) {
  const __m512 ql = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lane<R>(lo)));
  const __m512 qh = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lane<R>(hi)));
  _mm512_storeu_ps(out + R * K + 32 * b, _mm512_fmadd_ps(ql, _mm512_set1_ps(s[0][R]), _mm512_set1_ps(m[0][R])));
  _mm512_storeu_ps(out + R * K + 32 * b + 16, _mm512_fmadd_ps(qh, _mm512_set1_ps(s[1][R]), _mm512_set1_ps(m[1][R])));
}

template <Fmt F>
void dequantize_tile512(const uint8_t* t, const Layout& L, int64_t K, float* out) {
  for (int64_t b = 0; b < L.nb; ++b) {
    __m512i lo, hi;
    values512<F>(t, L, b, lo, hi);
    const Scales4 sc = scales4<F>(t, L, b);
    float s[2][4], m[2][4];
    _mm_storeu_ps(s[0], sc.s0), _mm_storeu_ps(s[1], sc.s1), _mm_storeu_ps(m[0], sc.m0), _mm_storeu_ps(m[1], sc.m1);
    store_row<0>(out, K, b, lo, hi, s, m);
    store_row<1>(out, K, b, lo, hi, s, m);
    store_row<2>(out, K, b, lo, hi, s, m);
    store_row<3>(out, K, b, lo, hi, s, m);
  }
}

void dequantize_tile512(Fmt f, const uint8_t* t, const Layout& L, int64_t K, float* out) {
  dispatch_fmt(f, [&](auto F) { dequantize_tile512<decltype(F)::value>(t, L, K, out); });
}

}  // namespace
}  // namespace fuselm
#pragma GCC pop_options
#endif  // FUSELM_X86

// ---------------------------------------------------------------- dispatch and the ops
namespace fuselm {
namespace {

enum class Isa { portable, avx2, avxvnni, avx512vnni };  // ordered: each needs the one before on x86
constexpr const char* kIsaNames[] = {"portable", "avx2", "avxvnni", "avx512vnni"};

Isa detect_isa() {
  Isa best = Isa::portable;
#ifdef FUSELM_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    best = Isa::avx2;
    if (__builtin_cpu_supports("avxvnni")) best = Isa::avxvnni;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vnni"))
      best = Isa::avx512vnni;
  }
#endif
  const char* cap = std::getenv("FUSELM_QUANT_ISA");
  if (cap == nullptr || *cap == '\0') return best;
  for (int i = 0; i < 4; ++i)
    if (std::string(cap) == kIsaNames[i]) {
      const Isa want = static_cast<Isa>(i);
#ifdef FUSELM_X86
      // avxvnni and avx512vnni are separate features: a CPU may have the second only
      if (want == Isa::avxvnni && best == Isa::avx512vnni && !__builtin_cpu_supports("avxvnni")) return Isa::avx2;
#endif
      return std::min(want, best);
    }
  TORCH_CHECK(false, "FUSELM_QUANT_ISA must be portable, avx2, avxvnni or avx512vnni, got '", cap, "'");
}

Isa isa() {
  static const Isa chosen = detect_isa();
  return chosen;
}

struct Problem {
  const uint8_t* tiles;
  Layout L;
  Acts a;
  int64_t M, N;
  const float* bias;  // [N] or null
  void* y;            // [M, N] with row stride ldy
  int64_t ldy;
  at::ScalarType out_dtype;
};

ALWAYS_INLINE void store(const Problem& p, int64_t m, int64_t n0, const float* v) {
  for (int r = 0; r < kTileRows && n0 + r < p.N; ++r)
    store_as(p.y, p.out_dtype, m * p.ldy + n0 + r, p.bias ? v[r] + p.bias[n0 + r] : v[r]);
}

// Rows [m0, m1) of x against tiles [t0, t1): passes of up to Kernel::kRows rows of x, largest first.
template <typename Kernel, Fmt F, int MB>
ALWAYS_INLINE void pass(const Problem& p, int64_t tile, int64_t& m, int64_t m1) {
  if constexpr (MB > 0) {
    for (; m + MB <= m1; m += MB) {
      float out[MB][kTileRows];
      Kernel::template tile<F, MB>(p.tiles + tile * p.L.bytes, p.L, p.a, m, out);
      for (int i = 0; i < MB; ++i) store(p, m + i, tile * kTileRows, out[i]);
    }
    pass<Kernel, F, MB / 2>(p, tile, m, m1);
  }
}

// Ask for tile t + kAhead while tile t runs: one sequential stream per thread, but the hardware
// prefetcher alone left half the time stalled on the weight loads (measured).
constexpr int64_t kAhead = 2;

inline void prefetch_tile(const Problem& p, int64_t t, int64_t t1) {
#ifdef FUSELM_X86
  if (t + kAhead >= t1) return;
  const char* next = reinterpret_cast<const char*>(p.tiles + (t + kAhead) * p.L.bytes);
  for (int64_t off = 0; off < p.L.bytes; off += 64) _mm_prefetch(next + off, _MM_HINT_T0);
#endif
}

template <typename Kernel, Fmt F>
void run_tiles(const Problem& p, int64_t t0, int64_t t1, int64_t m0, int64_t m1) {
  for (int64_t t = t0; t < t1; ++t) {
    prefetch_tile(p, t, t1);
    int64_t m = m0;
    pass<Kernel, F, Kernel::kRows>(p, t, m, m1);
  }
}

template <typename Kernel>
void run_tiles_fmt(Fmt f, const Problem& p, int64_t t0, int64_t t1, int64_t m0, int64_t m1) {
  dispatch_fmt(f, [&](auto F) { run_tiles<Kernel, decltype(F)::value>(p, t0, t1, m0, m1); });
}

void run_path(Isa path, Fmt f, const Problem& p, int64_t t0, int64_t t1, int64_t m0, int64_t m1) {
#ifdef FUSELM_X86
  if (path == Isa::avx512vnni) return run_tiles_fmt<Avx512Vnni>(f, p, t0, t1, m0, m1);
  if (path == Isa::avxvnni) return run_tiles_fmt<Avx2<true>>(f, p, t0, t1, m0, m1);
  if (path == Isa::avx2) return run_tiles_fmt<Avx2<false>>(f, p, t0, t1, m0, m1);
#endif
  run_tiles_fmt<Portable>(f, p, t0, t1, m0, m1);
}

// Tiles go to the threads in chunks on demand (a thread slowed by other work on a shared machine
// does not hold the others up), 2 chunks per thread, none under ~32 KiB of tiles: each chunk start
// costs a stall the prefetches cannot hide, and 16 chunks per thread decoded SmolLM2 13% slower
// than 2 (measured in one process, alternating). Rows of x go in chunks whose quantized rows stay
// in L2 (256 KiB) while every tile streams past them.
void run(Fmt f, const Problem& p) {
  const Isa path = isa();
  const int64_t tiles = (p.N + kTileRows - 1) / kTileRows;
  const int64_t threads = at::get_num_threads();
  const int64_t min_tiles = std::max<int64_t>(1, 32768 / p.L.bytes);
  const int64_t chunk = std::max(min_tiles, (tiles + 2 * threads - 1) / (2 * threads));
  const int64_t chunks = (tiles + chunk - 1) / chunk;
  const int64_t rows_per_pass = std::max<int64_t>(kMB, (262144 / p.a.K) / kMB * kMB);
  for (int64_t m0 = 0; m0 < p.M; m0 += rows_per_pass) {
    const int64_t m1 = std::min(p.M, m0 + rows_per_pass);
    std::atomic<int64_t> next{0};
    at::parallel_for(0, std::min(threads, chunks), 1, [&](int64_t, int64_t) {
      for (int64_t c; (c = next.fetch_add(1)) < chunks;)
        run_path(path, f, p, c * chunk, std::min(tiles, (c + 1) * chunk), m0, m1);
    });
  }
}

Fmt check_tiles(const char* op, const at::Tensor& tiles, int64_t fmt, int64_t N, int64_t K) {
  TORCH_CHECK(fmt >= 0 && fmt < kFormats, op, ": unknown format code ", fmt);
  const Fmt f = static_cast<Fmt>(fmt);
  TORCH_CHECK(tiles.device().is_cpu() && tiles.scalar_type() == at::kByte && tiles.dim() == 2 &&
                  tiles.is_contiguous(), op, ": tiles must be a contiguous uint8 CPU tensor [tiles, bytes], got ",
              tiles.scalar_type(), " ", tiles.sizes(), " on ", tiles.device());
  TORCH_CHECK(N > 0 && K > 0 && K % block_of(f) == 0, op, ": ", kFormatNames[f], " needs rows of a multiple of ",
              block_of(f), " weights, got [", N, ", ", K, "]");
  const Layout L(f, K);
  TORCH_CHECK(tiles.size(0) == (N + kTileRows - 1) / kTileRows && tiles.size(1) == L.bytes, op, ": ",
              kFormatNames[f], " tiles of a [", N, ", ", K, "] weight must be [", (N + kTileRows - 1) / kTileRows,
              ", ", L.bytes, "], got ", tiles.sizes());
  return f;
}

thread_local ActBuffer act_buffer;

// Prefill-sized M: from kGemmRows rows on the weight is dequantized a chunk of rows at a time and
// multiplied by torch's GEMM in x's precision: bfloat16 activations in bfloat16 where the CPU
// multiplies it natively (oneDNN), others in float32. SmolLM2's 16 x 128-token bf16 prefill went
// from 0.6x to ~0.95x the dense bf16 model's speed (the integer loop spends 4 float operations per
// 2 dot-product instructions). Chunks of 8 MiB of float32: oneDNN lost ~30% on chunks of a few
// hundred rows (measured). AVX-512 machines only (its vector dequantizer).
constexpr int64_t kGemmRows = 64;
constexpr int64_t kChunkBytes = 8 << 20;

bool gemm_path(int64_t M) {
#ifdef FUSELM_X86
  return M >= kGemmRows && isa() == Isa::avx512vnni;
#else
  return false;
#endif
}

void qlinear_gemm(Fmt f, const Layout& L, const uint8_t* tiles, const at::Tensor& x2d, int64_t N, int64_t K,
                  const at::Tensor& bias, at::Tensor& y2d) {
#ifdef FUSELM_X86
  static const bool cpu_bf16 = __builtin_cpu_supports("avx512bf16");
  const bool bf16 = cpu_bf16 && x2d.scalar_type() == at::kBFloat16;
  const at::ScalarType ct = bf16 ? at::kBFloat16 : at::kFloat;
  const at::Tensor xc = x2d.to(ct);
  const at::Tensor b = bias.defined() ? bias.to(ct) : at::Tensor();
  const int64_t rows = std::max<int64_t>(kTileRows, kChunkBytes / (K * 4) / kTileRows * kTileRows);
  at::Tensor wf = at::empty({rows, K}, x2d.options().dtype(at::kFloat));
  at::Tensor wc = bf16 ? at::empty({rows, K}, x2d.options().dtype(at::kBFloat16)) : wf;
  for (int64_t n0 = 0; n0 < N; n0 += rows) {
    const int64_t n = std::min(rows, N - n0), t0 = n0 / kTileRows, t1 = (n0 + n + kTileRows - 1) / kTileRows;
    float* w = wf.mutable_data_ptr<float>();
    at::parallel_for(t0, t1, 8, [&](int64_t a, int64_t e) {
      for (int64_t t = a; t < e; ++t) {
        dequantize_tile512(f, tiles + t * L.bytes, L, K, w + (t - t0) * kTileRows * K);
        if (bf16)
          cpu::from_float(w + (t - t0) * kTileRows * K,
                          wc.mutable_data_ptr<c10::BFloat16>() + (t - t0) * kTileRows * K, kTileRows * K);
      }
    });
    const std::optional<at::Tensor> bn = b.defined() ? std::optional<at::Tensor>(b.narrow(0, n0, n)) : std::nullopt;
    y2d.narrow(1, n0, n).copy_(at::linear(xc, wc.narrow(0, 0, n), bn));
  }
#endif
}

at::Tensor& qlinear_into(const at::Tensor& x, const at::Tensor& tiles, int64_t fmt, int64_t N,
                         const std::optional<at::Tensor>& bias, std::optional<at::ScalarType> out_dtype,
                         at::Tensor& y) {
  constexpr const char* op = "fuselm::qlinear";
  check_float(op, "x", x);
  TORCH_CHECK(x.device().is_cpu(), op, ": runs on the CPU only, x is on ", x.device());
  TORCH_CHECK(x.dim() >= 1, op, ": x must be [..., K], got a scalar");
  const int64_t K = x.size(-1);
  const Fmt f = check_tiles(op, tiles, fmt, N, K);
  const at::ScalarType dtype = check_out_dtype(op, out_dtype, x);
  at::Tensor b;
  if (bias.has_value()) {
    check_float(op, "bias", *bias);
    TORCH_CHECK(bias->device().is_cpu() && bias->dim() == 1 && bias->size(0) == N, op, ": bias must be a CPU tensor "
                "of shape (", N, ",), got ", bias->sizes(), " on ", bias->device());
    b = bias->to(at::kFloat).contiguous();
  }
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
  sizes.back() = N;
  check_out(op, "out", y, sizes, dtype, x);
  const int64_t M = x.numel() / K;
  if (M == 0) return y;
  const at::Tensor x2d = as_rows(x, K);
  if (gemm_path(M)) {
    at::Tensor y2d = y.view({M, N});
    qlinear_gemm(f, Layout(f, K), tiles.const_data_ptr<uint8_t>(), x2d, N, K, b, y2d);
    return y;
  }
  const Acts a = act_buffer.quantize(x2d, M, K);
  const Problem p{tiles.const_data_ptr<uint8_t>(), Layout(f, K), a, M, N,
                  b.defined() ? b.const_data_ptr<float>() : nullptr, y.mutable_data_ptr(), N, dtype};
  run(f, p);
  return y;
}

at::Tensor qlinear(const at::Tensor& x, const at::Tensor& tiles, int64_t fmt, int64_t N,
                   const std::optional<at::Tensor>& bias, std::optional<at::ScalarType> out_dtype) {
  check_float("fuselm::qlinear", "x", x);
  TORCH_CHECK(x.dim() >= 1, "fuselm::qlinear: x must be [..., K], got a scalar");
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
  sizes.back() = N;
  at::Tensor y = at::empty(sizes, x.options().dtype(check_out_dtype("fuselm::qlinear", out_dtype, x)));
  return qlinear_into(x, tiles, fmt, N, bias, out_dtype, y);
}

// Row n of the weight, dequantized as runtime/reference.py does (the same float32 operations in the
// same order, no fused multiply-add), so the lookup is bitwise the reference's.
__attribute__((optimize("fp-contract=off"))) void dequantize_row(Fmt f, const Layout& L, const uint8_t* tile,
                                                                 int r, int64_t K, float* out) {
  uint8_t q[kTileRows][32];
  for (int64_t b = 0; b < K / 32; ++b) {
    dispatch_fmt(f, [&](auto F) { values_scalar<decltype(F)::value>(tile, L, b, q); });
    float* o = out + 32 * b;
    if (!kquant(f)) {
      const float d = half_to_float(tile + L.d + 8 * b + 2 * r);
      if (has_min(f)) {
        const float m = half_to_float(tile + L.m + 8 * b + 2 * r);
        for (int j = 0; j < 32; ++j) {
          const float p = d * static_cast<float>(q[r][j]);
          o[j] = p + m;
        }
      } else {
        const int offset = static_cast<int>(offset_of(f));
        for (int j = 0; j < 32; ++j) o[j] = d * static_cast<float>(static_cast<int>(q[r][j]) - offset);
      }
    } else if (f == Q6_K) {
      const float d = half_to_float(tile + L.d + 8 * (b / 8) + 2 * r);
      for (int h = 0; h < 2; ++h) {
        const float s = d * static_cast<float>(static_cast<int8_t>(tile[L.sc6 + 8 * b + 4 * h + r]));
        for (int j = 16 * h; j < 16 * h + 16; ++j) o[j] = s * static_cast<float>(static_cast<int>(q[r][j]) - 32);
      }
    } else {
      const float s = half_to_float(tile + L.d + 8 * (b / 8) + 2 * r) * static_cast<float>(tile[L.sc + 4 * b + r]);
      const float low = half_to_float(tile + L.dmin + 8 * (b / 8) + 2 * r) * static_cast<float>(tile[L.mn + 4 * b + r]);
      for (int j = 0; j < 32; ++j) {
        const float p = s * static_cast<float>(q[r][j]);
        o[j] = p - low;
      }
    }
  }
}

at::Tensor qembedding(const at::Tensor& tokens, const at::Tensor& tiles, int64_t fmt, int64_t N, int64_t K,
                      at::ScalarType dtype) {
  constexpr const char* op = "fuselm::qembedding";
  const Fmt f = check_tiles(op, tiles, fmt, N, K);
  TORCH_CHECK(tokens.device().is_cpu() && (tokens.scalar_type() == at::kLong || tokens.scalar_type() == at::kInt),
              op, ": tokens must be an int64 or int32 CPU tensor, got ", tokens.scalar_type(), " on ", tokens.device());
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": dtype must be float32, float16 or bfloat16, got ", dtype);
  const at::Tensor ids = tokens.to(at::kLong).contiguous();
  std::vector<int64_t> sizes(ids.sizes().begin(), ids.sizes().end());
  sizes.push_back(K);
  at::Tensor out = at::empty(sizes, tiles.options().dtype(dtype));
  const int64_t n = ids.numel();
  const int64_t* id = ids.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(id[i] >= 0 && id[i] < N, op, ": token id ", id[i], " is outside the vocabulary [0, ", N, ")");
  const Layout L(f, K);
  const uint8_t* data = tiles.const_data_ptr<uint8_t>();
  at::parallel_for(0, n, std::max<int64_t>(1, 16384 / K), [&](int64_t i0, int64_t i1) {
    std::vector<float> row(K);
    for (int64_t i = i0; i < i1; ++i) {
      dequantize_row(f, L, data + (id[i] / kTileRows) * L.bytes, static_cast<int>(id[i] % kTileRows), K, row.data());
      dispatch_float(dtype, [&](auto tag) {
        cpu::from_float(row.data(), out.mutable_data_ptr<decltype(tag)>() + i * K, K);
      });
    }
  });
  return out;
}

std::string quant_isa() { return kIsaNames[static_cast<int>(isa())]; }

}  // namespace
}  // namespace fuselm

TORCH_LIBRARY_IMPL(fuselm, CPU, m) {
  m.impl("qlinear", &fuselm::qlinear);
  m.impl("qlinear.out", &fuselm::qlinear_into);
  m.impl("qembedding", &fuselm::qembedding);
}
TORCH_LIBRARY_FRAGMENT(fuselm, m) {
  // Which qlinear path runs on this CPU (the bench and the tests report it).
  m.def("quant_isa() -> str", &fuselm::quant_isa);
}
