"""Serving over HTTP: N concurrent streaming clients against `fuselm serve` and llama.cpp's llama-server.

SmolLM2-135M-Instruct from the built-in GGUF on both servers (fuselm's default load keeps its
blocks quantized), the same thread count (torch.get_num_threads()) and as many sequence slots as
clients (fuselm --max-num-seqs C; llama-server -np C, -c C x 256 so each slot holds 256 tokens).
Each round, C clients start at once, each streams one completion of its own ~120-token prompt
(cut from real text, so no two share a prefix; new prompts every round, the same for both servers,
so neither server's prompt cache holds them), greedy, N new tokens with EOS ignored:
    throughput   C * N generated tokens / wall time of the round (first request sent to last [DONE])
    ttft         time from sending the request to its first non-empty text chunk: p50 / p90
    itl          time between consecutive text chunks of a request: p50 / p90 (a chunk is a token
                 for both servers, except where text is held back for a UTF-8 character)
Rounds alternate between the servers (the first one rotates), --reps rounds each (default 3),
after one warm-up request per server; medians over the rounds, p20/p80 in the JSON. Loopback only.

    python -m bench.serve                 # 16 clients x 64 tokens, ~2 minutes on a 2-core CPU
    python -m bench.serve --clients 4 --new 128
    python -m bench.serve --quick         # 2 clients x 8 tokens, fuselm only: seconds
"""
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from . import common
from .e2e import TEXT, llama_cpp_bin

SLOT_TOKENS = 256


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process on a loopback port, ready once GET /health answers 200; its log in a temp file."""

    def __init__(self, name, cmd, port, env=None):
        self.name, self.url = name, f"http://127.0.0.1:{port}"
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})

    def wait_ready(self, limit=300):
        import httpx
        deadline = time.monotonic() + limit
        while True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.log.seek(0)
                raise RuntimeError(f"{self.name} did not start:\n{self.log.read()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def start_fuselm(clients, device):
    port = _free_port()
    cmd = [sys.executable, "-m", "fuselm.cli", "serve", "--model", "smollm2-135m-instruct", "--host", "127.0.0.1",
           "--port", str(port), "--max-num-seqs", str(clients), "--max-queue", str(clients), "--device", device]
    return Server("fuselm", cmd, port, {"PYTHONUNBUFFERED": "1"})


def start_llama(bin_dir, gguf, clients, threads):
    port = _free_port()
    cmd = [str(bin_dir / "llama-server"), "-m", str(gguf), "-t", str(threads), "-tb", str(threads),
           "-np", str(clients), "-c", str(clients * SLOT_TOKENS), "--host", "127.0.0.1", "--port", str(port)]
    return Server("llama.cpp", cmd, port)


async def _one(client, url, prompt, new):
    """One streamed completion -> (ttft, gaps between text chunks, number of text chunks)."""
    body = {"prompt": prompt, "max_tokens": new, "temperature": 0, "stream": True, "ignore_eos": True}
    t0 = time.perf_counter()
    stamps = []
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"{url}: {chunk['error']}")
            if any(c.get("text") for c in chunk.get("choices", ())):
                stamps.append(time.perf_counter())
    if not stamps:
        raise RuntimeError(f"{url}: a stream without text")
    return stamps[0] - t0, [b - a for a, b in zip(stamps, stamps[1:])]


def _pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))] if values else float("nan")


def run_round(url, prompts, new):
    """All prompts at once, one client each -> the round's figures."""
    import httpx

    async def main():
        limits = httpx.Limits(max_connections=len(prompts) + 4)
        async with httpx.AsyncClient(timeout=httpx.Timeout(600), limits=limits) as client:
            t0 = time.perf_counter()
            got = await asyncio.gather(*(_one(client, url, p, new) for p in prompts))
            return time.perf_counter() - t0, got

    wall, got = asyncio.run(main())
    ttft = [t for t, _ in got]
    gaps = [g for _, gs in got for g in gs]
    return {"gen_tok_s": len(prompts) * new / wall, "ttft_p50_ms": 1e3 * _pct(ttft, 50),
            "ttft_p90_ms": 1e3 * _pct(ttft, 90), "itl_p50_ms": 1e3 * _pct(gaps, 50),
            "itl_p90_ms": 1e3 * _pct(gaps, 90), "wall_s": wall}


def make_prompts(tokenizer, clients, length, seed):
    """One prompt of about `length` tokens per client: runs of words drawn from TEXT."""
    rng = random.Random(seed)
    words = TEXT.split()
    prompts = []
    for _ in range(clients):
        ids = tokenizer.encode(" ".join(rng.choice(words) for _ in range(length)), add_special_tokens=False)
        prompts.append(tokenizer.decode(ids[:length]))
    return prompts


def main(argv=None):
    def extra(p):
        p.add_argument("--clients", type=int, default=None, help="concurrent clients (default 16; quick 2)")
        p.add_argument("--new", type=int, default=None, help="new tokens per request (default 64; quick 8)")
        p.add_argument("--prompt", type=int, default=None, help="prompt tokens per request (default 120; quick 16)")
    args = common.parse_args(__doc__.splitlines()[0], argv, extra=extra)
    import fuselm
    from fuselm.weights import resolve_source
    print(common.header(args.device))
    quick = args.quick
    clients = args.clients or (2 if quick else 16)
    new = args.new or (8 if quick else 64)
    length = args.prompt or (16 if quick else 120)
    if length + new > SLOT_TOKENS:
        raise SystemExit(f"--prompt + --new must fit a {SLOT_TOKENS}-token slot")
    reps = args.reps or (1 if quick else 3)
    threads = torch.get_num_threads()
    notes = []
    _, gguf = resolve_source("smollm2-135m-instruct")
    tokenizer = fuselm.load("smollm2-135m-instruct", progress=False).tokenizer
    rounds = [make_prompts(tokenizer, clients, length, seed) for seed in range(reps + 1)]  # the last: warm-up
    llama_bin = None if quick else llama_cpp_bin(notes)
    if llama_bin is not None and not (llama_bin / "llama-server").exists():
        notes.append(f"llama.cpp: skipped, llama-server not found in {llama_bin}")
        llama_bin = None
    servers = []
    try:
        servers.append(start_fuselm(clients, args.device))
        if llama_bin is not None:
            servers.append(start_llama(llama_bin, gguf, clients, threads))
            notes.append(f"llama-server -t {threads} -tb {threads} -np {clients} -c {clients * SLOT_TOKENS}, "
                         f"{gguf.name}")
        for s in servers:  # one at a time: loading is not what is measured
            s.wait_ready()
            run_round(s.url, rounds[-1][:2], 4)  # warm-up: kernels built, plans recorded
        samples = {s.name: [] for s in servers}
        for rep in range(reps):
            order = servers[rep % len(servers):] + servers[:rep % len(servers)]
            for s in order:
                samples[s.name].append(run_round(s.url, rounds[rep], new))
    finally:
        for s in servers:
            s.stop()
    rows, spread = [], {}
    for name, s in samples.items():
        keys = s[0].keys()
        med = {k: statistics.median(x[k] for x in s) for k in keys}
        spread[name] = {k: [_pct([x[k] for x in s], 20), _pct([x[k] for x in s], 80)] for k in keys}
        rows.append({"server": name, "clients": clients, "new": new, **{k: round(v, 2) for k, v in med.items()}})
    if len(rows) == 2:
        ours, peer = rows
        ours["x_llama.cpp_throughput"] = round(ours["gen_tok_s"] / peer["gen_tok_s"], 2)
        ours["ttft_p50_over_llama.cpp"] = round(ours["ttft_p50_ms"] / peer["ttft_p50_ms"], 3)
    for r in rows:
        print(r)
    for n in notes:
        print("note:", n)
    path = common.save("serve", args, rows, {"spread_p20_p80": spread, "notes": notes,
                                             "sizes": {"clients": clients, "new": new, "prompt": length,
                                                       "reps": reps}})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
