"""Captures kept for reuse: optimizing one model several ways exports it once.

    captures = fxforge.CaptureCache()
    float_model = fxforge.optimize(model, (ids,), kv_cache=True, capture_cache=captures)
    int8_model = fxforge.optimize(model, (ids,), kv_cache=True, quantize="int8", capture_cache=captures)

Capturing (torch.export, then lowering to fxforge's IR) is most of what optimize() costs on
a real model (SmolLM2-135M: 4-7 s of capture against well under a second to copy the
captured IR), and comparing configurations (float against quantized, two gqa methods)
captures the same model with the same example inputs each time.

What is kept: the captured IR graph (copied for every optimize(), since passes rewrite
graphs; the copy shares the parameter tensors, which are the model's own, so the cache
holds no second copy of the weights) and its call spec, under a key of the model object,
the example inputs' structure, shapes, dtypes and devices (and the values of non-tensor
inputs), and `dynamic`. The cache is explicit: nothing is kept unless a cache is passed.

A capture is of the model's code and structure as they were: after changing those (a new
module, a different config), call `clear()`. Weight values are not part of it: optimize()
copies the model's current weights each time, cached capture or not.
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
    graph: Graph
    spec: CallSpec


class CaptureCache:
    def __init__(self):
        self._entries: dict[tuple, _Entry] = {}
        self.hits = 0
        self.misses = 0

    def capture(self, model: torch.nn.Module, example_inputs, example_kwargs, dynamic: bool, capture_fn):
        """(graph, spec) for this model and these inputs: a copy of the kept capture, or
        `capture_fn()` (kept for next time)."""
        key = (id(model), _signature(example_inputs), _signature(example_kwargs), bool(dynamic))
        entry = self._entries.get(key)
        if entry is None or entry.model is not model:
            self.misses += 1
            graph, spec = capture_fn()
            entry = self._entries[key] = _Entry(model, graph, spec)
        else:
            self.hits += 1
        return _copy_graph(entry.graph), entry.spec

    def clear(self):
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"CaptureCache({len(self)} captures, {self.hits} hits, {self.misses} misses)"


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
