// CPU sampler: torch.ops.fuselm.sample on CPU tensors, without sorting.
//
// Per row of V logits (rows in parallel with at::parallel_for):
//   e_i = exp(l_i / t - max(l / t))                      one vectorized pass
//   top-k:  the k-th largest e (a k-heap for small k, nth_element otherwise)
//   top-p:  the cutoff c with mass(e > c) < top_p * Z_k <= mass(e >= c), found by a
//           mass-weighted quickselect (three-way partitions, expected O(V))
//   min-p:  e_i >= min_p  (the largest e is exactly 1)
//   draw:   inverse transform with the Philox uniform of (seed, row): the first
//           kept i whose running mass exceeds u * Z, in index order
// Thresholds act on e, so tokens of equal probability are kept together, as in
// runtime/reference.sampling_probs. Greedy rows (t == 0 or top_k == 1) return
// the argmax (NaN first, then the first maximum, like torch.argmax), and so do
// rows without a distribution (a NaN, +inf or only -inf), where the reference's
// multinomial raises: a batch is never lost to one bad row. Same rule as CUDA.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <queue>
#include <vector>

#include "checks.h"
#include "cpu_vec.h"
#include "philox.h"

namespace fuselm {
namespace {

constexpr int64_t kHeapMaxK = 1024;  // above this, nth_element beats a k-heap

struct RowParams {
  float temperature;
  int64_t top_k;
  float top_p;
  float min_p;
};

// torch.argmax over float32 x: the first NaN if any, else the first maximum.
int64_t argmax(const float* x, int64_t n) {
  if (cpu::any_nan(x, n)) return std::find_if(x, x + n, [](float v) { return v != v; }) - x;
  return std::find(x, x + n, cpu::max(x, n)) - x;
}

// The k-th largest of x[0, n), ties counted (1 < k < n). `scratch` holds n floats.
float kth_largest(const float* x, int64_t n, int64_t k, float* scratch) {
  if (k <= kHeapMaxK) {
    // Min-heap of the k largest so far; most elements fail the first comparison.
    std::priority_queue<float, std::vector<float>, std::greater<float>> heap(x, x + k);
    for (int64_t i = k; i < n; ++i) {
      if (x[i] > heap.top()) {
        heap.pop();
        heap.push(x[i]);
      }
    }
    return heap.top();
  }
  std::copy(x, x + n, scratch);
  std::nth_element(scratch, scratch + k - 1, scratch + n, std::greater<float>());
  return scratch[k - 1];
}

// The top-p cutoff among v[0, n) (reordered in place): the value c with
// mass(v > c) < target <= mass(v >= c), or 0 (keep all) when the total stays below target.
float mass_cutoff(float* v, int64_t n, double target) {
  int64_t lo = 0, hi = n;
  double above = 0.0;  // mass of the values greater than everything in [lo, hi)
  while (lo < hi) {
    float a = v[lo], b = v[lo + (hi - lo) / 2], c = v[hi - 1];
    const float pivot = std::max(std::min(a, b), std::min(std::max(a, b), c));  // median of three
    // Three-way partition: [lo, gt) > pivot, [gt, i) == pivot, [lt, hi) < pivot.
    int64_t gt = lo, i = lo, lt = hi;
    double mass_gt = 0.0, mass_eq = 0.0;
    while (i < lt) {
      const float x = v[i];
      if (x > pivot) {
        std::swap(v[gt++], v[i++]);
        mass_gt += x;
      } else if (x < pivot) {
        std::swap(v[i], v[--lt]);
      } else {
        ++i;
        mass_eq += x;
      }
    }
    if (above + mass_gt >= target) {
      hi = gt;  // the cutoff is among the larger values
    } else if (above + mass_gt + mass_eq >= target) {
      return pivot;
    } else {
      above += mass_gt + mass_eq;
      lo = lt;
    }
  }
  return 0.f;
}

// One row: `e` and `scratch` hold V floats each. Returns the sampled index.
template <typename T>
int64_t sample_row(const T* logits, int64_t vocab, int64_t row, const RowParams& p, uint64_t seed, float* e,
                   float* scratch) {
  cpu::to_float(logits, e, vocab);
  if (p.temperature == 0.f || p.top_k == 1 || cpu::any_nan(e, vocab)) return argmax(e, vocab);
  // Division by t > 0 rounds monotonically, so max(l / t) == max(l) / t exactly.
  const float m = cpu::max(e, vocab) / p.temperature;
  if (!std::isfinite(m)) return argmax(e, vocab);  // +inf, all -inf or overflow: no distribution
  cpu::divide(e, vocab, p.temperature);
  cpu::exp_shifted(e, vocab, m);  // e in [0, 1], the max exactly 1

  float threshold = 0.f;
  if (p.top_k > 1 && p.top_k < vocab) threshold = kth_largest(e, vocab, p.top_k, scratch);
  if (p.top_p < 1.f) {
    // Candidates: the top-k set; the cutoff is taken on its renormalized masses.
    int64_t n = 0;
    for (int64_t i = 0; i < vocab; ++i)
      if (e[i] >= threshold) scratch[n++] = e[i];
    const double z_k = cpu::sum(scratch, n);
    const double target = std::max(static_cast<double>(p.top_p) * z_k, std::numeric_limits<double>::min());
    threshold = std::max(threshold, mass_cutoff(scratch, n, target));  // top_p <= 0 keeps the max
  }
  threshold = std::max(threshold, std::min(p.min_p, 1.f));  // <= 1: the max (e == 1) always stays

  const double z = cpu::sum_at_least(e, vocab, threshold);
  const double target = static_cast<double>(philox_uniform(seed, static_cast<uint64_t>(row))) * z;
  double run = 0.0;
  int64_t last = -1;
  for (int64_t i = 0; i < vocab; ++i) {
    if (e[i] >= threshold && e[i] > 0.f) {
      run += e[i];
      if (run > target) return i;
      last = i;
    }
  }
  return last;  // rounding left the running mass at or below u * Z: the last kept token
}

at::Tensor sample(const at::Tensor& logits_in, const at::Tensor& temperature, const at::Tensor& top_k,
                  const at::Tensor& top_p, const at::Tensor& min_p, const at::Tensor& seed) {
  check_sample_inputs(logits_in, temperature, top_k, top_p, min_p, seed);
  const at::Tensor logits = logits_in.stride(1) == 1 ? logits_in : logits_in.contiguous();
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  at::Tensor out = at::empty({rows}, logits.options().dtype(at::kLong));
  const uint64_t seed_value = static_cast<uint64_t>(seed.reshape({}).item<int64_t>());
  const float* t = temperature.const_data_ptr<float>();
  const int64_t* k = top_k.const_data_ptr<int64_t>();
  const float* tp = top_p.const_data_ptr<float>();
  const float* mp = min_p.const_data_ptr<float>();
  const int64_t ts = param_stride(temperature), ks = param_stride(top_k), tps = param_stride(top_p),
                mps = param_stride(min_p);
  int64_t* out_data = out.mutable_data_ptr<int64_t>();
  dispatch_float(logits.scalar_type(), [&](auto tag) {
    const auto* l = logits.const_data_ptr<decltype(tag)>();
    const int64_t stride = logits.stride(0);
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> e(vocab), scratch(vocab);  // [V] float32 scratch per task
      for (int64_t row = begin; row < end; ++row) {
        const RowParams p{t[row * ts], k[row * ks], tp[row * tps], mp[row * mps]};
        out_data[row] = sample_row(l + row * stride, vocab, row, p, seed_value, e.data(), scratch.data());
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace fuselm

TORCH_LIBRARY_IMPL(fuselm, CPU, m) { m.impl("sample", &fuselm::sample); }
