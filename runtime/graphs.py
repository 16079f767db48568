"""Decode-only engine steps captured once per batch size and replayed, so small-batch decode is
bound by the weights, not Python.

Transformer.step on a decode-only Batch has static shapes and no host sync: the tokens,
positions, slots, block tables [B, M] (M: the blocks of a full context) and lengths are
copied into static buffers, the recorded step is replayed, and its static logits buffer read.
Sampling stays outside.

  GPU: a CUDA graph per batch-size bucket (powers of two): rows past the batch are padding, with
       length 1, writing and reading block 0 (never handed out to a sequence).
  CPU: a native plan (csrc/plan_cpu.cpp) per batch size: the first step of each size runs under a
       TorchDispatchMode that records every operator it dispatches with its arguments and
       results; later steps replay that list from C++. A step that cannot be recorded faithfully
       (an operator that reads a tensor on the host through the dispatcher, such as .item(),
       draws random numbers, has a data-dependent output shape or returns anything but tensors)
       raises NotCapturable before that operator runs, and the step runs eagerly instead (with a
       warning, once). Reads that bypass the dispatcher (.tolist(), .numpy()) are not seen: the
       step has none.
"""
import logging

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .cache import Batch

log = logging.getLogger("fuselm")


class NotCapturable(RuntimeError):
    """The step dispatches an operator whose replay would not repeat what it did."""


# Nothing to replay: they only allocate (the recorded buffer is reused) or describe storage anew.
_ALLOCATIONS = ("aten::empty", "aten::empty_like", "aten::empty_strided", "aten::new_empty")
_REFUSED_TAGS = (torch.Tag.nondeterministic_seeded, torch.Tag.data_dependent_output, torch.Tag.dynamic_output_shape)
# Tagged for boolean masks, whose output shape depends on the data; with integer indices the shape is static.
_INDEXING = ("aten::index", "aten::index_put", "aten::index_put_")


def _refused(func, args):
    if func._schema.name in _INDEXING:
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1])
    return any(tag in func.tags for tag in _REFUSED_TAGS) or func._schema.name == "aten::_local_scalar_dense"


def _arguments(func, args, kwargs):
    """Every argument of func's schema in order, defaults filled in; numbers passed where the schema
    takes a Tensor become 0-dim tensors (what the Python binding does before dispatch)."""
    out = []
    for i, a in enumerate(func._schema.arguments):
        if i < len(args):
            value = args[i]
        elif a.name in kwargs:
            value = kwargs[a.name]
        elif a.has_default_value():
            value = a.default_value
        else:
            raise NotCapturable(f"{func}: no value for argument {a.name}")
        if isinstance(value, (int, float, bool)) and str(a.type) == "Tensor":
            value = torch.tensor(value)
        out.append(value)
    return out


def _views(func, args, results):
    """Whether func returned views of its inputs without writing anything. Decided on the tensors, not
    the schema: to(), contiguous() and reshape() return their input or a copy depending on it."""
    if any(a.alias_info is not None and a.alias_info.is_write for a in func._schema.arguments):
        return False
    inputs = {t.untyped_storage().data_ptr() for t in args if isinstance(t, torch.Tensor)}
    outs = [t for t in results if isinstance(t, torch.Tensor)]
    return bool(outs) and all(t.untyped_storage().data_ptr() in inputs for t in outs)


class _Recorder(TorchDispatchMode):
    @classmethod
    def _should_skip_dynamo(cls):
        # torch wraps __torch_dispatch__ in dynamo.disable, whose first call imports torch._dynamo (1.2 s)
        return False

    def __init__(self, plan):
        super().__init__()
        self.plan = plan

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _refused(func, args):
            raise NotCapturable(f"{func} reads tensor values on the host, draws random numbers or has a "
                                "data-dependent shape")
        out = func(*args, **kwargs)
        results = out if isinstance(out, (tuple, list)) else (out,)
        if func._schema.name in _ALLOCATIONS or torch.Tag.inplace_view in func.tags or _views(func, args, results):
            return out  # aliases recorded storage: nothing to replay
        if any(str(r.type) != "Tensor" for r in func._schema.returns):
            # the plan copies each returned Tensor into its recorded one; a list or a number it cannot
            raise NotCapturable(f"{func} returns {', '.join(str(r.type) for r in func._schema.returns)}")
        try:
            self.plan.add(func._schema.name, func._schema.overload_name, _arguments(func, args, kwargs),
                          [t for t in results if isinstance(t, torch.Tensor)])
        except RuntimeError as e:
            raise NotCapturable(f"{func}: {e}") from None
        return out


class _Static:
    """A decode-only Batch of `rows` rows in buffers that stay put, and the logits the step left."""

    def __init__(self, net, rows, max_blocks):
        d = net.device
        self.batch = Batch(torch.zeros(rows, dtype=torch.long, device=d), torch.zeros(rows, dtype=torch.long, device=d),
                           torch.zeros(rows, dtype=torch.long, device=d),
                           torch.zeros(rows, max_blocks, dtype=torch.int32, device=d),
                           torch.ones(rows, dtype=torch.int32, device=d), num_decode=rows)
        self.logits = None

    def load(self, batch):
        """Copy batch (B <= rows decode rows, tables max_blocks wide) in; padding rows get length 1,
        writing and reading slot 0 (block 0, never a sequence's)."""
        s, B = self.batch, batch.num_decode
        for name in ("tokens", "positions", "slots", "seqlens", "block_tables"):
            getattr(s, name)[:B].copy_(getattr(batch, name))
        if B < len(s.tokens):
            s.slots[B:].zero_()
            s.seqlens[B:].fill_(1)
            s.block_tables[B:, 0].zero_()


class StepGraphs:
    """net.step for decode-only batches, replayed: `kind` "cuda" (CUDA graphs) or "cpu" (native plans)."""

    def __init__(self, net, kv, kind, max_blocks):
        self.net, self.kv, self.kind, self.max_blocks = net, kv, kind, max_blocks
        self.graphs = {}
        self.eager = False  # a CPU step could not be recorded: every step runs eagerly

    def __call__(self, batch):
        B = batch.num_decode
        if self.eager:
            return self.net.step(batch, self.kv)
        rows = 1 << (B - 1).bit_length() if self.kind == "cuda" else B
        g = self.graphs.get(rows)
        if g is not None:
            g.load(batch)
            g.replay()
            return g.logits[:B]
        g = _Static(self.net, rows, self.max_blocks)
        g.load(batch)
        try:
            self._capture(g)  # the CPU recording runs the step itself
        except (NotCapturable, RuntimeError) as e:
            if not isinstance(e, NotCapturable) and self.kind != "cuda":
                raise  # e.g. out of memory on the CPU: nothing was kept, the next step tries again
            # CUDA: an operator that syncs or allocates in a way capture forbids
            log.warning("fuselm: the decode step runs eagerly (slower): it cannot be %s: %s",
                        "captured in a CUDA graph" if self.kind == "cuda" else "recorded as a native plan", e)
            self.eager = True
            return self.net.step(batch, self.kv)
        self.graphs[rows] = g  # only once captured: a failed capture leaves nothing half-built
        if self.kind == "cuda":
            g.replay()
        return g.logits[:B]

    def _capture(self, g):
        if self.kind == "cuda":
            # Warm up outside the graph: Triton autotuning and first-call compilation must not happen
            # during capture. The warm-up writes this step's K/V; the replay that follows rewrites them.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.net.step(g.batch, self.kv)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                g.logits = self.net.step(g.batch, self.kv)
            g.replay = graph.replay
            log.info("fuselm: decode step captured in a CUDA graph (%d rows)", len(g.batch.tokens))
            return
        plan = torch.classes.fuselm.Plan()
        with _Recorder(plan):
            # if recording fails midway, the operators recorded so far ran: their K/V writes are redone
            # by the eager step the caller runs instead
            g.logits = self.net.step(g.batch, self.kv)
        g.plan, g.replay = plan, plan.run
        log.info("fuselm: decode step recorded as a native plan of %d operators (%d rows)", plan.size(),
                 len(g.batch.tokens))
