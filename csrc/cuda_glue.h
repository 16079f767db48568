// Torch-side helpers for the CUDA glue (norm_cuda.cu, sampling_cuda.cu): the
// CUDA element type of each torch dtype. The kernels (.cuh) never see torch.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace fuselm {

// at::Half / at::BFloat16 share the bit layout of __half / __nv_bfloat16.
template <typename T>
struct CudaType {
  using type = T;
};
template <>
struct CudaType<c10::Half> {
  using type = __half;
};
template <>
struct CudaType<c10::BFloat16> {
  using type = __nv_bfloat16;
};

}  // namespace fuselm
