"""Tensor parallelism on torch.distributed: one model across N processes, the same tokens as one.

Megatron's split of a transformer block, as vLLM and gpt-fast shard it:
- column-parallel (rows of W [N, K] split): q/k/v by heads (whole heads; with fewer KV heads than
  ranks each KV head is replicated on N / Hkv ranks, vLLM's rule), gate/up and GPT-2's fc by
  intermediate rows, and the lm_head by vocabulary rows. Their biases split the same way.
- row-parallel (columns split): o and down (GPT-2's proj): each rank multiplies its heads' or its
  intermediate slice and one all-reduce per projection sums the partial outputs; their biases are
  added once (rank 0 keeps them, the other ranks hold zeros).
So a block costs two all-reduces of [T, hidden], and each forward one all-gather of the lm_head's
vocabulary slices of the rows that are sampled. Embeddings and norms are replicated. Each rank's
KV cache holds only its KV heads. Every rank's network is an ordinary Transformer with a `Shard`:
its local head counts, its intermediate slice and its vocabulary range.

Processes: `fuselm.load(source, tp=N)` spawns ranks 1..N-1 (torch.multiprocessing, spawn) and is
rank 0 itself; under `torchrun --nproc-per-node N` every rank calls fuselm.load and ranks > 0 never
return from it (they serve rank 0, then exit). Rank 0 runs the engine (scheduler, block tables,
sampling) alone and broadcasts each forward pass's input (`Batch`) to the others, which run the
same pass on their shard: the sampled token needs no broadcast, it arrives in the next Batch, and
stop/cancel are rank 0's scheduling. A dead rank makes rank 0's next collective fail with an error
(gloo and NCCL see the closed connection), never a hang; so does the timeout below.
CPU ranks split the cores between them (torch threads), so N ranks do not oversubscribe.
"""
import atexit
import dataclasses
import datetime
import os
import tempfile
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist

TIMEOUT = datetime.timedelta(seconds=120)  # a collective waiting this long on a rank raises
calls = {"all_reduce": 0, "all_gather": 0}  # collectives issued by this process (the tests count them)


@dataclass(frozen=True)
class Shard:
    """Rank `rank` of `size`: its query heads [q0, q0 + heads), KV heads [kv0, kv0 + kv_heads) and
    intermediate rows [i0, i0 + intermediate); rank r holds vocabulary rows [vocab[r], vocab[r + 1])."""
    rank: int
    size: int
    heads: int
    q0: int
    kv_heads: int
    kv0: int
    intermediate: int
    i0: int
    vocab: tuple

    @property
    def v0(self):
        return self.vocab[self.rank]

    @property
    def v1(self):
        return self.vocab[self.rank + 1]


def plan(config, size, rank):
    """Rank `rank`'s Shard of `config` over `size` ranks; a clear error when it cannot be split."""
    c = config
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"tp must be an integer >= 1, got {size!r}")
    problems = []
    if c.num_heads % size:
        problems.append(f"{c.num_heads} attention heads")
    if c.num_kv_heads % size and size % c.num_kv_heads:
        problems.append(f"{c.num_kv_heads} key/value heads (neither a multiple nor a divisor of {size})")
    if c.intermediate_size % size:
        problems.append(f"intermediate size {c.intermediate_size}")
    if problems:
        raise ValueError(f"the model cannot be split over tp={size} ranks: " + ", ".join(problems)
                         + f" do not divide by {size}")
    heads, I = c.num_heads // size, c.intermediate_size // size
    if c.num_kv_heads >= size:
        kv_heads, kv0 = c.num_kv_heads // size, rank * c.num_kv_heads // size
    else:  # replicated: rank r's query heads all read KV head r * Hkv / N
        kv_heads, kv0 = 1, rank * c.num_kv_heads // size
    return Shard(rank, size, heads, rank * heads, kv_heads, kv0, I, rank * I,
                 tuple(r * c.vocab_size // size for r in range(size + 1)))


# ---------------------------------------------------------------- slicing the weights

_COLUMN_PARALLEL = ("qkv", "gate_up", "fc")
_ROW_PARALLEL = ("o", "down", "proj")


def _kind(name):
    """("column" | "row" | "lm_head" | None, the projection) of an internal weight name."""
    if name == "lm_head":
        return "lm_head", None
    parts = name.split(".")
    if len(parts) == 4 and parts[2] in _COLUMN_PARALLEL:
        return "column", parts[2]
    if len(parts) == 4 and parts[2] in _ROW_PARALLEL:
        return "row", parts[2]
    return None, None


def row_ranges(shard, config, name, part, num_parts):
    """The [start, stop) row ranges of checkpoint part `part` (of num_parts) of internal weight `name`
    that rank shard holds, or None when it holds the part whole."""
    kind, proj = _kind(name)
    c, s = config, shard
    D = c.head_dim
    q = (s.q0 * D, (s.q0 + s.heads) * D)
    kv = (s.kv0 * D, (s.kv0 + s.kv_heads) * D)
    if kind == "lm_head":
        return [(s.v0, s.v1)]
    if kind != "column":
        return None
    if proj == "qkv":
        if num_parts == 3:                                    # q_proj, k_proj, v_proj
            return [q] if part == 0 else [kv]
        qn, kvn = c.num_heads * D, c.num_kv_heads * D           # one fused [q; k; v] (GPT-2's c_attn)
        return [q, (qn + kv[0], qn + kv[1]), (qn + kvn + kv[0], qn + kvn + kv[1])]
    i = (s.i0, s.i0 + s.intermediate)
    if proj == "gate_up" and num_parts == 1:                   # a fused [gate; up]
        I = c.intermediate_size
        return [i, (I + i[0], I + i[1])]
    return [i]


def col_range(shard, config, name):
    """The [start, stop) columns of internal weight `name` that the shard holds, or None (all)."""
    kind, proj = _kind(name)
    if kind != "row":
        return None
    if proj == "o":
        return shard.q0 * config.head_dim, (shard.q0 + shard.heads) * config.head_dim
    return shard.i0, shard.i0 + shard.intermediate


def part_ranges(shard, config, name, part, num_parts):
    """(rows, cols, zero) of checkpoint part `part` (of num_parts) of internal tensor `name` (a weight
    [N, K] or a bias [N]) for rank shard: the [(start, stop)] ranges of its rows and columns to read
    (None: all), and whether the rank holds zeros instead (a row-parallel bias off rank 0)."""
    weight = name.replace(".bias", ".weight")
    rows = row_ranges(shard, config, weight, part, num_parts)
    cols = col_range(shard, config, weight)
    if name.endswith(".bias"):
        return rows, None, cols is not None and shard.rank > 0
    return rows, None if cols is None else [cols], False


def check_blocks(shard, config, formats):
    """Before any weight is read: every quantized row-parallel weight (name -> its formats) must split
    its columns on block boundaries, or the load fails here naming it."""
    from .quant import FORMATS
    for name, fmts in formats.items():
        cols = col_range(shard, config, name)
        for f in (FORMATS[f] for f in fmts):
            if cols is not None and (cols[0] % f.block or cols[1] % f.block):
                raise ValueError(f"{name}: its {f.name} blocks of {f.block} columns straddle the tp={shard.size} "
                                 f"split at column {cols[0] if cols[0] % f.block else cols[1]}; load with "
                                 "quant='dequantize'")


def local_shape(shard, config, name, shape):
    """The shape rank shard holds of internal tensor `name` of full `shape`."""
    weight = name.replace(".bias", ".weight")
    rows = row_ranges(shard, config, weight, 0, 1)
    n = shape[0] if rows is None else sum(b - a for a, b in rows)
    if name.endswith(".bias") or len(shape) == 1:
        return (n,)
    cols = col_range(shard, config, weight)
    return (n, shape[1] if cols is None else cols[1] - cols[0])


# ---------------------------------------------------------------- collectives

def all_reduce(x):
    """Sum x over the ranks, in place (a row-parallel projection's partial outputs)."""
    calls["all_reduce"] += 1
    dist.all_reduce(x)
    return x


def gather_vocab(shard, logits):
    """Every rank's vocabulary slice of logits [T, v1 - v0] -> the full [T, V] (on every rank). The
    slices may differ by a row (V not a multiple of N): each is padded to the largest for the gather."""
    calls["all_gather"] += 1
    sizes = [b - a for a, b in zip(shard.vocab, shard.vocab[1:])]
    logits = torch.nn.functional.pad(logits, (0, max(sizes) - logits.shape[-1])).contiguous()
    parts = [torch.empty_like(logits) for _ in sizes]
    dist.all_gather(parts, logits)
    return torch.cat([p[..., :n] for p, n in zip(parts, sizes)], dim=-1)


# ---------------------------------------------------------------- processes

_RANK_ENV, _INIT_ENV = "FUSELM_TP_RANK", "FUSELM_TP_INIT"  # set in the ranks fuselm.load spawns


def join(size, source, load_kwargs, device):
    """Join (or start) the group of `size` ranks; returns (rank, local rank, Group or None). Rank 0
    without torchrun spawns ranks 1..size-1, each running fuselm.load(source, tp=size, **load_kwargs)."""
    if dist.is_initialized():
        raise RuntimeError("this process already belongs to a torch.distributed group (a tensor-parallel model "
                           "is loaded): close it first (model.close())")
    group = None
    if _RANK_ENV in os.environ:                                   # a rank fuselm.load spawned
        rank, init = int(os.environ[_RANK_ENV]), os.environ[_INIT_ENV]
        local = rank
    elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:     # torchrun
        if int(os.environ["WORLD_SIZE"]) != size:
            raise ValueError(f"tp={size}, but torchrun started {os.environ['WORLD_SIZE']} processes")
        rank, init = int(os.environ["RANK"]), "env://"
        local = int(os.environ.get("LOCAL_RANK", rank))           # its GPU on this node
    else:
        if device.type == "cuda" and torch.cuda.device_count() < size:
            raise ValueError(f"tp={size} needs {size} GPUs, but {torch.cuda.device_count()} are visible")
        rank = local = 0
        group = Group(size, source, load_kwargs)
        init = group.init
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if device.type == "cpu":
        torch.set_num_threads(max(1, cores // size))  # N ranks share the cores (Group.close gives them back)
    try:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=init, rank=rank,
                                world_size=size, timeout=TIMEOUT)
    except Exception as e:
        if group is not None:
            group.close()
        raise RuntimeError(f"the {size} tensor-parallel ranks did not meet ({e}); a spawned rank re-imports the "
                           "calling script, which must then guard its code with `if __name__ == '__main__':`") from e
    return rank, local, group


def _spawned(rank, size, init, source, load_kwargs):
    os.environ[_RANK_ENV], os.environ[_INIT_ENV] = str(rank), init
    from .model import Model
    Model.load(source, tp=size, **load_kwargs)  # serves rank 0, then exits


_open = weakref.WeakSet()  # groups and leaders still to close at exit (weak: a dropped model is freed)


@atexit.register
def _close_all():
    # leaders first: each stops its ranks, which its group then joins at once
    for obj in sorted(_open, key=lambda o: isinstance(o, Group)):
        obj.close()


class Group:
    """Rank 0's handle on the ranks it spawned."""

    def __init__(self, size, source, load_kwargs):
        import torch.multiprocessing as mp
        self.threads = torch.get_num_threads()
        self.dir = tempfile.mkdtemp(prefix="fuselm-tp-")
        self.init = f"file://{self.dir}/rendezvous"
        ctx = mp.get_context("spawn")
        self.procs = [ctx.Process(target=_spawned, args=(r, size, self.init, source, load_kwargs), daemon=True,
                                  name=f"fuselm-tp-rank{r}") for r in range(1, size)]
        for p in self.procs:
            p.start()
        self.closed = False
        _open.add(self)

    def check(self):
        for r, p in enumerate(self.procs, 1):
            if not p.is_alive():
                raise RuntimeError(f"tensor-parallel rank {r} exited (exit code {p.exitcode}); reload the model")

    def close(self):
        import shutil
        if self.closed:
            return
        self.closed = True
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
        torch.set_num_threads(self.threads)


def abort(group):
    """After a failed load: leave the process group and stop the ranks this process started."""
    if dist.is_initialized():
        dist.destroy_process_group()
    if group is not None:
        group.close()


def _portable(cmd, device):
    """cmd with its tensors (a Batch's, or token ids) moved to `device`: rank 0 sends CPU tensors, each
    rank takes them to its own device (pickled CUDA tensors would arrive on rank 0's GPU)."""
    def move(x):
        if isinstance(x, torch.Tensor):
            return x.to(device)
        if dataclasses.is_dataclass(x):
            return dataclasses.replace(x, **{f.name: move(getattr(x, f.name)) for f in dataclasses.fields(x)})
        return x
    return tuple(move(x) for x in cmd)


def _command(cmd=None):
    """Rank 0: broadcast cmd; the other ranks: receive it."""
    box = [None if cmd is None else _portable(cmd, "cpu")]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def serve(net):
    """Ranks > 0: run every forward pass rank 0 runs, on this rank's shard, until it stops. Each of rank
    0's KV pools (one per engine) has its twin here, by id."""
    pools = {}
    with torch.inference_mode():
        while True:
            cmd = _portable(_command(), net.device)
            if cmd[0] == "pool":
                pools[cmd[1]] = net.new_pool(*cmd[2:])
            elif cmd[0] == "step":
                net.step(cmd[2], pools[cmd[1]])
            elif cmd[0] == "forward":
                net.forward(cmd[1])
            else:
                break
    dist.destroy_process_group()


class Leader:
    """Rank 0's network: its own shard, with every pass first announced to the other ranks. Passes
    run one at a time (the engine's lock; Model.logits is not called during engine steps). A failed
    pass fails the group for good: the other ranks may be left inside a collective."""

    def __init__(self, net, group):
        self.net, self.group, self.failed = net, group, None
        self._pools, self._next_pool = weakref.WeakKeyDictionary(), 0  # rank 0's pool -> its id on every rank
        _open.add(self)

    def __getattr__(self, name):
        return getattr(self.net, name)

    def _run(self, cmd, fn, *args):
        if self.failed:
            raise RuntimeError(f"the tensor-parallel group failed earlier ({self.failed}); reload the model")
        try:
            if self.group is not None:
                self.group.check()
            _command(cmd)
            return fn(*args)
        except Exception as e:  # a rank died, a collective failed or timed out
            self.failed = str(e)
            raise RuntimeError(f"tensor-parallel pass failed: {e}") from e

    def new_pool(self, num_blocks, block_size):
        pid, self._next_pool = self._next_pool, self._next_pool + 1
        pool = self._run(("pool", pid, num_blocks, block_size), self.net.new_pool, num_blocks, block_size)
        self._pools[pool] = pid
        return pool

    def step(self, batch, kv):
        return self._run(("step", self._pools[kv], batch), self.net.step, batch, kv)

    def forward(self, tokens):
        return self._run(("forward", tokens), self.net.forward, tokens)

    def close(self):
        """Stop the other ranks (at exit, or by hand)."""
        _open.discard(self)
        if dist.is_initialized():
            if not self.failed:
                try:
                    _command(("stop",))
                except Exception:  # noqa: BLE001 (a rank already gone: nothing to stop)
                    pass
            dist.destroy_process_group()
        if self.group is not None:
            self.group.close()
