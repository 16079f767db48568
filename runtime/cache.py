"""The KV cache: static, preallocated once per generate call, and the decode step's one way into it.

k and v are [layers, B, Smax, Hkv, D] in the model's dtype; `seqlens` [B]
int32 on the device counts the cached positions of each row. Every row starts
at position 0 (prompts are right-padded), so its cached length is also the position of
its next token. Writes go to flat slots (row * Smax + position) through ops.store_kv,
so the model never does index arithmetic on the cache itself, and decode steps never
read a length back to the host (CUDA-graph friendly). A paged cache swaps `slots` and
`layer` for block tables; the model's forward does not change.
"""
import torch

from . import ops


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

    def slots(self, rows, positions):
        """Cache rows `rows` [n] at positions [n, S] -> the flat slot of each token, [n * S] int64."""
        return (rows.view(-1, 1) * self.max_len + positions).reshape(-1)

    def store(self, layer, k, v, slots, backend=None):
        """Write k/v [n, S, Hkv, D] of one layer into `slots` [n * S]."""
        H, D = self.k.shape[-2:]
        ops.store_kv(self.k[layer].view(-1, H, D), self.v[layer].view(-1, H, D), k.reshape(-1, H, D),
                     v.reshape(-1, H, D), slots, backend=backend)

    def layer(self, layer):
        """The layer's caches [B, Smax, Hkv, D], as decode attention reads them (up to seqlens)."""
        return self.k[layer], self.v[layer]
