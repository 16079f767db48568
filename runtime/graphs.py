"""The decode step captured in a CUDA graph, so batch-1 decode is bound by weight bandwidth, not Python.

Transformer.decode has static shapes and no host sync (positions and lengths
live in cache.seqlens on the device), so one capture per generate call
replays every later step: copy the new tokens into the static input buffer,
replay, read the static logits buffer. Sampling stays outside the graph.
"""
import logging

import torch

log = logging.getLogger("fuselm")


class DecodeGraph:
    def __init__(self, net, cache, tokens):
        self.tokens = tokens.clone()                               # [B] static input
        # Warm up once outside the graph: Triton autotuning and first-call compilation must not
        # happen during capture. The warm-up writes K/V at position seqlens and advances seqlens;
        # restoring seqlens is enough, since the first replay overwrites the same positions.
        lengths = cache.seqlens.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            net.decode(self.tokens, cache)
        torch.cuda.current_stream().wait_stream(side)
        cache.seqlens.copy_(lengths)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = net.decode(self.tokens, cache)           # [B, V] static output
        log.info("fuselm: decode step captured in a CUDA graph (batch %d, cache %d)", len(tokens), cache.max_len)

    def __call__(self, tokens):
        self.tokens.copy_(tokens)
        self.graph.replay()
        return self.logits
