// CUDA sampler glue: checks (checks.h), the current stream and device, dtype
// dispatch, and a launch check after the kernel (sampling.cuh). The seed and
// the parameters stay on the device, so nothing syncs with the host.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "checks.h"
#include "cuda_glue.h"
#include "sampling.cuh"

namespace fuselm {
namespace {

at::Tensor sample(const at::Tensor& logits_in, const at::Tensor& temperature, const at::Tensor& top_k,
                  const at::Tensor& top_p, const at::Tensor& min_p, const at::Tensor& seed) {
  check_sample_inputs(logits_in, temperature, top_k, top_p, min_p, seed);
  TORCH_CHECK(logits_in.size(0) <= std::numeric_limits<int32_t>::max(),
              "fuselm::sample: at most 2^31 - 1 rows, got ", logits_in.size(0));
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = logits_in.stride(1) == 1 ? logits_in : logits_in.contiguous();
  at::Tensor out = at::empty({logits.size(0)}, logits.options().dtype(at::kLong));
  SampleArgs a;
  a.logits = logits.const_data_ptr();
  a.row_stride = logits.stride(0);
  a.rows = logits.size(0);
  a.vocab = logits.size(1);
  a.temperature = temperature.const_data_ptr<float>();
  a.temperature_stride = param_stride(temperature);
  a.top_k = top_k.const_data_ptr<int64_t>();
  a.top_k_stride = param_stride(top_k);
  a.top_p = top_p.const_data_ptr<float>();
  a.top_p_stride = param_stride(top_p);
  a.min_p = min_p.const_data_ptr<float>();
  a.min_p_stride = param_stride(min_p);
  a.seed = seed.const_data_ptr<int64_t>();
  a.out = out.mutable_data_ptr<int64_t>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(logits.device().index());
  dispatch_float(logits.scalar_type(), [&](auto tag) {
    launch_sample<typename CudaType<decltype(tag)>::type>(a, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace fuselm

TORCH_LIBRARY_IMPL(fuselm, CUDA, m) { m.impl("sample", &fuselm::sample); }
