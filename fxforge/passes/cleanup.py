"""Cleanup: dead code, common subexpressions, constant folding, no-op removal, and
canonical forms (constants last in mul/add, division by a power of two as multiplication,
subtraction of a constant as addition, where(not m) with its arms swapped): each is
bit-exact, and each leaves later passes one spelling to match instead of several.

The no-op and folding rules are a table for the generic driver; DCE and CSE are whole-
graph sweeps (they are not local rewrites).
"""
from __future__ import annotations

import math
from collections import Counter

import torch

from ..ir.edit import dead_code_elimination
from ..ir.evaluate import attr_symbols, eval_node, scalar_exponents
from ..ir.graph import Graph, Node, Value
from ..ir.ops import is_pure
from ..ir.printer import format_attrs
from .pattern import Rule, apply_rules, attr, const, op, var  # noqa: F401


def common_subexpression_elimination(graph: Graph, stats: Counter | None = None) -> Graph:
    seen: dict[tuple, Node] = {}
    renamed: dict[Value, Value] = {}
    nodes: list[Node] = []
    for node in graph.nodes:
        node = node.with_renamed_inputs(renamed)
        if is_pure(node):
            key = (node.op, tuple(id(v) for v in node.inputs), format_attrs(node.attrs))
            twin = seen.get(key)
            if twin is not None and all(a.type.same_as(b.type) for a, b in zip(twin.outputs, node.outputs)):
                renamed.update(zip(node.outputs, twin.outputs))
                if stats is not None:
                    stats["cse"] += 1
                continue
            seen[key] = node
        nodes.append(node)
    if not renamed:
        return graph
    return graph.with_nodes(nodes, [renamed.get(v, v) for v in graph.outputs])


# Folded tensors larger than this stay as computations: a big constant costs memory.
FOLD_MAX_ELEMENTS = 1 << 16


def fold_constants(graph: Graph, stats: Counter | None = None) -> Graph:
    """Evaluate subgraphs that read no graph input and no weight (shape-only computations
    such as `unsqueeze(arange(0, 1))`) once, when their result has a concrete, small shape.
    The result becomes a 0-dim `const` or a `_folded.N` constant tensor. Subgraphs whose
    shape is symbolic (a causal mask of length T) cannot become one tensor; the passes
    that need to know what they compute evaluate them at sample sizes instead. Nor can a
    node whose attrs mention a size, at any depth (`const T`, also inside a fused body:
    `ones(1) * T` then rsqrt): its value differs from call to call."""
    known: dict[Value, torch.Tensor] = {}
    renamed: dict[Value, Value] = {}
    nodes: list[Node] = []
    folded = 0
    out_graph = graph.with_nodes([])
    device = next((t.device for t in graph.params.values()), torch.device("cpu"))
    exponents = scalar_exponents(graph.nodes)
    for node in graph.nodes:
        node = node.with_renamed_inputs(renamed)
        concrete = all(d.is_number for v in node.outputs if hasattr(v.type, "shape") for d in v.shape)
        evaluable = (is_pure(node) and concrete and node.op != "torch_call"
                     and all(v in known for v in node.inputs)
                     and not attr_symbols(node.attrs))  # a size in attrs (T, at any depth) varies per call
        if not evaluable:
            nodes.append(node)
            continue
        # (sizes in attrs are sympy numbers here, e.g. under static capture: the evaluator
        # hands torch plain Python numbers)
        value = eval_node(node, [known[v] for v in node.inputs], {}, device, exponents=exponents)[0]
        out = node.outputs[0]
        known[out] = value
        if node.op == "const" or value.numel() > FOLD_MAX_ELEMENTS or (not node.inputs and value.dim() > 0):
            nodes.append(node)
            continue
        if value.dim() == 0:
            new = Node("const", (), {"value": value.item(), "dtype": value.dtype}, (Value(out.type),), node.meta)
            nodes.append(new)
            renamed[out] = new.outputs[0]
        else:
            renamed[out] = out_graph.add_param(f"_folded.{folded}", value.clone())
        known[renamed[out]] = value
        folded += 1
    if not folded:
        return graph
    if stats is not None:
        stats["fold_constant"] += folded
    out_graph.nodes = nodes
    out_graph.outputs = [renamed.get(v, v) for v in graph.outputs]
    return dead_code_elimination(out_graph)


# -- rules --------------------------------------------------------------------------------
def _same_width_roundtrip(m, b):
    # cast(cast(x, wide), narrow) == cast(x, narrow) when `wide` holds every value of x exactly
    x, mid, out = m["x"].dtype, m.attr("mid"), m.root.outputs[0].dtype
    exact = {torch.float16: {torch.float32, torch.float64}, torch.bfloat16: {torch.float32, torch.float64},
             torch.float32: {torch.float64}}
    if mid in exact.get(x, ()) or (not x.is_floating_point and mid.is_floating_point and x == torch.bool):
        return b.cast(m["x"], out)
    return None


def _compose_permutes(m, b):
    inner, outer = m.attr("p1"), m.attr("p2")
    return b.emit("permute", m["x"], dims=tuple(inner[d] for d in outer))


def _if_same_type(m, b):
    return m["x"] if m.same_type("x") else None


def _adds_nothing(m, b):
    """x + 0 -> x where that is exact: for a float x only adding -0.0 is (IEEE: -0.0 + 0.0 is
    +0.0, so `1 / (x + 0.0)` at x = -0.0 is +inf where 1 / x is -inf)."""
    if not m.same_type("x"):
        return None
    zero = m.attr("c")
    if m["x"].dtype.is_floating_point or m["x"].dtype.is_complex:
        if not (isinstance(zero, float) and math.copysign(1.0, zero) < 0):
            return None
    return m["x"]


def _view_of_view(m, b):
    return b.emit("view", m["x"], shape=m.root.attrs["shape"])


# -- canonical forms: one spelling per computation, so that a pass matches one form ------
def _is_const(m, name) -> bool:
    node = m.producers.get(m[name])
    return node is not None and node.op == "const"


def _const_last(m, b):
    # mul(c, x) -> mul(x, c): IEEE multiplication and addition commute exactly
    if _is_const(m, "x") or not _is_const(m, "c"):
        return None
    return b.emit(m.root.op, m["x"], m["c"])


def _float_scalar(m, name):
    value = m.attr(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not m[name].dtype.is_floating_point:
        return None
    return float(value)


def _div_by_power_of_two(m, b):
    # x / 2^k -> x * 2^-k: both are the one correctly rounded value of the same real number,
    # so the answer is bit-identical. Any other divisor's reciprocal is rounded, and
    # x * (1/c) can differ from x / c in the last bit: those stay divisions.
    c = _float_scalar(m, "c")
    if c is None or not m["x"].dtype.is_floating_point:
        return None
    mantissa, exponent = math.frexp(c)
    if abs(mantissa) != 0.5 or not -126 < exponent < 126:
        return None
    return b.emit("mul", m["x"], b.const(1.0 / c, m["c"].dtype))


def _sub_as_add(m, b):
    # x - c -> x + (-c): IEEE defines subtraction as adding the negation (signed zeros too)
    c = _float_scalar(m, "c")
    if c is None:
        return None
    return b.emit("add", m["x"], b.const(-c, m["c"].dtype))


def _where_of_not(m, b):
    # where(not m, a, b) -> where(m, b, a)
    return b.emit("where", m["mask"], m["b"], m["a"])


def _typed_as_root(replace):
    """A canonical form must not change the result type (a promotion the spelling implied)."""
    def rule(m, b):
        out = replace(m, b)
        return out if out is not None and out.type.same_as(m.root.outputs[0].type) else None
    rule.__doc__ = replace.__doc__
    return rule


def _matmul_as_linear(m, b):
    """x @ W.T with W a 2-D parameter (falcon's FalconLinear) is the linear it spells: one
    form for the passes that match linears (fuse_linear, quantize, gqa, cpu_linear). Both
    run the same matrix product (mm with W transposed)."""
    w = m["w"]
    if w.param is None or w.rank != 2 or m["x"].rank < 2:
        return None
    return b.emit("linear", m["x"], w)


# before -> after
RULES: list[Rule] = [
    # matmul(x, permute(W, (1, 0))) with W a parameter -> linear(x, W)
    Rule("matmul_as_linear", op("matmul", var("x"), op("permute", var("w"), dims=lambda d: tuple(d) == (1, 0))),
         _typed_as_root(_matmul_as_linear)),
    # mul(c, x) -> mul(x, c) ; add(c, x) -> add(x, c)   (constants last)
    Rule("mul_const_last", op("mul", var("c"), var("x")), _typed_as_root(_const_last)),
    Rule("add_const_last", op("add", var("c"), var("x")), _typed_as_root(_const_last)),
    # div(x, 2^k) -> mul(x, 2^-k)
    Rule("div_power_of_two", op("div", var("x"), const("c")), _typed_as_root(_div_by_power_of_two)),
    # sub(x, c) -> add(x, -c)
    Rule("sub_const", op("sub", var("x"), const("c")), _typed_as_root(_sub_as_add)),
    # where(logical_not(m), a, b) -> where(m, b, a)
    Rule("where_of_not", op("where", op("logical_not", var("mask")), var("a"), var("b")),
         _typed_as_root(_where_of_not)),
    # add(x, 0) -> x ; sub(x, 0) -> x   (only where the type is unchanged)
    Rule("add_zero", op("add", var("x"), const("c", value=0), commutative=True), _adds_nothing),
    Rule("sub_zero", op("sub", var("x"), const(value=0)), _if_same_type),
    # mul(x, 1) -> x ; div(x, 1) -> x
    Rule("mul_one", op("mul", var("x"), const(value=1), commutative=True), _if_same_type),
    Rule("div_one", op("div", var("x"), const(value=1)), _if_same_type),
    # cast(x: T) to T -> x
    Rule("cast_noop", op("cast", var("x")), _if_same_type),
    # cast(cast(x, wider), y) -> cast(x, y)
    Rule("cast_roundtrip", op("cast", op("cast", var("x"), dtype=attr("mid"))), _same_width_roundtrip),
    # view(x) to x's own shape -> x ; expand(x) to its own shape -> x
    Rule("view_noop", op("view", var("x")), _if_same_type),
    Rule("expand_noop", op("expand", var("x")), _if_same_type),
    # view(view(x)) -> view(x)
    Rule("view_of_view", op("view", op("view", var("x"))), _view_of_view),
    # permute(x, identity) -> x ; permute(permute(x, p1), p2) -> permute(x, p1∘p2)
    Rule("permute_noop", op("permute", var("x"), dims=lambda d: list(d) == sorted(d)), _if_same_type),
    Rule("permute_of_permute", op("permute", op("permute", var("x"), dims=attr("p1")), dims=attr("p2")),
         _compose_permutes),
    # squeeze(unsqueeze(x, d), (d,)) -> x
    Rule("unsqueeze_squeeze", op("squeeze", op("unsqueeze", var("x"), dim=attr("d")),
                                 dims=lambda ds: len(ds) == 1), _if_same_type),
]


def cleanup(graph: Graph, ctx=None) -> Graph:
    stats = ctx.rules if ctx is not None else Counter()
    graph = dead_code_elimination(graph)
    graph = fold_constants(graph, stats)
    graph = apply_rules(graph, RULES, stats, pass_name="cleanup")
    graph = common_subexpression_elimination(graph, stats)
    # CSE can expose new no-ops (two equal views), so run the table once more.
    graph = apply_rules(graph, RULES, stats, pass_name="cleanup")
    return dead_code_elimination(graph)
