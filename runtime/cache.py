"""The KV cache: static, preallocated once per generate call.

k and v are [layers, B, Smax, Hkv, D] in the model's dtype; `seqlens` [B]
int32 on the device counts the cached positions of each row. Every row starts
at position 0 (prompts are right-padded), so its cached length is also the position of
its next token. Decode steps write at `seqlens` with tensor indexing, so they
never read a length back to the host (CUDA-graph friendly).
"""
import torch


class KVCache:
    def __init__(self, num_layers, batch, max_len, num_kv_heads, head_dim, dtype, device):
        shape = (num_layers, batch, max_len, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.seqlens = torch.zeros(batch, dtype=torch.int32, device=device)
        self.rows = torch.arange(batch, device=device)
        self.max_len = max_len

    @staticmethod
    def bytes_per_token(num_layers, num_kv_heads, head_dim, dtype):
        """Bytes one cached token costs over all layers (K and V)."""
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def write_prefill(self, layer, rows, k, v):
        """Store k/v [n, S, Hkv, D] of a prefill at positions 0..S-1 of cache rows `rows` [n]."""
        self.k[layer, rows, :k.shape[1]] = k
        self.v[layer, rows, :v.shape[1]] = v

    def write_decode(self, layer, k, v):
        """Store one new k/v [B, Hkv, D] per row at position seqlens[b]; return the layer's caches."""
        pos = self.seqlens.long()
        self.k[layer, self.rows, pos] = k
        self.v[layer, self.rows, pos] = v
        return self.k[layer], self.v[layer]
