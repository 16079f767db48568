// CPU RMSNorm / LayerNorm (+ fused residual add): torch.ops.fuselm.rms_norm
// and layer_norm on CPU tensors. Formulas as in norm.cuh and runtime/reference.py.
//
// Rows are split over threads with at::parallel_for; each row is converted to
// float32 once, its statistics accumulated in float64 (vectorized across
// lanes), and written back in one pass: one read of x (and residual), one
// write of y (and h), where the unfused reference makes about six passes.
// A row's arithmetic does not depend on the other rows (batch invariant).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "norm_ops.h"
#include "cpu_vec.h"

namespace fuselm {
namespace {

// Rows per parallel task: at least ~32k elements, so small inputs stay on one thread.
int64_t grain(int64_t cols) { return std::max<int64_t>(1, 32768 / cols); }

// Float32 buffers of a thread (weight, bias, a row, a second row), kept across calls: decode calls a
// norm twice per layer per token on one row, and four allocations cost more than the row.
struct Buffers {
  std::vector<float> w, b, buf, tmp;
};
thread_local Buffers buffers;

template <typename T>
void norm_rows(const NormInputs& in, bool rms, double eps, at::Tensor& y, at::Tensor& h) {
  const int64_t cols = in.cols;
  std::vector<float>& w = buffers.w;
  std::vector<float>& b = buffers.b;
  w.resize(cols);
  b.resize(in.bias.defined() ? cols : 0);
  dispatch_float(in.weight.scalar_type(), [&](auto tag) {
    cpu::to_float(in.weight.const_data_ptr<decltype(tag)>(), w.data(), cols);
  });
  if (in.bias.defined()) {
    dispatch_float(in.bias.scalar_type(), [&](auto tag) {
      cpu::to_float(in.bias.const_data_ptr<decltype(tag)>(), b.data(), cols);
    });
  }
  const float* bias = in.bias.defined() ? b.data() : nullptr;
  const T* x = in.x.const_data_ptr<T>();
  const T* r = in.residual.defined() ? in.residual.const_data_ptr<T>() : nullptr;
  const int64_t x_stride = in.x.stride(0), r_stride = r ? in.residual.stride(0) : 0;
  T* y_data = y.mutable_data_ptr<T>();
  T* h_data = r ? h.mutable_data_ptr<T>() : nullptr;

  at::parallel_for(0, in.rows, grain(cols), [&](int64_t begin, int64_t end) {
    constexpr bool kFloat = std::is_same_v<T, float>;  // float32 rows are read and written in place
    std::vector<float>& buf = buffers.buf;              // [cols] float32 scratch of this thread
    std::vector<float>& tmp = buffers.tmp;
    buf.resize(cols);
    tmp.resize(cols);
    for (int64_t row = begin; row < end; ++row) {
      const T* x_row = x + row * x_stride;
      T* y_row = y_data + row * cols;
      const float* hf = buf.data();  // h as float32
      if (r) {
        // h = x + residual rounded to T, and y computed from the rounded h.
        T* h_row = h_data + row * cols;
        cpu::to_float(x_row, buf.data(), cols);
        cpu::to_float(r + row * r_stride, tmp.data(), cols);
        cpu::add(buf.data(), tmp.data(), cols);
        cpu::from_float(buf.data(), h_row, cols);
        if (!kFloat) cpu::to_float(h_row, buf.data(), cols);
      } else if constexpr (kFloat) {
        hf = x_row;
      } else {
        cpu::to_float(x_row, buf.data(), cols);
      }
      float mean = 0.f;
      double var;
      if (rms) {
        var = cpu::sum_squares(hf, cols) / cols;
      } else {
        mean = static_cast<float>(cpu::sum(hf, cols) / cols);
        var = cpu::sum_squared_deviations(hf, cols, mean) / cols;  // two-pass: no cancellation
      }
      const float rstd = static_cast<float>(1.0 / std::sqrt(var + eps));
      if constexpr (kFloat) {
        cpu::normalize(hf, w.data(), bias, mean, rstd, y_row, cols);
      } else {
        cpu::normalize(hf, w.data(), bias, mean, rstd, tmp.data(), cols);
        cpu::from_float(tmp.data(), y_row, cols);
      }
    }
  });
}

// Into y (and h with a residual): contiguous tensors of x's shape and dtype.
void norm_into(const char* op, bool rms, const at::Tensor& x, const std::optional<at::Tensor>& residual,
               const at::Tensor& weight, const std::optional<at::Tensor>& bias, double eps, at::Tensor& y,
               at::Tensor& h) {
  const NormInputs in = norm_inputs(op, x, residual, weight, bias);
  check_out(op, "out", y, x.sizes(), x.scalar_type(), x);
  if (residual.has_value()) check_out(op, "out_h", h, x.sizes(), x.scalar_type(), x);
  dispatch_float(x.scalar_type(), [&](auto tag) { norm_rows<decltype(tag)>(in, rms, eps, y, h); });
}

std::tuple<at::Tensor, at::Tensor> norm(const char* op, bool rms, const at::Tensor& x,
                                        const std::optional<at::Tensor>& residual, const at::Tensor& weight,
                                        const std::optional<at::Tensor>& bias, double eps) {
  at::Tensor y = at::empty(x.sizes(), x.options());
  at::Tensor h = residual.has_value() ? at::empty(x.sizes(), x.options()) : at::Tensor();
  norm_into(op, rms, x, residual, weight, bias, eps, y, h);
  return {y, h};
}

}  // namespace
}  // namespace fuselm

TORCH_LIBRARY_IMPL(fuselm, CPU, m) {
  using fuselm::norm_into;
  fuselm::register_norms<fuselm::norm>(m);
  m.impl("rms_norm.out", [](const at::Tensor& x, const at::Tensor& weight, double eps, at::Tensor& out) -> at::Tensor& {
    at::Tensor none;
    norm_into("fuselm::rms_norm", true, x, std::nullopt, weight, std::nullopt, eps, out, none);
    return out;
  });
  m.impl("rms_norm.residual_out", [](const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                                     double eps, at::Tensor& out, at::Tensor& out_h) {
    norm_into("fuselm::rms_norm", true, x, residual, weight, std::nullopt, eps, out, out_h);
    return std::tuple<at::Tensor&, at::Tensor&>(out, out_h);
  });
  m.impl("layer_norm.out", [](const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              double eps, at::Tensor& out) -> at::Tensor& {
    at::Tensor none;
    norm_into("fuselm::layer_norm", false, x, std::nullopt, weight, bias, eps, out, none);
    return out;
  });
  m.impl("layer_norm.residual_out", [](const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                                       const std::optional<at::Tensor>& bias, double eps, at::Tensor& out,
                                       at::Tensor& out_h) {
    norm_into("fuselm::layer_norm", false, x, residual, weight, bias, eps, out, out_h);
    return std::tuple<at::Tensor&, at::Tensor&>(out, out_h);
  });
}
