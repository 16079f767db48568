"""Serving throughput of the engine on SmolLM2: random requests, 16 sequences side by side, a chat's second turn.

SmolLM2-135M-Instruct, the built-in GGUF, fuselm's default load (GGUF blocks kept quantized), against
llama.cpp on the same file with the same thread count (torch.get_num_threads()); runs alternate.
    random   N requests (default 32; --quick 6), prompt lengths uniform in [32, 256] tokens, output
             lengths uniform in [32, 128] (seed 0, EOS ignored; nano-vllm's bench draws them the same
             way at GPU sizes), all submitted at once to an engine of max_num_seqs=16:
               throughput = output tokens / wall time (and prompt + output tokens / wall time)
               time to first token and time between tokens: p50 / p90 / p99 over all requests
    16 seqs  16 requests of one 128-token prompt, 128 new tokens each (no prefix cache), the same
             formula as bench/e2e.py: decode tokens/s = 16 * (N - 2) / (time from the 2nd to the N-th
             token), against llama-batched-bench -npp 128 -ntg 128 -npl 16 (speed_tg); ratio
    chat     turn 1: a ~1000-token user message (time to first token, 32 new tokens); turn 2: that
             history, the reply and a short question on the same engine (the prefix cache holds turn 1):
             its time to first token / turn 1's (goal < 0.25)
Medians over --reps repetitions (default 3; quick 1), p20/p80 in the JSON.

    python -m bench.engine            # ~3 minutes on a quiet 2-core CPU
    python -m bench.engine --quick    # tiny sizes, seconds
"""
import random
import statistics
import time

import torch

from . import common
from .e2e import TEXT, Fuselm, LlamaBatchedBench, llama_cpp_bin


def _pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))] if values else float("nan")


def random_requests(model, n, quick):
    """n (prompt ids, output length): prompts cut from TEXT-like words (real tokens), lengths uniform."""
    rng = random.Random(0)
    words = TEXT.split()
    lo, hi, out_lo, out_hi = (16, 48, 8, 16) if quick else (32, 256, 32, 128)
    reqs = []
    for _ in range(n):
        ids = model.tokenizer.encode(" ".join(rng.choice(words) for _ in range(hi)), add_special_tokens=False)
        reqs.append((ids[:rng.randint(lo, hi)], rng.randint(out_lo, out_hi)))
    return reqs


def run_random(model, reqs, max_num_seqs):
    engine = model.engine(max_num_seqs=max_num_seqs, prefix_caching=False)
    t0 = time.perf_counter()
    handles = [engine.submit(p, max_new_tokens=n, ignore_eos=True) for p, n in reqs]
    done = [h.result() for h in handles]
    wall = time.perf_counter() - t0
    out = sum(c.completion_tokens for c in done)
    gaps = [g for c in done for g in c.token_times]
    ttft = [c.time_to_first_token for c in done]
    return {"output_tok_s": out / wall, "total_tok_s": (out + sum(c.prompt_tokens for c in done)) / wall,
            "ttft_p50_ms": 1e3 * _pct(ttft, 50), "ttft_p90_ms": 1e3 * _pct(ttft, 90), "ttft_p99_ms": 1e3 * _pct(ttft, 99),
            "itl_p50_ms": 1e3 * _pct(gaps, 50), "itl_p90_ms": 1e3 * _pct(gaps, 90), "wall_s": wall}


def run_chat(model, history_tokens, new):
    tok = model.tokenizer
    words = (TEXT * (history_tokens // 20 + 1)).split()
    text = " ".join(words)
    ids = tok.encode(text, add_special_tokens=False)[:history_tokens]
    messages = [{"role": "user", "content": tok.decode(ids) + "\nWhat is this text about?"}]
    engine = model.engine(max_num_seqs=1)
    first = engine.submit(tok.apply_chat_template(messages, add_generation_prompt=True), max_new_tokens=new,
                          add_special_tokens=False).result()
    messages += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "Say it in one line."}]
    second = engine.submit(tok.apply_chat_template(messages, add_generation_prompt=True), max_new_tokens=new,
                           add_special_tokens=False).result()
    return {"turn1_prompt": first.prompt_tokens, "turn1_ttft_ms": 1e3 * first.time_to_first_token,
            "turn2_prompt": second.prompt_tokens, "turn2_cached": second.cached_tokens,
            "turn2_ttft_ms": 1e3 * second.time_to_first_token,
            "turn2_over_turn1": second.time_to_first_token / first.time_to_first_token}


def _median_rows(samples):
    """[{metric: value}] per repetition -> {metric: median}, {metric: [p20, p80]}."""
    keys = samples[0].keys()
    med = {k: statistics.median(s[k] for s in samples) for k in keys}
    spread = {k: [_pct([s[k] for s in samples], 20), _pct([s[k] for s in samples], 80)] for k in keys}
    return med, spread


def main(argv=None):
    args = common.parse_args(__doc__.splitlines()[0], argv)
    import fuselm
    from fuselm.weights import resolve_source
    print(common.header(args.device))
    quick = args.quick
    reps = args.reps or (1 if quick else 3)
    n_req, B, S, N, history = (6, 4, 16, 8, 120) if quick else (32, 16, 128, 128, 1000)
    notes = []
    model = fuselm.load("smollm2-135m-instruct", device=args.device, progress=False)
    _, gguf = resolve_source("smollm2-135m-instruct")
    llama_bin = None if quick else llama_cpp_bin(notes)
    peer = LlamaBatchedBench(llama_bin, gguf, torch.get_num_threads(), N) if llama_bin else None
    reqs = random_requests(model, n_req, quick)
    prompt = model.tokenizer.encode(TEXT * 8, add_special_tokens=False)[:S]
    fixed = Fuselm("fuselm", model)
    samples = {"random": [], "fixed": [], "peer": [], "chat": []}
    run_random(model, reqs[:2], B)  # warm-up: plans recorded, kernels built
    for rep in range(reps):
        jobs = [("random", lambda: run_random(model, reqs, B)),
                ("fixed", lambda: {"decode_tok_s": fixed.run_batch(prompt, B, N)["decode"]}),
                ("chat", lambda: run_chat(model, history, 32))]
        if peer is not None:
            jobs.append(("peer", lambda: {"decode_tok_s": peer.run(prompt, [B], N)[B]["decode"]}))
        for name, job in jobs[rep % len(jobs):] + jobs[:rep % len(jobs)]:  # the first one rotates
            samples[name].append(job())
    rows, spread = [], {}
    for name, s in samples.items():
        if s:
            med, spread[name] = _median_rows(s)
            rows.append({"case": name, **{k: round(v, 3) for k, v in med.items()}})
    med = {r["case"]: r for r in rows}
    if "peer" in med:
        ratio = med["fixed"]["decode_tok_s"] / med["peer"]["decode_tok_s"]
        med["fixed"]["x_llama.cpp"] = round(ratio, 2)
        notes.append(f"llama-batched-bench -npp {S} -ntg {N} -npl {B}, -t {torch.get_num_threads()}, {gguf.name}")
    for r in rows:
        print(r)
    for n in notes:
        print("note:", n)
    path = common.save("engine", args, rows, {"spread_p20_p80": spread, "notes": notes,
                                              "sizes": {"requests": n_req, "max_num_seqs": B, "prompt": S, "new": N,
                                                        "chat_history": history}})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
