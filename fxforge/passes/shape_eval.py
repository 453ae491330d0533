"""Evaluate shape-only subgraphs at sample sizes, so a pass can recognise what they
compute (a causal mask built from arange / tril / comparisons / index, or sliced from a
buffer) rather than how the model spelled it.

A subgraph is shape-only when it reads no graph input: only constants, parameters and
buffers, and sizes (symbols, bound here to sample values).
"""
from __future__ import annotations

import sympy
import torch

from ..ir.graph import Graph, Node, Value
from ..ir.ops import OPS, is_pure

# A mask subgraph is small; anything larger is not shape-only in practice.
MAX_NODES = 400


def substitute_sizes(value, sizes: dict):
    """Attrs with sympy sizes -> plain ints for the given sizes."""
    if isinstance(value, sympy.Basic):
        out = value.subs(sizes)
        if not out.is_number:
            raise KeyError(f"no sample size for {out.free_symbols}")
        return int(out) if out.is_integer else float(out)
    if isinstance(value, tuple):
        return tuple(substitute_sizes(v, sizes) for v in value)
    if isinstance(value, list):
        return [substitute_sizes(v, sizes) for v in value]
    if isinstance(value, dict):
        return {k: substitute_sizes(v, sizes) for k, v in value.items()}
    return value


def shape_only_nodes(value: Value, producers: dict[Value, Node]) -> list[Node] | None:
    """The nodes `value` depends on, in topological order, or None if it reads a graph
    input, an impure op, or too much of the graph."""
    order: list[Node] = []
    state: dict[int, int] = {}  # id(node) -> 1 visiting, 2 done
    stack: list[tuple[Node, bool]] = []
    root = producers.get(value)
    if root is None:
        return [] if value.param else None
    stack.append((root, False))
    while stack:
        node, expanded = stack.pop()
        if expanded:
            state[id(node)] = 2
            order.append(node)
            continue
        if state.get(id(node)):
            continue
        if not is_pure(node) or len(order) + len(stack) > MAX_NODES:
            return None
        state[id(node)] = 1
        stack.append((node, True))
        for v in node.inputs:
            if v.param:
                continue
            p = producers.get(v)
            if p is None:
                return None  # a graph input: data, not shape
            if not state.get(id(p)):
                stack.append((p, False))
    return order


def evaluate(value: Value, producers: dict[Value, Node], graph: Graph, sizes: dict) -> torch.Tensor | None:
    """The value of a shape-only subgraph at `sizes` ({symbol: int}), on the CPU."""
    nodes = shape_only_nodes(value, producers)
    if nodes is None:
        return None
    env: dict[Value, torch.Tensor] = {}
    try:
        for node in nodes:
            args = []
            for v in node.inputs:
                args.append(env[v] if v in env else graph.params[v.param].detach().cpu())
            attrs = substitute_sizes(dict(node.attrs), sizes)
            out = OPS[node.op].reference(*args, **attrs)
            outs = out if isinstance(out, (tuple, list)) else (out,)
            env.update(zip(node.outputs, outs))
    except (KeyError, RuntimeError, TypeError, ValueError, IndexError):
        return None
    if value.param:
        return graph.params[value.param].detach().cpu()
    return env[value]


def sample_sizes(graph: Graph, count: int = 3) -> list[dict]:
    """A few distinct size assignments for every symbol in the graph's input types; sizes
    differ from each other and from 1 so that no accidental equality passes a check."""
    symbols = sorted({s for v in graph.inputs if hasattr(v.type, "shape") for d in v.shape
                      for s in d.free_symbols}, key=str)
    bases = [(2, 5), (3, 9), (1, 12)][:count]
    out = []
    for b, t in bases:
        out.append({s: (b if str(s).startswith("B") else t + 2 * i) for i, s in enumerate(symbols)})
    return out
