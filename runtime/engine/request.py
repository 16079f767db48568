"""One request's state: its sampling parameters, tokens, KV blocks, text and timings.

Everything that changes while a request runs lives on its Request; sizes derived from the raw
fields are properties, so nobody else does length arithmetic on them.
"""
import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .. import ops


MAX_LOGPROBS = 20  # the most alternatives a request may ask for per token (vLLM's default cap, OpenAI's chat cap)


class FinishReason(str, enum.Enum):
    STOP = "stop"            # EOS, a stop token id or a stop string
    LENGTH = "length"        # max_new_tokens, or the model's context
    CANCELLED = "cancelled"  # handle.cancel(), or the engine shut down


def _int(name, value, low):
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


@dataclass(frozen=True)
class SamplingParams:
    """What one request asks for. temperature 0 (or top_k 1) is greedy; seed makes sampling repeat."""
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple = ()            # strings: the text ends before the first one that appears
    stop_token_ids: tuple = ()  # token ids that end the request (not part of the text), beside EOS
    ignore_eos: bool = False
    logprobs: int | None = None  # report each output token's log-probability and this many best alternatives

    def __post_init__(self):
        _int("max_new_tokens", self.max_new_tokens, 1)
        ops.check_sampling_params(self.temperature, self.top_k, self.top_p, self.min_p)
        if self.seed is not None:
            _int("seed", self.seed, 0)
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        ids = tuple(self.stop_token_ids or ())
        for t in ids:
            _int("stop_token_ids entries", t, 0)
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        if self.logprobs is not None:
            _int("logprobs", self.logprobs, 0)
            if self.logprobs > MAX_LOGPROBS:
                raise ValueError(f"logprobs must be at most {MAX_LOGPROBS}, got {self.logprobs}")
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", ids)

    @property
    def greedy(self):
        return self.temperature == 0 or self.top_k == 1


class Text:
    """The text of a request's output: stop strings, and what is safe to emit while streaming."""

    def __init__(self, tokenizer, stops):
        self.decoder = tokenizer.stream()
        self.stops = stops
        self.hold = max(map(len, stops), default=1) - 1  # a stop string may still be completing
        self.text, self.emitted = "", 0

    def push(self, token):
        """Add a token's text; True when a stop string appeared (the text is cut before it)."""
        self.text += self.decoder.push(token)
        hits = [i for i in (self.text.find(s, max(0, self.emitted - self.hold)) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
        return bool(hits)

    def flush(self):
        self.text += self.decoder.flush()

    def take(self, done):
        """Text not yet emitted that no stop string can still claim (all of it once done)."""
        end = len(self.text) if done else max(self.emitted, len(self.text) - self.hold)
        piece, self.emitted = self.text[self.emitted:end], end
        return piece


@dataclass(frozen=True)
class TokenLogprob:
    """An output token's log-probability under the model (log_softmax of its raw logits, before
    temperature and the top-k/top-p/min-p filters), and the `logprobs` most likely tokens there,
    best first, as (token id, log-probability) pairs."""
    token: int
    logprob: float
    top: tuple


class Delta(NamedTuple):
    """What a request hands out at a step: new text, and the TokenLogprobs of its new tokens (when asked)."""
    text: str
    logprobs: tuple


_ids = itertools.count()


@dataclass(eq=False)
class Request:
    prompt_ids: list
    params: SamplingParams
    stop_ids: frozenset         # EOS (unless ignore_eos) and params.stop_token_ids
    text: Text
    id: int = field(default_factory=lambda: next(_ids))
    output_ids: list = field(default_factory=list)
    all_ids: list = None        # prompt + output ids, appended to (never rebuilt)
    block_table: list = field(default_factory=list)  # KV block ids, position p in block_table[p // block_size]
    block_hashes: list = field(default_factory=list)  # prefix digests of the first full blocks (blocks.py)
    num_committed: int = 0      # leading blocks offered to the prefix cache since the last admission
    num_computed: int = 0       # tokens whose K/V are in the cache
    num_cached: int | None = None  # prompt tokens the prefix cache served at the first admission
    finish_reason: FinishReason | None = None
    cancel_requested: bool = False
    generator: torch.Generator | None = None
    arrival: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    token_times: list = field(default_factory=list)  # perf_counter of each output token
    preemptions: int = 0
    logprobs: list | None = None  # a TokenLogprob per output token, when params.logprobs is set
    logprobs_taken: int = 0       # of them, handed out by take()

    def __post_init__(self):
        self.all_ids = list(self.prompt_ids)
        if self.params.logprobs is not None:
            self.logprobs = []

    @property
    def num_tokens(self):
        return len(self.all_ids)

    @property
    def num_uncomputed(self):
        """Tokens still to run through the model before the next one can be sampled (1 when decoding)."""
        return self.num_tokens - self.num_computed

    @property
    def decoding(self):
        return self.num_uncomputed == 1 and bool(self.output_ids)

    @property
    def finished(self):
        return self.finish_reason is not None

    def add_token(self, token, now, logprob=None):
        """Append a sampled token (with its TokenLogprob when asked) and decide whether the request is finished."""
        if self.first_token_time is None:
            self.first_token_time = now
        self.token_times.append(now)
        if token in self.stop_ids:
            self.finish_reason = FinishReason.STOP
            return
        self.output_ids.append(token)
        self.all_ids.append(token)
        if self.logprobs is not None:
            self.logprobs.append(logprob)
        if self.text.push(token):
            self.finish_reason = FinishReason.STOP
        elif len(self.output_ids) >= self.params.max_new_tokens:
            self.finish_reason = FinishReason.LENGTH

    def take(self, done):
        """The Delta not yet handed out (the text no stop string can still claim; everything once done)."""
        lps = () if self.logprobs is None else tuple(self.logprobs[self.logprobs_taken:])
        self.logprobs_taken += len(lps)
        return Delta(self.text.take(done), lps)


@dataclass(frozen=True)
class Completion:
    """A finished request: text, tokens, why it stopped, counts and timings (seconds)."""
    text: str
    token_ids: list
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int           # prompt tokens served from the prefix cache
    time_to_first_token: float | None
    token_times: list            # seconds between consecutive tokens (after the first)
    logprobs: list | None = None  # a TokenLogprob per token of token_ids, when the request asked for them

    @classmethod
    def of(cls, r):
        times = [b - a for a, b in zip(r.token_times, r.token_times[1:])]
        ttft = None if r.first_token_time is None else r.first_token_time - r.arrival
        return cls(r.text.text, list(r.output_ids), r.finish_reason, len(r.prompt_ids), len(r.output_ids),
                   r.num_cached or 0, ttft, times, None if r.logprobs is None else list(r.logprobs))
