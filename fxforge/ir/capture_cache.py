"""Captures kept for reuse: optimizing one model several ways exports it once.

    captures = fxforge.CaptureCache()
    float_model = fxforge.optimize(model, (ids,), kv_cache=True, capture_cache=captures)
    int8_model = fxforge.optimize(model, (ids,), kv_cache=True, quantize="int8", capture_cache=captures)

Capturing (torch.export, then lowering to fxforge's IR) is most of what optimize() costs on
a real model (SmolLM2-135M: 4-7 s of capture against well under a second to copy the
captured IR), and comparing configurations (float against quantized, two gqa methods)
captures the same model with the same example inputs each time.

The key: the model object; its module tree (every submodule's name, class and `training`
flag: train() and eval() capture different graphs, dropout in one and not the other); every
parameter and buffer by name, with its shape, dtype, device and which names share one tensor
(tied weights); the example inputs' structure, shapes, dtypes and devices (and the values
of non-tensor inputs); and `dynamic`. So model.eval(), model.to(torch.float16), .to(device),
tying or untying weights or swapping a submodule for another class captures again.

What a hit reuses: the captured IR graph's nodes, values, guards and call spec (copied for
every optimize(), since passes rewrite graphs), i.e. everything torch.export and the
lowering produced except the weights. What a hit re-reads: every parameter and buffer the
graph names, looked up by that name on the model as it is now (`model.fc.weight =
nn.Parameter(...)`, `load_state_dict(..., assign=True)`, `p.data = ...` and in-place edits
all reach the new program), and tensor attributes the graph names likewise; a name the
model no longer has, or whose shape, dtype or device differs from the capture's, is a miss
and captures again. optimize() then copies those current weights as it does without a cache.
The kept entry holds no weights of the model (only tensor constants that forward() itself
made, which have no name on the model). The cache is explicit: nothing is kept unless a
cache is passed.

A capture is of the model's code as it was: after changing what the key does not see (a
forward() edited, a config flag that forward() reads, a dropout probability), call `clear()`.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch.utils import _pytree as pytree

from .capture import CallSpec
from .graph import Graph


@dataclass
class _Entry:
    model: torch.nn.Module  # held, so that its id cannot be reused by another model
    graph: Graph  # its params hold only the constants that are not found on the model
    spec: CallSpec
    # per graph parameter, in order: (name, shape, dtype, device) as captured
    param_meta: tuple
    # graph parameter names that are re-read from the model on a hit
    from_model: frozenset


class CaptureCache:
    def __init__(self):
        self._entries: dict[tuple, _Entry] = {}
        self.hits = 0
        self.misses = 0

    def capture(self, model: torch.nn.Module, example_inputs, example_kwargs, dynamic: bool, capture_fn):
        """(graph, spec) for this model and these inputs: a copy of the kept capture with
        the model's current weights, or `capture_fn()` (kept for next time)."""
        key = (id(model), _model_signature(model), _signature(example_inputs), _signature(example_kwargs),
               bool(dynamic))
        entry = self._entries.get(key)
        if entry is not None and entry.model is model:
            params = _current_params(model, entry)
            if params is not None:
                self.hits += 1
                graph = _copy_graph(entry.graph)
                graph.params = params
                return graph, entry.spec
        self.misses += 1
        graph, spec = capture_fn()
        self._entries[key] = _keep(model, graph, spec)
        return _copy_graph(graph), spec

    def clear(self):
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"CaptureCache({len(self)} captures, {self.hits} hits, {self.misses} misses)"


def _keep(model: torch.nn.Module, graph: Graph, spec: CallSpec) -> _Entry:
    """The entry for a fresh capture: the graph without the tensors that can be read from
    the model again by name (so the cache keeps no weights alive and none goes stale)."""
    meta = tuple((name, tuple(t.shape), t.dtype, t.device) for name, t in graph.params.items())
    from_model = frozenset(name for name in graph.params if _lookup(model, name) is not None)
    kept = copy.copy(graph)
    kept.params = {name: t for name, t in graph.params.items() if name not in from_model}
    return _Entry(model, _copy_graph(kept), spec, meta, from_model)


def _current_params(model: torch.nn.Module, entry: _Entry) -> dict[str, torch.Tensor] | None:
    """The graph's parameters as the model has them now, by name, in the captured order;
    None when one is gone or no longer matches the captured shape, dtype or device."""
    params = {}
    for name, shape, dtype, device in entry.param_meta:
        if name in entry.from_model:
            t = _lookup(model, name)
            if t is None:
                return None
            t = t.detach()
        else:
            t = entry.graph.params[name]
        if tuple(t.shape) != shape or t.dtype != dtype or t.device != device:
            return None
        params[name] = t
    return params


def _lookup(model: torch.nn.Module, name: str) -> torch.Tensor | None:
    """The tensor `name` (a parameter's, buffer's or tensor attribute's dotted path, as
    torch.export names them) on the model now, or None."""
    obj = model
    for part in name.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if isinstance(obj, torch.Tensor) else None


def _model_signature(model: torch.nn.Module) -> tuple:
    """What a capture depends on in the model beyond its code: every submodule's name,
    class and training flag, and every parameter and buffer's name, shape, dtype, device
    and the first name sharing its tensor (tied weights)."""
    modules = tuple((name, type(m).__qualname__, m.training) for name, m in model.named_modules(remove_duplicate=False))
    first: dict[int, str] = {}
    tensors = []
    for kind, named in (("p", model.named_parameters(remove_duplicate=False)),
                        ("b", model.named_buffers(remove_duplicate=False))):
        for name, t in named:
            tie = first.setdefault(id(t), name)
            tensors.append((kind, name, tuple(t.shape), t.dtype, str(t.device), tie))
    return modules, tuple(tensors)


def _copy_graph(graph: Graph) -> Graph:
    """A deep copy of the graph's nodes, values and attributes sharing its parameter tensors."""
    return copy.deepcopy(graph, memo={id(t): t for t in graph.params.values()})


def _signature(inputs) -> tuple:
    """What a capture depends on in the example inputs: their tree structure, and per leaf
    the tensor's shape, dtype, device (and requires_grad), or a non-tensor's type and repr."""
    leaves, tree = pytree.tree_flatten(inputs)
    sig = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            sig.append(("tensor", tuple(leaf.shape), leaf.dtype, str(leaf.device), leaf.requires_grad))
        else:
            sig.append((type(leaf).__qualname__, repr(leaf)))
    return str(tree), tuple(sig)
