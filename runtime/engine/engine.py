"""The engine: requests in, tokens out, continuously batched over a paged KV cache.

Each step: take in new and cancelled requests, schedule (scheduler.py), run the forward passes,
sample one token for every sequence that finished its prompt or decoded, and hand the text to
the request handles. Decode rows and prefill chunks share one pass when the model's linears
give every row the result it would get alone at that many rows (Transformer.invariant_rows);
otherwise the decode rows run in passes of at most that many rows (replayed as a CUDA graph or
native CPU plan) and each chunk in its own. With row-invariant kernels (the native quantized
ones) a request's tokens then do not depend on what else runs; kernels that choose their path
by row count (dense GEMMs, cuBLAS) may move the last bits of a row's logits with the batch.
A preempted request recomputes its generated tokens as prompt: the same tokens in practice,
not bitwise the same K/V.

    engine = fuselm.Engine(model, max_num_seqs=8)
    h = engine.submit("The capital of France is", SamplingParams(max_new_tokens=16))
    for text in h: ...                 # drives engine.step() itself when no loop runs
    for d in h.deltas(): d.text, d.logprobs   # the same, with TokenLogprobs (SamplingParams(logprobs=k))
    engine.start(); async for text in h: ...; engine.stop()
"""
import asyncio
import logging
import numbers
import os
import queue
import re
import threading
import time

import torch

from .. import memory, ops
from ..cache import Batch
from ..graphs import StepGraphs
from .blocks import BlockManager
from .request import Completion, FinishReason, Request, SamplingParams, Text, TokenLogprob
from .scheduler import Scheduler

log = logging.getLogger("fuselm")

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
          "g": 2**30, "gb": 2**30, "gib": 2**30}
_DONE = object()  # the last item of a handle's queue


def parse_memory(value, device):
    """The KV cache budget in bytes: an int (bytes), a string such as "512MiB" or "2G", or a float
    in (0, 1]: that share of the device's free memory."""
    if isinstance(value, float) and not isinstance(value, bool):
        if not 0 < value <= 1:
            raise ValueError(f"kv_cache_memory as a share of free memory must be in (0, 1], got {value}")
        return int(value * memory.free_bytes(device))
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", value)
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"kv_cache_memory {value!r} is not a size such as '512MiB' or '2GiB'")
        return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    raise ValueError(f"kv_cache_memory must be bytes (int > 0), a size string or a share in (0, 1], got {value!r}")


def _logprob(row, token, k):
    """The TokenLogprob of `token` under one row of logits, with the k most likely tokens."""
    lp = torch.log_softmax(row.float(), -1)
    top = lp.topk(k) if k else None
    best = () if top is None else tuple(zip(top.indices.tolist(), top.values.tolist()))
    return TokenLogprob(token, lp[token].item(), best)


class RequestHandle:
    """A submitted request: iterate it for its text as it comes (sync or async), cancel() it, or wait
    for its Completion with result() / await aresult()."""

    def __init__(self, engine, req):
        self._engine, self._req = engine, req
        self._queue = queue.Queue()  # Deltas, then _DONE
        self._lock = threading.Lock()
        self._loop = self._aqueue = None  # set by async iteration: pieces then go to its asyncio queue
        self._drained = False             # _DONE was handed out
        self.completion = None
        self.error = None  # set when the engine failed the request (a bug): iterating raises it

    @property
    def id(self):
        return self._req.id

    @property
    def finished(self):
        return self.completion is not None

    def cancel(self):
        """Stop the request; its blocks are freed within one engine step."""
        self._engine._cancel(self._req)

    def _put(self, item):  # engine side
        with self._lock:
            if self._loop is None:
                self._queue.put(item)
                return
            try:
                self._loop.call_soon_threadsafe(self._aqueue.put_nowait, item)
            except RuntimeError:  # the consumer's event loop is closed: nobody listens any more
                self._loop = None
                self._req.cancel_requested = True

    def _get(self):
        if self._drained:
            return _DONE
        while True:
            try:
                item = self._queue.get_nowait()
                break
            except queue.Empty:
                pass
            if not self._engine.running:
                if not self._engine.step() and self._queue.empty():
                    raise RuntimeError(f"request {self.id} has no work left but never finished")
                continue
            try:
                item = self._queue.get(timeout=0.5)
                break
            except queue.Empty:
                self._engine._check_loop()
        self._drained = item is _DONE
        return item

    def deltas(self):
        """Deltas (text, TokenLogprobs) as they come, empty ones included; handed out once (a second
        iteration yields nothing)."""
        while (item := self._get()) is not _DONE:
            yield item
        self._raise()

    def __iter__(self):
        """The text as it comes."""
        return (d.text for d in self.deltas() if d.text)

    def _raise(self):
        if self.error is not None:
            raise RuntimeError(f"request {self.id} failed in the engine: {self.error}") from self.error

    def result(self):
        """Wait for (or drive) the request to its end -> Completion."""
        for _ in self:
            pass
        return self.completion

    async def adeltas(self):
        """deltas() for asyncio: needs the engine's background loop; leaving early cancels the request."""
        if not self._engine.running:
            raise RuntimeError("async iteration needs the engine's background loop: call engine.start() first")
        with self._lock:
            if not self._drained:
                self._loop, self._aqueue = asyncio.get_running_loop(), asyncio.Queue()
                while not self._queue.empty():  # what came before this iterator
                    self._aqueue.put_nowait(self._queue.get_nowait())
        try:
            while not self._drained and (item := await self._aqueue.get()) is not _DONE:
                yield item
            self._drained = True
            self._raise()
        finally:
            if self.completion is None:  # the consumer went away (a client disconnected): stop the request
                self.cancel()

    async def __aiter__(self):
        async for d in self.adeltas():
            if d.text:
                yield d.text

    async def aresult(self):
        async for _ in self:
            pass
        return self.completion


class Engine:
    """Continuous batching over a paged KV cache for one Model.

    max_num_seqs: sequences running at once; kv_cache_memory: bytes, a size string or a share of free
    memory (default: a full context for every sequence, at most a quarter of free memory);
    block_size: tokens per KV block; chunk: the most prompt tokens one step prefills (also the
    prefill chunk); prefix_caching: reuse cached prompt blocks; max_model_len: the longest a request
    (prompt + output) may grow, default and at most the model's context (vLLM's max_model_len: every
    block table is that wide, so a shorter one also shortens what attention kernels that scan the
    whole table read); check: check the block pool's integrity after every step (tests)."""

    def __init__(self, model, max_num_seqs=16, kv_cache_memory=None, block_size=16, chunk=512, prefix_caching=True,
                 max_model_len=None, check=False):
        c = model.config
        for name, v in (("max_num_seqs", max_num_seqs), ("block_size", block_size), ("chunk", chunk),
                        ("max_model_len", c.context if max_model_len is None else max_model_len)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if max_model_len is not None and max_model_len > c.context:
            raise ValueError(f"max_model_len {max_model_len} is longer than the model's context ({c.context} tokens)")
        self.model, self.net = model, model.net
        self.block_size, self.context = block_size, max_model_len or c.context
        per_block = block_size * model.kv_bytes_per_token
        full = (max_num_seqs * -(-self.context // block_size) + 1) * per_block  # + block 0 (padding)
        budget = (min(full, int(0.25 * memory.free_bytes(model.device))) if kv_cache_memory is None
                  else parse_memory(kv_cache_memory, model.device))
        num_blocks = budget // per_block
        if num_blocks < 2:
            raise ValueError(f"kv_cache_memory of {budget} bytes holds no KV block ({per_block} bytes for "
                             f"{block_size} tokens)")
        self.blocks = BlockManager(num_blocks, block_size, prefix_caching)
        self.scheduler = Scheduler(self.blocks, max_num_seqs, chunk)
        self.kv = self.net.new_pool(num_blocks, block_size)
        self.max_blocks = -(-self.context // block_size)
        self.mix_rows = self.net.invariant_rows()
        kind = ("cuda" if model.use_cuda_graph else "cpu" if model.use_cpu_graph else None)
        self.graphs = StepGraphs(self.net, self.kv, kind, self.max_blocks) if kind else None
        self.check = check or os.environ.get("FUSELM_CHECK_BLOCKS") == "1"
        self.eos = set(c.eos_token_ids) | set(model.tokenizer.eos_token_ids)
        self._handles = {}   # request id -> handle, while unfinished
        self._inbox = []     # requests submitted since the last step
        self._lock = threading.RLock()   # one step at a time
        self._wake = threading.Condition()
        self._thread, self._stopping = None, False
        self.stats = {"prompt_tokens": 0, "cached_tokens": 0, "generated_tokens": 0, "steps": 0, "preemptions": 0}
        log.info("fuselm: KV cache of %d blocks x %d tokens = %d tokens (%.1f MiB) on %s", num_blocks - 1, block_size,
                 (num_blocks - 1) * block_size, num_blocks * per_block / 2**20, model.device)
        self.capacity = (num_blocks - 1) * block_size

    # ---------------------------------------------------------------- requests

    def submit(self, prompt, params=None, add_special_tokens=True, **kwargs):
        """Queue a request: prompt is text or a list of token ids; params a SamplingParams (or its fields
        as keyword arguments). Bad input raises here, before anything is queued."""
        if params is None:
            params = SamplingParams(**kwargs)
        elif kwargs:
            raise ValueError("pass either params or sampling keyword arguments, not both")
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        ids = self.encode(prompt, add_special_tokens)
        room = self.context - len(ids)
        if room < 1:
            limit = ("the model's context" if self.context == self.model.config.context
                     else "this engine's max_model_len")
            raise ValueError(f"the prompt has {len(ids)} tokens, but {limit} is {self.context} tokens "
                             f"(it must leave room for at least one new token){self.model.config.context_note()}")
        if params.max_new_tokens > room:
            log.warning("fuselm: max_new_tokens %d reduced to %d to fit the %d-token context",
                        params.max_new_tokens, room, self.context)
            params = SamplingParams(**{**params.__dict__, "max_new_tokens": room})
        need = len(ids) + params.max_new_tokens
        if need > self.capacity:
            raise ValueError(f"the request needs up to {need} tokens of KV cache (prompt {len(ids)} + max_new_tokens "
                             f"{params.max_new_tokens}), but the cache holds {self.capacity}; raise kv_cache_memory")
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else frozenset(self.eos))
        req = Request(ids, params, stop_ids, Text(self.model.tokenizer, params.stop))
        if not params.greedy:
            req.generator = torch.Generator(device=self.model.device)
            if params.seed is None:
                req.generator.seed()
            else:
                req.generator.manual_seed(params.seed)
        handle = RequestHandle(self, req)
        with self._wake:
            self._handles[req.id] = handle
            self._inbox.append(req)
            self._wake.notify()
        return handle

    def encode(self, prompt, add_special_tokens=True):
        """A prompt (text or token ids) -> its token ids, checked."""
        if isinstance(prompt, str):
            ids = self.model.tokenizer.encode(prompt, add_special_tokens=add_special_tokens) if prompt else []
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, numbers.Integral) and not isinstance(t, bool)
                                                       for t in prompt):
            ids = [int(t) for t in prompt]
            bad = [t for t in ids if not 0 <= t < self.model.config.vocab_size]
            if bad:
                raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.model.config.vocab_size})")
        else:
            raise TypeError(f"prompt must be a str or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise ValueError("the prompt is empty")
        return ids

    def _cancel(self, req):
        req.cancel_requested = True
        with self._wake:
            self._wake.notify()

    # ---------------------------------------------------------------- stepping

    def has_work(self):
        return bool(self._inbox) or self.scheduler.has_work()

    @property
    def num_running(self):
        return len(self.scheduler.running)

    @property
    def num_waiting(self):
        """Requests not yet admitted: queued, or submitted since the last step."""
        return len(self.scheduler.waiting) + len(self._inbox)

    def step(self):
        """One engine step; False when there was nothing to do."""
        with self._lock:
            with self._wake:
                new, self._inbox = self._inbox, []
            for req in new:
                self.scheduler.add(req)
            for req in [r for r in (*self.scheduler.running, *self.scheduler.waiting) if r.cancel_requested]:
                self._finish(req, FinishReason.CANCELLED)
            step = self.scheduler.schedule()
            if not step:
                return bool(new)
            self.stats["steps"] += 1
            self.stats["preemptions"] += len(step.preempted)
            with torch.inference_mode():
                for decode, chunks in self._passes(step):
                    self._run(decode, chunks)
            if self.check:
                self.blocks.check_integrity(self.scheduler.running)
            return True

    def _passes(self, step):
        """The forward passes of a step: all in one where the rows stay invariant, else the decode rows
        together and each prefill chunk alone."""
        if step.num_tokens <= self.mix_rows:
            return [(step.decode, step.prefill)]
        # decode rows in passes of at most mix_rows (> 1: row-invariant kernels) or all together (1: none are)
        size = self.mix_rows if self.mix_rows > 1 else max(1, len(step.decode))
        decode = [step.decode[i:i + size] for i in range(0, len(step.decode), size)]
        return [(d, []) for d in decode] + [([], [c]) for c in step.prefill]

    def _run(self, decode, chunks):
        batch, written, sampling = self._batch(decode, chunks)
        if self.check:
            self.blocks.check_integrity(self.scheduler.running, written)
        if not chunks and self.graphs is not None:
            logits = self.graphs(batch)
        else:
            logits = self.net.step(batch, self.kv)
        tokens = self._sample(logits, sampling)
        for r in decode:
            r.num_computed += 1
        for r, n in chunks:
            r.num_computed += n
        now = time.perf_counter()
        for r in (*decode, *(r for r, _ in chunks)):
            self.blocks.commit(r)
        for r, (t, logprob) in zip(sampling, tokens):
            r.add_token(t, now, logprob)
            self.stats["generated_tokens"] += 1
            handle = self._handles[r.id]
            if r.finished:
                self._finish(r, r.finish_reason)
            else:
                handle._put(r.take(False))

    def _batch(self, decode, chunks):
        """The Batch of one pass (decode rows first), the slots it writes, the requests it samples for."""
        bs, dev = self.block_size, self.model.device
        tokens, positions, lens, tables, chunk_meta, last, sampling = [], [], [], [], [], [], []
        for r in decode:
            p = r.num_computed
            tokens.append(r.all_ids[p])
            positions.append(p)
            lens.append(p + 1)
            tables.append(r.block_table)
            last.append(len(tokens) - 1)
            sampling.append(r)
        for r, n in chunks:
            p = r.num_computed
            chunk_meta.append((len(tokens), n, p))
            tokens.extend(r.all_ids[p:p + n])
            positions.extend(range(p, p + n))
            lens.append(p + n)
            tables.append(r.block_table)
            if p + n == r.num_tokens:
                last.append(len(tokens) - 1)
                sampling.append(r)
        slots = [t[p // bs] * bs + p % bs for t, rows in zip(
            tables, [[lens[i] - 1] for i in range(len(decode))] + [range(p, p + n) for _, n, p in chunk_meta])
            for p in rows]
        # every table max_blocks wide: a kernel's split of a row may follow the table width, which must then
        # not depend on the other rows
        M = self.max_blocks
        table = torch.tensor([t + [0] * (M - len(t)) for t in tables], dtype=torch.int32, device=dev)
        as_long = lambda x: torch.tensor(x, dtype=torch.long, device=dev)  # noqa: E731
        batch = Batch(as_long(tokens), as_long(positions), as_long(slots), table,
                      torch.tensor(lens, dtype=torch.int32, device=dev), len(decode), tuple(chunk_meta),
                      None if not chunks and len(last) == len(tokens) else as_long(last))
        return batch, slots, sampling

    def _sample(self, logits, reqs):
        """One token per requesting row: argmax for greedy ones, each sampled one with its own generator
        (so seeded requests repeat whatever runs beside them); with its TokenLogprob where asked."""
        if not reqs:
            return []
        tokens = logits.argmax(-1)
        for i, r in enumerate(reqs):
            p = r.params
            if not p.greedy:
                tokens[i] = ops.sample(logits[i:i + 1], p.temperature, p.top_k, p.top_p, p.min_p,
                                       generator=r.generator, backend=self.net.backends["sample"])[0]
        tokens = tokens.tolist()
        return [(t, None if r.params.logprobs is None else _logprob(logits[i], t, r.params.logprobs))
                for i, (r, t) in enumerate(zip(reqs, tokens))]

    def _finish(self, req, reason):
        req.finish_reason = reason
        self.scheduler.remove(req)
        req.text.flush()
        self.stats["prompt_tokens"] += len(req.prompt_ids)
        self.stats["cached_tokens"] += req.num_cached or 0
        handle = self._handles.pop(req.id)
        handle._put(req.take(True))
        handle.completion = Completion.of(req)
        handle._put(_DONE)

    # ---------------------------------------------------------------- background loop

    @property
    def running(self):
        """Whether the background loop runs (handles then wait for it instead of stepping)."""
        return self._thread is not None

    def start(self):
        """Run steps in a background thread until stop()."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="fuselm-engine", daemon=True)
            self._thread.start()
        return self

    def _loop(self):
        while True:
            with self._wake:
                while not self._stopping and not self.has_work():
                    self._wake.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as e:  # a bug: fail every request rather than hang their clients
                log.exception("fuselm: engine step failed")
                self._end_all(error=e)

    def _check_loop(self):
        if self._thread is not None and not self._thread.is_alive() and not self._stopping:
            raise RuntimeError("the engine's background loop has died (see the log)")

    def _end_all(self, error=None):
        """Finish every request, running, waiting or just submitted: cancelled, or failed with error."""
        with self._lock:
            with self._wake:
                new, self._inbox = self._inbox, []
            for req in [*self.scheduler.running, *self.scheduler.waiting, *new]:
                handle = self._handles.get(req.id)
                if handle is None:
                    continue
                handle.error = error
                try:
                    self._finish(req, FinishReason.CANCELLED)
                except Exception as e:  # one broken request must not keep the others waiting
                    log.exception("fuselm: could not finish request %d", req.id)
                    handle.error = handle.error or e
                    self._handles.pop(req.id, None)
                    handle._put(_DONE)

    def stop(self):
        """Stop the loop; requests still running are cancelled."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._end_all()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
