// C entry points to the emulated CUDA kernels (cuda_emulator.h), called from
// tests/test_native.py through ctypes with the tensors' data pointers.
// dtype: 0 float32, 1 float16, 2 bfloat16.
#include "norm.cuh"
#include "sampling.cuh"

using namespace fuselm;

extern "C" void emulated_norm(int dtype, int float_weight, NormArgs args) {
  if (dtype == 0) launch_norm<float, float>(args, nullptr);
  if (dtype == 1 && !float_weight) launch_norm<__half, __half>(args, nullptr);
  if (dtype == 1 && float_weight) launch_norm<__half, float>(args, nullptr);
  if (dtype == 2 && !float_weight) launch_norm<__nv_bfloat16, __nv_bfloat16>(args, nullptr);
  if (dtype == 2 && float_weight) launch_norm<__nv_bfloat16, float>(args, nullptr);
}

extern "C" void emulated_sample(int dtype, SampleArgs args) {
  if (dtype == 0) launch_sample<float>(args, nullptr);
  if (dtype == 1) launch_sample<__half>(args, nullptr);
  if (dtype == 2) launch_sample<__nv_bfloat16>(args, nullptr);
}
