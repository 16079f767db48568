// CPU KV-cache write: torch.ops.fuselm.store_kv(k_cache, v_cache, k, v, slots), as runtime/reference.py:
//   k_cache[slots[t]] = k[t], v_cache[slots[t]] = v[t]     caches [num_slots, H, D], k/v [T, H, D]
// A slot is a row of the cache (the static cache's row b, position p is slot b * Smax + p; a paged
// cache's block n, offset o is n * block_size + o). Bytes: 2 * T * H * D * e read and written.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstring>

#include "checks.h"

namespace fuselm {
namespace {

void store_kv(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& slots) {
  constexpr const char* op = "fuselm::store_kv";
  TORCH_CHECK(slots.device().is_cpu() && slots.scalar_type() == at::kLong && slots.dim() == 1, op,
              ": slots must be a 1-D int64 CPU tensor, got ", slots.scalar_type(), " ", slots.sizes());
  const int64_t T = slots.size(0);
  const at::Tensor s = slots.contiguous();
  const int64_t* slot = s.const_data_ptr<int64_t>();
  for (const auto& [cache, x, name] : {std::tuple{&k_cache, &k, "k"}, std::tuple{&v_cache, &v, "v"}}) {
    TORCH_CHECK(cache->device().is_cpu() && cache->dim() == 3 && cache->is_contiguous(), op, ": ", name,
                "_cache must be a contiguous CPU tensor [num_slots, H, D], got ", cache->sizes());
    TORCH_CHECK(x->scalar_type() == cache->scalar_type() && x->dim() == 3 && x->size(0) == T &&
                    x->size(1) == cache->size(1) && x->size(2) == cache->size(2), op, ": ", name, " must be ",
                cache->scalar_type(), " [", T, ", ", cache->size(1), ", ", cache->size(2), "], got ",
                x->scalar_type(), " ", x->sizes());
    const int64_t H = cache->size(1), D = cache->size(2), num = cache->size(0);
    const at::Tensor xs = x->stride(2) == 1 ? *x : x->contiguous();
    const int64_t e = cache->element_size();
    const char* src = static_cast<const char*>(xs.const_data_ptr());
    char* dst = static_cast<char*>(cache->data_ptr());
    for (int64_t t = 0; t < T; ++t) {
      TORCH_CHECK(slot[t] >= 0 && slot[t] < num, op, ": slot ", slot[t], " is outside the cache [0, ", num, ")");
      for (int64_t h = 0; h < H; ++h)
        std::memcpy(dst + ((slot[t] * H + h) * D) * e, src + (t * xs.stride(0) + h * xs.stride(1)) * e, D * e);
    }
  }
}

}  // namespace
}  // namespace fuselm

TORCH_LIBRARY_IMPL(fuselm, CPU, m) { m.impl("store_kv", &fuselm::store_kv); }
