"""Sampling speed: temperature with top-k / top-p, without a sort (fuselm) and with one.

Providers: "torch" (runtime/reference.py: two sorts, then torch.multinomial),
"sort" (a plain sort-based top-k / top-p sampler as vLLM ran it before its
FlashInfer sampler: one sort, masks on the sorted logits, scatter back,
exponential race), triton (fuselm.kernels.sampling) and native (when it
builds). Before timing, every provider's tokens must lie in the reference's
kept set.

Logits are float32 randn * 2.5 (a broad distribution: top_p=0.9 keeps
thousands of tokens, the hard case for a threshold search). Bytes per call for
B rows of V logits, the minimum any sampler must move:
    bytes = B * V * 4            (the logits read once)
GB/s = bytes / median time; "% copy" = GB/s / measured copy bandwidth;
"vs sort" / "vs torch" = that baseline's median time / this provider's.

    python -m bench.sampling          # CUDA: batch 1..128, vocab 32k..256k, top_k=50 / top_p=0.9 / both
    python -m bench.sampling --quick  # tiny sizes; CPU smoke run (triton only with TRITON_INTERPRET=1)
"""

import torch

from . import common
from fuselm import reference

TEMPERATURE = 1.0
FILTERS = {"top_k=50": dict(top_k=50), "top_p=0.9": dict(top_p=0.9), "both": dict(top_k=50, top_p=0.9)}


def sort_sampler(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """vLLM's sampler before FlashInfer: sort once, mask top-k / top-p there, scatter back, race."""
    logits = logits.float() / temperature
    V = logits.shape[-1]
    logits_sort, logits_idx = logits.sort(dim=-1, descending=False)
    if top_k:
        kth = logits_sort[:, V - top_k].unsqueeze(1)
        logits_sort.masked_fill_(logits_sort < kth, float("-inf"))
    if top_p < 1.0:
        cum = logits_sort.softmax(-1).cumsum(-1)
        drop = cum <= 1 - top_p
        drop[:, -1] = False  # the most probable token always stays
        logits_sort.masked_fill_(drop, float("-inf"))
    logits = torch.empty_like(logits_sort).scatter_(-1, logits_idx, logits_sort)
    probs = logits.softmax(-1)
    q = torch.empty_like(probs).exponential_(generator=generator)
    return probs.div_(q).argmax(-1)


def providers(device, quick, notes):
    """name -> sample(logits, generator=..., **params); the baselines first."""
    out = {"sort": sort_sampler, "torch": reference.sample}
    for backend in ("triton", "native"):
        if (impls := common.implementations(backend, ("sample",), device, quick, notes)) is not None:
            out[backend] = impls["sample"]
    return out


def run_case(fns, batch, vocab, filt, device, reps, notes):
    """Check then time every provider on one case; returns the table rows."""
    g = torch.Generator().manual_seed(batch * 7 + vocab)
    logits = (torch.randn(batch, vocab, generator=g) * 2.5).to(device)
    params = dict(temperature=TEMPERATURE, **FILTERS[filt])
    kept = reference.sampling_probs(logits, **params) > 0                  # [B, V]
    bytes_moved = batch * vocab * 4
    times = {}
    for name, fn in list(fns.items()):
        gen = torch.Generator(device=device).manual_seed(0)
        tokens = common.run_or_drop(fns, name, lambda: fn(logits, generator=gen, **params), notes)
        if name not in fns:
            continue
        inside = kept.gather(1, tokens.view(-1, 1).long())
        if not bool(inside.all()):
            raise AssertionError(f"{name}: drew a token outside the reference's kept set "
                                 f"({filt}, B={batch}, V={vocab})")
        times[name] = common.timeit(lambda: fn(logits, generator=gen, **params), device, reps=reps)
    case = {"filter": filt, "batch": batch, "vocab": vocab}
    return common.bandwidth_rows(case, times, bytes_moved, device, ("sort", "torch"))


def main(argv=None):
    args = common.parse_args(__doc__.splitlines()[0], argv)
    device = torch.device(args.device)
    if args.quick:
        batches, vocabs = (1, 4), (1000,)
    else:
        batches, vocabs = (1, 8, 32, 128), (32000, 128256, 256000)
    notes = []
    fns = providers(device, args.quick, notes)
    print(f"{common.header(device)}; copy bandwidth {common.copy_bandwidth(device):.1f} GB/s "
          f"(over {common.stream_bytes(device) >> 20} MiB); "
          f"float32 logits, temperature {TEMPERATURE}")
    results = []
    for filt in FILTERS:
        for vocab in vocabs:
            for batch in batches:
                results += run_case(fns, batch, vocab, filt, device, args.reps, notes)
    common.print_table(results, ["filter", "vocab", "batch", "provider", "median_ms", "p20_ms", "p80_ms",
                                 "GB/s", "% copy", "vs sort", "vs torch"])
    for note in notes:
        print("note:", note)
    path = common.save("sampling", args, results, extra={"temperature": TEMPERATURE, "notes": notes})
    print(f"saved {path}")
    return results


if __name__ == "__main__":
    main()
