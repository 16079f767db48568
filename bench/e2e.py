"""End-to-end greedy decode and prefill speed: fuselm's runtime against transformers, in one run.

Each provider generates exactly N new tokens greedily (EOS ignored) from the
same prompt; runs alternate between providers so machine noise hits all of
them alike. decode tokens/s = batch * (N - 1) / (time for N tokens - time for 1),
prefill tokens/s = batch * prompt length / (time for 1 token).
Bandwidth estimate: decode reads every weight once per step, so
GB/s = weight bytes * steps/s; its % of the measured copy bandwidth says how
close decode is to the limit. Greedy tokens of fuselm float32 and transformers
float32 must be identical (checked before timing is reported).
"""
import statistics
import time

import torch

from bench import common


def _fuselm(model):
    from fuselm.generate import Stats, generate_tokens

    def run(ids, n):
        steps = generate_tokens(model, ids, n, lambda logits: logits.argmax(-1), Stats())
        return [list(t) for t in zip(*steps)]
    return run


def _hf(model):
    def run(ids, n):
        batch = torch.tensor(ids, device=model.device)
        with torch.inference_mode():
            out = model.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=n,
                                 min_new_tokens=n, do_sample=False, pad_token_id=0)
        return out[:, batch.shape[1]:].tolist()
    return run


def _timed(run, ids, n, device):
    common._sync(device)
    t0 = time.perf_counter()
    tokens = run(ids, n)
    common._sync(device)
    return time.perf_counter() - t0, tokens


def providers(source, device, dtypes, hf_source):
    """name -> (run function, weight bytes); fuselm in the given dtypes, transformers eager/sdpa float32."""
    import fuselm
    import transformers
    out = {}
    for dt in dtypes:
        m = fuselm.load(source, dtype=dt, device=device, progress=False)
        out[f"fuselm {str(m.dtype).replace('torch.', '')}"] = (_fuselm(m), _weight_bytes(m.net.w.values()))
    for impl in ("eager", "sdpa"):
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            hf_source[0], dtype=torch.float32, attn_implementation=impl, **hf_source[1]).to(device).eval()
        out[f"transformers {impl} float32"] = (_hf(hf), _weight_bytes(hf.parameters()))
    return out


def _weight_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())


def measure(provs, prompt_ids, n_new, reps, device):
    """Alternate providers rep by rep; return rows of medians, and each provider's tokens."""
    times = {name: {"one": [], "all": []} for name in provs}
    tokens = {}
    for _ in range(reps):
        for name, (run, _) in provs.items():
            times[name]["one"].append(_timed(run, prompt_ids, 1, device)[0])
            t, tokens[name] = _timed(run, prompt_ids, n_new, device)
            times[name]["all"].append(t)
    copy = common.copy_bandwidth(device)
    rows = []
    B, S = len(prompt_ids), len(prompt_ids[0])
    for name, (_, wbytes) in provs.items():
        one, full = statistics.median(times[name]["one"]), statistics.median(times[name]["all"])
        steps_per_s = (n_new - 1) / max(full - one, 1e-9)
        rows.append({"provider": name, "batch": B, "prompt": S, "new": n_new,
                     "prefill_tok_s": B * S / one, "decode_tok_s": B * steps_per_s,
                     "weight_GBps": wbytes * steps_per_s / 1e9,
                     "pct_copy_bw": 100 * wbytes * steps_per_s / 1e9 / copy})
    base = next(r["decode_tok_s"] for r in rows if r["provider"] == "transformers eager float32")
    for r in rows:
        r["x_vs_transformers"] = r["decode_tok_s"] / base
    return rows, tokens


def main(argv=None):
    args = common.parse_args(__doc__.splitlines()[0], argv)
    from fuselm.weights import resolve_source
    _, path = resolve_source("smollm2-135m-instruct")
    n_new = 8 if args.quick else 64
    reps = args.reps or (1 if args.quick else 3)
    import fuselm
    default_dtype = str(fuselm.model.default_dtype(torch.device(args.device))).replace("torch.", "")
    dtypes = sorted({default_dtype, "float32"})
    provs = providers("smollm2-135m-instruct", args.device, dtypes, (path.parent, {"gguf_file": path.name}))
    prompt = [[504, 3458, 282, 4649, 314, 253, 1345, 28, 284]]  # "The capital of France is a city, and"
    rows, tokens = measure(provs, prompt, n_new, reps, args.device)
    if tokens["fuselm float32"] != tokens["transformers eager float32"]:
        raise AssertionError("fuselm float32 and transformers disagree on greedy tokens")
    common.print_table(rows, ["provider", "batch", "prefill_tok_s", "decode_tok_s", "weight_GBps",
                              "pct_copy_bw", "x_vs_transformers"])
    print("saved", common.save("e2e", args, rows))
    return rows


if __name__ == "__main__":
    main()
