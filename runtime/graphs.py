"""The decode step captured once and replayed, so small-batch decode is bound by the weights, not Python.

Transformer.decode has static shapes and no host sync (positions and lengths live in
cache.seqlens on the device), so one capture per generate call replays every later
step: copy the new tokens into the static input buffer, replay, read the static
logits buffer. Sampling stays outside.

  GPU: a CUDA graph (DecodeGraph).
  CPU: a native plan (CPUGraph, csrc/plan_cpu.cpp): the first step runs under a
       TorchDispatchMode that records every operator it dispatches with its arguments
       and results; later steps replay that list from C++. A step that cannot be
       recorded faithfully (an operator that reads a tensor on the host through the
       dispatcher, such as .item(), draws random numbers, has a data-dependent output
       shape or returns anything but tensors) raises NotCapturable before that
       operator runs, and the caller runs eagerly instead. Reads that bypass the
       dispatcher (.tolist(), .numpy()) are not seen: the decode step has none.
"""
import logging

import torch
from torch.utils._python_dispatch import TorchDispatchMode

log = logging.getLogger("fuselm")


class DecodeGraph:
    def __init__(self, net, cache, tokens):
        self.tokens = tokens.clone()                               # [B] static input
        # Warm up once outside the graph: Triton autotuning and first-call compilation must not
        # happen during capture. The warm-up writes K/V at position seqlens and advances seqlens;
        # restoring seqlens is enough, since the first replay overwrites the same positions.
        lengths = cache.seqlens.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            net.decode(self.tokens, cache)
        torch.cuda.current_stream().wait_stream(side)
        cache.seqlens.copy_(lengths)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = net.decode(self.tokens, cache)           # [B, V] static output
        log.info("fuselm: decode step captured in a CUDA graph (batch %d, cache %d)", len(tokens), cache.max_len)

    def __call__(self, tokens):
        self.tokens.copy_(tokens)
        self.graph.replay()
        return self.logits


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


class CPUGraph:
    """net.decode on static buffers: the first call records it (and is that step), later calls replay."""

    def __init__(self, net, cache, tokens):
        self.net, self.cache = net, cache
        self.tokens = tokens.clone()  # [B] static input
        self.plan = self.logits = None

    def __call__(self, tokens):
        self.tokens.copy_(tokens)
        if self.plan is None:
            plan = torch.classes.fuselm.Plan()
            lengths = self.cache.seqlens.clone()
            try:
                with _Recorder(plan):
                    self.logits = self.net.decode(self.tokens, self.cache)  # [B, V] static output
            except NotCapturable:
                # Ops recorded so far ran: their cache writes are redone by the eager step the caller
                # runs instead; seqlens (advanced last) goes back to where the step started.
                self.cache.seqlens.copy_(lengths)
                raise
            self.plan = plan
            log.info("fuselm: decode step recorded as a native plan of %d operators (batch %d)", plan.size(),
                     len(tokens))
            return self.logits
        self.plan.run()
        return self.logits
