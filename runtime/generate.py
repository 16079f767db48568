"""Model.generate and Model.chat: prompts submitted as requests to the model's engine.

There is one generation path, the engine (runtime/engine/): this file only turns the
generate/chat arguments into requests, waits for them (or streams the first one), and keeps
the counts and timings of the last call in model.last_stats.
"""
from dataclasses import dataclass

from .engine.request import SamplingParams


@dataclass
class Stats:
    rows: int = 1
    prompt_tokens: int = 0
    cached_tokens: int = 0
    prefill_seconds: float = 0.0   # submission to the last row's first token
    new_tokens: int = 0
    decode_seconds: float = 0.0    # the last row's first token to the end

    @property
    def decode_tokens_per_s(self):
        # every row's tokens after its first, over the time after the first tokens
        steps = self.new_tokens - self.rows
        return steps / self.decode_seconds if self.decode_seconds > 0 and steps > 0 else float("nan")


def _stats(completions):
    ttft = max((c.time_to_first_token or 0.0) for c in completions)
    total = max((c.time_to_first_token or 0.0) + sum(c.token_times) for c in completions)
    return Stats(rows=len(completions), prompt_tokens=sum(c.prompt_tokens for c in completions),
                 cached_tokens=sum(c.cached_tokens for c in completions), prefill_seconds=ttft,
                 new_tokens=sum(c.completion_tokens for c in completions), decode_seconds=total - ttft)


def generate(model, prompt, max_new_tokens=64, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, seed=None,
             stop=None, stream=False, add_special_tokens=True, **extra):
    """See Model.generate. Validates everything before any work starts; extra: the other
    SamplingParams fields (stop_token_ids, ignore_eos)."""
    single = isinstance(prompt, str)
    prompts = [prompt] if single else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompt must be a non-empty str or a non-empty list of str")
    if stream and not single:
        raise ValueError("stream=True takes a single prompt")
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            min_p=min_p, seed=seed, stop=stop, **extra)
    engine = model.default_engine()
    ids = []
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompt {i} must be a str, got {type(p).__name__}")
        try:
            ids.append(engine.encode(p, add_special_tokens))
        except ValueError as e:
            raise ValueError(f"prompt {i}: {e}") from None
    handles = []
    try:
        for x in ids:
            handles.append(engine.submit(x, params))
    except ValueError:
        for h in handles:
            h.cancel()
        raise
    if stream:
        return _stream(model, handles[0])
    try:
        completions = [h.result() for h in handles]
    finally:
        for h in handles:
            h.cancel()  # no-op for finished ones; an interrupted call leaves nothing running
    model.last_stats = _stats(completions)
    texts = [c.text for c in completions]
    return texts[0] if single else texts


def _stream(model, handle):
    try:
        yield from handle
    finally:
        handle.cancel()  # the consumer stopped early: free the request's blocks
    model.last_stats = _stats([handle.completion])
