"""The serving engine: continuous batching over a paged KV cache with prefix caching."""
from .engine import Engine, RequestHandle, parse_memory
from .request import Completion, FinishReason, SamplingParams

__all__ = ["Engine", "RequestHandle", "SamplingParams", "Completion", "FinishReason", "parse_memory"]
