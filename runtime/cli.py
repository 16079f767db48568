"""The `fuselm` command: generate, chat, serve, bench.

    fuselm generate "The capital of France is" --max-new-tokens 32
    fuselm generate --chat "What is the capital of France?"
    fuselm chat --model path/to/model.gguf
    fuselm serve --port 8000          # an OpenAI-compatible server at http://127.0.0.1:8000/v1
    fuselm bench --quick
"""
import argparse
import logging
import sys

DEFAULT_MODEL = "smollm2-135m-instruct"


def _model_args(p):
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"a Hugging Face directory, a .gguf file or a built-in name (default {DEFAULT_MODEL})")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: best for the device)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when present)")
    p.add_argument("--backend", default="auto", help="auto | torch | triton | native")
    p.add_argument("--quant", default="keep", choices=("keep", "dequantize"),
                   help="GGUF block-quantized weights: keep them quantized (default, where the device has "
                        "quantized matmuls) or dequantize them at load")
    p.add_argument("--quantize", default=None, choices=("q8_0", "q4_0", "q4_1"),
                   help="quantize dense (safetensors) weights at load")
    p.add_argument("--tp", type=int, default=1, help="tensor parallelism: shard the model over N processes "
                                                     "(GPUs, or CPU processes sharing the cores; default 1)")


def _sampling_args(p):
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def _sampling(a):
    return dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                min_p=a.min_p, seed=a.seed, stop=a.stop)


def _load(a):
    import fuselm
    return fuselm.load(a.model, dtype=a.dtype, device=a.device, backend=a.backend, quant=a.quant, quantize=a.quantize,
                       tp=a.tp)


def _report(model):
    s = model.last_stats
    cached = f" ({s.cached_tokens} from the prefix cache)" if s.cached_tokens else ""
    print(f"\n[{s.prompt_tokens} prompt tokens{cached}, {s.new_tokens} new tokens; prefill "
          f"{s.prompt_tokens / max(s.prefill_seconds, 1e-9):.1f} tokens/s, decode "
          f"{s.decode_tokens_per_s:.1f} tokens/s]", file=sys.stderr)


def cmd_generate(a):
    model = _load(a)
    if a.chat and model.tokenizer.chat_template is None:
        raise ValueError(f"{a.model} has no chat template; leave out --chat")
    run = (lambda **kw: model.chat([{"role": "user", "content": a.prompt}], **kw)) if a.chat else (
        lambda **kw: model.generate(a.prompt, **kw))
    for piece in run(stream=True, **_sampling(a)):
        print(piece, end="", flush=True)
    print()
    _report(model)


def cmd_chat(a):
    model = _load(a)
    if model.tokenizer.chat_template is None:
        raise ValueError(f"{a.model} has no chat template; use `fuselm generate`")
    messages = [{"role": "system", "content": a.system}] if a.system else []
    print("fuselm chat: type a message, Ctrl-D to quit.", file=sys.stderr)
    while True:
        try:
            user = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return
        if not user.strip():
            continue
        messages.append({"role": "user", "content": user})
        reply = []
        for piece in model.chat(messages, stream=True, **_sampling(a)):
            reply.append(piece)
            print(piece, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": "".join(reply)})


def cmd_serve(a):
    from fuselm.serve.server import kv_cache_memory, serve
    load = dict(dtype=a.dtype, device=a.device, backend=a.backend, quant=a.quant, quantize=a.quantize, tp=a.tp)
    return serve(a.model, host=a.host, port=a.port, api_key=a.api_key, served_model_name=a.served_model_name,
                 max_num_seqs=a.max_num_seqs, max_queue=a.max_queue, kv_cache_memory=kv_cache_memory(a.kv_cache_memory),
                 max_model_len=a.max_model_len, load_kwargs=load, verbose=a.verbose)


def cmd_bench(a):
    from fuselm.bench import run
    run.main((["--quick"] if a.quick else []) + [f"--{k}={v}" for k in ("only", "device", "out")
                                                    if (v := getattr(a, k)) is not None])


def build_parser():
    p = argparse.ArgumentParser(prog="fuselm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="log which backend each op runs on")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="complete a prompt, streaming")
    g.add_argument("prompt")
    g.add_argument("--chat", action="store_true", help="send the prompt as a user message through the model's "
                                                      "chat template (instruct models)")
    _model_args(g)
    _sampling_args(g)
    g.set_defaults(func=cmd_generate)
    c = sub.add_parser("chat", help="interactive chat with the model's chat template")
    _model_args(c)
    _sampling_args(c)
    c.add_argument("--system", default=None, help="a system message")
    c.set_defaults(func=cmd_chat)
    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    _model_args(s)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1, /tokenize and "
                                                   "/detokenize")
    s.add_argument("--served-model-name", default=None, help="the model's name in the API (default: --model)")
    s.add_argument("--max-num-seqs", type=int, default=16, help="requests running at once (default 16)")
    s.add_argument("--max-queue", type=int, default=256, help="requests waiting beyond those running; more get "
                                                              "503 (default 256)")
    s.add_argument("--kv-cache-memory", default=None, help="KV cache: bytes, a size such as 512MiB, or a share of "
                                                           "free memory such as 0.5 (default: a full context per "
                                                           "sequence, at most a quarter of free memory)")
    s.add_argument("--max-model-len", type=int, default=None, help="the longest a request (prompt + output) may "
                                                                   "grow, in tokens (default: the model's context)")
    s.set_defaults(func=cmd_serve)
    b = sub.add_parser("bench", help="run the benchmarks and write bench/results/<device>/")
    b.add_argument("--quick", action="store_true", help="tiny sizes")
    b.add_argument("--only", default=None, help="comma-separated benchmarks (default: all; see python -m "
                                               "fuselm.bench.run --help)")
    b.add_argument("--device", default=None, help="cuda or cpu (default: cuda when there is a GPU)")
    b.add_argument("--out", default=None, help="results folder (default: bench/results/<device> in a checkout, "
                                               "else ./fuselm-bench/<device>)")
    b.set_defaults(func=cmd_bench)
    return p


def main(argv=None):
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, format="%(message)s")
    try:
        status = a.func(a)
    except (ValueError, FileNotFoundError, RuntimeError, TypeError) as e:
        print(f"fuselm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
