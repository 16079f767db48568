// The four norm operators (rms_norm, layer_norm and their .residual overloads)
// over one device's `norm` function, and their registration for that device:
// norm_cpu.cpp and norm_cuda.cu differ only in `norm`.
#pragma once
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace fuselm {

// (y, h) of rms (true) or layer norm named `op`; h is undefined without a residual.
using NormFn = std::tuple<at::Tensor, at::Tensor> (*)(const char* op, bool rms, const at::Tensor& x,
                                                     const std::optional<at::Tensor>& residual,
                                                     const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                                     double eps);

template <NormFn norm>
void register_norms(torch::Library& m) {
  m.impl("rms_norm", [](const at::Tensor& x, const at::Tensor& weight, double eps) {
    return std::get<0>(norm("fuselm::rms_norm", true, x, std::nullopt, weight, std::nullopt, eps));
  });
  m.impl("rms_norm.residual", [](const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                                 double eps) {
    return norm("fuselm::rms_norm", true, x, residual, weight, std::nullopt, eps);
  });
  m.impl("layer_norm", [](const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          double eps) {
    return std::get<0>(norm("fuselm::layer_norm", false, x, std::nullopt, weight, bias, eps));
  });
  m.impl("layer_norm.residual", [](const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias, double eps) {
    return norm("fuselm::layer_norm", false, x, residual, weight, bias, eps);
  });
}

}  // namespace fuselm
