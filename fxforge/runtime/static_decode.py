"""Decode steps on static buffers, replayed as CUDA graphs.

A decode step of a cached graph is a few hundred kernel launches that each move little
data: on a GPU the host's launch work, not the device, sets its speed (DESIGN.md). The
cure is to capture the step once as a CUDA graph and replay it, which needs every tensor
the step touches to stay at one address with one shape from token to token. The eager
step has neither: the cache length `L` is a Python int baked into the program, and the
key bias and the cache views grow by one key per token.

So the static step runs the same graph with
  - `L` a 0-d device tensor: kv_append writes at that slot with `index_copy_` (no host
    read) and returns the whole [B, Hkv, capacity, D] buffer instead of its filled prefix;
    a fused_pointwise node that stores K/V itself (`into`) gets the same tensor as its
    `start`, and its kernel loads the slot from it (codegen/pointwise.py `Stores`);
  - the key bias over every slot of the buffer: slots past the new token (and the left
    padding) are masked with the dtype's lowest value, so they get exactly zero weight
    and attention over the whole buffer equals attention over the prefix;
  - positions and the bias computed on the device from the cache length and the left
    padding, into buffers of their own (`Backend.static_step_inputs`: one kernel on the
    Triton backends, codegen/kernels/step_inputs.py; torch ops on the torch backend).
On CUDA the step is captured at its first call per (cache, batch size) and replayed after;
elsewhere the same static-buffer step runs as is (tested on the CPU: same tokens, no
per-step cache or position tensors).

A sliding window and ALiBi measure from the query's position, which the attention kernels
take to be the last key, here the buffer's end. The static step's attention therefore adds
them to the key bias itself, from the device-side position (`attention_at`), and runs the
kernel without them: keys outside the window get the same zero weight, and the ALiBi term is
the same slopes x distance.

Not every graph can take it (`static_decode_problem` says why): the cache length must be
read by the KV appends alone (kv_append, a fused_pointwise's `into` start, or a
rope_attention's start: its kernel loads the slot from the tensor too), and the bias and
cache views by attention alone. A paged cache has a static step of its own
(static_paged.py): its appends go through slot mappings, which are tensors already.
"""
from __future__ import annotations

import warnings
from functools import partial

import sympy
import torch

from ..ir import roles
from ..ir.graph import Graph
from ..ir.ops import attention_inputs, kv_append_at  # kv_append_at: the step overrides kv_append
from ..ir.types import symbol
from .program import build_program


def step_inputs_problem(graph: Graph, allowed: set) -> tuple[str | None, sympy.Symbol | None]:
    """(why a static step cannot feed `graph`'s inputs, or None; the cache length's symbol):
    roles within `allowed`, one token-id input, and a cache length and key bias to make."""
    role_list = [roles.role_of(v) for v in graph.inputs]
    extra = sorted(set(role_list) - allowed)
    if extra:
        return f"inputs with role(s) {extra}", None
    if role_list.count(roles.INPUT) != 1:
        return "the model takes inputs besides the token ids", None
    if roles.CACHE_LEN not in role_list or roles.KEY_BIAS not in role_list:
        return "no cache_len or key_bias input", None
    return None, symbol(graph.inputs[role_list.index(roles.CACHE_LEN)].hint)


def static_decode_problem(graph: Graph) -> str | None:
    """Why the decode step of `graph` cannot run on static buffers; None: it can."""
    if not graph.state_values:
        return "the graph has no KV cache"
    if roles.is_paged(graph):
        return "a paged KV cache (static_paged.paged_static_problem decides for those)"
    problem, cache_len = step_inputs_problem(graph, {roles.INPUT, roles.CACHE_LEN, roles.POSITIONS, roles.KEY_BIAS})
    if problem:
        return problem
    bias = graph.inputs[[roles.role_of(v) for v in graph.inputs].index(roles.KEY_BIAS)]
    appended = set()
    for n in graph.nodes:
        if n.op == "rope_attention":  # stores K/V at its start and attends with the bias, as attention may
            if sympy.sympify(n.attrs["start"]) != cache_len:
                return f"a {n.op} writes the KV cache at {n.attrs['start']}, not at the cache length"
            if any(v in appended for v in n.inputs):
                return f"{n.op} reads another node's cache"
            continue
        if n.op == "kv_append" or (n.op == "fused_pointwise" and n.attrs.get("into")):
            if sympy.sympify(n.attrs["start"]) != cache_len:
                return f"a {n.op} writes the KV cache at {n.attrs['start']}, not at the cache length"
            stored = set(n.outputs) if n.op == "kv_append" else {n.outputs[k] for k, _ in n.attrs["into"]}
            appended.update(stored)
            attrs = {k: v for k, v in n.attrs.items() if k != "start"}
            if cache_len in _symbols(attrs) or any(cache_len in _symbols(o.shape) for o in n.outputs if o not in stored):
                return f"{n.op} reads the cache length"
            if any(v in appended or v is bias for v in n.inputs):
                return f"{n.op} reads the cache or the key bias (only attention may)"
            continue
        if cache_len in _symbols(n.attrs) or any(cache_len in _symbols(getattr(o, "shape", ())) for o in n.outputs):
            return f"{n.op} reads the cache length"
        reads_cache = [v for v in n.inputs if v in appended or v is bias]
        if not reads_cache:
            continue
        if n.op != "attention":
            return f"{n.op} reads the cache or the key bias (only attention may)"
    return None


def _symbols(value) -> set:
    if isinstance(value, sympy.Basic):
        return value.free_symbols
    if isinstance(value, dict):
        value = tuple(value.values())
    if isinstance(value, (tuple, list)):
        out = set()
        for v in value:
            out |= _symbols(v)
        return out
    return set()


def attention_at(q, k, v, bias=None, slopes=None, sink=None, *, causal: bool, scale: float, softcap=None,
                 window=None, alibi: bool = False, sinks: bool = False, base, position: torch.Tensor,
                 keys: torch.Tensor):
    """attention for one query per row at `position` (a 0-d device tensor) over the whole
    cache buffer: a sliding window and ALiBi become part of the key bias, measured from
    `position` instead of the buffer's last key, then `base` (the backend's attention) runs
    with neither (sinks are passed on). Keys outside the window get the lowest float32, as
    padding does."""
    bias, slopes, sink = attention_inputs(bias, slopes, sink, alibi=alibi, sinks=sinks)
    extra = None
    if window is not None:  # keys `window` or more positions before the query drop out
        outside = keys <= position - int(window)
        extra = torch.zeros(keys.shape[0], dtype=torch.float32, device=keys.device)
        extra = extra.masked_fill(outside, torch.finfo(torch.float32).min).view(1, 1, 1, -1)
    if slopes is not None:  # slopes[h] * (key position - query position)
        term = slopes.float().view(1, -1, 1, 1) * (keys - position).float().view(1, 1, 1, -1)
        extra = term if extra is None else extra + term
    if extra is not None:
        bias = extra if bias is None else bias.float() + extra
    if sink is not None:
        return base(q, k, v, bias, sink, causal=causal, scale=scale, softcap=softcap, sinks=True)
    return base(q, k, v, bias, causal=causal, scale=scale, softcap=softcap)


class StaticDecodeStep:
    """One-token steps of `model` over `cache` for `batch` rows, on buffers that stay put
    (token ids, cache length, left padding, positions, key bias). On CUDA it is captured as
    a CUDA graph at the first call and replayed afterwards."""

    def __init__(self, model, cache, batch: int, capacity: int | None = None):
        """`capacity`: the key slots a step attends over (default: the cache's)."""
        device = model.device
        self.model, self.cache, self.batch = model, cache, batch
        self.capacity = cache.capacity if capacity is None else capacity
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.length = torch.zeros((), dtype=torch.long, device=device)  # tokens already in the cache
        self.pad = torch.zeros(batch, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=device)
        dtype = model.bias_dtype()
        self.bias = torch.zeros(batch, 1, 1, self.capacity, dtype=dtype, device=device)
        self._keys = torch.arange(self.capacity, device=device)  # attention_at's key positions
        self.program = self._build_program()
        self.capture = device.type == "cuda"
        self.graph = None  # the torch.cuda.CUDAGraph, once captured
        self.capture_error: str | None = None  # why capture failed, if it did
        self._logits = None
        self.steps = 0

    def _build_program(self):
        """This step's own program: kv_append and attention read its device-side length."""
        model = self.model
        ops = {**model.op_implementations, "kv_append": kv_append_at,
               "attention": partial(attention_at, base=model.op_implementations["attention"], position=self.length,
                                    keys=self._keys)}
        return build_program(model.graph, ops, device=model.device,
                             filename=f"<fxforge static decode step for {model.model_name}, batch {self.batch}>",
                             inline_fused=model.backend.inlines_fused_pointwise)

    def __call__(self, ids: torch.Tensor, start: int, pad: torch.Tensor, host_pad=None) -> torch.Tensor:
        """Logits [batch, 1, vocab] of the token `ids` [batch, 1] at position `start`
        (left padding `pad` [batch]), a tensor of the caller's own. (`host_pad` is the
        paged step's; a dense row holds every position up to the capacity.)"""
        if ids.shape != (self.batch, 1):
            raise ValueError(f"a static decode step takes [{self.batch}, 1] token ids, got {tuple(ids.shape)}")
        if start >= self.capacity:
            raise ValueError(f"the KV cache holds {self.capacity} positions; position {start} does not fit")
        self.ids.copy_(ids)
        self.length.fill_(start)
        self.pad.copy_(pad)
        self.steps += 1
        if self.capture and self.graph is None:
            self._capture()
        if not self.capture:
            return self._step()
        self.graph.replay()
        # the graph's output is overwritten by the next replay: the caller gets its own copy
        # (generate keeps scores across steps; float() of float32 logits would alias it)
        return self._logits.clone()

    def _step(self) -> torch.Tensor:
        """The device work of one step: everything a CUDA graph holds."""
        # one launch on the Triton backends (codegen/kernels/step_inputs.py), torch ops elsewhere
        self.model.backend.static_step_inputs(self.length, self.pad, self.positions, self.bias,
                                              self._paged_buffers())
        by_role = self._step_inputs()
        model = self.model
        outs = self.program(*(by_role[r] for r in model._input_roles), *self.cache.buffers)
        return model.logits_of(outs)

    def _paged_buffers(self):
        return None  # a paged step's (table, row starts, slots, block size): static_paged.py

    def _step_inputs(self) -> dict:
        """The program's inputs by role, once positions and bias are made."""
        return {roles.CACHE_LEN: self.length, roles.POSITIONS: self.positions, roles.KEY_BIAS: self.bias,
                roles.INPUT: self.ids}

    def _capture(self):
        # a first run outside the graph compiles and autotunes every kernel for these shapes
        # (it writes this step's keys and values, which the replay writes again, the same)
        side = torch.cuda.Stream(self.ids.device)
        side.wait_stream(torch.cuda.current_stream(self.ids.device))
        with torch.cuda.stream(side):
            self._step()
        torch.cuda.current_stream(self.ids.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: other threads' CUDA work (another generate() call) neither
            # breaks this capture nor is broken by it
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self._logits = self._step()
        except RuntimeError as e:
            # an op that cannot be captured (a host copy or sync inside the step): the
            # static buffers still run, launched one kernel at a time; say so once
            self.capture, self.capture_error = False, f"{type(e).__name__}: {e}"
            warnings.warn(f"fxforge: the decode step could not be captured as a CUDA graph ({self.capture_error}); "
                          "it runs uncaptured on static buffers", RuntimeWarning, stacklevel=3)
            return
        self.graph = graph


def static_step_for(model, cache, batch: int) -> StaticDecodeStep:
    """The static step of `model` for `batch` rows of `cache`, made at its first use and
    kept with the cache (its buffers, and a captured graph, are the cache's)."""
    steps = cache.static_steps
    step = steps.get(batch)
    if step is None or step.model is not model:
        step = steps[batch] = StaticDecodeStep(model, cache, batch)
    return step
