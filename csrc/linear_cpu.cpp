// CPU linear for decode: torch.ops.fuselm.linear(x, weight, bias) on CPU tensors.
//
//   y[m, n] = sum_k x[m, k] * w[n, k] (+ b[n])     x [M, K], w [N, K], y [M, N]
//   accumulated in float32, rounded once to x's dtype.
//   bytes = N*K*e (the weight, read once per call) + M*K*e + M*N*e (+ N*e bias)
//   FLOPs = 2*M*N*K
// At decode M (the tokens of the step) is 1..32 and the weight is nearly all of
// the bytes, so the kernel is built to stream it at memory bandwidth.
//
// Work split: the weight rows, in chunks, go to the threads of at::parallel_for
// on demand (an atomic counter), so a thread slowed by other work on a shared
// machine does not hold the others up. A thread reads each of its rows once,
// front to back, and computes all M outputs of that row while it is in cache:
//   - while x (M*K elements as read) stays in L1 (up to kNarrowBytes), a tile
//     is one weight row: one sequential stream, which the hardware prefetcher
//     follows at full speed (4 interleaved row streams ran at ~60% of it),
//     and x is re-read from L1 for each row;
//   - beyond, a tile is 4 weight rows x up to 6 rows of x (AVX-512: 24
//     accumulators; portable: 2 rows of x), so each x vector loaded from L2
//     serves 4 rows, and the next tile is prefetched (into L2) in software.
// Past kMaxRows rows of x (prefill) the product is compute-bound and the
// blocked GEMM behind at::linear (MKL / oneDNN) is the better tool: the op
// calls it.
//
// Paths, chosen once per process from the CPU (as cpu_vec.cpp's clones are):
//   avx512bf16  bf16 pairs multiplied and summed by vdpbf16ps, 32 k per step
//   avx512      float32 FMA, 16 k per step; bf16 widened by a 16-bit shift,
//               fp16 by vcvtph2ps
//   portable    8-lane float vectors (GCC/Clang vector extensions), built for
//               AVX-512, AVX2 and the baseline as target_clones
// FUSELM_LINEAR_ISA=portable|avx512 caps the choice (the tests run each path).
//
// Batch invariance: y[m, n] is one accumulator per vector lane over k, a
// zero-filled last step, then a fixed horizontal sum, whatever M, the tile it
// lands in or the thread count: row m's result is bitwise the same alone or in
// a batch of up to kMaxRows rows.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "checks.h"

#include "cpu_clones.h"
#ifdef FUSELM_X86
#include <immintrin.h>
#endif

namespace fuselm {
namespace {

constexpr int64_t kMaxRows = 32;        // rows of x up to which the op streams the weight itself
constexpr int64_t kNarrowBytes = 12288;  // x up to this size: one-row tiles (measured; L1d is 32 KiB)
constexpr int kWideRows = 4;             // weight rows per tile when x is larger

// One call, as raw pointers. x is float32, except bf16 as given on the avx512bf16 path.
struct Problem {
  const void* x;
  int64_t ldx;     // elements between rows of x
  const void* w;   // [N, K] contiguous
  const float* b;  // [N] float32, or null
  void* y;         // [M, N] contiguous
  at::ScalarType out;  // y's dtype
  int64_t M, N, K;
};

// Kernel::tile<R, MB>(x, ldx, w, K, sum) sets sum[m][r] = dot(x row m, w row r) for a tile
// of R weight rows and MB rows of x; below, the loops over tiles, common to every path.
template <typename Kernel, typename T, int R, int MB>
ALWAYS_INLINE void tile_and_store(const Problem& p, int64_t m0, int64_t n0) {
  float sum[MB][R];
  Kernel::template tile<R, MB>(static_cast<const typename Kernel::X*>(p.x) + m0 * p.ldx, p.ldx,
                               static_cast<const typename Kernel::W*>(p.w) + n0 * p.K, p.K, sum);
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) {
      const float v = p.b ? sum[m][r] + p.b[n0 + r] : sum[m][r];
      store_as(p.y, p.out, (m0 + m) * p.N + n0 + r, v);
    }
}

// The last M % Kernel::kXRows rows of x: one tile of MB rows when that many are left, else fewer.
template <typename Kernel, typename T, int R, int MB>
ALWAYS_INLINE void tail_tile(const Problem& p, int64_t m, int64_t n0) {
  if constexpr (MB > 0) {
    if (p.M - m == MB) return tile_and_store<Kernel, T, R, MB>(p, m, n0);
    tail_tile<Kernel, T, R, MB - 1>(p, m, n0);
  }
}

// All M outputs of weight rows [n0, n0 + R).
template <typename Kernel, typename T, int R>
ALWAYS_INLINE void tile_column(const Problem& p, int64_t n0) {
  int64_t m = 0;
  constexpr int MB = Kernel::kXRows;
  for (; m + MB <= p.M; m += MB) tile_and_store<Kernel, T, R, MB>(p, m, n0);
  tail_tile<Kernel, T, R, MB - 1>(p, m, n0);
}

// All M outputs of weight rows [n0, n1).
template <typename Kernel, typename T>
ALWAYS_INLINE void rows(const Problem& p, int64_t n0, int64_t n1) {
  int64_t n = n0;
  if (p.M * p.K * static_cast<int64_t>(sizeof(typename Kernel::X)) > kNarrowBytes)
    for (; n + kWideRows <= n1; n += kWideRows) tile_column<Kernel, T, kWideRows>(p, n);
  for (; n < n1; ++n) tile_column<Kernel, T, 1>(p, n);
}

// ---------------------------------------------------------------- portable

// 8 float lanes: lane l of an accumulator sums the k = l (mod 8). A GCC/Clang vector (one AVX2
// register, two SSE ones), else a plain array.
constexpr int kLanes = 8;
#if defined(__GNUC__)
typedef float Lanes __attribute__((vector_size(4 * kLanes)));
#else
struct Lanes {
  float v[kLanes] = {};
  float& operator[](int l) { return v[l]; }
  Lanes& operator+=(const Lanes& o) {
    for (int l = 0; l < kLanes; ++l) v[l] += o.v[l];
    return *this;
  }
  friend Lanes operator*(Lanes a, const Lanes& b) {
    for (int l = 0; l < kLanes; ++l) a.v[l] *= b.v[l];
    return a;
  }
};
#endif

ALWAYS_INLINE Lanes load_lanes(const float* p) {
  Lanes v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
ALWAYS_INLINE Lanes load_lanes(const c10::BFloat16* p) {
#if defined(__GNUC__)
  typedef uint16_t Bits16 __attribute__((vector_size(2 * kLanes)));
  typedef uint32_t Bits32 __attribute__((vector_size(4 * kLanes)));
  Bits16 h;
  std::memcpy(&h, p, sizeof h);
  const Bits32 wide = __builtin_convertvector(h, Bits32) << 16;  // bf16 is the top half of a float
  Lanes v;
  std::memcpy(&v, &wide, sizeof v);
  return v;
#else
  Lanes v;
  for (int l = 0; l < kLanes; ++l) v[l] = static_cast<float>(p[l]);
  return v;
#endif
}
ALWAYS_INLINE Lanes load_lanes(const c10::Half* p) {
  Lanes v;
  for (int l = 0; l < kLanes; ++l) v[l] = static_cast<float>(p[l]);
  return v;
}
// The last n < kLanes elements, zeros after.
template <typename E>
ALWAYS_INLINE Lanes load_lanes(const E* p, int64_t n) {
  E buf[kLanes] = {};
  for (int64_t l = 0; l < n; ++l) buf[l] = p[l];
  return load_lanes(buf);
}

template <typename WT>
struct Portable {
  using X = float;
  using W = WT;
  static constexpr int kXRows = 2;  // 4 x 2 accumulators + 4 weight vectors + x fit AVX2's 16 registers

  template <int R, int MB, typename... Tail>
  static ALWAYS_INLINE void step(const float* x, int64_t ldx, const W* w, int64_t K, Lanes (&acc)[MB][R],
                                 Tail... n) {
    Lanes wv[R];
    for (int r = 0; r < R; ++r) wv[r] = load_lanes(w + r * K, n...);
    for (int m = 0; m < MB; ++m) {
      const Lanes xv = load_lanes(x + m * ldx, n...);
      for (int r = 0; r < R; ++r) acc[m][r] += wv[r] * xv;
    }
  }

  template <int R, int MB>
  static ALWAYS_INLINE void tile(const float* x, int64_t ldx, const W* w, int64_t K, float (&sum)[MB][R]) {
    Lanes acc[MB][R];
    for (int m = 0; m < MB; ++m)
      for (int r = 0; r < R; ++r) acc[m][r] = Lanes{};
    int64_t k = 0;
    for (; k + kLanes <= K; k += kLanes) step<R, MB>(x + k, ldx, w + k, K, acc);
    if (k < K) step<R, MB>(x + k, ldx, w + k, K, acc, K - k);
    for (int m = 0; m < MB; ++m)
      for (int r = 0; r < R; ++r) {
        float a[kLanes];
        std::memcpy(a, &acc[m][r], sizeof a);
        for (int half = kLanes / 2; half > 0; half /= 2)
          for (int l = 0; l < half; ++l) a[l] += a[l + half];
        sum[m][r] = a[0];
      }
  }
};

// One clone set per dtype: the loops above inline into each and get its vector width.
CLONES void portable_rows(const Problem& p, const float*, int64_t n0, int64_t n1) {
  rows<Portable<float>, float>(p, n0, n1);
}
CLONES void portable_rows(const Problem& p, const c10::Half*, int64_t n0, int64_t n1) {
  rows<Portable<c10::Half>, c10::Half>(p, n0, n1);
}
CLONES void portable_rows(const Problem& p, const c10::BFloat16*, int64_t n0, int64_t n1) {
  rows<Portable<c10::BFloat16>, c10::BFloat16>(p, n0, n1);
}

}  // namespace
}  // namespace fuselm

// ---------------------------------------------------------------- AVX-512
// Compiled for AVX-512 (the loops above inline into the *_rows entry points);
// they run only where detect_isa() found the ISA.
#ifdef FUSELM_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")
namespace fuselm {
namespace {

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const float* p, __mmask16 k) { return _mm512_maskz_loadu_ps(k, p); }
inline __m512 widen_bf16(__m256i v) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16)); }
inline __m512 load16(const c10::BFloat16* p) { return widen_bf16(_mm256_loadu_si256((const __m256i*)p)); }
inline __m512 load16(const c10::BFloat16* p, __mmask16 k) { return widen_bf16(_mm256_maskz_loadu_epi16(k, p)); }
inline __m512 load16(const c10::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
inline __m512 load16(const c10::Half* p, __mmask16 k) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p)); }

// Ask for the next tile's rows (same offset) while this tile streams: R lines per step cover it.
template <int R, typename W>
inline void prefetch_next_tile(const W* w, int64_t K) {
  if constexpr (R > 1)
    for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(w + (R + r) * K), _MM_HINT_T1);
}

template <int R, int MB>
inline void reduce(__m512 (&acc)[MB][R], float (&sum)[MB][R]) {
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) sum[m][r] = _mm512_reduce_add_ps(acc[m][r]);
}

template <typename WT>
struct Avx512 {
  using X = float;
  using W = WT;
  static constexpr int kXRows = 6;  // 4 x 6 accumulators + 4 weight vectors + x of 32 registers

  template <int R, int MB, typename... Mask>
  static inline void step(const float* x, int64_t ldx, const W* w, int64_t K, __m512 (&acc)[MB][R], Mask... k) {
    prefetch_next_tile<R>(w, K);
    __m512 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = load16(w + r * K, k...);
    for (int m = 0; m < MB; ++m) {
      const __m512 xv = load16(x + m * ldx, k...);
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_fmadd_ps(wv[r], xv, acc[m][r]);
    }
  }

  template <int R, int MB>
  static void tile(const float* x, int64_t ldx, const W* w, int64_t K, float (&sum)[MB][R]) {
    __m512 acc[MB][R];
    for (int m = 0; m < MB; ++m)
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) step<R, MB>(x + k, ldx, w + k, K, acc);
    if (k < K) step<R, MB>(x + k, ldx, w + k, K, acc, static_cast<__mmask16>((1u << (K - k)) - 1));
    reduce(acc, sum);
  }
};

void avx512_rows(const Problem& p, const float*, int64_t n0, int64_t n1) { rows<Avx512<float>, float>(p, n0, n1); }
void avx512_rows(const Problem& p, const c10::Half*, int64_t n0, int64_t n1) {
  rows<Avx512<c10::Half>, c10::Half>(p, n0, n1);
}
void avx512_rows(const Problem& p, const c10::BFloat16*, int64_t n0, int64_t n1) {
  rows<Avx512<c10::BFloat16>, c10::BFloat16>(p, n0, n1);
}

}  // namespace
}  // namespace fuselm
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")
namespace fuselm {
namespace {

// x and w both bf16; lane i of an accumulator sums the pairs k = 32j + 2i, 32j + 2i + 1.
struct Avx512Bf16 {
  using X = c10::BFloat16;
  using W = c10::BFloat16;
  static constexpr int kXRows = 6;

  static inline __m512i load32(const c10::BFloat16* p) { return _mm512_loadu_si512(p); }
  static inline __m512i load32(const c10::BFloat16* p, __mmask32 k) { return _mm512_maskz_loadu_epi16(k, p); }

  template <int R, int MB, typename... Mask>
  static inline void step(const X* x, int64_t ldx, const W* w, int64_t K, __m512 (&acc)[MB][R], Mask... k) {
    prefetch_next_tile<R>(w, K);
    __m512i wv[R];
    for (int r = 0; r < R; ++r) wv[r] = load32(w + r * K, k...);
    for (int m = 0; m < MB; ++m) {
      const __m512i xv = load32(x + m * ldx, k...);
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], (__m512bh)wv[r], (__m512bh)xv);
    }
  }

  template <int R, int MB>
  static void tile(const X* x, int64_t ldx, const W* w, int64_t K, float (&sum)[MB][R]) {
    __m512 acc[MB][R];
    for (int m = 0; m < MB; ++m)
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) step<R, MB>(x + k, ldx, w + k, K, acc);
    if (k < K) step<R, MB>(x + k, ldx, w + k, K, acc, static_cast<__mmask32>((1ull << (K - k)) - 1));
    reduce(acc, sum);
  }
};

void avx512bf16_rows(const Problem& p, const c10::BFloat16*, int64_t n0, int64_t n1) {
  rows<Avx512Bf16, c10::BFloat16>(p, n0, n1);
}

}  // namespace
}  // namespace fuselm
#pragma GCC pop_options
#endif  // FUSELM_X86

// ---------------------------------------------------------------- dispatch and the op
namespace fuselm {
namespace {

enum class Isa { portable, avx512, avx512bf16 };  // ordered: each needs the one before

Isa detect_isa() {
  Isa best = Isa::portable;
#ifdef FUSELM_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    best = __builtin_cpu_supports("avx512bf16") ? Isa::avx512bf16 : Isa::avx512;
#endif
  const char* cap = std::getenv("FUSELM_LINEAR_ISA");
  if (cap == nullptr || *cap == '\0') return best;
  const std::string name(cap);
  TORCH_CHECK(name == "portable" || name == "avx512" || name == "avx512bf16",
              "FUSELM_LINEAR_ISA must be portable, avx512 or avx512bf16, got '", name, "'");
  const Isa want = name == "portable" ? Isa::portable : name == "avx512" ? Isa::avx512 : Isa::avx512bf16;
  return std::min(want, best);
}

Isa isa() {
  static const Isa chosen = detect_isa();
  return chosen;
}

// Weight rows [n0, n1) on `path` for dtype T.
template <typename T>
void run_rows(Isa path, const Problem& p, int64_t n0, int64_t n1) {
  const T* dtype = nullptr;  // picks the overload
#ifdef FUSELM_X86
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (path == Isa::avx512bf16) return avx512bf16_rows(p, dtype, n0, n1);
  }
  if (path != Isa::portable) return avx512_rows(p, dtype, n0, n1);
#endif
  portable_rows(p, dtype, n0, n1);
}

// The rows split into chunks of whole tiles, ~16 per thread (some slack for a slow thread),
// none under ~64k weight elements, so small matrices stay on one thread.
template <typename Fn>
void parallel_rows(const Problem& p, const Fn& fn) {
  const int64_t tiles = (p.N + kWideRows - 1) / kWideRows;
  const int64_t threads = at::get_num_threads();
  const int64_t min_tiles = std::max<int64_t>(1, 65536 / (kWideRows * p.K));
  const int64_t chunk = std::max(min_tiles, (tiles + 16 * threads - 1) / (16 * threads));
  const int64_t chunks = (tiles + chunk - 1) / chunk;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(threads, chunks), 1, [&](int64_t, int64_t) {
    for (int64_t c; (c = next.fetch_add(1)) < chunks;)
      fn(c * chunk * kWideRows, std::min(p.N, (c + 1) * chunk * kWideRows));
  });
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  std::optional<at::ScalarType> out_dtype) {
  constexpr const char* op = "fuselm::linear";
  check_float(op, "x", x);
  const at::ScalarType out = check_out_dtype(op, out_dtype, x);
  check_device(op, "weight", weight, x);
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight is ", weight.scalar_type(), " but x is ",
              x.scalar_type());
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be [N, K], got shape ", weight.sizes());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == weight.size(1), op, ": x must end in K = ", weight.size(1),
              " (weight is [N, K] = ", weight.sizes(), "), got shape ", x.sizes());
  const int64_t N = weight.size(0), K = weight.size(1);
  if (bias.has_value()) {
    check_device(op, "bias", *bias, x);
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), op, ": bias is ", bias->scalar_type(), " but x is ",
                x.scalar_type());
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, op, ": bias must have shape (", N, ",), got ",
                bias->sizes());
  }
  const int64_t M = K > 0 ? x.numel() / K : 0;
  // Prefill-sized M is compute-bound: MKL/oneDNN's blocked GEMM wins there. K = 0: zeros (+ bias).
  if (M > kMaxRows || K == 0) return at::linear(x, weight, bias).to(out);

  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
  sizes.back() = N;
  at::Tensor y = at::empty(sizes, x.options().dtype(out));  // [..., N]
  if (M == 0 || N == 0) return y;

  const Isa path = isa();
  const bool bf16_pairs = path == Isa::avx512bf16 && x.scalar_type() == at::kBFloat16;
  const at::Tensor xs = bf16_pairs ? as_rows(x, K) : as_rows(x, K).to(at::kFloat);  // [M, K]
  const at::Tensor w = weight.contiguous();
  const at::Tensor b = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const Problem p{xs.const_data_ptr(), xs.stride(0), w.const_data_ptr(),
                  b.defined() ? b.const_data_ptr<float>() : nullptr, y.mutable_data_ptr(), out, M, N, K};
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    parallel_rows(p, [&](int64_t n0, int64_t n1) { run_rows<T>(path, p, n0, n1); });
  });
  return y;
}

}  // namespace
}  // namespace fuselm

TORCH_LIBRARY_IMPL(fuselm, CPU, m) { m.impl("linear", &fuselm::linear); }
