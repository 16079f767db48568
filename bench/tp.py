"""What tensor parallelism costs per token on the CPU: tp=1 against tp=2 ranks over gloo.

bench/e2e.py's random-weight Llama of the CPU shape (8 layers, hidden 512, 8 query / 2 KV heads,
intermediate 1536, SmolLM2's 49152-token vocabulary: 50M parameters) in float32 (--quick: its quick
shape), loaded with the default
backend at tp=1 and at tp=2 (2 spawned ranks splitting the cores); batch-1 greedy decode of N new
tokens after a 32-token prompt, EOS ignored, rounds alternating between the two:
    ms/token = (time of the last N - 1 tokens) / (N - 1), median over rounds.
On one machine both ranks share its cores and memory bandwidth, so tp=2 cannot be faster: the
difference is what the 2 all-reduces per layer, the lm_head's all-gather and the broadcast of each
step cost (fuselm/tp.py). The greedy tokens of both are checked equal first.

    python -m bench.tp            # ~1 minute
    python -m bench.tp --quick
"""
import statistics
import tempfile
import time
from pathlib import Path

import torch

from . import common
from .e2e import LLAMA_CPU, LLAMA_QUICK, VOCAB, _tokenizer

ROUNDS = 3


def save_model(path, quick, notes):
    """e2e's random-weight Llama of the CPU shape (or the quick one), float32 safetensors."""
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, **(LLAMA_QUICK if quick else LLAMA_CPU))
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(path)
    _tokenizer(notes).save(str(Path(path) / "tokenizer.json"))
    return path


def main(argv=None):
    args = common.parse_args(__doc__.splitlines()[0], argv)
    args.device = "cpu"
    import fuselm
    n = 8 if args.quick else 64
    with tempfile.TemporaryDirectory() as tmp:
        notes = []
        path = save_model(tmp, args.quick, notes)
        models = {1: fuselm.load(path, dtype="float32", device="cpu", progress=False)}
        threads = {1: torch.get_num_threads()}
        models[2] = fuselm.load(path, dtype="float32", device="cpu", progress=False, tp=2)
        threads[2] = torch.get_num_threads()  # rank 0's share of the cores
        prompt = list(range(1, 33))
        engines = {k: m.engine(max_num_seqs=1, max_model_len=256) for k, m in models.items()}
        tokens = {k: e.submit(prompt, max_new_tokens=n, ignore_eos=True).result().token_ids for k, e in engines.items()}
        if tokens[1] != tokens[2]:
            raise SystemExit(f"tp=2 gave other greedy tokens than tp=1: {tokens[2][:8]} vs {tokens[1][:8]}")
        rounds = {k: [] for k in models}
        for _ in range(1 if args.quick else ROUNDS):
            for k, e in engines.items():
                torch.set_num_threads(threads[k])  # tp=1 on every core, each tp=2 rank on its share
                h = e.submit(prompt, max_new_tokens=n, ignore_eos=True)
                stamps = []
                for _piece in h.deltas():
                    stamps.append(time.perf_counter())
                rounds[k].append((stamps[-1] - stamps[0]) / max(1, len(stamps) - 1) * 1e3)
        models[2].close()
    rows = [{"tp": k, "ms_per_token": statistics.median(v), "tok_s": 1e3 / statistics.median(v), "rounds": v}
            for k, v in rounds.items()]
    rows[1]["x_tp1"] = rows[0]["ms_per_token"] / rows[1]["ms_per_token"]
    print(common.header("cpu"))
    common.print_table(rows, ["tp", "ms_per_token", "tok_s", "x_tp1"])
    for note in notes:
        print("note:", note)
    print(f"saved {common.save('tp', args, rows, extra={'new_tokens': n, 'notes': notes})}")
    return rows


if __name__ == "__main__":
    main()
