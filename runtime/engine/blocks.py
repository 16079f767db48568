"""The KV cache's block bookkeeping: a pool of fixed-size blocks, block tables, reference counts,
and the prefix cache.

A block holds block_size consecutive positions of one sequence (in every layer). Block 0 is
never handed out: padding rows of a batch write there. A full block whose K/V are computed is
keyed by a chained digest of the tokens up to its end (blake2b of the previous block's digest
and its own tokens), so a later request starting with the same tokens reuses it; a hit is also
checked against the block's tokens. A cryptographic digest, not Python's hash(): prompts may be
raw token ids, and a crafted collision must not serve one request's K/V to another. Blocks nobody references are free; free blocks that still hold
a cached prefix stay findable until they are reused, least recently freed first.
Every capacity check comes paired with its mutation: can_allocate/allocate, can_append/append.
"""
import hashlib
from array import array
from collections import OrderedDict


class BlockManager:
    def __init__(self, num_blocks, block_size, prefix_caching=True):
        if num_blocks < 2 or block_size < 1:
            raise ValueError(f"the KV cache needs at least 2 blocks of at least 1 token, got {num_blocks} x "
                             f"{block_size}")
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.ref = [0] * num_blocks
        self.free = OrderedDict.fromkeys(range(1, num_blocks))  # oldest first: the next ones reused
        self.key = {}      # block -> (hash, tokens) of a cached full block
        self.cached = {}   # hash -> block
        self.hits = self.queries = 0  # prefix-cache counters, in blocks

    @property
    def usable(self):
        return self.num_blocks - 1

    @property
    def num_free(self):
        return len(self.free)

    def blocks_for(self, tokens):
        return -(-tokens // self.block_size)

    def _digests(self, ids, count, known=()):
        """Chained digests of (at least) the first `count` full blocks of ids; `known` holds the first ones."""
        out, bs = list(known), self.block_size  # may be longer than count: callers slice
        for i in range(len(out), count):
            h = hashlib.blake2b(array("q", ids[i * bs:(i + 1) * bs]).tobytes(), digest_size=16,
                                key=out[-1] if out else b"")
            out.append(h.digest())
        return out

    def _prefix(self, req):
        """The cached blocks that hold a prefix of req's tokens. At least one token is left to compute:
        the last one's logits pick the next token."""
        if not self.prefix_caching:
            return []
        ids, bs, blocks = req.all_ids, self.block_size, []
        count = (req.num_tokens - 1) // bs
        req.block_hashes = self._digests(ids, count, req.block_hashes)  # they depend on the tokens only: kept
        for i, h in enumerate(req.block_hashes[:count]):
            b = self.cached.get(h)
            if b is None or self.key[b][1] != tuple(ids[i * bs:(i + 1) * bs]):
                break
            blocks.append(b)
        return blocks

    def can_allocate(self, req, max_tokens):
        """req holds no blocks: the tokens of its first chunk (at most max_tokens after its cached
        prefix) if blocks for the prefix and the chunk are free, else None."""
        hit = self._prefix(req)
        tokens = min(req.num_tokens - len(hit) * self.block_size, max_tokens)
        need = self.blocks_for(len(hit) * self.block_size + tokens) - len(hit)
        return tokens if need <= self.num_free - sum(1 for b in hit if self.ref[b] == 0) else None

    def allocate(self, req, tokens):
        """Give req its cached prefix (num_computed moves past it) and blocks for `tokens` more
        (what can_allocate returned)."""
        assert not req.block_table, "allocate() takes a request without blocks"
        hit = self._prefix(req)
        self.queries += (req.num_tokens - 1) // self.block_size
        self.hits += len(hit)
        for b in hit:
            if self.ref[b] == 0:
                del self.free[b]
            self.ref[b] += 1
        req.block_table = list(hit)
        req.num_computed = len(hit) * self.block_size
        if req.num_cached is None:  # the first admission; a recompute after preemption is not a prompt hit
            req.num_cached = min(req.num_computed, len(req.prompt_ids))
        self.append(req, tokens)

    def can_append(self, req, tokens):
        return self.blocks_for(req.num_computed + tokens) - len(req.block_table) <= self.num_free

    def append(self, req, tokens):
        """Blocks for `tokens` more positions after req.num_computed."""
        for _ in range(self.blocks_for(req.num_computed + tokens) - len(req.block_table)):
            b, _ = self.free.popitem(last=False)
            if b in self.key:  # evict the prefix it held
                del self.cached[self.key.pop(b)[0]]
            self.ref[b] = 1
            req.block_table.append(b)

    def commit(self, req):
        """Cache req's full, computed blocks under their prefix digests (call after each pass); each
        block is digested once."""
        if not self.prefix_caching:
            return
        done, full = req.num_committed, req.num_computed // self.block_size
        if full <= done:
            return
        req.block_hashes = self._digests(req.all_ids, full, req.block_hashes)
        req.num_committed = full
        bs = self.block_size
        for i in range(done, full):
            b, h = req.block_table[i], req.block_hashes[i]
            if b in self.key or h in self.cached:  # already cached (here, or the same prefix in another block)
                continue
            self.key[b] = (h, tuple(req.all_ids[i * bs:(i + 1) * bs]))
            self.cached[h] = b

    def release(self, req):
        """Drop req's blocks; its cached ones stay findable, the last blocks reused first."""
        for b in reversed(req.block_table):
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.free[b] = None
                if b not in self.key:  # uncached: nothing to keep, reuse it first
                    self.free.move_to_end(b, last=False)
        req.block_table = []
        req.num_computed = req.num_committed = 0

    def check_integrity(self, requests, written_slots=()):
        """free + used == total, reference counts match the block tables, cached blocks are full and
        unchanged, nobody writes a shared or cached block. Raises AssertionError naming the problem."""
        refs = [0] * self.num_blocks
        for r in requests:
            assert len(set(r.block_table)) == len(r.block_table), f"request {r.id} holds a block twice"
            for b in r.block_table:
                refs[b] += 1
            assert len(r.block_table) * self.block_size >= r.num_computed, f"request {r.id} lacks blocks"
        assert refs == self.ref, f"reference counts {self.ref} do not match the block tables {refs}"
        assert 0 not in self.free and self.ref[0] == 0, "block 0 (padding) was handed out"
        used = sum(1 for b in range(1, self.num_blocks) if self.ref[b] > 0)
        assert used + len(self.free) == self.usable, f"{used} used + {len(self.free)} free != {self.usable}"
        assert all(self.ref[b] == 0 for b in self.free), "a free block is referenced"
        assert len(self.cached) == len(self.key) and all(self.key[b][0] == h for h, b in self.cached.items()), \
            "prefix index out of step"
        real = [slot for slot in written_slots if slot // self.block_size != 0]
        assert len(set(real)) == len(real), "a pass writes one slot twice"
        for slot in real:
            b = slot // self.block_size
            assert self.ref[b] == 1 and b not in self.key, f"slot {slot}: block {b} is shared or cached"
