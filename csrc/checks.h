// Argument checks and 2-D row views shared by the CPU and CUDA implementations
// of the fuselm ops (schemas in library.cpp). Errors name the op and the
// argument; fuselm.ops checks the values that would need a host sync to read.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

namespace fuselm {

inline void check_float(const char* op, const char* name, const at::Tensor& t) {
  const auto d = t.scalar_type();
  TORCH_CHECK(d == at::kFloat || d == at::kHalf || d == at::kBFloat16, op, ": ", name,
              " must be float32, float16 or bfloat16, got ", d);
}

inline void check_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device());
}

// A weight or bias: a float tensor of shape [cols] on x's device (any float dtype: kernels read it as float32).
inline at::Tensor norm_param(const char* op, const char* name, const at::Tensor& p, const at::Tensor& x) {
  check_float(op, name, p);
  check_device(op, name, p, x);
  TORCH_CHECK(p.dim() == 1 && p.size(0) == x.size(-1), op, ": ", name, " must have shape (", x.size(-1),
              ",), got ", p.sizes());
  return p.contiguous();
}

// Calls fn(T{}) with T the C++ type of a float32/float16/bfloat16 dtype (checked before).
template <typename Fn>
void dispatch_float(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: fn(float{}); break;
    case at::kHalf: fn(c10::Half{}); break;
    case at::kBFloat16: fn(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, "fuselm: unsupported dtype ", dtype);
  }
}

// y[i] = v rounded to `dtype` (float32, float16 or bfloat16, checked before): kernels whose output
// dtype differs from their input's (float32 logits out of bf16 activations) store through this.
inline void store_as(void* y, at::ScalarType dtype, int64_t i, float v) {
  switch (dtype) {
    case at::kHalf: static_cast<c10::Half*>(y)[i] = static_cast<c10::Half>(v); return;
    case at::kBFloat16: static_cast<c10::BFloat16*>(y)[i] = static_cast<c10::BFloat16>(v); return;
    default: static_cast<float*>(y)[i] = v;
  }
}

inline at::ScalarType check_out_dtype(const char* op, std::optional<at::ScalarType> out, const at::Tensor& x) {
  const at::ScalarType d = out.value_or(x.scalar_type());
  TORCH_CHECK(d == at::kFloat || d == at::kHalf || d == at::kBFloat16, op,
              ": out_dtype must be float32, float16 or bfloat16, got ", d);
  return d;
}

// An out= argument: what the op would return (sizes, dtype, x's device), contiguous. The plan that
// replays a decode step (plan_cpu.cpp) passes the tensors a recorded call returned.
inline void check_out(const char* op, const char* name, const at::Tensor& out, at::IntArrayRef sizes,
                      at::ScalarType dtype, const at::Tensor& x) {
  TORCH_CHECK(out.sizes() == sizes && out.scalar_type() == dtype && out.device() == x.device() && out.is_contiguous(),
              op, ": ", name, " must be a contiguous ", dtype, " tensor of shape ", sizes, " on ", x.device(), ", got ",
              out.scalar_type(), " ", out.sizes(), out.is_contiguous() ? "" : " (not contiguous)", " on ", out.device());
}

// [..., cols] -> [rows, cols] with unit column stride: a view when the layout allows, else a copy.
inline at::Tensor as_rows(const at::Tensor& t, int64_t cols) {
  at::Tensor rows = t.reshape({-1, cols});
  return rows.stride(1) == 1 ? rows : rows.contiguous();
}

// The inputs of rms_norm / layer_norm, checked; x and residual viewed as [rows, cols].
struct NormInputs {
  at::Tensor x, residual, weight, bias;  // residual and bias undefined when absent
  int64_t rows, cols;
};

inline NormInputs norm_inputs(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& residual,
                              const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  check_float(op, "x", x);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, op, ": x must have a non-empty last dim, got shape ", x.sizes());
  const int64_t cols = x.size(-1);
  NormInputs in;
  in.cols = cols;
  in.rows = x.numel() / cols;
  in.x = as_rows(x, cols);
  in.weight = norm_param(op, "weight", weight, x);
  if (bias.has_value()) in.bias = norm_param(op, "bias", *bias, x);
  if (residual.has_value()) {
    check_device(op, "residual", *residual, x);
    TORCH_CHECK(residual->scalar_type() == x.scalar_type(), op, ": residual is ", residual->scalar_type(),
                " but x is ", x.scalar_type());
    TORCH_CHECK(residual->sizes() == x.sizes(), op, ": residual has shape ", residual->sizes(), " but x has ",
                x.sizes());
    in.residual = as_rows(*residual, cols);
  }
  return in;
}

// A per-row sampling parameter: a 0-dim (shared) or [rows] tensor of `dtype` on the logits' device.
inline void check_param(const char* name, const at::Tensor& t, const at::Tensor& logits, at::ScalarType dtype) {
  TORCH_CHECK(t.scalar_type() == dtype, "fuselm::sample: ", name, " must be a ", dtype, " tensor, got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == logits.device(), "fuselm::sample: ", name, " is on ", t.device(),
              " but logits are on ", logits.device());
  TORCH_CHECK(t.dim() == 0 || (t.dim() == 1 && t.size(0) == logits.size(0)), "fuselm::sample: ", name,
              " must have shape () or (", logits.size(0), ",), got ", t.sizes());
}

// Element stride between rows of a parameter: 0 shares one value between all rows.
inline int64_t param_stride(const at::Tensor& t) { return t.dim() == 0 ? 0 : t.stride(0); }

inline void check_sample_inputs(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k,
                                const at::Tensor& top_p, const at::Tensor& min_p, const at::Tensor& seed) {
  check_float("fuselm::sample", "logits", logits);
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0, "fuselm::sample: logits must be [B, V], got shape ",
              logits.sizes());
  check_param("temperature", temperature, logits, at::kFloat);
  check_param("top_k", top_k, logits, at::kLong);
  check_param("top_p", top_p, logits, at::kFloat);
  check_param("min_p", min_p, logits, at::kFloat);
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 1 && seed.device() == logits.device(),
              "fuselm::sample: seed must be a one-element int64 tensor on ", logits.device(), ", got ",
              seed.scalar_type(), " of shape ", seed.sizes(), " on ", seed.device());
}

}  // namespace fuselm
