"""decode_attention speed per provider: one new token per sequence over a KV cache.

Providers: torch (runtime/reference.py, only where its float32 copies of the
cache fit in REF_BYTES), sdpa (torch's scaled_dot_product_attention on the
cache sliced to the sequence length, enable_gqa), flash_attn
(flash_attn_with_kvcache, only when importable on CUDA) and triton
(fuselm.kernels.decode). Before timing, every provider is checked against the
reference on the first rows of the batch (as many as fit in REF_BYTES).

Every row attends to its whole cache (seqlens = Smax = L), so the sliced cache
SDPA reads is the same data. Bytes per call, e = element size:
    bytes = sum_b seqlens[b] * Hkv * D * 2 * e    (K and V, each read once)
          + 2 * B * Hq * D * e                    (q read, out written)
GB/s = bytes / median time; "% copy" = GB/s / measured copy bandwidth;
"vs X" = X's median time / this provider's. Caches under ~50 MB stay in the
GPU's L2 across repetitions, so the smallest cases can exceed DRAM bandwidth.

    python -m bench.decode           # CUDA: bf16, D=128, Hq=32, Hkv=8, batch 1..128, L 1k..32k
    python -m bench.decode --quick   # tiny sizes; CPU smoke run (triton only with TRITON_INTERPRET=1)
"""

import torch
import torch.nn.functional as F

from . import common
from fuselm import reference

DTYPE = torch.bfloat16
REF_BYTES = 4 << 30  # the reference materializes the cache in float32, repeated per query head


def _sdpa(q, k_cache, v_cache, seqlens):
    L = k_cache.shape[1]  # every row uses the whole cache in this benchmark
    out = F.scaled_dot_product_attention(q.unsqueeze(2), k_cache[:, :L].transpose(1, 2),
                                         v_cache[:, :L].transpose(1, 2), enable_gqa=True)
    return out.squeeze(2)                                            # [B, Hq, D]


def providers(device, quick, notes):
    """name -> decode function (q, k_cache, v_cache, seqlens) -> [B, Hq, D]; baselines first."""
    out = {"torch": reference.decode_attention, "sdpa": _sdpa}
    if device.type == "cuda":
        try:
            from flash_attn import flash_attn_with_kvcache
            out["flash_attn"] = lambda q, k, v, lens: flash_attn_with_kvcache(
                q.unsqueeze(1), k, v, cache_seqlens=lens.to(torch.int32)).squeeze(1)
        except ImportError:
            notes.append("flash_attn: not installed")
    if (impls := common.implementations("triton", ("decode_attention",), device, quick, notes)) is not None:
        out["triton"] = impls["decode_attention"]
    return out


def _ref_rows(B, L, Hq, D):
    """How many rows the float32 reference can take: ~4 float32 copies of a [L, Hq, D] cache each."""
    return max(1, min(B, REF_BYTES // (4 * L * Hq * D * 4)))


def run_case(fns, k_all, v_all, B, Hq, device, reps, notes):
    """Check then time every provider with batch B over caches k_all/v_all[:B]; returns table rows."""
    k, v = k_all[:B], v_all[:B]                                       # [B, L, Hkv, D]
    L, Hkv, D = k.shape[1:]
    q = torch.randn(B, Hq, D, device=device, dtype=DTYPE)
    seqlens = torch.full((B,), L, dtype=torch.int32, device=device)
    e = k.element_size()
    bytes_moved = int(seqlens.sum()) * Hkv * D * 2 * e + 2 * B * Hq * D * e
    r = _ref_rows(B, L, Hq, D)
    expected = reference.decode_attention(q[:r], k[:r], v[:r], seqlens[:r])
    times = {}
    for name, fn in fns.items():
        if name == "torch" and r < B:
            continue  # would not fit; checked on the first r rows instead
        try:
            out = fn(q, k, v, seqlens)
        except torch.cuda.OutOfMemoryError:  # a baseline that materializes the cache per query head
            notes.append(f"{name}: out of memory at batch {B}, cache length {L}")
            continue
        common.check_close(f"{name} B={B} L={L}", out[:r], expected, atol=2e-2, rtol=2e-2)
        del out
        times[name] = common.timeit(lambda: fn(q, k, v, seqlens), device, reps=reps)
    return common.bandwidth_rows({"batch": B, "cache_len": L}, times, bytes_moved, device,
                                 ("torch", "sdpa", "flash_attn"))


def main(argv=None):
    args = common.parse_args(__doc__.splitlines()[0], argv)
    device = torch.device(args.device)
    if args.quick:
        Hq, Hkv, D, batches, lengths = 4, 1, 64, (1, 2), (20, 50)
    else:
        Hq, Hkv, D, batches, lengths = 32, 8, 128, (1, 4, 16, 32, 64, 128), (1024, 4096, 8192, 16384, 32768)
    reps = args.reps or (3 if args.quick else None)  # the interpreter is slow; --quick only smoke-tests
    notes = []
    fns = providers(device, args.quick, notes)
    print(f"{common.header(device)}; copy bandwidth {common.copy_bandwidth(device):.1f} GB/s "
          f"(over {common.stream_bytes(device) >> 20} MiB); "
          f"{str(DTYPE).replace('torch.', '')}, Hq={Hq}, Hkv={Hkv}, D={D}")
    torch.manual_seed(0)
    results = []
    for L in lengths:
        # one cache per length, sliced per batch size (batch slices stay contiguous)
        k_all = torch.randn(max(batches), L, Hkv, D, device=device, dtype=DTYPE)
        v_all = torch.randn(max(batches), L, Hkv, D, device=device, dtype=DTYPE)
        for B in batches:
            results += run_case(fns, k_all, v_all, B, Hq, device, reps, notes)
        del k_all, v_all
    common.print_table(results, ["batch", "cache_len", "provider", "median_ms", "p20_ms", "p80_ms",
                                 "GB/s", "% copy", "vs torch", "vs sdpa", "vs flash_attn"])
    for note in notes:
        print("note:", note)
    path = common.save("decode", args, results, extra={
        "dtype": str(DTYPE), "q_heads": Hq, "kv_heads": Hkv, "head_dim": D, "notes": notes})
    print(f"saved {path}")
    return results


if __name__ == "__main__":
    main()
