"""Evaluate shape-only subgraphs at sample sizes, so a pass can recognise what they
compute (a causal mask built from arange / tril / comparisons / index, or sliced from a
buffer) rather than how the model spelled it.

A subgraph is shape-only when it reads no graph input: only constants, parameters and
buffers, and sizes (symbols, bound here to sample values).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import sympy
import torch

from ..ir.graph import Graph, Node, Value
from ..ir.evaluate import eval_node, scalar_exponents
from ..ir.guards import holds
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
    exponents = scalar_exponents(nodes)
    try:
        for node in nodes:
            args = []
            for v in node.inputs:
                args.append(env[v] if v in env else graph.params[v.param].detach().cpu())
            env.update(zip(node.outputs, eval_node(node, args, sizes, exponents=exponents)))
    except (KeyError, RuntimeError, TypeError, ValueError, IndexError):
        return None
    if value.param:
        return graph.params[value.param].detach().cpu()
    return env[value]


def _is_batch(symbol) -> bool:
    return str(symbol).startswith("B")


def _size_symbols(graph: Graph) -> list:
    """The symbols in the graph's input types, in name order."""
    return sorted({s for v in graph.inputs if hasattr(v.type, "shape") for d in v.shape
                   for s in d.free_symbols}, key=str)


def _callable_at(graph: Graph, sizes: dict) -> bool:
    """The graph's guards hold at `sizes`: the model can be called there."""
    return all(holds(g, sizes) for g in graph.guards)


# Every length up to this is probed too, each one: the samples start at 5, and a mask may
# compute otherwise at a few tokens (a condition on T such as `T > 4`, a window of T // 4
# keys that leaves a row no key below 4 tokens), where a decode step (1) or a short prompt
# runs. Masks are tiny there, so the dozen evaluations cost little.
SHORT_PROBE_MAX = 8
# With two lengths or more, each one alone also goes through the lengths up to this while
# the others keep their sample size (one query over many keys, and the other way round).
SHORT_ALONE_MAX = 4


def _short_probes(graph: Graph, sample: dict) -> list[dict]:
    """Every length symbol at each length 1..SHORT_PROBE_MAX together, and with two lengths
    or more, each alone at 1..SHORT_ALONE_MAX (the others at `sample`), where the guards
    allow; the batch stays at the sample's."""
    lengths = [s for s in sample if not _is_batch(s)]
    probes = [{s: (size if s in lengths else sample[s]) for s in sample} for size in range(1, SHORT_PROBE_MAX + 1)]
    if len(lengths) > 1:
        probes += [{**sample, chosen: size} for chosen in lengths for size in range(1, SHORT_ALONE_MAX + 1)]
    return [p for p in probes if _callable_at(graph, p)]


def sample_sizes(graph: Graph, count: int = 3) -> list[dict]:
    """Size assignments for every symbol in the graph's input types: first `count` base
    samples, whose sizes differ from each other and from 1 so that no accidental equality
    passes a check, then every short length (_short_probes: a mask may compute otherwise
    at a few tokens, and trusting the base samples alone proved a mask causal that is not
    below 5 tokens).

    The lengths grow in name order (T < T1), and with two lengths or more one more sample
    has them the other way round (T > T1), where the guards allow it: a mask over a query
    length and an independent key length (cross-attention) can be causal only while there
    are no more queries than keys, and a pass must see the sizes where it is not."""
    out = _base_samples(graph, count)
    return out + [p for p in (_short_probes(graph, out[0]) if out else []) if p not in out]


def _base_samples(graph: Graph, count: int) -> list[dict]:
    symbols = _size_symbols(graph)
    bases = [(2, 5), (3, 9), (1, 12)][:count]
    out = []
    for b, t in bases:
        out.append({s: (b if _is_batch(s) else t + 2 * i) for i, s in enumerate(symbols)})
    if out and sum(not _is_batch(s) for s in symbols) > 1:
        b, t = bases[min(1, len(bases) - 1)]
        last = len(symbols) - 1
        reversed_order = {s: (b if _is_batch(s) else t + 2 * (last - i)) for i, s in enumerate(symbols)}
        if _callable_at(graph, reversed_order):
            out.append(reversed_order)
    return out


# Masks are checked at one length beyond every number the mask is built from (a sliding
# window of W keys looks causal at every T <= W): above this length the [T, T] tensors
# cost too much to evaluate, and a pass must not assume the mask is causal.
MAX_PROBE_LENGTH = 4098
# Every mask is also checked at a power of two at least twice its largest number, and at
# least this long: a window written in a way the number scan does not see (a product of
# constants, say) is still caught when it is shorter than this.
MIN_LONG_PROBE = 64
# A float at or below this is a fill (-1e4, -1e9, finfo.min, -inf put where keys are
# dropped), not a length: counting it would put every such mask over MAX_PROBE_LENGTH.
FILL_LIKE = -1e4
# Parameters with at most this many elements have each value counted (a window in a 0-d
# buffer, ALiBi slopes); larger ones their largest magnitude.
SMALL_PARAM = 64


def _magnitudes(x: float) -> list[float]:
    """The lengths a number can stand for in a mask: |x|, and 1/|x| for a fraction (a
    window of 20 written `d * 0.05 < 1`, chunks `floor(i / 16.0)` as `i * 0.0625`)."""
    a = abs(x)
    return [a, 1.0 / a] if 0 < a < 1 else [a]


def _number_magnitudes(a) -> list[float]:
    """The magnitudes of the numbers in one attr: ints, floats other than fills, and the
    numbers inside symbolic attrs (T - 4, T / 16)."""
    if isinstance(a, bool) or a is None:
        return []
    if isinstance(a, int):
        return [float(abs(a))]
    if isinstance(a, float):
        return [] if not math.isfinite(a) or a <= FILL_LIKE else _magnitudes(a)
    if isinstance(a, complex):
        return _number_magnitudes(a.real) + _number_magnitudes(a.imag)
    if isinstance(a, sympy.Basic):
        return [m for n in a.atoms(sympy.Number) if n.is_real and n.is_finite for m in _magnitudes(float(n))]
    if isinstance(a, (tuple, list)):
        return [m for x in a for m in _number_magnitudes(x)]
    return []


def _param_magnitudes(t: torch.Tensor) -> list[float]:
    """The numbers a parameter read by a mask holds (a window in a 0-d buffer, or made in
    forward as torch.tensor(20), which capture lifts to a parameter), fills left out."""
    if t.dtype == torch.bool or t.is_complex() or t.numel() == 0:
        return []
    x = t.detach().double().flatten()
    x = x[torch.isfinite(x) & (x > FILL_LIKE)]
    if x.numel() == 0:
        return []
    if x.numel() > SMALL_PARAM:
        x = x.abs().max().reshape(1)
    return [m for v in x.tolist() for m in _magnitudes(v)]


def _numbers_in(nodes: list[Node], graph: Graph) -> list[float]:
    """The magnitude of every number a subgraph is built from: attrs and constants
    (comparison bounds, clamp bounds, divisors), and the values of the parameters it reads."""
    found = [m for node in nodes for a in node.attrs.values() for m in _number_magnitudes(a)]
    seen: set[str] = set()
    for node in nodes:
        for v in node.inputs:
            if v.param and v.param in graph.params and v.param not in seen:
                seen.add(v.param)
                found.extend(_param_magnitudes(graph.params[v.param]))
    return found


def _param_sizes_in(nodes: list[Node], graph: Graph) -> list[int]:
    """The sizes of the parameters a subgraph reads (a mask buffer sliced to T)."""
    return [int(d) for node in nodes for v in node.inputs if v.param and v.param in graph.params
            for d in graph.params[v.param].shape]


# Ops that map many positions to one value (i // 64, i % 64, i * 0.01): a condition on
# what they give changes at a length that many times its number (block-local attention's
# `i // 64 - j // 64 >= 8` first drops a key at 64 * 8 = 512 tokens).
_DIVIDING_CALLS = ("floor_divide", "div", "remainder", "fmod")


def _constant_numbers(v: Value, producers: dict, graph: Graph) -> list[float]:
    """The magnitudes a constant operand holds (a 0-d const, a small parameter), else []."""
    if v.param:
        t = graph.params.get(v.param)
        return [] if t is None else _param_magnitudes(t)
    p = producers.get(v)
    return _number_magnitudes(p.attrs.get("value")) if p is not None and p.op == "const" else []


def _node_numbers(node: Node, producers: dict, graph: Graph) -> list[float]:
    """The numbers one node is given: its attrs (a torch_call's args, a comparison bound),
    and the constants and small parameters it reads."""
    found = [m for a in node.attrs.values() for m in _number_magnitudes(a)]
    return found + [m for v in node.inputs for m in _constant_numbers(v, producers, graph)]


def _dividing_factor(node: Node, producers: dict, graph: Graph) -> float:
    """How many positions one unit of this node's result spans more than its inputs': the
    divisor of a division or remainder by a constant, 1/c of a product with a fraction c;
    1 for any other op."""
    target = str(node.attrs.get("target", "")) if node.op == "torch_call" else node.op
    if any(name in target for name in _DIVIDING_CALLS):
        return max([m for m in _node_numbers(node, producers, graph) if m > 1], default=1.0)
    if node.op == "mul":
        consts = [abs(c) for v in node.inputs for c in _constant_values(v, producers, graph)]
        return max([1.0 / c for c in consts if 0 < c < 1], default=1.0)
    return 1.0


def _constant_values(v: Value, producers: dict, graph: Graph) -> list[float]:
    """The value of a 0-d constant or one-element parameter operand, else []."""
    if v.param:
        t = graph.params.get(v.param)
        return [float(t.double())] if t is not None and t.numel() == 1 and not t.is_complex() else []
    p = producers.get(v)
    value = p.attrs.get("value") if p is not None and p.op == "const" else None
    return [float(value)] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


def _reach(nodes: list[Node], graph: Graph) -> float:
    """The longest length at which the subgraph's result may first change its pattern, as
    its numbers tell: each number times the positions one unit of the value it meets spans
    (the product of the divisors on the way from the positions: `i // 64 >= 8` -> 512,
    `i // 8 // 8 >= 8` -> 512, `sin(i * 0.01) < -0.5` -> 200), at least the largest number."""
    producers = {v: n for n in nodes for v in n.outputs}
    span: dict[Value, float] = {}
    reach = 0.0
    for node in nodes:
        spans_in = max((span.get(v, 1.0) for v in node.inputs), default=1.0)
        numbers = _node_numbers(node, producers, graph)
        if numbers:
            reach = max(reach, spans_in * max(numbers))
        out = spans_in * _dividing_factor(node, producers, graph)
        for v in node.outputs:
            span[v] = out
    return max([reach] + _numbers_in(nodes, graph))


def _long_lengths(nodes: list[Node], graph: Graph) -> tuple[set[int], bool]:
    """(lengths, complete): one past the subgraph's reach (_reach: its largest number, or a
    product of a divisor and a number after it), a generous power of two above it, and the
    sizes of the parameters read; complete=False when that needs a length over
    MAX_PROBE_LENGTH."""
    largest = _reach(nodes, graph)
    if largest + 2 > MAX_PROBE_LENGTH:
        return set(), False
    just_past = math.floor(largest) + 2
    generous = max(MIN_LONG_PROBE, 1 << math.ceil(math.log2(2 * largest + 2)))
    lengths = {just_past, min(generous, MAX_PROBE_LENGTH), max(_param_sizes_in(nodes, graph), default=0)}
    return lengths, True


def _long_probes(graph: Graph, short: dict, length: int) -> list[dict]:
    """The probes at one long `length`: every length symbol at it, and with two lengths or
    more, each in turn at it while the others keep their `short` sample size (where the
    guards allow): a key length far past the query length, or far short of it, shows an
    offset that only the difference between the two lengths sets."""
    lengths = [s for s in short if not _is_batch(s)]
    probes = [{s: (1 if _is_batch(s) else length) for s in short}]
    if len(lengths) > 1:
        for chosen in lengths:
            probe = {s: (1 if _is_batch(s) else length if s == chosen else short[s]) for s in short}
            if _callable_at(graph, probe):
                probes.append(probe)
    return probes


@dataclass
class Probes:
    """The sizes to evaluate a mask at: `sizes[:required]` (the samples and every short
    length) must evaluate, or the mask is not proven; the rest are long probes, where a
    mask that cannot be built (a buffer shorter than the length) means the model cannot run
    there either. complete=False: a length the mask needs was too long to probe, so what
    the probes show may not hold at every length."""

    sizes: list[dict]
    required: int
    complete: bool


def mask_probes(graph: Graph, values: list[Value], producers: dict[Value, Node]) -> Probes:
    """The sample sizes (every short length among them); and longer ones that show a
    window, offset or band wider than the samples: one past the reach of the numbers the
    subgraphs of `values` are built from (a window of 16 keys looks causal at every
    T <= 16; the numbers include float constants, their reciprocals and small parameters'
    values, times the divisors they follow: _reach), a generous power of two above that,
    and one as long as the parameters they read (a mask buffer, sliced to T, is valid up
    to its size); with several lengths, each also alone at those (_long_probes).
    complete=False when such a length is over MAX_PROBE_LENGTH (not evaluated: a caller
    must not conclude the mask is plain causal, nor that no row is left without a key)."""
    sizes = sample_sizes(graph)
    required = len(sizes)
    if not sizes or not sizes[-1]:
        return Probes(sizes, required, True)  # no symbol: every length is the one sampled
    nodes = [n for value in values for n in (shape_only_nodes(value, producers) or [])]
    lengths, complete = _long_lengths(nodes, graph)
    sampled = max(max(s.values(), default=0) for s in sizes)
    short = sizes[0]
    for length in sorted(x for x in lengths if x > sampled):
        if length > MAX_PROBE_LENGTH:
            complete = False
            continue
        sizes.extend(_long_probes(graph, short, length))
    return Probes(sizes, required, complete)


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
