"""The paged KV cache: one pool of fixed-size blocks per layer, and the forward pass's way into it.

k and v are [layers, num_blocks, block_size, Hkv, D] in the model's dtype. Which blocks belong to
which sequence is the engine's business (engine/blocks.py); the model sees a step's slot mapping
(slot = block * block_size + offset: where each new token's K/V go, written through
ops.store_kv) and its block tables and lengths (what the attention kernels read).
"""
from dataclasses import dataclass

import torch

from . import ops


@dataclass
class Batch:
    """One forward pass over new tokens of several sequences: first `num_decode` sequences with one
    token each (token i is sequence i's), then prefill chunks. Tensors on the model's device."""
    tokens: torch.Tensor        # [T] int64
    positions: torch.Tensor     # [T] int64
    slots: torch.Tensor         # [T] int64: where each token's K/V go
    block_tables: torch.Tensor  # [B, M] int32
    seqlens: torch.Tensor       # [B] int32: each sequence's length after this pass
    num_decode: int
    chunks: tuple = ()          # per prefill sequence: (first token in tokens, tokens, positions cached before)
    last: torch.Tensor | None = None  # [R] int64: the tokens whose logits are wanted (None: every token)


class KVPool:
    def __init__(self, num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype, device):
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        # uninitialized: the kernels never read a slot before it is written (on the CPU the pages
        # become resident only as blocks are first used)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.num_blocks, self.block_size = num_blocks, block_size

    @staticmethod
    def bytes_per_token(num_layers, num_kv_heads, head_dim, dtype):
        """Bytes one cached token costs over all layers (K and V)."""
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def store(self, layer, k, v, slots, backend=None):
        """Write k/v [T, Hkv, D] of one layer into `slots` [T] int64."""
        H, D = self.k.shape[-2:]
        ops.store_kv(self.k[layer].view(-1, H, D), self.v[layer].view(-1, H, D), k, v, slots, backend=backend)

    def layer(self, layer):
        """The layer's pools [num_blocks, block_size, Hkv, D], as the paged kernels read them."""
        return self.k[layer], self.v[layer]
