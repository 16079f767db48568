"""The native backend on the CPU against the torch reference: norms, sampling, attention.

Decides what `auto` should pick on the CPU (the GPU comparisons live in
bench/norm.py and bench/sampling.py). Each output is checked against
runtime/reference.py before it is timed.

Norms, M rows of N columns, e = element size:
    bytes = M*N*e * (2 + 2*residual) + N*e * (1 + bias)   (read x [+ residual], weight [+ bias]; write y [+ h])
Sampling, B rows of V float32 logits:
    bytes = B*V*4   (the logits read once: the least any sampler moves)
Attention at SmolLM2's sizes (Hq 9, Hkv 3, D 64), e = element size:
    decode, B rows of L cached keys each (the whole cache visible):
        bytes = 2*B*L*Hkv*D*e + 2*B*Hq*D*e          (K and V read once; q read, o written)
        FLOPs = 4*B*Hq*L*D
    paged decode, the same keys in a pool of 16-key blocks (all rows' blocks in random order), read
    through [B, L/16] int32 block tables:
        bytes = the dense decode's + 4*B*ceil(L/16)     (the table entries), FLOPs the same
        "vs dense" = native decode_attention's median time over the same keys laid out per row / paged's
    prefill, causal, B rows of S tokens:
        bytes = 2*B*S*(Hq + Hkv)*D*e                 (q, k, v read once, o written: the least possible)
        FLOPs = 4*B*Hq*D*S*(S+1)/2                   (the visible (query, key) pairs)
    baselines: "torch" (the reference: float32 copies of K/V, repeat_interleave for GQA) and "sdpa"
    (torch.nn.functional.scaled_dot_product_attention, enable_gqa, on [B, H, S, D] views; its causal
    mask is top-left aligned, the same as bottom-right when Sq == Sk).
GB/s = bytes / median time; "% copy" = GB/s / measured copy bandwidth;
"vs torch" = the reference's median time / native's (and "vs sdpa" likewise).

    python -m bench.native_cpu           # rows 1..512, hidden 576..8192; vocab 128256, batch 1/8/32;
                                         # decode (dense, paged) batch 1/16, cache 128..4096; prefill 128..1024
    python -m bench.native_cpu --quick   # tiny sizes, seconds
"""
import torch

from . import common
from fuselm import native, reference

EPS = 1e-5
SAMPLING = {  # name -> parameters
    "top_k=50 top_p=0.9": dict(temperature=0.8, top_k=50, top_p=0.9),
    "top_p=0.9": dict(temperature=0.8, top_p=0.9),
    "temperature": dict(temperature=0.8),
}


def norm_case(op, dtype, rows, hidden, residual, reps):
    g = torch.Generator().manual_seed(rows * hidden)
    x, r = (torch.randn(rows, hidden, generator=g).to(dtype) for _ in range(2))
    w, b = (torch.randn(hidden, generator=g).to(dtype) for _ in range(2))
    args = (x, w) if op == "rms_norm" else (x, w, b)
    r = r if residual else None
    bytes_moved = x.numel() * x.element_size() * (2 + 2 * residual) + hidden * w.element_size() * (1 + (op == "layer_norm"))
    expected = getattr(reference, op)(*args, eps=EPS, residual=r)
    out = getattr(native, op)(*args, eps=EPS, residual=r)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for got, want in zip(out if residual else (out,), expected if residual else (expected,)):
        common.check_close(f"native {op}", got, want, atol=tol, rtol=tol)
    return bytes_moved, {name: common.timeit(lambda fn=getattr(mod, op): fn(*args, eps=EPS, residual=r), "cpu", reps=reps)
                         for name, mod in (("torch", reference), ("native", native))}


def sample_case(params, batch, vocab, reps):
    g = torch.Generator().manual_seed(batch)
    logits = torch.randn(batch, vocab, generator=g) * 3                       # [B, V] float32
    kept = reference.sampling_probs(logits, **params) > 0
    tokens = native.sample(logits, generator=g, **params)
    if not kept.gather(1, tokens.view(-1, 1)).all():
        raise AssertionError(f"native sample drew a token outside the reference's kept set ({params})")
    times = {"native": common.timeit(lambda: native.sample(logits, generator=g, **params), "cpu", reps=reps)}
    # the reference sorts the vocabulary twice per call: one warm-up is enough
    times["torch"] = common.timeit(lambda: reference.sample(logits, generator=g, **params), "cpu", reps=reps, warmup=1)
    return batch * vocab * 4, times


HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64  # SmolLM2


def sdpa(q, k, v, causal):
    """q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D] -> [B, Sq, Hq, D] through torch's fused attention."""
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                           is_causal=causal, enable_gqa=True)
    return out.transpose(1, 2)


def attention_case(op, dtype, batch, length, reps):
    """decode: one query per row over `length` cached keys; prefill: `length` tokens, causal."""
    g = torch.Generator().manual_seed(batch * length)
    queries = 1 if op == "decode_attention" else length
    q = torch.randn(batch, queries, HEADS, HEAD_DIM, generator=g).to(dtype)
    k, v = (torch.randn(batch, length, KV_HEADS, HEAD_DIM, generator=g).to(dtype) for _ in range(2))
    e = q.element_size()
    if op == "decode_attention":
        seqlens = torch.full((batch,), length, dtype=torch.int32)
        calls = {"torch": lambda: reference.decode_attention(q[:, 0], k, v, seqlens),
                 "native": lambda: native.decode_attention(q[:, 0], k, v, seqlens),
                 "sdpa": lambda: sdpa(q, k, v, causal=False)[:, 0]}
        bytes_moved = 2 * batch * length * KV_HEADS * HEAD_DIM * e + 2 * batch * HEADS * HEAD_DIM * e
        flops = 4 * batch * HEADS * length * HEAD_DIM
    else:
        calls = {"torch": lambda: reference.attention(q, k, v, causal=True),
                 "native": lambda: native.attention(q, k, v, causal=True),
                 "sdpa": lambda: sdpa(q, k, v, causal=True)}
        bytes_moved = 2 * batch * length * (HEADS + KV_HEADS) * HEAD_DIM * e
        flops = 4 * batch * HEADS * HEAD_DIM * length * (length + 1) // 2
    expected = calls["torch"]().float()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for name in ("native", "sdpa"):
        common.check_close(f"{name} {op}", calls[name](), expected, atol=tol, rtol=tol)
    # the reference converts the whole cache per call: seconds at batch 16, so one warm-up
    times = {name: common.timeit(fn, "cpu", reps=reps, warmup=1 if name == "torch" else 3)
             for name, fn in calls.items()}
    case = {"op": op, "dtype": str(dtype).replace("torch.", ""), "batch": batch, "length": length}
    rows = common.bandwidth_rows(case, times, bytes_moved, "cpu", ("torch", "sdpa"))
    for row in rows:
        row["GFLOP/s"] = flops / row["median_ms"] / 1e6
    return rows


PAGE = 16  # keys per block of the paged pool (the engine's block size)


def paged_decode_case(dtype, batch, length, reps):
    """Decode over `length` keys per row held in a paged pool, against the dense native op over the
    same keys laid out per row: the cost of reading through the block table."""
    g = torch.Generator().manual_seed(batch * length)
    q = torch.randn(batch, HEADS, HEAD_DIM, generator=g).to(dtype)
    k, v = (torch.randn(batch, length, KV_HEADS, HEAD_DIM, generator=g).to(dtype) for _ in range(2))
    pages = -(-length // PAGE)
    table = torch.randperm(batch * pages, generator=g).int().view(batch, pages)  # scattered, as after churn
    pools = []
    for cache in (k, v):
        padded = torch.zeros(batch, pages * PAGE, KV_HEADS, HEAD_DIM, dtype=dtype)
        padded[:, :length] = cache
        pool = torch.empty(batch * pages, PAGE, KV_HEADS, HEAD_DIM, dtype=dtype)
        pool[table.long().flatten()] = padded.view(batch * pages, PAGE, KV_HEADS, HEAD_DIM)
        pools.append(pool)
    k_pool, v_pool = pools
    seqlens = torch.full((batch,), length, dtype=torch.int32)
    calls = {"torch": lambda: reference.paged_decode_attention(q, k_pool, v_pool, table, seqlens),
             "native": lambda: native.paged_decode_attention(q, k_pool, v_pool, table, seqlens),
             "dense": lambda: native.decode_attention(q, k, v, seqlens)}
    expected = calls["torch"]().float()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for name in ("native", "dense"):
        common.check_close(f"{name} paged_decode_attention", calls[name](), expected, atol=tol, rtol=tol)
    times = {name: common.timeit(fn, "cpu", reps=reps, warmup=1 if name == "torch" else 3)
             for name, fn in calls.items()}
    e = q.element_size()
    bytes_moved = 2 * batch * length * KV_HEADS * HEAD_DIM * e + 2 * batch * HEADS * HEAD_DIM * e + 4 * batch * pages
    case = {"op": "paged_decode_attention", "dtype": str(dtype).replace("torch.", ""), "batch": batch,
            "length": length}
    rows = common.bandwidth_rows(case, times, bytes_moved, "cpu", ("torch", "dense"))
    for row in rows:
        row["GFLOP/s"] = 4 * batch * HEADS * length * HEAD_DIM / row["median_ms"] / 1e6
    return rows


def table_rows(case, bytes_moved, times, copy):
    rows = []
    for name in ("torch", "native"):
        t = times[name]
        gbps = bytes_moved / t["median_ms"] / 1e6
        rows.append({**case, "provider": name, **t, "GB/s": gbps, "% copy": 100 * gbps / copy,
                     "vs torch": times["torch"]["median_ms"] / t["median_ms"]})
    return rows


def main(argv=None):
    args = common.parse_args(__doc__.splitlines()[0], argv)
    args.device = "cpu"  # this benchmark is about the CPU path
    if args.quick:
        rows_list, hiddens, dtypes, batches, vocab = (1, 8), (96, 576), (torch.float32,), (1, 4), 4096
        decode_batches, cache_lengths, prompt_lengths = (1, 4), (128,), (64,)
    else:
        rows_list, hiddens, dtypes, batches, vocab = (1, 16, 512), (576, 2048, 8192), \
            (torch.float32, torch.bfloat16), (1, 8, 32), 128256
        decode_batches, cache_lengths, prompt_lengths = (1, 16), (128, 512, 1024, 4096), (128, 512, 1024)
    native.build()
    copy = common.copy_bandwidth("cpu")
    print(f"{common.header('cpu')}; copy bandwidth {copy:.1f} GB/s (over {common.stream_bytes('cpu') >> 20} MiB)")
    norms = []
    for op in ("rms_norm", "layer_norm"):
        for dtype in dtypes:
            for residual in (False, True):
                for rows in rows_list:
                    for hidden in hiddens:
                        case = {"op": op, "dtype": str(dtype).replace("torch.", ""), "residual": residual,
                                "rows": rows, "hidden": hidden}
                        norms += table_rows(case, *norm_case(op, dtype, rows, hidden, residual, args.reps), copy)
    common.print_table(norms, ["op", "dtype", "residual", "rows", "hidden", "provider", "median_ms", "p20_ms",
                               "p80_ms", "GB/s", "% copy", "vs torch"])
    samples = []
    for name, params in SAMPLING.items():
        for batch in batches:
            case = {"op": "sample", "params": name, "batch": batch, "vocab": vocab}
            samples += table_rows(case, *sample_case(params, batch, vocab, args.reps), copy)
    print()
    common.print_table(samples, ["params", "batch", "vocab", "provider", "median_ms", "p20_ms", "p80_ms", "GB/s",
                                 "% copy", "vs torch"])
    attention = []
    for dtype in dtypes:
        for batch in decode_batches:
            for length in cache_lengths:
                attention += attention_case("decode_attention", dtype, batch, length, args.reps)
                attention += paged_decode_case(dtype, batch, length, args.reps)
        for length in prompt_lengths:
            attention += attention_case("attention", dtype, 1, length, args.reps)
    print()
    common.print_table(attention, ["op", "dtype", "batch", "length", "provider", "median_ms", "p20_ms", "p80_ms",
                                   "GB/s", "% copy", "GFLOP/s", "vs torch", "vs sdpa", "vs dense"])
    rows = norms + samples + attention
    ratios = {op: [r["vs torch"] for r in rows if r["op"] == op and r["provider"] == "native"]
              for op in ("rms_norm", "layer_norm", "sample", "decode_attention", "paged_decode_attention", "attention")}
    for op, rs in ratios.items():
        print(f"native vs torch, {op}: min x{min(rs):.2f}, max x{max(rs):.2f} over {len(rs)} cases")
    paging = [r["vs dense"] for r in rows if r["op"] == "paged_decode_attention" and r["provider"] == "native"]
    print(f"paged vs dense native decode (block size {PAGE}): min x{min(paging):.2f}, max x{max(paging):.2f} "
          f"over {len(paging)} cases")
    path = common.save("native_cpu", args, rows, extra={"threads": torch.get_num_threads()})
    print(f"saved {path}")
    return rows


if __name__ == "__main__":
    main()
