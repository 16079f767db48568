"""Tensor parallelism (fuselm.tp) on CPU ranks over gloo: 2 processes give one process's tokens.

- The shard plan: heads, KV heads (replicated when fewer than ranks), intermediate rows and
  vocabulary slices; a bad split raises before any weight is read or any process starts.
- Weight slicing: the ranks' column-parallel rows and row-parallel columns put back together are
  the full weight; a quantized row-parallel weight whose blocks straddle the split is refused.
- End to end with 2 spawned ranks: tiny Llama (4 query heads over 2 KV heads, and over 1: fewer KV
  heads than ranks) and GPT-2 in float32 give the greedy tokens of one process and logits within a
  float32 tolerance; a GGUF Q8_0 model kept quantized too; the collectives per pass are as designed
  (2 all-reduces per layer, 1 all-gather); a rank that dies makes the caller get an error, not a hang.
"""
import os
import signal

import pytest
import torch

import fuselm
from fuselm import quant, tp
from tests.fixtures import save_tiny_gguf, save_tiny_model

PROMPTS = ["hello world", "a longer prompt with more words"]


@pytest.fixture(autouse=True)
def _no_group_left():
    """A test that fails mid-way must not leave its ranks (and this process's group) to the next one."""
    yield
    tp._close_all()


def tiny_config(arch="llama", **kw):
    from fuselm.weights import open_checkpoint
    return open_checkpoint(save_tiny_model(arch, kw.pop("path"), **kw)).config


# ---------------------------------------------------------------- the plan and the slices

def test_plan_splits_heads_kv_heads_intermediate_and_vocabulary(tmp_path):
    c = tiny_config(path=tmp_path / "a")                                   # 4 heads, 2 KV heads, I 128
    shards = [tp.plan(c, 2, r) for r in range(2)]
    assert [(s.heads, s.q0, s.kv_heads, s.kv0, s.intermediate, s.i0) for s in shards] == [
        (2, 0, 1, 0, 64, 0), (2, 2, 1, 1, 64, 64)]
    assert shards[0].vocab == (0, c.vocab_size // 2, c.vocab_size)
    one = tiny_config(path=tmp_path / "b", num_key_value_heads=1)
    assert [(s.kv_heads, s.kv0) for s in (tp.plan(one, 2, r) for r in range(2))] == [(1, 0), (1, 0)]  # replicated
    four = [tp.plan(c, 4, r) for r in range(4)]
    assert [s.kv0 for s in four] == [0, 0, 1, 1] and all(s.heads == 1 for s in four)


@pytest.mark.parametrize("size, match", [(3, "4 attention heads"), (0, "integer >= 1")])
def test_bad_split_is_refused_before_loading(tmp_path, size, match):
    path = save_tiny_model("llama", tmp_path)
    with pytest.raises(ValueError, match=match):
        fuselm.load(path, dtype="float32", device="cpu", tp=size, progress=False)


@pytest.mark.parametrize("change, match", [
    (dict(num_heads=12, num_kv_heads=3), "3 key/value heads"), (dict(intermediate_size=129), "intermediate size 129")])
def test_each_bad_split_is_named(tmp_path, change, match):
    import dataclasses
    c = dataclasses.replace(tiny_config(path=tmp_path), **change)
    with pytest.raises(ValueError, match=match):
        tp.plan(c, 2, 0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_slices_put_back_together_are_the_weights(tmp_path, arch):
    path = save_tiny_model(arch, tmp_path)
    full = fuselm.load(path, dtype="float32", device="cpu", backend="torch", progress=False).net
    c = full.config
    from fuselm.model import load_weights
    from fuselm.weights import open_checkpoint
    ckpt = open_checkpoint(path)
    parts = [load_weights(ckpt, torch.float32, torch.device("cpu"), progress=False, shard=tp.plan(c, 2, r))
             for r in range(2)]
    D, I = c.head_dim, c.intermediate_size
    for name, w in full.w.items():
        a, b = parts[0][name], parts[1][name]
        kind, proj = tp._kind(name.replace(".bias", ".weight"))
        if kind is None:
            assert torch.equal(a, w) and torch.equal(b, w), name                      # replicated
        elif kind == "row" and name.endswith(".bias"):
            assert torch.equal(a, w) and not b.any(), name                            # added once
        elif kind == "row":
            assert torch.equal(torch.cat([a, b], dim=1), w), name
        elif kind == "lm_head":
            assert torch.equal(torch.cat([a, b]), w), name
        elif proj == "qkv":  # [q; k; v] of each rank: its query heads, its KV heads
            H, Hkv = c.num_heads, c.num_kv_heads
            q, k, v = w.split([H * D, Hkv * D, Hkv * D])
            for r, part in enumerate((a, b)):
                s = tp.plan(c, 2, r)
                expect = torch.cat([q[s.q0 * D:(s.q0 + s.heads) * D], k[s.kv0 * D:(s.kv0 + s.kv_heads) * D],
                                    v[s.kv0 * D:(s.kv0 + s.kv_heads) * D]])
                assert torch.equal(part, expect), name
        elif proj == "gate_up":
            gate, up = w.split([I, I])
            assert torch.equal(torch.cat([a, b]), torch.cat([gate[:I // 2], up[:I // 2], gate[I // 2:], up[I // 2:]]))
        else:  # fc
            assert torch.equal(torch.cat([a, b]), w), name


def test_quantized_row_parallel_blocks_must_not_straddle(tmp_path):
    c = tiny_config(path=tmp_path / "c", intermediate_size=64)                 # down: 64 columns, 32 per rank
    tp.check_blocks(tp.plan(c, 2, 1), c, {"layers.0.down.weight": ["Q8_0"]})     # 32-blocks: fine
    with pytest.raises(ValueError, match=r"layers.0.down.weight: its Q4_K blocks of 256 columns straddle"):
        tp.check_blocks(tp.plan(c, 2, 1), c, {"layers.0.down.weight": ["Q4_K"]})
    # end to end: 96 columns, 48 per rank, in 32-blocks: refused before any weight is read, the group stopped
    gguf_file = save_tiny_gguf(save_tiny_model("llama", tmp_path / "hf", intermediate_size=96), tmp_path / "m.gguf",
                               qtype="Q8_0")
    with pytest.raises(ValueError, match=r"down.weight: its Q8_0 blocks of 32 columns straddle the tp=2 split"):
        fuselm.load(gguf_file, dtype="float32", device="cpu", progress=False, tp=2)
    import torch.distributed as dist
    assert not dist.is_initialized()
    dense = fuselm.load(gguf_file, dtype="float32", device="cpu", progress=False, tp=2, quant="dequantize")
    assert dense.generate("hello", max_new_tokens=2)  # dense weights split at any column
    dense.close()


# ---------------------------------------------------------------- 2 ranks, end to end

def _pair(path, **kw):
    one = fuselm.load(path, dtype="float32", device="cpu", progress=False, **kw)
    two = fuselm.load(path, dtype="float32", device="cpu", progress=False, tp=2, **kw)
    return one, two


def _same_tokens_and_close_logits(one, two):
    ids = torch.tensor([one.tokenizer.encode("hello world, a longer prompt")])
    expected, got = one.logits(ids), two.logits(ids)
    # the same float32 weights; a row-parallel projection sums two partial dot products instead of one:
    # reordering K float32 additions moves each by ~K u |x||w|, far below 1e-4 of these logits' range
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max(), (got - expected).abs().max()
    assert two.generate(PROMPTS, max_new_tokens=8) == one.generate(PROMPTS, max_new_tokens=8)


@pytest.mark.parametrize("arch, kw", [("llama", {}), ("llama", {"num_key_value_heads": 1}), ("gpt2", {}),
                                      ("gpt2-gguf", {}), ("llama-gguf", {})])
def test_two_ranks_give_one_process_tokens(tmp_path, arch, kw):
    path = save_tiny_model(arch.split("-")[0], tmp_path, **kw)
    if arch.endswith("gguf"):  # float32 GGUF: the parts read row by row from the file (Conv1D and Q/K permuted)
        path = save_tiny_gguf(path, tmp_path / "m.gguf", qtype="F32")
    one, two = _pair(path)
    assert isinstance(two.net, tp.Leader) and two.net.shard.size == 2
    _same_tokens_and_close_logits(one, two)
    # a second engine has its own KV pool on every rank; the first still works after it
    other = two.engine(max_num_seqs=2).submit(PROMPTS[1], max_new_tokens=8).result().text
    assert other == one.generate(PROMPTS[1], max_new_tokens=8)
    assert two.generate(PROMPTS[0], max_new_tokens=8) == one.generate(PROMPTS[0], max_new_tokens=8)
    before = dict(tp.calls)
    two.logits(torch.tensor([[1, 2, 3]]))
    layers = one.config.num_layers
    assert tp.calls["all_reduce"] - before["all_reduce"] == 2 * layers
    assert tp.calls["all_gather"] - before["all_gather"] == 1
    two.close()


def test_two_ranks_keep_gguf_blocks_quantized(tmp_path):
    gguf_file = save_tiny_gguf(save_tiny_model("llama", tmp_path / "hf"), tmp_path / "m.gguf", qtype="Q8_0")
    one, two = _pair(gguf_file, backend="native")
    assert isinstance(two.net.w["layers.0.down.weight"], quant.QuantizedTensor)
    assert two.net.w["layers.0.down.weight"].shape[1] == one.net.w["layers.0.down.weight"].shape[1] // 2
    ids = torch.tensor([one.tokenizer.encode("hello world")])
    expected, got = one.logits(ids), two.logits(ids)
    # int8 activations quantized per half of a row instead of per whole row: the same blocks of 32
    # (the split falls on a block boundary), so only float32 summation order differs
    assert (got - expected).abs().max() <= 1e-3 * expected.abs().max()
    assert two.generate(PROMPTS, max_new_tokens=6) == one.generate(PROMPTS, max_new_tokens=6)
    two.close()


def test_a_dead_rank_is_an_error_not_a_hang(tmp_path):
    path = save_tiny_model("llama", tmp_path)
    two = fuselm.load(path, dtype="float32", device="cpu", progress=False, tp=2)
    assert two.generate("hello", max_new_tokens=2)
    proc = two.net.group.procs[0]
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(timeout=30)
    with pytest.raises(RuntimeError, match="rank 1 exited"):
        two.generate("hello", max_new_tokens=2)
    with pytest.raises(RuntimeError, match="tensor-parallel"):
        two.logits(torch.tensor([[1, 2]]))
    two.close()


def test_cli_generate_with_tp_2_prints_the_same_text(tmp_path):
    import subprocess
    import sys
    path = save_tiny_model("llama", tmp_path)
    outs = []
    for n in ("1", "2"):
        r = subprocess.run([sys.executable, "-m", "fuselm.cli", "generate", "hello world", "--model", str(path),
                            "--device", "cpu", "--dtype", "float32", "--max-new-tokens", "6", "--tp", n],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        outs.append(r.stdout)
    assert outs[0] == outs[1] and outs[0].strip()


def test_torchrun_ranks_each_load_their_shard(tmp_path):
    """Under torchrun every rank calls fuselm.load(tp=2); rank 0 gets the model, rank 1 serves it."""
    import subprocess
    import sys
    path = save_tiny_model("llama", tmp_path)
    script = tmp_path / "run.py"
    script.write_text(
        "import fuselm, os\n"
        f"m = fuselm.load({str(path)!r}, dtype='float32', device='cpu', progress=False, tp=2)\n"
        "assert os.environ['RANK'] == '0'  # only rank 0 gets here\n"
        "print('OUT', repr(m.generate('hello world', max_new_tokens=6)))\n")
    import socket
    with socket.socket() as sock:  # a free loopback port for the rendezvous (torchrun takes no port 0)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                        "127.0.0.1", "--master-port", str(port), str(script)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    one = fuselm.load(path, dtype="float32", device="cpu", progress=False)
    assert f"OUT {one.generate('hello world', max_new_tokens=6)!r}" in r.stdout


def test_tp_benchmark_runs(tmp_path):
    """bench.tp --quick: both loads, the same greedy tokens, a row per tp."""
    import json
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "bench.tp", "--quick", "--out", str(tmp_path)], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert [row["tp"] for row in json.loads((tmp_path / "tp.json").read_text())["rows"]] == [1, 2]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (NCCL)")
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_two_gpus_give_one_gpu_tokens(tmp_path, arch):
    path = save_tiny_model(arch, tmp_path)
    one = fuselm.load(path, dtype="float32", device="cuda", progress=False)
    two = fuselm.load(path, dtype="float32", device="cuda", progress=False, tp=2)
    _same_tokens_and_close_logits(one, two)
    two.close()


def test_serve_with_tp_2_answers_like_one_process_and_stops_its_ranks(tmp_path):
    import httpx
    from tests.test_serve import Server
    path = save_tiny_model("llama", tmp_path / "m")
    server = Server(tmp_path, "--model", str(path), "--tp", "2", "--device", "cpu", "--dtype", "float32")
    import psutil  # (accelerate's dependency)
    try:
        server.wait_ready()
        ranks = psutil.Process(server.proc.pid).children()
        assert len(ranks) >= 1
        r = httpx.post(f"{server.url}/v1/completions", json={"model": str(path), "prompt": "hello world",
                                                             "max_tokens": 6, "temperature": 0}, timeout=60)
        assert r.status_code == 200, r.text
        one = fuselm.load(path, dtype="float32", device="cpu", progress=False)
        assert r.json()["choices"][0]["text"] == one.generate("hello world", max_new_tokens=6)
    finally:
        assert server.stop() == 0, server.text()
    gone, alive = psutil.wait_procs(ranks, timeout=30)
    assert not alive, f"ranks left running after the server stopped: {alive}"


@pytest.mark.parametrize("fmt", ["safetensors", "gguf-q8_0", "gguf-f16"])
def test_each_rank_reads_only_its_part_of_the_matrices(tmp_path, fmt, monkeypatch):
    """The loader asks the checkpoint for the rank's rows/columns of every split matrix (safetensors
    slices its map; GGUF reads those rows, or those bytes of each row, from the file), and the
    pieces equal the full tensors cut."""
    from fuselm.model import load_weights
    from fuselm.weights import GGUFCheckpoint, SafetensorsCheckpoint, open_checkpoint
    path = save_tiny_model("llama", tmp_path / "hf")
    if fmt != "safetensors":
        path = save_tiny_gguf(path, tmp_path / "m.gguf", qtype=fmt.split("-")[1].upper())
    calls = []
    cls = SafetensorsCheckpoint if fmt == "safetensors" else GGUFCheckpoint
    method = "get_quantized" if fmt == "gguf-q8_0" else "_read"
    real = getattr(cls, method)

    def spy(self, name, *args):
        calls.append((name, args[-2:]))
        return real(self, name, *args)
    monkeypatch.setattr(cls, method, spy)
    ckpt = open_checkpoint(path)
    c = ckpt.config
    got = load_weights(ckpt, torch.float32, torch.device("cpu"), progress=False, keep=fmt == "gguf-q8_0",
                       shard=tp.plan(c, 2, 1), layout="planes")
    split = [(n, rc) for n, rc in calls if "proj" in n or "lm_head" in n or "output.weight" in n or "attn_" in n
             or "ffn_" in n]
    assert split and all(rows is not None or cols is not None for _, (rows, cols) in split), split
    monkeypatch.undo()
    if fmt != "gguf-q8_0":
        whole = load_weights(open_checkpoint(path), torch.float32, torch.device("cpu"), progress=False)
        s = tp.plan(c, 2, 1)
        for name in ("layers.0.down.weight", "layers.1.qkv.weight", "lm_head"):
            rows, cols, _ = tp.part_ranges(s, c, name, 0, 1)
            expect = whole[name] if cols is None else whole[name][:, cols[0][0]:cols[0][1]]
            expect = expect if rows is None else torch.cat([expect[x:y] for x, y in rows])
            assert torch.equal(got[name], expect), name
    else:  # GGUF rows: whole heads of the permuted Q rows, and bytes of each ffn_down row
        q, down = "model.layers.1.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"
        D = c.head_dim
        full_q, part_q = ckpt.get_quantized(q), ckpt.get_quantized(q, rows=[(2 * D, 4 * D)])
        assert torch.equal(part_q.raw, full_q.raw[2 * D:4 * D])
        full_d, part_d = ckpt.get_quantized(down), ckpt.get_quantized(down, cols=[(64, 128)])
        assert part_d.shape == (full_d.shape[0], 64) and torch.equal(part_d.raw, full_d.raw[:, 2 * 34:4 * 34])
    assert isinstance(got["layers.0.o.weight"], quant.QuantizedTensor) == (fmt == "gguf-q8_0")
