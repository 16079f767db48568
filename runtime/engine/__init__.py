"""The serving engine: continuous batching over a paged KV cache with prefix caching."""
from .engine import Engine, RequestHandle, parse_memory
from .request import MAX_LOGPROBS, Completion, Delta, FinishReason, SamplingParams, TokenLogprob

__all__ = ["Engine", "RequestHandle", "SamplingParams", "Completion", "FinishReason", "TokenLogprob", "Delta",
           "MAX_LOGPROBS", "parse_memory"]
