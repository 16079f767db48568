// CPU attention: torch.ops.fuselm.attention (prefill), decode_attention, and their paged forms
// paged_attention / paged_decode_attention on CPU tensors.
//
// Each query row (batch b, query i, head h) attends to its visible keys j in [lo, hi) of KV head
// h / G (GQA, G = Hq / Hkv):
//   s_j = scale * (q . k_j)        o = sum_j softmax(s)_j v_j        o = 0 when no key is visible
//   prefill: lo = kv_start[b], hi = Sk, or i + Sk - Sq + 1 when causal (bottom-right aligned)
//   decode:  the same with one query (Sq = 1) and hi = seqlens[b] (clamped to [0, Smax]), no causal limit
//   paged:   lo = 0 and row b's keys are its first seqlens[b] positions (clamped to [0, M * page]) of a
//            pool [num_blocks, page, Hkv, D]: key j is row j % page of block block_tables[b, j / page]
//            (block_tables [B, M] int32). Paged prefill's Sq queries are the row's last: query i sees
//            keys j < seqlens[b] - Sq + i + 1 when causal (bottom-right aligned per row).
// Keys outside [lo, hi) are never read: before kv_start and past seqlens they may hold anything (NaN),
// and table entries past a row's ceil(seqlens[b] / page) pages are never read either.
//
// Key addressing is the only difference between a dense cache and a pool: a key block (or decode split)
// is loaded into the float32 scratch as runs of rows that are contiguous in memory (`run_at`): one run
// from the row's base in a dense cache, one run per page in a pool. The blocks themselves, and so every
// reduction, are the same as over the gathered cache: a paged row is bitwise the dense op over its keys
// gathered in the pool's layout (a contiguous pool: gather_pages(pool, block_tables)[b, :seqlens[b]]).
//
// Online softmax (one function for both ops, `update`): keys arrive in blocks of 4096 / D (16 KiB
// of float32 K, the same of V); per row a running max m, sum l and a float32 accumulator acc [D]:
//   m' = max(m, max_j s_j)   acc = acc * e^(m - m') + sum_j e^(s_j - m') v_j   l likewise   o = acc / l
// A block whose scores are all -inf is shifted by 0 instead of -inf, so its keys weigh exactly 0
// (as in softmax) rather than NaN; a row that saw keys but only -inf scores is NaN, as softmax.
// Float32 throughout; the output is rounded once to the input dtype.
//
// Work split: a task is (b, KV head, a block of kQueryRows / G queries): its rows (queries x the G
// heads of the group) share every K/V row, converted to float32 once per task, so decode reads each
// cached K/V row once for the whole query-head group and prefill reuses it from cache for ~64 rows.
// Tasks go to the threads of at::parallel_for on demand (causal query blocks differ in cost).
// Any strides are read in place, except a non-unit head-dim stride: that tensor is copied first.
//
// Bytes (e = element size of the inputs):
//   decode:  2 * Hkv * D * e * sum_b (seqlens[b] - kv_start[b])   (the visible cache, once)
//            + 2 * B * Hq * D * e                                  (q read, o written)
//   prefill: 2 * Hkv * D * e * sum over tasks of the keys they see (~ B * Sk * ceil(Sq / (64 / G)),
//            about half of it when causal) + 2 * B * Sq * Hq * D * e
//   paged:   the same with kv_start = 0 and Sk = seqlens[b] per row, plus 4 bytes per table entry read
//            (sum_b ceil(seqlens[b] / page): once to check the ids, then once per page run a task loads)
// FLOPs: 4 * D per (query row, visible key).
//
// Batch invariance: a row's key blocks, and so its reduction order, depend only on its own
// kv_start / length and its query block, never on B, the other rows or the thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <optional>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "cpu_vec.h"

#include "cpu_clones.h"

namespace fuselm {
namespace {

constexpr int64_t kQueryRows = 64;      // query rows (queries x group heads) per prefill task
constexpr int64_t kBlockFloats = 4096;  // keys per block x D: a float32 K block of 16 KiB, V the same
constexpr int64_t kMinWork = 1 << 14;   // (row, key, d) products per thread below which one thread runs it

// One call, as raw pointers and element strides; the head dim is contiguous in q, k, v.
struct Problem {
  const void *q, *k, *v;
  void* out;  // [B, Sq, Hq, D] contiguous
  int64_t B, Sq, Hq, Hkv, D;
  int64_t q_b, q_i, q_h, k_b, k_j, k_h, v_b, v_j, v_h;
  const int64_t* lo;  // [B] first visible key of each batch row
  const int64_t* hi;  // [B] one past its last key before the causal limit (within the cache)
  // Paged (table not null): k and v point at pools [num_blocks, page, Hkv, D] and k_b / v_b are their
  // block strides; key j of batch row b is row j % page of block table[b * table_stride + j / page].
  const int32_t* table;
  int64_t table_stride, page;
  bool causal;
  float scale;
  int64_t queries;    // queries per task
  int64_t key_block;  // keys per block

  int64_t group() const { return Hq / Hkv; }
  int64_t query_blocks() const { return (Sq + queries - 1) / queries; }
  int64_t tasks() const { return B * Hkv * query_blocks(); }
  // One past the last key query i of batch row b sees: causal queries are the last Sq of the row's hi[b]
  // keys (bottom-right aligned; the dense prefill's hi[b] is Sk). <= lo: the query sees no key.
  int64_t end(int64_t b, int64_t i) const { return causal ? hi[b] - (Sq - 1 - i) : hi[b]; }
};

// Where key (or value) row j of batch row b lies, as an element offset from the cache's base, and in
// `count` how many rows from it, up to row `end` (exclusive), follow ld_j apart: all of them in a dense
// cache (ld_b the batch stride), those up to the page's end in a paged pool (ld_b the block stride).
ALWAYS_INLINE int64_t run_at(const Problem& p, int64_t ld_b, int64_t ld_j, int64_t b, int64_t j, int64_t end,
                             int64_t& count) {
  if (p.table == nullptr) {
    count = end - j;
    return b * ld_b + j * ld_j;
  }
  const int64_t offset = j % p.page;
  count = std::min(end - j, p.page - offset);
  return p.table[b * p.table_stride + j / p.page] * ld_b + offset * ld_j;
}

// Float vectors of L lanes (GCC/Clang vector extensions), L the register width of the ISA a loop is
// built for (x86_width): a vector wider than the registers lives on the stack, and the AVX2 build of
// 16-lane loops ran ~10x off bandwidth, loading and storing its accumulators. The kernel's float32 rows
// are padded with zeros to kPad floats, a whole number of vectors at every width, so no loop has a tail.
constexpr int64_t kPad = 16;
template <int L>
struct VecOf {
  typedef float type __attribute__((vector_size(4 * L)));
};
template <int L>
using Vec = typename VecOf<L>::type;

template <int L>
ALWAYS_INLINE Vec<L> load(const float* p) {
  Vec<L> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <int L>
ALWAYS_INLINE void store(float* p, Vec<L> v) {
  std::memcpy(p, &v, sizeof v);
}
// A tree of register halves (a loop over a float array compiles to store-forwarding stalls).
template <int L>
ALWAYS_INLINE float sum_lanes(Vec<L> v) {
  if constexpr (L == 4) {
    return (v[0] + v[2]) + (v[1] + v[3]);
  } else {
    Vec<L / 2> lo, hi;
    std::memcpy(&lo, &v, sizeof lo);
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof lo, sizeof hi);
    return sum_lanes<L / 2>(lo + hi);
  }
}

// Per-thread buffers, sized for the largest task; rows of Dp = D rounded up to kPad floats.
// Zero-filled when the shape changes: the padding stays zero, so it adds nothing to dot products or
// outputs. Kept across calls (thread-local): decode calls this op once per layer per token, and
// allocating and clearing the buffers each time cost more than attending over a short context.
struct Scratch {
  int64_t D = -1, rows = -1, key_block = -1, Dp = 0;
  std::vector<float> q, acc, m, l, s, k, v, o;
  std::vector<const float*> krows, vrows;  // the rows of k and v
  void fit(const Problem& p) {
    const int64_t r = p.queries * p.group();
    if (p.D == D && r == rows && p.key_block == key_block) return;
    D = p.D, rows = r, key_block = p.key_block, Dp = (p.D + kPad - 1) / kPad * kPad;
    for (auto* buf : {&q, &acc, &m, &l, &s, &k, &v, &o}) buf->clear();
    q.resize(rows * Dp);
    acc.resize(rows * Dp);
    m.resize(rows);
    l.resize(rows);
    s.resize((key_block + kPad - 1) / kPad * kPad);
    k.resize(key_block * Dp);
    v.resize(key_block * Dp);
    o.resize(Dp);
    krows.resize(key_block);
    vrows.resize(key_block);
    for (int64_t j = 0; j < key_block; ++j) krows[j] = k.data() + j * Dp, vrows[j] = v.data() + j * Dp;
  }
};
thread_local Scratch scratch;

// n rows of D elements, `ld` apart, into buf as float32 rows Dp apart. float32 is copied too: the
// padded rows need no tail loops, and the copy reads cache lines the kernel reads anyway.
// Row j of the next block (`ahead` rows on) is asked for into L2 as row j is read: the K/V rows of
// one head are Hkv * D apart in the cache, a stride the hardware prefetcher follows poorly, and
// spreading the requests keeps them from stalling on full miss buffers (measured, decode).
template <typename T>
ALWAYS_INLINE void prefetch_row(const T* row, int64_t D) {
  for (int64_t byte = 0; byte < D * static_cast<int64_t>(sizeof(T)); byte += 64)
    __builtin_prefetch(reinterpret_cast<const char*>(row) + byte, 0, 2);
}

template <typename T>
ALWAYS_INLINE void prefetch_rows(const T* src, int64_t ld, int64_t n, int64_t D) {
  for (int64_t j = 0; j < n; ++j) prefetch_row(src + j * ld, D);
}

template <typename T>
ALWAYS_INLINE void load_rows(const T* src, int64_t ld, int64_t n, int64_t ahead, int64_t D, int64_t Dp, float* buf) {
  for (int64_t j = 0; j < n; ++j) {
    if (j < ahead) prefetch_row(src + (n + j) * ld, D);
    cpu::to_float(src + j * ld, buf + j * Dp, D);
  }
}

// The same for key rows [j0, j0 + n) of batch row b of a dense cache or a pool (run_at); `ahead` rows
// after them are asked for into L2. A dense cache is one load_rows; a pool's next rows need not follow
// these in memory, so after each page's run as many of the next block's rows as that run held are
// asked for: spread over the block, as load_rows spreads them.
template <typename T>
ALWAYS_INLINE void prefetch_keys(const Problem& p, const T* base, int64_t ld_b, int64_t ld_j, int64_t b, int64_t j0,
                                 int64_t n) {
  for (int64_t j = j0, c = 0; j < j0 + n; j += c) {
    const T* src = base + run_at(p, ld_b, ld_j, b, j, j0 + n, c);  // sets c: before it is passed on
    prefetch_rows(src, ld_j, c, p.D);
  }
}

template <typename T>
ALWAYS_INLINE void load_keys(const Problem& p, const T* base, int64_t ld_b, int64_t ld_j, int64_t b, int64_t j0,
                             int64_t n, int64_t ahead, int64_t Dp, float* buf) {
  if (p.table == nullptr) return load_rows(base + b * ld_b + j0 * ld_j, ld_j, n, ahead, p.D, Dp, buf);
  for (int64_t j = j0, c = 0, asked = 0; j < j0 + n; j += c) {
    const T* src = base + run_at(p, ld_b, ld_j, b, j, j0 + n, c);
    const int64_t more = std::min(ahead, j + c - j0) - asked;
    if (more > 0) {
      prefetch_keys(p, base, ld_b, ld_j, b, j0 + n + asked, more);
      asked += more;
    }
    load_rows(src, ld_j, c, 0, p.D, Dp, buf + (j - j0) * Dp);
  }
}

// s[j] = scale * (q . k_j) for n key rows (Dp floats each at k[j] + col); four keys at a time share
// each q vector. Each key has one accumulator summed over d in order, so a key's score is the same in
// either loop. Rows by pointer: float32 caches are read in place, a page at a time (split_rows).
template <int L>
ALWAYS_INLINE void scores(const float* q, const float* const* k, int64_t col, int64_t n, int64_t Dp, float scale,
                          float* s) {
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const float *k0 = k[j] + col, *k1 = k[j + 1] + col, *k2 = k[j + 2] + col, *k3 = k[j + 3] + col;
    Vec<L> s0 = {}, s1 = {}, s2 = {}, s3 = {};
    for (int64_t d = 0; d < Dp; d += L) {
      const Vec<L> qd = load<L>(q + d);
      s0 += qd * load<L>(k0 + d);
      s1 += qd * load<L>(k1 + d);
      s2 += qd * load<L>(k2 + d);
      s3 += qd * load<L>(k3 + d);
    }
    s[j] = sum_lanes<L>(s0) * scale;
    s[j + 1] = sum_lanes<L>(s1) * scale;
    s[j + 2] = sum_lanes<L>(s2) * scale;
    s[j + 3] = sum_lanes<L>(s3) * scale;
  }
  for (; j < n; ++j) {
    Vec<L> s0 = {};
    for (int64_t d = 0; d < Dp; d += L) s0 += load<L>(q + d) * load<L>(k[j] + col + d);
    s[j] = sum_lanes<L>(s0) * scale;
  }
}

// The online-softmax step of one row over n more keys: s [n rounded up to kPad] their scores
// (overwritten with e^(s - m'), zeros after n), v their value rows (Dp floats at v[j] + col), m / l /
// acc [Dp] the row's running state. Four accumulators over the keys: one would be a chain of
// dependent FMAs.
template <int L>
ALWAYS_INLINE void update(float* s, int64_t n, const float* const* v, int64_t col, int64_t Dp, float& m,
                          float& l, float* acc) {
  const float m_new = std::max(m, cpu::max(s, n));  // a NaN score is skipped here and turns into a NaN weight below
  const float shift = m_new == -INFINITY ? 0.f : m_new;  // all -inf so far: weights e^-inf = 0, not NaN
  cpu::exp_shifted(s, n, shift);
  const float alpha = std::exp(m - shift);  // the old terms' rescale; 0 while m is -inf
  std::fill(s + n, s + (n + kPad - 1) / kPad * kPad, 0.f);
  Vec<L> sum = {};
  for (int64_t j = 0; j < n; j += L) sum += load<L>(s + j);
  l = l * alpha + sum_lanes<L>(sum);
  for (int64_t d = 0; d < Dp; d += L) {
    const int64_t at = col + d;
    Vec<L> a0 = load<L>(acc + d) * alpha, a1 = {}, a2 = {}, a3 = {};
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
      a0 += s[j] * load<L>(v[j] + at);
      a1 += s[j + 1] * load<L>(v[j + 1] + at);
      a2 += s[j + 2] * load<L>(v[j + 2] + at);
      a3 += s[j + 3] * load<L>(v[j + 3] + at);
    }
    for (; j < n; ++j) a0 += s[j] * load<L>(v[j] + at);
    store<L>(acc + d, (a0 + a1) + (a2 + a3));
  }
  m = m_new;
}

// One task: batch row b, KV head h, queries [i0, i1), each with the G query heads of h.
template <typename T, int L>
ALWAYS_INLINE void run_task(const Problem& p, int64_t task, Scratch& w) {
  const int64_t G = p.group(), D = p.D, Dp = w.Dp, blocks = p.query_blocks();
  const int64_t b = task / (p.Hkv * blocks), h = task / blocks % p.Hkv;
  const int64_t i0 = task % blocks * p.queries, i1 = std::min(p.Sq, i0 + p.queries);
  const T* q = static_cast<const T*>(p.q) + b * p.q_b + h * G * p.q_h;
  const T* k = static_cast<const T*>(p.k) + h * p.k_h;  // head h's rows; row b's are load_keys'
  const T* v = static_cast<const T*>(p.v) + h * p.v_h;
  // row r = (i - i0) * G + g: query i, head h * G + g
  for (int64_t i = i0; i < i1; ++i)
    load_rows(q + i * p.q_i, p.q_h, G, 0, D, Dp, w.q.data() + (i - i0) * G * Dp);
  const int64_t rows = (i1 - i0) * G;
  std::fill_n(w.acc.begin(), rows * Dp, 0.f);
  std::fill_n(w.m.begin(), rows, -INFINITY);
  std::fill_n(w.l.begin(), rows, 0.f);

  const int64_t lo = p.lo[b], hi = p.end(b, i1 - 1);  // the keys any row of the task sees
  // the first block's rows now (load_rows asks for each next block as it reads one): without it
  // its misses came one after another, a third of a cold decode call over 140 keys (measured)
  prefetch_keys(p, k, p.k_b, p.k_j, b, lo, std::min(p.key_block, hi - lo));
  prefetch_keys(p, v, p.v_b, p.v_j, b, lo, std::min(p.key_block, hi - lo));
  for (int64_t j0 = lo; j0 < hi; j0 += p.key_block) {
    const int64_t n = std::min(p.key_block, hi - j0);
    const int64_t ahead = std::min(p.key_block, hi - j0 - n);  // rows of the next block
    load_keys(p, k, p.k_b, p.k_j, b, j0, n, ahead, Dp, w.k.data());
    load_keys(p, v, p.v_b, p.v_j, b, j0, n, ahead, Dp, w.v.data());
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t seen = std::min(n, p.end(b, i) - j0);  // causal: a prefix of the block
      if (seen <= 0) continue;
      for (int64_t r = (i - i0) * G; r < (i - i0 + 1) * G; ++r) {
        scores<L>(w.q.data() + r * Dp, w.krows.data(), 0, seen, Dp, p.scale, w.s.data());
        update<L>(w.s.data(), seen, w.vrows.data(), 0, Dp, w.m[r], w.l[r], w.acc.data() + r * Dp);
      }
    }
  }

  T* out = static_cast<T*>(p.out) + (b * p.Sq * p.Hq + h * G) * D;
  for (int64_t i = i0; i < i1; ++i) {
    // l = 0: no key visible (zeros), or only -inf scores (NaN, as softmax of all -inf)
    const float empty = p.end(b, i) > lo ? NAN : 0.f;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t r = (i - i0) * G + g;
      const float* acc = w.acc.data() + r * Dp;
      const float l = w.l[r];
      for (int64_t d = 0; d < D; ++d) w.o[d] = l == 0.f ? empty : acc[d] / l;
      cpu::from_float(w.o.data(), out + (i * p.Hq + g) * D, D);
    }
  }
}

// The vector width the loops run at: the CPU's widest (x86_width), or less where FUSELM_ATTENTION_ISA
// caps it (portable: 4 lanes, avx2: 8, avx512: 16), so each build can be tested on one machine.
int width() {
  static const int chosen = [] {
#ifdef FUSELM_X86
    const int best = x86_width();
#else
    const int best = 4;
#endif
    const char* cap = std::getenv("FUSELM_ATTENTION_ISA");
    if (cap == nullptr || *cap == '\0') return best;
    const std::string name(cap);
    TORCH_CHECK(name == "portable" || name == "avx2" || name == "avx512",
                "FUSELM_ATTENTION_ISA must be portable, avx2 or avx512, got '", name, "'");
    return std::min(best, name == "portable" ? 4 : name == "avx2" ? 8 : 16);
  }();
  return chosen;
}

// Tasks pulled from `next` until none is left, with L-lane vectors.
template <typename T, int L>
ALWAYS_INLINE void run_tasks(const Problem& p, std::atomic<int64_t>& next) {
  Scratch& w = scratch;
  w.fit(p);
  for (int64_t t; (t = next.fetch_add(1)) < p.tasks();) run_task<T, L>(p, t, w);
}
// One build per ISA, with its register width; run_tasks_at calls the one of `lanes` (width()).
#ifdef FUSELM_X86
template <typename T>
TARGET_V4 void run_tasks_v4(const Problem& p, std::atomic<int64_t>& next) { run_tasks<T, 16>(p, next); }
template <typename T>
TARGET_V3 void run_tasks_v3(const Problem& p, std::atomic<int64_t>& next) { run_tasks<T, 8>(p, next); }
#endif
template <typename T>
void run_tasks_at(int lanes, const Problem& p, std::atomic<int64_t>& next) {
#ifdef FUSELM_X86
  if (lanes == 16) return run_tasks_v4<T>(p, next);
  if (lanes == 8) return run_tasks_v3<T>(p, next);
#endif
  run_tasks<T, 4>(p, next);
}

template <typename T>
void run(const Problem& p) {
  // As many threads as the work is worth: at most the task count, at least kMinWork products each
  // (estimated from the longest key range of any row).
  int64_t keys = 1;
  for (int64_t b = 0; b < p.B; ++b) keys = std::max(keys, p.hi[b] - p.lo[b]);
  const int64_t work = p.tasks() * std::min(p.Sq, p.queries) * p.group() * keys * p.D;
  const int64_t threads = std::clamp<int64_t>(std::min<int64_t>(work / kMinWork, p.tasks()), 1, at::get_num_threads());
  std::atomic<int64_t> next{0};
  const int lanes = width();  // here: a bad FUSELM_ATTENTION_ISA raises in the caller's thread
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) { run_tasks_at<T>(lanes, p, next); });
}

// ---------------------------------------------------------------- decode, split over keys
// One query per row over a cache whose rows [Hkv, D] are contiguous, D a multiple of kPad (the
// model's static cache): a task is one split of kSplitKeys keys of one batch row, for all its heads.
// Its K (and V) rows are then one contiguous range of the cache: float32 is read in place (asked into
// cache up front: a row of one head is strided, 1.4x faster at B = 1 over 64 to 1024 keys, measured),
// other dtypes are converted in one pass instead of row by row for each head (25% faster over 140 keys
// in cache, measured), and a batch row of few heads still gives the threads one task per split.
// Each task writes its softmax partial per query head (max m, sum l, weighted values acc); a last
// pass combines a row's splits in order:  M = max_s m_s,  o = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s.
// Splits depend only on a row's own [lo, hi), so its result stays batch invariant. A pool's rows
// [Hkv, D] are contiguous too (a page at a time): a split is read one page run at a time.
constexpr int64_t kSplitKeys = 64;

struct Split {
  int64_t b, j0, j1;
};

struct SplitScratch {
  std::vector<float> k, v, s, q;
  std::vector<const float*> krows, vrows;
};
thread_local SplitScratch split_scratch;

bool splits_apply(const Problem& p) {
  return p.Sq == 1 && !p.causal && p.D % kPad == 0 && p.k_h == p.D && p.k_j == p.Hkv * p.D && p.v_h == p.D &&
         p.v_j == p.Hkv * p.D;
}

// rows[j - t.j0] = key (or value) row j of the split, [Hkv * D] float32: a float32 cache's own rows,
// read in place; other dtypes converted into buf, one contiguous run (a page in a pool) per pass.
template <typename T>
ALWAYS_INLINE void split_rows(const Problem& p, const void* base, int64_t ld_b, const Split& t, std::vector<float>& buf,
                              std::vector<const float*>& rows) {
  const int64_t row = p.Hkv * p.D;  // also the key stride (splits_apply)
  rows.resize(t.j1 - t.j0);
  if constexpr (!std::is_same_v<T, float>) buf.resize((t.j1 - t.j0) * row);
  for (int64_t j = t.j0, c = 0; j < t.j1; j += c) {
    const T* src = static_cast<const T*>(base) + run_at(p, ld_b, row, t.b, j, t.j1, c);
    const float* first;
    if constexpr (std::is_same_v<T, float>) {
      prefetch_row(src, c * row);
      first = src;
    } else {
      float* dst = buf.data() + (j - t.j0) * row;
      cpu::to_float(src, dst, c * row);
      first = dst;
    }
    for (int64_t i = 0; i < c; ++i) rows[j - t.j0 + i] = first + i * row;
  }
}

// partial: [Hq][2 + D] for this task: m, l, acc
template <typename T, int L>
ALWAYS_INLINE void split_task(const Problem& p, const Split& t, float* partial) {
  SplitScratch& w = split_scratch;
  const int64_t D = p.D, G = p.group(), n = t.j1 - t.j0;
  w.s.resize((n + kPad - 1) / kPad * kPad);
  w.q.resize(D);
  split_rows<T>(p, p.k, p.k_b, t, w.k, w.krows);
  split_rows<T>(p, p.v, p.v_b, t, w.v, w.vrows);
  const T* q = static_cast<const T*>(p.q) + t.b * p.q_b;
  for (int64_t r = 0; r < p.Hq; ++r) {
    const int64_t h = r / G;
    cpu::to_float(q + r * p.q_h, w.q.data(), D);
    float* out = partial + r * (2 + D);
    float m = -INFINITY, l = 0.f;
    std::fill_n(out + 2, D, 0.f);
    scores<L>(w.q.data(), w.krows.data(), h * D, n, D, p.scale, w.s.data());
    update<L>(w.s.data(), n, w.vrows.data(), h * D, D, m, l, out + 2);
    out[0] = m, out[1] = l;
  }
}

template <typename T, int L>
ALWAYS_INLINE void split_tasks(const Problem& p, const std::vector<Split>& tasks, float* partials,
                               std::atomic<int64_t>& next) {
  const int64_t stride = p.Hq * (2 + p.D);
  for (int64_t t; (t = next.fetch_add(1)) < static_cast<int64_t>(tasks.size());)
    split_task<T, L>(p, tasks[t], partials + t * stride);
}
// one build per ISA, as run_tasks
#ifdef FUSELM_X86
template <typename T>
TARGET_V4 void split_tasks_v4(const Problem& p, const std::vector<Split>& tasks, float* partials,
                              std::atomic<int64_t>& next) {
  split_tasks<T, 16>(p, tasks, partials, next);
}
template <typename T>
TARGET_V3 void split_tasks_v3(const Problem& p, const std::vector<Split>& tasks, float* partials,
                              std::atomic<int64_t>& next) {
  split_tasks<T, 8>(p, tasks, partials, next);
}
#endif
template <typename T>
void split_tasks_at(int lanes, const Problem& p, const std::vector<Split>& tasks, float* partials,
                    std::atomic<int64_t>& next) {
#ifdef FUSELM_X86
  if (lanes == 16) return split_tasks_v4<T>(p, tasks, partials, next);
  if (lanes == 8) return split_tasks_v3<T>(p, tasks, partials, next);
#endif
  split_tasks<T, 4>(p, tasks, partials, next);
}

// The caller's buffers for a call (kept across calls, as the threads' scratch).
struct SplitCall {
  std::vector<Split> tasks;
  std::vector<int64_t> first;
  std::vector<float> partials, o;
};
thread_local SplitCall split_call;

template <typename T>
void run_splits(const Problem& p) {
  std::vector<Split>& tasks = split_call.tasks;
  std::vector<int64_t>& first = split_call.first;  // row b's splits are tasks [first[b], first[b + 1])
  tasks.clear();
  first.assign(p.B + 1, 0);
  int64_t keys = 1;
  for (int64_t b = 0; b < p.B; ++b) {
    first[b] = static_cast<int64_t>(tasks.size());
    for (int64_t j0 = p.lo[b]; j0 < p.hi[b]; j0 += kSplitKeys) tasks.push_back({b, j0, std::min(p.hi[b], j0 + kSplitKeys)});
    keys = std::max(keys, p.hi[b] - p.lo[b]);
  }
  first[p.B] = static_cast<int64_t>(tasks.size());
  const int64_t stride = p.Hq * (2 + p.D);
  std::vector<float>& partials = split_call.partials;
  partials.resize(tasks.size() * stride);
  const int64_t work = p.B * p.Hq * keys * p.D;
  const int64_t threads = std::clamp<int64_t>(std::min<int64_t>(work / kMinWork, tasks.size()), 1, at::get_num_threads());
  std::atomic<int64_t> next{0};
  const int lanes = width();
  at::parallel_for(0, threads, 1,
                   [&](int64_t, int64_t) { split_tasks_at<T>(lanes, p, tasks, partials.data(), next); });
  std::vector<float>& o = split_call.o;
  o.resize(p.D);
  for (int64_t b = 0; b < p.B; ++b) {
    T* out = static_cast<T*>(p.out) + b * p.Hq * p.D;
    for (int64_t r = 0; r < p.Hq; ++r) {
      float M = -INFINITY;
      for (int64_t t = first[b]; t < first[b + 1]; ++t) M = std::max(M, partials[t * stride + r * (2 + p.D)]);
      const float shift = M == -INFINITY ? 0.f : M;  // all -inf: weights 0, l = 0 below
      float l = 0.f;
      std::fill(o.begin(), o.end(), 0.f);
      for (int64_t t = first[b]; t < first[b + 1]; ++t) {
        const float* part = partials.data() + t * stride + r * (2 + p.D);
        const float e = std::exp(part[0] - shift);
        l += e * part[1];
        for (int64_t d = 0; d < p.D; ++d) o[d] += e * part[2 + d];
      }
      // l = 0: no key visible (zeros), or only -inf scores (NaN, as softmax of all -inf)
      const float empty = first[b + 1] > first[b] ? NAN : 0.f;
      for (int64_t d = 0; d < p.D; ++d) o[d] = l == 0.f ? empty : o[d] / l;
      cpu::from_float(o.data(), out + r * p.D, p.D);
    }
  }
}

// ---------------------------------------------------------------- the ops

// q, k, v as the kernel reads them: the head dim contiguous (a copy only for a strided head dim).
at::Tensor unit_last(const at::Tensor& t) { return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous(); }

// An optional [B] integer tensor (any integer dtype) as int64 values clamped to [0, limit], or `fill`.
std::vector<int64_t> row_values(const char* op, const char* name, const std::optional<at::Tensor>& t,
                                const at::Tensor& q, int64_t limit, int64_t fill) {
  std::vector<int64_t> out(q.size(0), fill);
  if (!t.has_value()) return out;
  TORCH_CHECK(at::isIntegralType(t->scalar_type(), /*includeBool=*/false), op, ": ", name,
              " must be an integer tensor, got ", t->scalar_type());
  TORCH_CHECK(t->dim() == 1 && t->size(0) == q.size(0), op, ": ", name, " must have shape (", q.size(0),
              ",), got ", t->sizes());
  TORCH_CHECK(t->device() == q.device(), op, ": ", name, " is on ", t->device(), " but q is on ", q.device());
  AT_DISPATCH_INTEGRAL_TYPES(t->scalar_type(), "row_values", [&] {
    const scalar_t* data = t->const_data_ptr<scalar_t>();
    const int64_t stride = t->stride(0);
    for (size_t b = 0; b < out.size(); ++b) out[b] = std::clamp<int64_t>(data[b * stride], 0, limit);
  });
  return out;
}

// The checks shared by the ops: k and v of one shape [B, S, Hkv, D] (paged: pools [num_blocks, page, Hkv,
// D] shared by every row), q's dtype and device, Hq = G * Hkv.
void check_kv(const char* op, const at::Tensor& q, int64_t q_heads, const at::Tensor& k, const at::Tensor& v,
              const char* k_name, const char* v_name, bool paged = false) {
  check_float(op, "q", q);
  for (const auto& [name, t] : {std::pair{k_name, &k}, std::pair{v_name, &v}}) {
    TORCH_CHECK(t->device() == q.device(), op, ": ", name, " is on ", t->device(), " but q is on ", q.device());
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), op, ": ", name, " is ", t->scalar_type(), " but q is ",
                q.scalar_type());
  }
  TORCH_CHECK(k.dim() == 4, op, ": ", k_name, " must be ", paged ? "[num_blocks, block_size, H, D]" : "[B, S, H, D]",
              ", got shape ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), op, ": ", v_name, " has shape ", v.sizes(), " but ", k_name, " has ",
              k.sizes());
  TORCH_CHECK((paged || k.size(0) == q.size(0)) && k.size(3) == q.size(-1), op, ": ", k_name, " ", k.sizes(),
              paged ? " must share the head dim with q " : " must share batch and head dim with q ", q.sizes());
  TORCH_CHECK(!paged || k.size(1) > 0, op, ": ", k_name, " ", k.sizes(), " has blocks of 0 keys");
  TORCH_CHECK(k.size(2) > 0 && q_heads % k.size(2) == 0, op, ": query heads (", q_heads,
              ") must be a multiple of key/value heads (", k.size(2), ")");
}

// A paged cache's block table and key counts: block_tables [B, M] int32 (rows read with unit stride: a copy
// otherwise), seqlens clamped to [0, M * page]. Every block id a row reads (its first ceil(seqlens[b] /
// page) entries) must be one of the pool's; the entries after them are never read and may hold anything.
struct Pages {
  at::Tensor table;
  std::vector<int64_t> hi;
};

Pages check_pages(const char* op, const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& block_tables,
                  const at::Tensor& seqlens) {
  TORCH_CHECK(block_tables.scalar_type() == at::kInt, op, ": block_tables must be an int32 tensor, got ",
              block_tables.scalar_type());
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == q.size(0), op,
              ": block_tables must have shape (", q.size(0), ", max_blocks), got ", block_tables.sizes());
  TORCH_CHECK(block_tables.device() == q.device(), op, ": block_tables is on ", block_tables.device(),
              " but q is on ", q.device());
  Pages pages;
  pages.table = block_tables.size(1) <= 1 || block_tables.stride(1) == 1 ? block_tables : block_tables.contiguous();
  const int64_t page = k_pool.size(1), blocks = k_pool.size(0), M = pages.table.size(1);
  pages.hi = row_values(op, "seqlens", seqlens, q, M * page, 0);
  const int32_t* ids = pages.table.const_data_ptr<int32_t>();
  for (int64_t b = 0; b < q.size(0); ++b) {
    for (int64_t i = 0; i < (pages.hi[b] + page - 1) / page; ++i) {
      const int64_t id = ids[b * pages.table.stride(0) + i];
      TORCH_CHECK(id >= 0 && id < blocks, op, ": block_tables[", b, ", ", i, "] = ", id,
                  " is not a block of the pool (", blocks, " blocks), and row ", b, " reads it (seqlens ",
                  pages.hi[b], ", block size ", page, ")");
    }
  }
  return pages;
}

void set_pages(Problem& p, const Pages& pages, const at::Tensor& k_pool) {
  p.table = pages.table.const_data_ptr<int32_t>();
  p.table_stride = pages.table.stride(0);
  p.page = k_pool.size(1);
}

// Fills everything but the q pointer/strides, lo, hi, causal and the table; runs p into out (q's shape, contiguous).
at::Tensor& launch(Problem& p, const at::Tensor& q, const at::Tensor& k_in, const at::Tensor& v_in,
                   std::optional<double> scale, at::Tensor& out) {
  const at::Tensor k = unit_last(k_in), v = unit_last(v_in);
  if (out.numel() == 0) return out;
  p.k = k.const_data_ptr();
  p.v = v.const_data_ptr();
  p.out = out.mutable_data_ptr();
  p.Hkv = k.size(2);
  p.k_b = k.stride(0), p.k_j = k.stride(1), p.k_h = k.stride(2);
  p.v_b = v.stride(0), p.v_j = v.stride(1), p.v_h = v.stride(2);
  p.scale = static_cast<float>(scale.value_or(1.0 / std::sqrt(static_cast<double>(p.D))));
  p.queries = std::min(p.Sq, std::max<int64_t>(1, kQueryRows / p.group()));
  p.key_block = std::max<int64_t>(8, kBlockFloats / std::max<int64_t>(p.D, 1));
  dispatch_float(q.scalar_type(), [&](auto tag) {
    if (splits_apply(p)) run_splits<decltype(tag)>(p);
    else run<decltype(tag)>(p);
  });
  return out;
}

at::Tensor attention(const at::Tensor& q_in, const at::Tensor& k, const at::Tensor& v, bool causal,
                     std::optional<double> scale, const std::optional<at::Tensor>& kv_start) {
  constexpr const char* op = "fuselm::attention";
  check_float(op, "q", q_in);
  TORCH_CHECK(q_in.dim() == 4, op, ": q must be [B, S, H, D], got shape ", q_in.sizes());
  check_kv(op, q_in, q_in.size(2), k, v, "k", "v");
  const at::Tensor q = unit_last(q_in);
  const std::vector<int64_t> lo = row_values(op, "kv_start", kv_start, q, k.size(1), 0);
  const std::vector<int64_t> hi(q.size(0), k.size(1));
  Problem p{};
  p.q = q.const_data_ptr();
  p.B = q.size(0), p.Sq = q.size(1), p.Hq = q.size(2), p.D = q.size(3);
  p.q_b = q.stride(0), p.q_i = q.stride(1), p.q_h = q.stride(2);
  p.lo = lo.data(), p.hi = hi.data();
  p.causal = causal;
  at::Tensor out = at::empty(q.sizes(), q.options());
  return launch(p, q, k, v, scale, out);
}

at::Tensor& decode_attention_into(const at::Tensor& q_in, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& seqlens, std::optional<double> scale,
                                  const std::optional<at::Tensor>& kv_start, at::Tensor& out) {
  constexpr const char* op = "fuselm::decode_attention";
  check_float(op, "q", q_in);
  TORCH_CHECK(q_in.dim() == 3, op, ": q must be [B, H, D], got shape ", q_in.sizes());
  check_kv(op, q_in, q_in.size(1), k_cache, v_cache, "k_cache", "v_cache");
  const at::Tensor q = unit_last(q_in);
  const int64_t smax = k_cache.size(1);
  const std::vector<int64_t> hi = row_values(op, "seqlens", seqlens, q, smax, 0);
  const std::vector<int64_t> lo = row_values(op, "kv_start", kv_start, q, smax, 0);
  Problem p{};  // one query per row: prefill with Sq = 1, keys [kv_start, seqlens)
  p.q = q.const_data_ptr();
  p.B = q.size(0), p.Sq = 1, p.Hq = q.size(1), p.D = q.size(2);
  p.q_b = q.stride(0), p.q_i = 0, p.q_h = q.stride(1);
  p.lo = lo.data(), p.hi = hi.data();
  p.causal = false;
  check_out(op, "out", out, q_in.sizes(), q_in.scalar_type(), q_in);
  return launch(p, q, k_cache, v_cache, scale, out);
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& seqlens, std::optional<double> scale,
                            const std::optional<at::Tensor>& kv_start) {
  at::Tensor out = at::empty(q.sizes(), q.options());
  return decode_attention_into(q, k_cache, v_cache, seqlens, scale, kv_start, out);
}

at::Tensor& paged_decode_attention_into(const at::Tensor& q_in, const at::Tensor& k_pool, const at::Tensor& v_pool,
                                        const at::Tensor& block_tables, const at::Tensor& seqlens,
                                        std::optional<double> scale, at::Tensor& out) {
  constexpr const char* op = "fuselm::paged_decode_attention";
  check_float(op, "q", q_in);
  TORCH_CHECK(q_in.dim() == 3, op, ": q must be [B, H, D], got shape ", q_in.sizes());
  check_kv(op, q_in, q_in.size(1), k_pool, v_pool, "k_pool", "v_pool", /*paged=*/true);
  const at::Tensor q = unit_last(q_in);
  const Pages pages = check_pages(op, q, k_pool, block_tables, seqlens);
  const std::vector<int64_t> lo(q.size(0), 0);
  Problem p{};  // decode_attention's, keys [0, seqlens) read through the table
  p.q = q.const_data_ptr();
  p.B = q.size(0), p.Sq = 1, p.Hq = q.size(1), p.D = q.size(2);
  p.q_b = q.stride(0), p.q_i = 0, p.q_h = q.stride(1);
  p.lo = lo.data(), p.hi = pages.hi.data();
  p.causal = false;
  set_pages(p, pages, k_pool);
  check_out(op, "out", out, q_in.sizes(), q_in.scalar_type(), q_in);
  return launch(p, q, k_pool, v_pool, scale, out);
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                                  const at::Tensor& block_tables, const at::Tensor& seqlens,
                                  std::optional<double> scale) {
  at::Tensor out = at::empty(q.sizes(), q.options());
  return paged_decode_attention_into(q, k_pool, v_pool, block_tables, seqlens, scale, out);
}

at::Tensor paged_attention(const at::Tensor& q_in, const at::Tensor& k_pool, const at::Tensor& v_pool,
                           const at::Tensor& block_tables, const at::Tensor& seqlens, bool causal,
                           std::optional<double> scale) {
  constexpr const char* op = "fuselm::paged_attention";
  check_float(op, "q", q_in);
  TORCH_CHECK(q_in.dim() == 4, op, ": q must be [B, S, H, D], got shape ", q_in.sizes());
  check_kv(op, q_in, q_in.size(2), k_pool, v_pool, "k_pool", "v_pool", /*paged=*/true);
  const at::Tensor q = unit_last(q_in);
  const Pages pages = check_pages(op, q, k_pool, block_tables, seqlens);
  const std::vector<int64_t> lo(q.size(0), 0);
  Problem p{};  // attention's, row b's queries the last Sq of its seqlens[b] keys
  p.q = q.const_data_ptr();
  p.B = q.size(0), p.Sq = q.size(1), p.Hq = q.size(2), p.D = q.size(3);
  p.q_b = q.stride(0), p.q_i = q.stride(1), p.q_h = q.stride(2);
  p.lo = lo.data(), p.hi = pages.hi.data();
  p.causal = causal;
  set_pages(p, pages, k_pool);
  at::Tensor out = at::empty(q.sizes(), q.options());
  return launch(p, q, k_pool, v_pool, scale, out);
}

}  // namespace
}  // namespace fuselm

TORCH_LIBRARY_IMPL(fuselm, CPU, m) {
  m.impl("attention", &fuselm::attention);
  m.impl("decode_attention", &fuselm::decode_attention);
  m.impl("decode_attention.out", &fuselm::decode_attention_into);
  m.impl("paged_attention", &fuselm::paged_attention);
  m.impl("paged_decode_attention", &fuselm::paged_decode_attention);
  m.impl("paged_decode_attention.out", &fuselm::paged_decode_attention_into);
}
