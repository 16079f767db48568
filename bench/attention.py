"""Prefill attention: fuselm's Triton kernel vs torch SDPA (flash backend), and the reference when small.

    python -m bench.attention           # GPU sweep, bf16
    python -m bench.attention --quick   # tiny sizes; on the CPU the kernel runs under Triton's interpreter

FLOPs = 4 * B * Hq * D * pairs (two matmuls of 2 FLOPs per multiply-add), where
pairs = Sq * Sk without a mask, and Sq * Sk - Sq^2 / 2 when causal with Sq <= Sk
(the Sq x Sq diagonal square counts half, the FlashAttention convention:
Sq * Sk / 2 when Sq == Sk). TFLOP/s is reported with % of the measured bf16
matmul peak and the speedup over SDPA measured in the same run.

The GPU sweep keeps the work per case roughly constant: B * S = 16k tokens and
Hq * D = 2048, for S from 512 to 16k; plus a GQA case and a query chunk after a
cached prefix (bottom-right causal: SDPA gets causal_lower_right there, since
its is_causal aligns top-left). On the CPU (--quick) the SDPA baseline is its
math backend. Before timing, every provider's output is checked against
runtime/reference.py on the last query rows (bottom-right alignment makes them
the same rows of a shorter query).
"""
import os

import torch

from . import common

CHECK_ROWS = 64          # query rows checked against the reference before timing
REFERENCE_MAX = 2 ** 27  # time the reference only up to this many scores (B * Hq * Sq * Sk)


def cases(quick):
    """(B, Sq, Sk, Hq, Hkv, D, causal) per case."""
    if quick:
        return [(1, 32, 32, 2, 2, 64, True), (1, 32, 32, 2, 2, 64, False), (1, 16, 48, 4, 1, 64, True)]
    out = []
    for D in (64, 128):
        for causal in (True, False):
            for S in (512, 1024, 2048, 4096, 8192, 16384):
                out.append((16384 // S, S, S, 2048 // D, 2048 // D, D, causal))
    out.append((4, 4096, 4096, 32, 8, 128, True))   # GQA, Llama-3-8B-like heads
    out.append((4, 512, 8192, 32, 8, 128, True))    # a 512-token chunk after an 8k cached prefix
    return out


def flops(B, Sq, Sk, Hq, D, causal):
    pairs = Sq * Sk - Sq * Sq / 2 if causal and Sq <= Sk else Sq * Sk
    return 4 * B * Hq * D * pairs


def _sdpa(q, k, v, causal, backend):
    """SDPA on [B, H, S, D] tensors with one backend; bottom-right causal like fuselm."""
    from torch.nn.attention import sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    Sq, Sk = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    with sdpa_kernel(backend):
        if causal and Sq != Sk:
            return torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=causal_lower_right(Sq, Sk), enable_gqa=gqa)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)


def run_case(case, device, reps, sdpa_backend):
    from fuselm import ops, reference

    B, Sq, Sk, Hq, Hkv, D, causal = case
    dtype = torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, Sq, Hq, D, device=device, dtype=dtype, generator=gen)    # [B, Sq, Hq, D]
    k = torch.randn(B, Sk, Hkv, D, device=device, dtype=dtype, generator=gen)   # [B, Sk, Hkv, D]
    v = torch.randn(B, Sk, Hkv, D, device=device, dtype=dtype, generator=gen)
    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))            # SDPA layout [B, H, S, D]

    providers = {
        "triton": lambda: ops.attention(q, k, v, causal=causal, backend="triton"),
        "sdpa": lambda: _sdpa(qt, kt, vt, causal, sdpa_backend).transpose(1, 2),
    }
    if B * Hq * Sq * Sk <= REFERENCE_MAX:
        providers["torch"] = lambda: reference.attention(q, k, v, causal=causal)

    r = min(Sq, CHECK_ROWS)
    expected = reference.attention(q[:1, -r:], k[:1], v[:1], causal=causal)
    work = flops(B, Sq, Sk, Hq, D, causal)
    label = f"B={B} Sq={Sq} Sk={Sk} H={Hq}/{Hkv} D={D} {'causal' if causal else 'full'}"
    rows = []
    for name, fn in providers.items():
        row = {"case": label, "provider": name, "B": B, "Sq": Sq, "Sk": Sk, "Hq": Hq, "Hkv": Hkv, "D": D,
               "causal": causal, "dtype": str(dtype).replace("torch.", "")}
        try:
            out = fn()
        except RuntimeError as e:  # e.g. SDPA's flash backend refusing a shape: say so, time nothing
            row["error"] = str(e).splitlines()[0][:120]
            rows.append(row)
            continue
        common.check_close(f"{name} {label}", out[:1, -r:], expected, atol=2e-2, rtol=2e-2)
        row.update(common.timeit(fn, device, reps=reps))
        row["TFLOPs"] = work / row["median_ms"] / 1e9
        rows.append(row)
    sdpa_ms = next((r["median_ms"] for r in rows if r["provider"] == "sdpa" and "median_ms" in r), None)
    for row in rows:
        if sdpa_ms and "median_ms" in row:
            row["speedup_vs_sdpa"] = sdpa_ms / row["median_ms"]
    return rows


def main(argv=None):
    args = common.parse_args("prefill attention: triton vs SDPA flash vs reference", argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        # the Triton kernel runs on CPU tensors only under the interpreter; set before triton loads it
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from torch.nn.attention import SDPBackend

    sdpa_backend = SDPBackend.FLASH_ATTENTION if device.type == "cuda" else SDPBackend.MATH
    peak = common.matmul_peak(device, torch.bfloat16)
    rows = []
    for case in cases(args.quick):
        rows += run_case(case, device, args.reps, sdpa_backend)
    for row in rows:
        if "TFLOPs" in row:
            row["pct_matmul_peak"] = 100 * row["TFLOPs"] / peak
    print(f"attention on {common.header(device)}; bf16 matmul peak {peak:.4g} TFLOP/s; "
          f"SDPA baseline: {sdpa_backend.name}")
    common.print_table(rows, ["case", "provider", "median_ms", "p20_ms", "p80_ms", "TFLOPs",
                              "pct_matmul_peak", "speedup_vs_sdpa", "error"])
    path = common.save("attention", args, rows, extra={
        "matmul_peak_TFLOPs": peak, "sdpa_backend": sdpa_backend.name,
        "flops": "4*B*Hq*D*pairs; pairs = Sq*Sk, or Sq*Sk - Sq^2/2 when causal",
    })
    print(f"saved {path}")
    return rows


if __name__ == "__main__":
    main()
