// CUDA RMSNorm / LayerNorm glue: checks (checks.h), the current stream and
// device, dtype dispatch, and a launch check after the kernel (norm.cuh).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <tuple>

#include "checks.h"
#include "norm_ops.h"
#include "cuda_glue.h"
#include "norm.cuh"

namespace fuselm {
namespace {

std::tuple<at::Tensor, at::Tensor> norm(const char* op, bool rms, const at::Tensor& x,
                                        const std::optional<at::Tensor>& residual, const at::Tensor& weight,
                                        const std::optional<at::Tensor>& bias, double eps) {
  const NormInputs in = norm_inputs(op, x, residual, weight, bias);
  TORCH_CHECK(in.rows <= std::numeric_limits<int32_t>::max(), op, ": at most 2^31 - 1 rows, got ", in.rows);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty(x.sizes(), x.options());
  at::Tensor h = residual.has_value() ? at::empty(x.sizes(), x.options()) : at::Tensor();
  NormArgs a;
  a.x = in.x.const_data_ptr();
  a.x_row_stride = in.x.stride(0);
  a.residual = in.residual.defined() ? in.residual.const_data_ptr() : nullptr;
  a.residual_row_stride = in.residual.defined() ? in.residual.stride(0) : 0;
  // The kernels read weight and bias as x's dtype or float32 (both of the same type).
  const at::ScalarType w_type =
      in.weight.scalar_type() == x.scalar_type() && (!in.bias.defined() || in.bias.scalar_type() == x.scalar_type())
          ? x.scalar_type()
          : at::kFloat;
  const at::Tensor weight_w = in.weight.to(w_type);
  const at::Tensor bias_w = in.bias.defined() ? in.bias.to(w_type) : at::Tensor();
  a.weight = weight_w.const_data_ptr();
  a.bias = bias_w.defined() ? bias_w.const_data_ptr() : nullptr;
  a.y = y.mutable_data_ptr();
  a.h = h.defined() ? h.mutable_data_ptr() : nullptr;
  a.rows = in.rows;
  a.cols = in.cols;
  a.eps = static_cast<float>(eps);
  a.rms = rms;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index());
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = typename CudaType<decltype(tag)>::type;
    if (w_type == x.scalar_type())
      launch_norm<T, T>(a, stream);
    else
      launch_norm<T, float>(a, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, h};
}

}  // namespace
}  // namespace fuselm

TORCH_LIBRARY_IMPL(fuselm, CUDA, m) { fuselm::register_norms<fuselm::norm>(m); }
