// The fuselm operator library: schemas of torch.ops.fuselm.*. The CPU kernels
// register in norm_cpu.cpp / sampling_cpu.cpp / linear_cpu.cpp / attention_cpu.cpp, the CUDA kernels in
// norm_cuda.cu / sampling_cuda.cu, and the fake (shape) functions in Python
// (fuselm.native), so the ops also trace under torch.compile.
//
// Semantics are those of runtime/reference.py. Outputs are fresh contiguous
// tensors; no op mutates its inputs.
#include <torch/library.h>

TORCH_LIBRARY(fuselm, m) {
  // y = h * rsqrt(mean(h^2) + eps) * weight over the last dim, h = x.
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  // The same with h = x + residual (rounded to x.dtype); returns (y, h).
  m.def("rms_norm.residual(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  // y = (h - mean) * rsqrt(var + eps) * weight (+ bias).
  m.def("layer_norm(Tensor x, Tensor weight, Tensor? bias, float eps) -> Tensor");
  m.def("layer_norm.residual(Tensor x, Tensor residual, Tensor weight, Tensor? bias, float eps) -> (Tensor, Tensor)");
  // out= forms of the ops a CPU decode step runs, written into the given tensors (CPU only): the replayed
  // plan (plan_cpu.cpp) calls them with the tensors the recorded call returned, so it allocates and
  // copies nothing.
  m.def("rms_norm.out(Tensor x, Tensor weight, float eps, *, Tensor(a!) out) -> Tensor(a!)");
  m.def("rms_norm.residual_out(Tensor x, Tensor residual, Tensor weight, float eps, *, Tensor(a!) out, "
        "Tensor(b!) out_h) -> (Tensor(a!), Tensor(b!))");
  m.def("layer_norm.out(Tensor x, Tensor weight, Tensor? bias, float eps, *, Tensor(a!) out) -> Tensor(a!)");
  m.def("layer_norm.residual_out(Tensor x, Tensor residual, Tensor weight, Tensor? bias, float eps, *, "
        "Tensor(a!) out, Tensor(b!) out_h) -> (Tensor(a!), Tensor(b!))");
  // One token per row of logits [B, V] -> [B] int64. temperature, top_p, min_p: float32,
  // top_k: int64, each of shape () or [B]; seed: one int64 (the same seed gives the same tokens).
  m.def("sample(Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p, Tensor min_p, Tensor seed) -> Tensor");
  // y = x @ weight.T (+ bias): x [..., K], weight [N, K], bias [N], one dtype; float32 accumulation;
  // y in out_dtype (default x's). CPU only (linear_cpu.cpp), for decode's few rows of x.
  m.def("linear(Tensor x, Tensor weight, Tensor? bias=None, ScalarType? out_dtype=None) -> Tensor");
  // y = x @ w.T (+ bias) with w [n, K] in a GGUF block format `fmt` (runtime/quant.py's codes), stored as
  // runtime/quant.py's tiles (uint8 [ceil(n / 4), tile bytes]); x float, y in out_dtype (default x's).
  // CPU only (quant_cpu.cpp).
  m.def("qlinear(Tensor x, Tensor tiles, int fmt, int n, Tensor? bias=None, ScalarType? out_dtype=None) -> Tensor");
  m.def("qlinear.out(Tensor x, Tensor tiles, int fmt, int n, Tensor? bias=None, ScalarType? out_dtype=None, *, "
        "Tensor(a!) out) -> Tensor(a!)");
  // Rows `tokens` of such a weight [n, k], dequantized as runtime/reference.py does -> [*tokens.shape, k] dtype.
  m.def("qembedding(Tensor tokens, Tensor tiles, int fmt, int n, int k, ScalarType dtype) -> Tensor");
  // softmax(q k^T * scale) v with GQA: q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D] -> [B, Sq, Hq, D]; causal is
  // bottom-right aligned, kv_start [B] (any integer dtype) hides each row's first keys, scale None = D^-0.5.
  // CPU only (attention_cpu.cpp).
  m.def("attention(Tensor q, Tensor k, Tensor v, bool causal=True, float? scale=None, Tensor? kv_start=None) -> Tensor");
  // One query per row: q [B, Hq, D] over caches [B, Smax, Hkv, D], keys [kv_start[b], seqlens[b]) -> [B, Hq, D].
  // CPU only (attention_cpu.cpp).
  // Rotary embedding ("rotate half") of x [..., H, D] at positions [...] (int64) with cos/sin tables [P, D/2].
  m.def("rope(Tensor x, Tensor cos, Tensor sin, Tensor positions) -> Tensor");
  m.def("rope.out(Tensor x, Tensor cos, Tensor sin, Tensor positions, *, Tensor(a!) out) -> Tensor(a!)");
  // silu(x[..., :I]) * x[..., I:] for x [..., 2I]; GELU with the tanh approximation (GPT-2's).
  m.def("silu_mul(Tensor x) -> Tensor");
  m.def("silu_mul.out(Tensor x, *, Tensor(a!) out) -> Tensor(a!)");
  m.def("gelu_tanh(Tensor x) -> Tensor");
  m.def("gelu_tanh.out(Tensor x, *, Tensor(a!) out) -> Tensor(a!)");
  // k_cache[slots[t]] = k[t], v_cache[slots[t]] = v[t]: caches [num_slots, H, D], k/v [T, H, D], slots [T] int64.
  m.def("store_kv(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, Tensor slots) -> ()");
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor seqlens, float? scale=None, "
        "Tensor? kv_start=None) -> Tensor");
  m.def("decode_attention.out(Tensor q, Tensor k_cache, Tensor v_cache, Tensor seqlens, float? scale=None, "
        "Tensor? kv_start=None, *, Tensor(a!) out) -> Tensor(a!)");
  // Over a paged cache: pools [num_blocks, block_size, Hkv, D], block_tables [B, M] int32, seqlens [B] (any
  // integer dtype); row b's key j is pool[block_tables[b, j // block_size], j % block_size], j < seqlens[b].
  // paged_attention's q [B, Sq, Hq, D] are each row's last Sq positions (causal: bottom-right aligned per
  // row). CPU only (attention_cpu.cpp).
  m.def("paged_decode_attention(Tensor q, Tensor k_pool, Tensor v_pool, Tensor block_tables, Tensor seqlens, "
        "float? scale=None) -> Tensor");
  m.def("paged_decode_attention.out(Tensor q, Tensor k_pool, Tensor v_pool, Tensor block_tables, Tensor seqlens, "
        "float? scale=None, *, Tensor(a!) out) -> Tensor(a!)");
  m.def("paged_attention(Tensor q, Tensor k_pool, Tensor v_pool, Tensor block_tables, Tensor seqlens, "
        "bool causal=True, float? scale=None) -> Tensor");
}
