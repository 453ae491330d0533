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
from ..ir.evaluate import eval_node
from ..ir.ops import is_pure

# A mask subgraph is small; anything larger is not shape-only in practice.
MAX_NODES = 400


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
            env.update(zip(node.outputs, eval_node(node, args, sizes)))
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


# Masks are checked at one length beyond every integer the mask is built from (a sliding
# window of W keys looks causal at every T <= W): above this length the [T, T] tensors
# cost too much to evaluate, and a pass must not assume the mask is causal.
MAX_PROBE_LENGTH = 4098


def _integers_in(nodes: list[Node]) -> list[int]:
    """Every integer a subgraph is built from: int attrs and constants, and the integers
    inside symbolic attrs (T - 4)."""
    found: list[int] = []

    def collect(a):
        if isinstance(a, bool):
            return
        if isinstance(a, int):
            found.append(abs(a))
        elif isinstance(a, sympy.Basic):
            found.extend(abs(int(i)) for i in a.atoms(sympy.Integer))
        elif isinstance(a, (tuple, list)):
            for x in a:
                collect(x)

    for node in nodes:
        for a in node.attrs.values():
            collect(a)
    return found


def _param_sizes_in(nodes: list[Node], graph: Graph) -> list[int]:
    """The sizes of the parameters a subgraph reads (a mask buffer sliced to T)."""
    return [int(d) for node in nodes for v in node.inputs if v.param and v.param in graph.params
            for d in graph.params[v.param].shape]


def probe_sizes(graph: Graph, values: list[Value], producers: dict[Value, Node]) -> tuple[list[dict], bool]:
    """(sizes, complete): the sample sizes, plus longer ones that show a window, offset or
    band wider than the samples: one longer than every integer the subgraphs of `values`
    are built from (a window of 16 keys looks causal at every T <= 16), and one as long as
    the parameters they read (a mask buffer, sliced to T, is valid up to its size).
    complete=False when such a length is over MAX_PROBE_LENGTH (not evaluated: a caller
    must not conclude the mask is plain causal)."""
    sizes = sample_sizes(graph)
    if not sizes:
        return sizes, True
    nodes = [n for value in values for n in (shape_only_nodes(value, producers) or [])]
    lengths = {max(_integers_in(nodes), default=0) + 2, max(_param_sizes_in(nodes, graph), default=0)}
    sampled = max(max(s.values(), default=0) for s in sizes)
    complete = True
    for length in sorted(x for x in lengths if x > sampled):
        if length > MAX_PROBE_LENGTH:
            complete = False
            continue
        sizes.append({s: (1 if str(s).startswith("B") else length) for s in sizes[-1]})
    return sizes, complete


def band_width(keep: torch.Tensor) -> int | None:
    """For a [Tq, Tk] keep-mask: W if it is a causal band (query i sees exactly its last W
    keys, bottom-right aligned, as sliding-window attention does) narrower than Tk; None if
    it is plain causal or anything else."""
    tq, tk = keep.shape[-2], keep.shape[-1]
    offset = tk - tq
    width = int(keep[-1].sum())
    if width >= tk or width < 1:
        return None
    i = torch.arange(tq)[:, None] + offset
    j = torch.arange(tk)[None, :]
    band = (j <= i) & (j > i - width)
    return width if bool((keep == band).all()) else None
