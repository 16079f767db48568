"""The KV cache's block bookkeeping: a pool of fixed-size blocks, block tables, reference counts,
and the prefix cache.

A block holds block_size consecutive positions of one sequence (in every layer). Block 0 is
never handed out: padding rows of a batch write there. A full block whose K/V are computed is
keyed by a chained hash of the tokens up to its end (its own tokens and every block before it),
so a later request starting with the same tokens reuses it (the hit is checked against the
tokens, not only the hash). Blocks nobody references are free; free blocks that still hold
a cached prefix stay findable until they are reused, least recently freed first.
Every capacity check comes paired with its mutation: can_allocate/allocate, can_append/append.
"""
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

    def _hashes(self, ids, count):
        """Chained hashes of the first `count` full blocks of ids."""
        h, out, bs = None, [], self.block_size
        for i in range(count):
            h = hash((h, tuple(ids[i * bs:(i + 1) * bs])))
            out.append(h)
        return out

    def _prefix(self, req):
        """The cached blocks that hold a prefix of req's tokens. At least one token is left to compute:
        the last one's logits pick the next token."""
        if not self.prefix_caching:
            return []
        ids, bs, blocks = req.all_ids, self.block_size, []
        for i, h in enumerate(self._hashes(ids, (req.num_tokens - 1) // bs)):
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
        req.num_computed = req.num_cached = len(hit) * self.block_size
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
        """Cache req's full, computed blocks under their prefix hashes (call after each step)."""
        if not self.prefix_caching:
            return
        full, ids, bs = req.num_computed // self.block_size, req.all_ids, self.block_size
        for i, h in enumerate(self._hashes(ids, full)):
            b = req.block_table[i]
            if b in self.key or h in self.cached:  # already cached (here, or the same prefix in another block)
                continue
            self.key[b] = (h, tuple(ids[i * bs:(i + 1) * bs]))
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
        req.num_computed = 0

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
        assert all(self.cached[h] == b for b, (h, _) in self.key.items()), "prefix index out of step"
        for slot in written_slots:
            b = slot // self.block_size
            assert b == 0 or (self.ref[b] == 1 and b not in self.key), f"slot {slot}: block {b} is shared or cached"
