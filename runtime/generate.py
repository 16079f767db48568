"""The generation loop: batched prefill of the prompts, then batched one-token decode steps.

Prompts of similar lengths are right-padded into one prefill (Transformer.prefill
says why no mask is needed); each fills its own row of a static KV cache, and
decode steps attend over per-row lengths. The only host sync per step is reading
the new token ids, which EOS, stop strings and streaming need. Finished rows keep
stepping (static shapes) but their tokens are dropped.
"""
import logging
import time
from dataclasses import dataclass

import torch

from . import ops
from .graphs import CPUGraph, DecodeGraph, NotCapturable

log = logging.getLogger("fuselm")


@dataclass
class Stats:
    rows: int = 1
    prompt_tokens: int = 0
    prefill_seconds: float = 0.0
    new_tokens: int = 0
    decode_steps: int = 0
    decode_seconds: float = 0.0

    @property
    def decode_tokens_per_s(self):
        return self.decode_steps * self.rows / self.decode_seconds if self.decode_seconds else float("nan")


def _check_params(max_new_tokens, temperature, top_k, top_p, min_p, seed, stop):
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    ops.check_sampling_params(temperature, top_k, top_p, min_p)
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        raise ValueError(f"seed must be a non-negative integer or None, got {seed!r}")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if not all(isinstance(s, str) and s for s in stops):
        raise ValueError(f"stop must be a non-empty string or a list of them, got {stop!r}")
    return stops


def _picker(model, temperature, top_k, top_p, min_p, seed):
    """The function logits [B, V] -> next tokens [B]."""
    if temperature == 0 or top_k == 1:
        return lambda logits: logits.argmax(-1)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=model.device)
        generator.manual_seed(seed)
    return lambda logits: ops.sample(logits, temperature, top_k, top_p, min_p, generator=generator,
                                     backend=model.net.backends["sample"])


def _prefill_groups(lengths):
    """Rows prefilled together: longest first, a row joins the current group while it is at least half
    as long as the group's first, so right padding at most doubles a group's work."""
    groups = []
    for row in sorted(range(len(lengths)), key=lambda r: -lengths[r]):
        if groups and 2 * lengths[row] >= lengths[groups[-1][0]]:
            groups[-1].append(row)
        else:
            groups.append([row])
    return groups


def generate_tokens(model, prompt_ids, max_new_tokens, pick, stats):
    """Yield the next token of every row (a list of ints), step by step, for at most max_new_tokens
    steps; the caller stops iterating when it has what it needs."""
    net, device = model.net, model.device
    with torch.inference_mode():
        cache = net.new_cache(len(prompt_ids), max(map(len, prompt_ids)) + max_new_tokens)
        t0 = time.perf_counter()
        logits = torch.empty(len(prompt_ids), model.config.vocab_size, device=device)
        for rows in _prefill_groups([len(ids) for ids in prompt_ids]):
            lengths = torch.tensor([len(prompt_ids[r]) for r in rows], dtype=torch.int32)
            padded = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long)  # right padding: id 0
            for i, r in enumerate(rows):
                padded[i, :lengths[i]] = torch.tensor(prompt_ids[r])
            index = torch.tensor(rows, device=device)
            logits[index] = net.prefill(padded.to(device), lengths.to(device), cache, index)
        tokens = pick(logits)
        out = tokens.tolist()
        stats.prefill_seconds = time.perf_counter() - t0
        stats.prompt_tokens = sum(map(len, prompt_ids))
        yield out
        t0 = time.perf_counter()
        step_fn = lambda t: net.decode(t, cache)  # noqa: E731
        if model.use_cuda_graph and max_new_tokens > 2:
            step_fn = DecodeGraph(net, cache, tokens)
        elif model.use_cpu_graph and max_new_tokens > 2:
            step_fn = _recorded(net, cache, tokens)
        for step in range(1, max_new_tokens):
            tokens = pick(step_fn(tokens))
            out = tokens.tolist()
            stats.decode_steps = step
            stats.decode_seconds = time.perf_counter() - t0
            yield out


def _recorded(net, cache, tokens):
    """The CPU decode step replayed from a native plan, or eager (with a warning) if it cannot be recorded."""
    graph = CPUGraph(net, cache, tokens)

    def step(t):
        nonlocal graph
        if graph is not None:
            try:
                return graph(t)
            except NotCapturable as e:
                ops._log_once(("cpu-graph", str(e)), logging.WARNING, "fuselm: the decode step runs eagerly "
                              "(slower): it cannot be recorded as a native plan: %s", e)
                graph = None
        return net.decode(t, cache)
    return step


class _Row:
    """The text of one generated row: EOS, stop strings, and what is safe to emit while streaming."""

    def __init__(self, tokenizer, eos_ids, stops):
        self.decoder = tokenizer.stream()
        self.eos_ids, self.stops = eos_ids, stops
        self.hold = max(map(len, stops), default=1) - 1  # a stop string may still be completing
        self.text, self.emitted, self.done, self.tokens = "", 0, False, 0

    def push(self, token):
        if token in self.eos_ids:
            self.finish()
            return
        self.tokens += 1
        self.text += self.decoder.push(token)
        hits = [i for i in (self.text.find(s, max(0, self.emitted - self.hold)) for s in self.stops) if i >= 0]
        if hits:
            self.text, self.done = self.text[:min(hits)], True

    def finish(self):
        if not self.done:
            self.text += self.decoder.flush()
            self.done = True

    def take(self):
        """Text not yet emitted that no stop string can still claim."""
        end = len(self.text) if self.done else max(self.emitted, len(self.text) - self.hold)
        piece, self.emitted = self.text[self.emitted:end], end
        return piece


def _encode(model, prompts, add_special_tokens):
    context = model.config.max_position_embeddings
    ids = []
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompt {i} must be a str, got {type(p).__name__}")
        x = model.tokenizer.encode(p, add_special_tokens=add_special_tokens)
        if not p or not x:
            raise ValueError(f"prompt {i} is empty")
        if len(x) >= context:
            raise ValueError(f"prompt {i} has {len(x)} tokens, but the model's context is {context} tokens "
                             "(it must leave room for at least one new token)")
        ids.append(x)
    return ids


def generate(model, prompt, max_new_tokens=64, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, seed=None,
             stop=None, stream=False, add_special_tokens=True):
    """See Model.generate. Validates everything before any work starts."""
    single = isinstance(prompt, str)
    prompts = [prompt] if single else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompt must be a non-empty str or a non-empty list of str")
    if stream and not single:
        raise ValueError("stream=True takes a single prompt")
    stops = _check_params(max_new_tokens, temperature, top_k, top_p, min_p, seed, stop)
    ids = _encode(model, prompts, add_special_tokens)
    room = model.config.max_position_embeddings - max(map(len, ids))
    if max_new_tokens > room:
        log.warning("fuselm: max_new_tokens %d reduced to %d to fit the %d-token context",
                    max_new_tokens, room, model.config.max_position_embeddings)
        max_new_tokens = room
    eos = set(model.config.eos_token_ids) | set(model.tokenizer.eos_token_ids)
    rows = [_Row(model.tokenizer, eos, stops) for _ in ids]
    model.last_stats = stats = Stats(rows=len(ids))
    steps = generate_tokens(model, ids, max_new_tokens, _picker(model, temperature, top_k, top_p, min_p, seed),
                            stats)

    def run():
        for tokens in steps:
            for row, t in zip(rows, tokens):
                if not row.done:
                    row.push(t)
            yield
            if all(r.done for r in rows):
                break
        steps.close()
        for r in rows:
            r.finish()
        stats.new_tokens = sum(r.tokens for r in rows)

    if stream:
        return _stream(run(), rows[0])
    for _ in run():
        pass
    texts = [r.text for r in rows]
    return texts[0] if single else texts


def _stream(run, row):
    for _ in run:
        piece = row.take()
        if piece:
            yield piece
    piece = row.take()
    if piece:
        yield piece
