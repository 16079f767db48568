// CPU pointwise ops of a transformer block: torch.ops.fuselm.rope, silu_mul, gelu_tanh.
// Formulas as in runtime/reference.py, computed in float32 and rounded once to x's dtype.
//
//   rope:      x [..., H, D], position p of each leading index: for i < D/2, with c = cos[p, i],
//              s = sin[p, i] (tables [P, D/2] float32; "rotate half": dim i pairs with i + D/2)
//                y_i = x_i c - x_{i+D/2} s      y_{i+D/2} = x_{i+D/2} c + x_i s
//   silu_mul:  x [..., 2I] -> y [..., I], y_j = silu(x_j) * x_{I+j}, silu(a) = a / (1 + e^-a)
//   gelu_tanh: y = x / 2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
// Bytes: one read of x and one write of y; at decode sizes these run in microseconds, and exist so
// the decode step is all native operators (runtime/graphs.py replays it without Python).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "checks.h"
#include "cpu_clones.h"
#include "cpu_vec.h"

namespace fuselm {
namespace {

// Rows of `row_elems` elements per parallel task: at least ~32k elements each.
int64_t grain(int64_t row_elems) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, row_elems)); }

template <typename T>
void rope_rows(const T* x, int64_t ldx_row, int64_t ldx_head, const float* cos, const float* sin,
                      const int64_t* pos, int64_t rows, int64_t H, int64_t D, T* y) {
  const int64_t half = D / 2;
  for (int64_t r = 0; r < rows; ++r) {
    const float* c = cos + pos[r] * half;
    const float* s = sin + pos[r] * half;
    for (int64_t h = 0; h < H; ++h) {
      const T* xr = x + r * ldx_row + h * ldx_head;
      T* yr = y + (r * H + h) * D;
      for (int64_t i = 0; i < half; ++i) {
        const float a = static_cast<float>(xr[i]), b = static_cast<float>(xr[i + half]);
        yr[i] = static_cast<T>(a * c[i] - b * s[i]);
        yr[i + half] = static_cast<T>(b * c[i] + a * s[i]);
      }
    }
  }
}

at::Tensor& rope_into(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& positions,
                      at::Tensor& y) {
  constexpr const char* op = "fuselm::rope";
  check_float(op, "x", x);
  TORCH_CHECK(x.device().is_cpu(), op, ": runs on the CPU only");
  TORCH_CHECK(x.dim() >= 3 && x.size(-1) % 2 == 0, op, ": x must be [..., H, D] with D even, got ", x.sizes());
  const int64_t H = x.size(-2), D = x.size(-1);
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.sizes() == x.sizes().slice(0, x.dim() - 2), op,
              ": positions must be int64 of x's leading shape ", x.sizes().slice(0, x.dim() - 2), ", got ",
              positions.scalar_type(), " ", positions.sizes());
  for (const auto* t : {&cos, &sin})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 2 && t->size(1) == D / 2 && t->is_contiguous(), op,
                ": cos and sin must be contiguous float32 [positions, ", D / 2, "], got ", t->scalar_type(), " ",
                t->sizes());
  // rows = the leading dims flattened; each row's heads at a fixed stride with a contiguous head dim
  const at::Tensor xs = x.stride(-1) == 1 ? x : x.contiguous();
  const at::Tensor x3 = xs.reshape({-1, H, D});
  const at::Tensor pos = positions.reshape({-1}).contiguous();
  const int64_t rows = x3.size(0), P = cos.size(0);
  const int64_t* p = pos.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r)
    TORCH_CHECK(p[r] >= 0 && p[r] < P, op, ": position ", p[r], " is outside the tables [0, ", P, ")");
  check_out(op, "out", y, x.sizes(), x.scalar_type(), x);
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    at::parallel_for(0, rows, grain(H * D), [&](int64_t r0, int64_t r1) {
      rope_rows<T>(x3.const_data_ptr<T>() + r0 * x3.stride(0), x3.stride(0), x3.stride(1),
                   cos.const_data_ptr<float>(), sin.const_data_ptr<float>(), p + r0, r1 - r0, H, D,
                   y.mutable_data_ptr<T>() + r0 * H * D);
    });
  });
  return y;
}

at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& positions) {
  at::Tensor y = at::empty(x.sizes(), x.options());
  return rope_into(x, cos, sin, positions, y);
}

// Rows as float32 (converted through a per-task buffer unless already float32), then `fn` on them.
template <typename T, typename Fn>
void float_rows(const T* x, int64_t ldx, int64_t cols, T* y, int64_t ldy, int64_t rows, int64_t out_cols,
                const Fn& fn) {
  std::vector<float> in(std::is_same_v<T, float> ? 0 : cols), out(std::is_same_v<T, float> ? 0 : out_cols);
  for (int64_t r = 0; r < rows; ++r) {
    if constexpr (std::is_same_v<T, float>) {
      fn(x + r * ldx, y + r * ldy);
    } else {
      cpu::to_float(x + r * ldx, in.data(), cols);
      fn(in.data(), out.data());
      cpu::from_float(out.data(), y + r * ldy, out_cols);
    }
  }
}

at::Tensor& silu_mul_into(const at::Tensor& x, at::Tensor& y) {
  constexpr const char* op = "fuselm::silu_mul";
  check_float(op, "x", x);
  TORCH_CHECK(x.device().is_cpu(), op, ": runs on the CPU only");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) % 2 == 0, op, ": x must be [..., 2I], got ", x.sizes());
  const int64_t I = x.size(-1) / 2;
  const at::Tensor x2 = as_rows(x, 2 * I);
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
  sizes.back() = I;
  check_out(op, "out", y, sizes, x.scalar_type(), x);
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    at::parallel_for(0, x2.size(0), grain(2 * I), [&](int64_t r0, int64_t r1) {
      float_rows(x2.const_data_ptr<T>() + r0 * x2.stride(0), x2.stride(0), 2 * I, y.mutable_data_ptr<T>() + r0 * I,
                 I, r1 - r0, I, [&](const float* in, float* out) { cpu::silu_mul(in, in + I, out, I); });
    });
  });
  return y;
}

at::Tensor silu_mul(const at::Tensor& x) {
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
  if (!sizes.empty()) sizes.back() /= 2;
  at::Tensor y = at::empty(sizes, x.options());
  return silu_mul_into(x, y);
}

at::Tensor& gelu_tanh_into(const at::Tensor& x, at::Tensor& y) {
  constexpr const char* op = "fuselm::gelu_tanh";
  check_float(op, "x", x);
  TORCH_CHECK(x.device().is_cpu(), op, ": runs on the CPU only");
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dim");
  const int64_t cols = std::max<int64_t>(1, x.size(-1));
  const at::Tensor x2 = as_rows(x, cols);
  check_out(op, "out", y, x.sizes(), x.scalar_type(), x);
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    at::parallel_for(0, x2.size(0), grain(cols), [&](int64_t r0, int64_t r1) {
      float_rows(x2.const_data_ptr<T>() + r0 * x2.stride(0), x2.stride(0), cols,
                 y.mutable_data_ptr<T>() + r0 * cols, cols, r1 - r0, cols,
                 [&](const float* in, float* out) { cpu::gelu_tanh(in, out, cols); });
    });
  });
  return y;
}

at::Tensor gelu_tanh(const at::Tensor& x) {
  at::Tensor y = at::empty(x.sizes(), x.options());
  return gelu_tanh_into(x, y);
}

}  // namespace
}  // namespace fuselm

TORCH_LIBRARY_IMPL(fuselm, CPU, m) {
  m.impl("rope", &fuselm::rope);
  m.impl("rope.out", &fuselm::rope_into);
  m.impl("silu_mul", &fuselm::silu_mul);
  m.impl("silu_mul.out", &fuselm::silu_mul_into);
  m.impl("gelu_tanh", &fuselm::gelu_tanh);
  m.impl("gelu_tanh.out", &fuselm::gelu_tanh_into);
}
