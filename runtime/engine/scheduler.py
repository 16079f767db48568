"""Which requests run in the next step, and how many of their tokens.

Running requests that are decoding come first, one token each; then the next prefill chunk of
requests still prefilling; then waiting requests are admitted first come, first served, while a
sequence slot (max_num_seqs), the step's prefill budget and KV blocks allow. A prompt is
prefilled in chunks of at most `chunk` tokens, which is also the most prefill tokens one step
runs, so a long prompt never holds up the decode steps of the others for more than one chunk.
Chunks start at the request's own boundaries (its cached prefix, then every `chunk` tokens) and
are never cut to fit what is left of a step: how a request's tokens are split into forward
passes never depends on what else runs.
When a request needs a block and none is free, the most recently admitted request is
preempted: its blocks are freed (their cached prefix stays findable) and it goes back to the
front of the queue, to be recomputed when blocks free up. No request is lost.
"""
from collections import deque
from dataclasses import dataclass, field


@dataclass
class Step:
    decode: list = field(default_factory=list)   # requests computing one token each
    prefill: list = field(default_factory=list)  # (request, tokens) chunks
    preempted: list = field(default_factory=list)

    def __bool__(self):
        return bool(self.decode or self.prefill)

    @property
    def num_tokens(self):
        return len(self.decode) + sum(n for _, n in self.prefill)


class Scheduler:
    def __init__(self, blocks, max_num_seqs, chunk):
        self.blocks, self.max_num_seqs, self.chunk = blocks, max_num_seqs, chunk
        self.waiting = deque()
        self.running = []  # in admission order

    def add(self, req):
        self.waiting.append(req)

    def has_work(self):
        return bool(self.waiting or self.running)

    def remove(self, req):
        """Take a finished or cancelled request out, freeing its blocks."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.blocks.release(req)

    def _preempt(self, req, step):
        self.running.remove(req)
        self.blocks.release(req)
        req.preemptions += 1
        self.waiting.appendleft(req)
        step.preempted.append(req)

    def schedule(self):
        step, budget = Step(), self.chunk  # prefill tokens left in this step
        for req in list(self.running):
            if req not in self.running:  # preempted to make room for an earlier one
                continue
            n = 1 if req.decoding else min(req.num_uncomputed, self.chunk)
            if not req.decoding and n > budget:
                continue
            while not self.blocks.can_append(req, n):
                victim = self.running[-1]
                self._preempt(victim, step)
                if victim is req:
                    break
            if req not in self.running:
                continue
            self.blocks.append(req, n)
            if req.decoding:
                step.decode.append(req)
            else:
                step.prefill.append((req, n))
                budget -= n
        while self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
            req = self.waiting[0]
            n = self.blocks.can_allocate(req, self.chunk)
            if n is None or n > budget:
                break
            self.blocks.allocate(req, n)
            self.running.append(self.waiting.popleft())
            step.prefill.append((req, n))
            budget -= n
        return step
