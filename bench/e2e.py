"""End-to-end greedy decode and prefill speed: fuselm's runtime against transformers, in one run.

Models: the built-in SmolLM2-135M (fuselm in its default dtype and in float32,
transformers in float32, as a CPU user runs it) and a random-weight Llama of
Llama-3.2-1B shape in bfloat16 (50M parameters on the CPU, tiny with --quick). Providers per
model: fuselm's own runtime, transformers eager and sdpa, and transformers with
`fuselm.hf.apply`. Batches 1 and 16 (1 and 4 with --quick).

Each provider generates exactly N new tokens greedily (EOS ignored) from the
same prompts; runs alternate between providers so machine noise hits all alike.
decode tokens/s = B * (N - 1) / (time for N tokens - time for 1 token),
prefill tokens/s = B * S / (time for 1 token).
Bandwidth: each decode step reads every weight once, so
weight GB/s = weight bytes * steps/s; its % of the measured copy bandwidth
says how close decode is to the limit. Before any number is reported, fuselm
float32 and transformers float32 must produce identical greedy tokens on SmolLM2.
"""
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench import common

LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, head_dim=64, max_position_embeddings=4096, rope_theta=500000.0,
                tie_word_embeddings=True)
# the CPU cannot decode the 1B shape in bf16 in useful time (~2.5 GB read per token): a 50M-parameter one
LLAMA_CPU = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                 num_key_value_heads=2, head_dim=64, max_position_embeddings=2048, tie_word_embeddings=True)
LLAMA_QUICK = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                   num_key_value_heads=2, head_dim=32, max_position_embeddings=1024, tie_word_embeddings=True)

TEXT = ("The history of computing is a story of machines that grew faster and smaller while the "
        "problems people asked of them grew larger. Early computers filled rooms and used vacuum tubes. ")


def _weight_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())


def _fuselm(model):
    from fuselm.generate import Stats, generate_tokens

    def run(ids, n):
        steps = generate_tokens(model, ids, n, lambda logits: logits.argmax(-1), Stats())
        return [list(t) for t in zip(*steps)]
    return run


def _hf(model, patch):
    """transformers generate; patch: None, an attn implementation name, or "fuselm.hf"."""
    import fuselm.hf

    def run(ids, n):
        if patch == "fuselm.hf":
            fuselm.hf.apply(model)
        else:
            model.set_attn_implementation(patch)
        batch = torch.tensor(ids, device=model.device)
        try:
            with torch.inference_mode():
                out = model.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=n,
                                     min_new_tokens=n, do_sample=False, pad_token_id=0)
        finally:
            if patch == "fuselm.hf":
                fuselm.hf.revert(model)
        return out[:, batch.shape[1]:].tolist()
    return run


def _timed(run, ids, n, device):
    common._sync(device)
    t0 = time.perf_counter()
    tokens = run(ids, n)
    common._sync(device)
    return time.perf_counter() - t0, tokens


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
    B, S = len(prompt_ids), len(prompt_ids[0])
    rows = []
    for name, (_, wbytes) in provs.items():
        one, full = statistics.median(times[name]["one"]), statistics.median(times[name]["all"])
        steps_per_s = (n_new - 1) / max(full - one, 1e-9)
        rows.append({"provider": name, "batch": B, "prompt": S, "new": n_new,
                     "prefill_tok_s": B * S / one, "decode_tok_s": B * steps_per_s,
                     "weight_GBps": wbytes * steps_per_s / 1e9,
                     "pct_copy_bw": 100 * wbytes * steps_per_s / 1e9 / copy})
    base = statistics.median(r["decode_tok_s"] for r in rows if r["provider"].startswith("transformers eager"))
    for r in rows:
        r["x_vs_transformers_eager"] = r["decode_tok_s"] / base
    return rows, tokens


def _providers(fuselm_models, hf_model, hf_dtype):
    import fuselm.hf  # noqa: F401  (registers the "fuselm" attention)
    provs = {f"fuselm {str(m.dtype)[6:]}": (_fuselm(m), _weight_bytes(m.net.w.values())) for m in fuselm_models}
    hf_bytes = _weight_bytes(hf_model.parameters())
    for patch in ("eager", "sdpa", "fuselm.hf"):
        label = "transformers + fuselm.hf.apply" if patch == "fuselm.hf" else f"transformers {patch}"
        provs[f"{label} {hf_dtype}"] = (_hf(hf_model, patch), hf_bytes)
    return provs


def smollm2(device):
    import fuselm
    import transformers
    from fuselm.model import default_dtype
    from fuselm.weights import resolve_source
    _, path = resolve_source("smollm2-135m-instruct")
    dtypes = dict.fromkeys([default_dtype(torch.device(device)), torch.float32])
    ours = [fuselm.load("smollm2-135m-instruct", dtype=dt, device=device, progress=False) for dt in dtypes]
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return ours, hf.to(device).eval(), "float32"


def random_llama(device, shape, tmp):
    """A random-weight Llama of `shape`, bf16, saved as safetensors with SmolLM2's tokenizer."""
    import fuselm
    import transformers
    from fuselm.weights import open_checkpoint
    tok = open_checkpoint("smollm2-135m-instruct").tokenizer()
    cfg = transformers.LlamaConfig(vocab_size=tok.vocab_size, **shape)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    hf.save_pretrained(tmp)
    tok._backend.save(str(Path(tmp) / "tokenizer.json"))
    ours = fuselm.load(tmp, dtype="bfloat16", device=device, progress=False)
    return [ours], hf.to(device).eval(), "bfloat16"


def main(argv=None):
    args = common.parse_args(__doc__.splitlines()[0], argv, extra=lambda p: p.add_argument(
        "--models", default="smollm2,llama-1b", help="comma-separated subset of smollm2,llama-1b"))
    quick = args.quick
    wanted = args.models.split(",")
    cpu = args.device == "cpu"
    n_new, reps, prompt_len = (8, 1, 16) if quick else (32 if cpu else 64, 3, 128)
    batches = (1, 4) if quick else (1, 16)
    llama, llama_label = ((LLAMA_QUICK, "Llama tiny shape (quick)") if quick else
                          (LLAMA_CPU, "Llama 50M shape (CPU)") if cpu else (LLAMA_1B, "Llama 1B shape"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        models = {"smollm2": ("SmolLM2-135M", lambda: smollm2(args.device)),
                  "llama-1b": (llama_label, lambda: random_llama(args.device, llama, tmp))}
        for label, make in (models[m] for m in wanted):
            ours, hf, hf_dtype = make()
            provs = _providers(ours, hf, hf_dtype)
            prompt = ours[0].tokenizer.encode(TEXT * (1 + prompt_len // 60))[:prompt_len]
            for B in batches:
                batch_rows, tokens = measure(provs, [prompt] * B, n_new, args.reps or reps, args.device)
                if label.startswith("SmolLM2") and tokens["fuselm float32"] != tokens["transformers eager float32"]:
                    raise AssertionError(f"fuselm float32 and transformers disagree on greedy tokens (batch {B})")
                rows += [{"model": label, **r} for r in batch_rows]
            del provs, ours, hf
    common.print_table(rows, ["model", "provider", "batch", "prefill_tok_s", "decode_tok_s", "weight_GBps",
                              "pct_copy_bw", "x_vs_transformers_eager"])
    print("saved", common.save("e2e", args, rows))
    return rows


if __name__ == "__main__":
    main()
