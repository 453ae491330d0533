"""typecheck(graph): single assignment, definition before use, and every type re-derived."""
from __future__ import annotations

import torch

from .graph import Graph
from .ops import IRTypeError, OPS, get
from .signature import signature_problem
from .printer import Namer, format_node
from .roles import roles_problem
from .types import TensorType


class IRCheckError(TypeError):
    """The graph is malformed. The message quotes the offending IR line."""


def typecheck(graph: Graph, registry=None, *, weights: bool | None = None) -> Graph:
    """weights=True: every `param` must have its tensor in graph.params (a graph that is
    to run: the pass manager asks for it after a pass whose input had them); None: only
    when graph.params holds any (a graph parsed without weights has none, and checks)."""
    registry = OPS if registry is None else registry
    if weights is None:
        weights = bool(graph.params)
    names = Namer(graph)
    defined: set = set()

    def fail(node, why: str):
        raise IRCheckError(f"{why}\n  at: {format_node(node, names)}{node.where()}")

    for v in graph.inputs + graph.param_values + graph.state_values:
        if v in defined:
            raise IRCheckError(f"graph input %{names[v]} is listed twice")
        defined.add(v)
    for v in graph.param_values:
        if weights and v.param not in graph.params:
            missing = [p.param for p in graph.param_values if p.param not in graph.params]
            raise IRCheckError(f"{len(missing)} parameter(s) have no tensor in graph.params, e.g. "
                               f"{missing[:3]} (graph.params holds {len(graph.params)})")
        t = graph.params.get(v.param)
        # compared as sympy, so a symbolic or non-tensor type is a mismatch, not a crash
        if t is not None and (not isinstance(v.type, TensorType) or tuple(t.shape) != tuple(v.type.shape)
                              or t.dtype != v.type.dtype):
            raise IRCheckError(f"parameter {v.param!r} is {tuple(t.shape)} {t.dtype}, but typed {v.type}")

    problem = roles_problem(graph)
    if problem:
        raise IRCheckError(f"graph signature: {problem}")
    sized = {s for v in graph.inputs if hasattr(v.type, "shape") for d in v.shape for s in d.free_symbols}
    for guard in graph.guards:
        if not guard.free_symbols <= sized:
            unknown = ", ".join(sorted(map(str, guard.free_symbols - sized)))
            raise IRCheckError(f"guard {guard} names {unknown}, which is no size of a graph input")

    for node in graph.nodes:
        if node.op not in registry:
            fail(node, f"unknown op {node.op!r}")
        for v in node.inputs:
            if v not in defined:
                fail(node, "reads a value that is not defined before it")
        for v in node.outputs:
            if v in defined:
                fail(node, "assigns a value that is already defined")
            defined.add(v)
        why = signature_problem(registry[node.op], len(node.inputs), node.attrs)
        if why:
            fail(node, why)
        try:
            inferred = registry[node.op].infer([v.type for v in node.inputs], node.attrs)
        except IRTypeError as e:
            fail(node, f"type error in {node.op}: {e}")
        except Exception as e:  # noqa: BLE001
            # A node that passes its signature can still hold values a type rule cannot
            # use (a dim out of range, a body naming a missing step). Whatever the rule
            # raises, the caller gets one error type that quotes the line.
            fail(node, f"type error in {node.op}: {type(e).__name__}: {e}")
        why = dtype_problem(node.op, [v.type for v in node.inputs])
        if why:
            fail(node, why)
        if inferred is None:
            continue
        if len(inferred) != len(node.outputs):
            fail(node, f"{node.op} produces {len(inferred)} values, the node has {len(node.outputs)}")
        for want, v in zip(inferred, node.outputs):
            if not want.same_as(v.type):
                fail(node, f"result is typed {v.type} but {node.op} gives {want}")

    for v in graph.outputs:
        if v not in defined:
            raise IRCheckError(f"graph output %{names[v]} is not defined")
    return graph


# Ops whose torch kernels refuse operands of different dtypes ("mat1 and mat2 must have the
# same dtype"), by the names of their operands. Their type rules promote, so a mixed node
# still gets a type; it cannot run. The fused and quantized ops (attention, linear_fused,
# quant_linear, paged caches) cast their operands themselves and are not here.
_SAME_DTYPE_OPERANDS = {"linear": ("input", "weight", "bias"), "matmul": ("left", "right"),
                        "sdpa": ("query", "key", "value")}


def dtype_problem(op: str, types: list) -> str | None:
    """Why `op` cannot run on operands of these dtypes, or None."""
    names = _SAME_DTYPE_OPERANDS.get(op)
    if names is None:
        return None
    tensors = [(name, t) for name, t in zip(names, types) if isinstance(t, TensorType)]
    if len({t.dtype for _, t in tensors}) > 1:
        given = ", ".join(f"{name} {t}" for name, t in tensors)
        return (f"{op} needs one dtype for its {', '.join(n for n, _ in tensors)}, got {given}: torch's kernel "
                "refuses them, the graph cannot run. Whatever made this node must cast its operands to one dtype")
    if op == "sdpa" and len(types) > 3 and isinstance(types[3], TensorType):
        query, mask = types[0], types[3]
        if mask.dtype not in (torch.bool, torch.float32, query.dtype):
            return (f"sdpa's mask {mask} must be bool, f32 or the query's dtype ({query}): torch's kernel refuses "
                    "it. Whatever made this node must cast the mask")
    return None


__all__ = ["typecheck", "IRCheckError", "get", "dtype_problem"]
