"""The OpenAI-compatible HTTP routes on FastAPI: completions, chat, models, health, metrics, tokenize.

Nothing here schedules: each choice of a request is one engine request (Engine.submit), whose
handle is iterated with asyncio while the engine steps in its own thread, so the event loop never
waits on a forward pass. Streams go out as Server-Sent Events ("data: {...}" lines, then
"data: [DONE]"); an error after a stream started is its last event. A client that disconnects
cancels its engine requests (their KV blocks are free after the next engine step), streamed or not.
Every error has OpenAI's shape (protocol.error_body): 400 for any invalid request (validation
included), 401 without the API key, 404 for an unknown model or path, 503 while the model loads
or when the queue is full, 500 only for bugs.
"""
import asyncio
import hmac
import json
import logging
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from ..engine import FinishReason, SamplingParams
from . import protocol as P
from .metrics import Metrics

log = logging.getLogger("fuselm")
_PROTECTED = ("/v1/", "/tokenize", "/detokenize")


class ServerState:
    """What the routes share: the engine (None while the model loads), the served names, the API
    key, and the bound on requests in flight (max_num_seqs running + max_queue waiting)."""

    def __init__(self, names, api_key=None, max_queue=None):
        self.engine, self.names, self.api_key = None, list(names), api_key
        self.max_queue = max_queue
        self.pending = 0  # engine requests submitted and not yet answered (the event loop's count)
        self.created = int(time.time())
        self.metrics = Metrics(self)

    def ready(self):
        if self.engine is None:
            raise P.APIError(503, "the model is still loading", code="model_loading")
        return self.engine

    def name(self, requested):
        if requested is not None and requested not in self.names:
            raise P.APIError(404, f"the model {requested!r} does not exist; this server serves "
                                  f"{', '.join(map(repr, self.names))}", "model", "model_not_found")
        return self.names[0]


def _auth(app, state):
    """Pure ASGI middleware: the API key on /v1, /tokenize and /detokenize (not /health, /metrics)."""
    async def middleware(scope, receive, send):
        if scope["type"] == "http" and state.api_key is not None and scope["path"].startswith(_PROTECTED):
            header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(header.encode(), f"Bearer {state.api_key}".encode()):
                response = JSONResponse(P.error_body(401, "a missing or wrong API key (send 'Authorization: "
                                                          "Bearer KEY')", code="invalid_api_key"), 401)
                return await response(scope, receive, send)
        return await app(scope, receive, send)
    return middleware


def _validation_error(exc):
    """pydantic's errors -> one 400 naming the field (for a union: the field, with what each member wanted)."""
    errors = exc.errors()
    locs = [[str(x) for x in e.get("loc", ()) if x != "body"] for e in errors]
    if errors[0].get("type") == "json_invalid":
        return P.APIError(400, f"the body is not valid JSON: {errors[0].get('ctx', {}).get('error', errors[0]['msg'])}")
    same = [(loc, e) for loc, e in zip(locs, errors) if loc[:1] == locs[0][:1]]
    prefix = locs[0]
    for loc, _ in same:
        prefix = [a for a, b in zip(prefix, loc) if a == b][:len(prefix)]
        while prefix and prefix != loc[:len(prefix)]:
            prefix.pop()
    param = ".".join(prefix) or None
    msgs = list(dict.fromkeys(e["msg"].removeprefix("Value error, ") for _, e in same))
    msg = msgs[0] if len(msgs) == 1 else "; or ".join(msgs)
    if len(same) > 1 and "input" in same[0][1]:
        msg = f"{json.dumps(same[0][1]['input'], default=str)[:80]} is not valid: {msg}"
    return P.APIError(400, f"{param}: {msg}" if param else msg, param)


def _prompt_ids(engine, prompt, add_special_tokens, param):
    try:
        return engine.encode(prompt, add_special_tokens)
    except (ValueError, TypeError) as e:
        raise P.APIError(400, str(e), param) from None


def _max_tokens(engine, ids, requested, param):
    """max_tokens, or all the room left (None): refused when prompt + max_tokens exceed what fits."""
    limit = min(engine.context, engine.capacity)
    where = (f"the model's maximum context length is {engine.context} tokens" if limit == engine.context else
             f"the KV cache holds {engine.capacity} tokens (the model's context is {engine.context})")
    if len(ids) >= limit:
        raise P.APIError(400, f"the prompt has {len(ids)} tokens, but {where} and at least one new token must "
                              "fit", param)
    if requested is None:
        return limit - len(ids)
    if len(ids) + requested > limit:
        raise P.APIError(400, f"{len(ids)} prompt tokens + max_tokens {requested} = {len(ids) + requested} tokens, "
                              f"but {where}", "max_tokens")
    return requested


def _params(body, engine, max_tokens, index):
    vocab = engine.model.config.vocab_size
    bad = [t for t in body.stop_token_ids or () if t >= vocab]
    if bad:
        raise P.APIError(400, f"stop_token_ids: {bad[0]} is outside the vocabulary [0, {vocab})", "stop_token_ids")
    try:
        return SamplingParams(**body.sampling(max_tokens, index))
    except (ValueError, TypeError) as e:
        raise P.APIError(400, str(e)) from None


class _Submitted:
    """The engine requests of one HTTP request: submitted together, cancelled together."""

    def __init__(self, state, jobs):
        """jobs: (prompt ids, SamplingParams) per choice."""
        engine = state.engine
        if state.max_queue is not None and state.pending + len(jobs) > engine.scheduler.max_num_seqs + state.max_queue:
            raise P.APIError(503, f"the server is busy: {state.pending} requests in flight, at most "
                                  f"{engine.scheduler.max_num_seqs} running + {state.max_queue} queued (--max-queue)",
                             code="queue_full")
        self.state, self.handles = state, []
        try:
            for ids, params in jobs:
                self.handles.append(engine.submit(ids, params, add_special_tokens=False))
        except (ValueError, TypeError) as e:
            self.cancel()
            raise P.APIError(400, str(e)) from None
        state.pending += len(jobs)
        self.open = True

    def cancel(self):
        for h in self.handles:
            if not h.finished:
                h.cancel()

    def close(self):
        """Done (answered, failed or disconnected): unfinished requests are cancelled."""
        if getattr(self, "open", False):
            self.open = False
            self.state.pending -= len(self.handles)
            self.cancel()
            for h in self.handles:
                if h.completion is not None and h.completion.finish_reason is not FinishReason.CANCELLED:
                    self.state.metrics.observe(h.completion)

    async def results(self, request):
        """Every handle's Completion; a client disconnecting first cancels them (-> None)."""
        async def disconnected():
            while (await request.receive())["type"] != "http.disconnect":
                pass
        waiter = asyncio.ensure_future(asyncio.gather(*(h.aresult() for h in self.handles)))
        listener = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait([waiter, listener], return_when=asyncio.FIRST_COMPLETED)
            if not waiter.done():
                return None
            try:
                completions = waiter.result()
            except RuntimeError as e:  # the engine failed the request: a bug
                raise P.APIError(500, str(e), code="engine_error") from None
            _check_cancelled(completions)
            return completions
        finally:
            listener.cancel()
            if not waiter.done():
                waiter.cancel()
            self.close()

    async def deltas(self):
        """(choice index, engine Delta) as they come (not the empty ones), then (index, None) when that
        choice is done."""
        queue = asyncio.Queue()

        async def pump(i, h):
            try:
                async for d in h.adeltas():
                    if d.text or d.logprobs:
                        queue.put_nowait((i, d))
                queue.put_nowait((i, None))
            except Exception as e:  # noqa: BLE001 (handed to the stream as its error event)
                queue.put_nowait((i, e))

        tasks = [asyncio.ensure_future(pump(i, h)) for i, h in enumerate(self.handles)]
        try:
            done = 0
            while done < len(self.handles):
                i, item = await queue.get()
                if isinstance(item, Exception):
                    raise P.APIError(500, f"the engine failed: {item}", code="engine_error")
                if item is None:
                    done += 1
                    _check_cancelled([self.handles[i].completion])
                yield i, item
        finally:
            for t in tasks:
                t.cancel()


class _EventStream(StreamingResponse):
    """A StreamingResponse of SSE events that closes its requests however it ends: also when the
    client disconnects before the first event (the event generator then never starts)."""

    def __init__(self, events, submitted):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache",
                                                                          "X-Accel-Buffering": "no"})
        self.submitted = submitted

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.submitted.close()


def _check_cancelled(completions):
    if any(c.finish_reason is FinishReason.CANCELLED for c in completions):
        raise P.APIError(503, "the request was cancelled: the server is shutting down", code="cancelled")


def _usage(prompt_lens, completions):
    prompt, generated = sum(prompt_lens), sum(c.completion_tokens for c in completions)
    return P.Usage(prompt_tokens=prompt, completion_tokens=generated, total_tokens=prompt + generated)


def _sse(obj):
    return f"data: {obj if isinstance(obj, str) else obj.model_dump_json()}\n\n"


async def _stream(submitted, first, chunk, final, usage):
    """The SSE events of a streamed request: first() chunks, a chunk per engine Delta, a final chunk
    per choice with its finish_reason, the usage chunk (or None), [DONE]; an error as the last event."""
    try:
        for c in first():
            yield _sse(c)
        async for i, delta in submitted.deltas():
            if delta is None:
                yield _sse(final(i, submitted.handles[i].completion))
            else:
                yield _sse(chunk(i, delta))
        u = usage([h.completion for h in submitted.handles])
        if u is not None:
            yield _sse(u)
    except P.APIError as e:
        yield _sse(json.dumps(e.body()))
    except Exception as e:  # noqa: BLE001 (a bug: the client still gets a well-formed end)
        log.exception("fuselm: stream failed")
        yield _sse(json.dumps(P.error_body(500, f"internal error: {e}")))
    finally:
        submitted.close()
    yield _sse("[DONE]")


def create_app(state):
    app = FastAPI(title="fuselm", summary="OpenAI-compatible server on the fuselm engine")
    app.state.fuselm = state

    @app.exception_handler(P.APIError)
    async def _api_error(request, exc):
        return JSONResponse(exc.body(), exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc):
        e = _validation_error(exc)
        return JSONResponse(e.body(), e.status)

    @app.exception_handler(HTTPException)
    async def _http(request, exc):
        message = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
        return JSONResponse(P.error_body(exc.status_code, message, code="not_found" if exc.status_code == 404
                                         else None), exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request, exc):
        log.exception("fuselm: internal error on %s", request.url.path)
        return JSONResponse(P.error_body(500, f"internal error: {type(exc).__name__}: {exc}"), 500)

    @app.get("/health")
    async def health():
        state.ready()
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    @app.get("/v1/models")
    async def models():
        engine = state.ready()
        return P.ModelList(data=[P.ModelCard(id=n, created=state.created, max_model_len=engine.context)
                                 for n in state.names])

    @app.post("/v1/completions")
    async def completions(body: P.CompletionRequest, request: Request):
        engine = state.ready()
        name = state.name(body.model)
        tok = engine.model.tokenizer
        prompts = body.prompts
        ids = [_prompt_ids(engine, p, True, "prompt") for p in prompts]
        jobs = [(x, _params(body, engine, _max_tokens(engine, x, body.max_tokens, "prompt"), j))
                for x in ids for j in range(body.n)]
        echo = [(p if isinstance(p, str) else tok.decode(p)) if body.echo else "" for p in prompts]
        echo = [e for e in echo for _ in range(body.n)]  # per choice: index = prompt * n + j
        submitted = _Submitted(state, jobs)
        rid = P.new_id("cmpl")
        lens = [len(x) for x in ids]
        offsets = [0] * len(jobs)  # per choice: where its next token's text starts (logprobs' text_offset)

        def response(choices, usage=None):
            return P.CompletionResponse(id=rid, model=name, choices=choices, usage=usage)

        def logprobs(i, entries):
            if body.logprobs is None:
                return None
            out, offsets[i] = P.completion_logprobs(tok, entries, offsets[i])
            return out

        if body.stream:
            return _EventStream(_stream(
                submitted,
                lambda: [response([P.CompletionChoice(index=i, text=e)]) for i, e in enumerate(echo) if e],
                lambda i, d: response([P.CompletionChoice(index=i, text=d.text, logprobs=logprobs(i, d.logprobs))]),
                lambda i, c: response([P.CompletionChoice(index=i, text="", finish_reason=c.finish_reason.value)]),
                lambda cs: response([], _usage(lens, cs)) if body.include_usage else None),
                submitted)
        completions = await submitted.results(request)
        if completions is None:
            return Response(status_code=499)
        return response([P.CompletionChoice(index=i, text=echo[i] + c.text, logprobs=logprobs(i, c.logprobs),
                                            finish_reason=c.finish_reason.value)
                         for i, c in enumerate(completions)], _usage(lens, completions))

    @app.post("/v1/chat/completions")
    async def chat(body: P.ChatCompletionRequest, request: Request):
        engine = state.ready()
        name = state.name(body.model)
        ids = _prompt_ids(engine, _render(engine, body.messages, body.add_generation_prompt), False, "messages")
        max_tokens = _max_tokens(engine, ids, body.max_new_tokens, "messages")
        submitted = _Submitted(state, [(ids, _params(body, engine, max_tokens, j)) for j in range(body.n)])
        rid = P.new_id("chatcmpl")
        tok = engine.model.tokenizer

        def chunk(choices, usage=None):
            return P.ChatCompletionChunk(id=rid, model=name, choices=choices, usage=usage)

        def logprobs(entries):
            return P.chat_logprobs(tok, entries) if body.logprobs else None

        if body.stream:
            return _EventStream(_stream(
                submitted,
                lambda: [chunk([P.ChatChunkChoice(index=i, delta=P.ChatDelta(role="assistant", content=""))])
                         for i in range(body.n)],
                lambda i, d: chunk([P.ChatChunkChoice(index=i, delta=P.ChatDelta(content=d.text),
                                                      logprobs=logprobs(d.logprobs))]),
                lambda i, c: chunk([P.ChatChunkChoice(index=i, delta=P.ChatDelta(),
                                                      finish_reason=c.finish_reason.value)]),
                lambda cs: chunk([], _usage([len(ids)], cs)) if body.include_usage else None),
                submitted)
        completions = await submitted.results(request)
        if completions is None:
            return Response(status_code=499)
        return P.ChatCompletionResponse(
            id=rid, model=name, usage=_usage([len(ids)], completions),
            choices=[P.ChatChoice(index=i, message=P.ChatMessageOut(content=c.text), logprobs=logprobs(c.logprobs),
                                  finish_reason=c.finish_reason.value) for i, c in enumerate(completions)])

    @app.post("/tokenize")
    async def tokenize(body: P.TokenizeRequest):
        engine = state.ready()
        state.name(body.model)
        if body.messages is not None:
            ids = _prompt_ids(engine, _render(engine, body.messages, body.add_generation_prompt), False, "messages")
        else:
            try:
                ids = engine.model.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
            except (ValueError, TypeError) as e:
                raise P.APIError(400, str(e), "prompt") from None
        return {"count": len(ids), "max_model_len": engine.context, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(body: P.DetokenizeRequest):
        engine = state.ready()
        state.name(body.model)
        vocab = engine.model.config.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise P.APIError(400, f"tokens: {bad[0]} is outside the vocabulary [0, {vocab})", "tokens")
        return {"prompt": engine.model.tokenizer.decode(body.tokens)}

    return _auth(app, state) if state.api_key is not None else app


def _render(engine, messages, add_generation_prompt):
    try:
        return engine.model.tokenizer.apply_chat_template([m.as_dict() for m in messages], add_generation_prompt)
    except ValueError as e:
        raise P.APIError(400, str(e), "messages") from None
