"""Builder: appends typed nodes to a node list. Used by capture and by rewrite rules."""
from __future__ import annotations

from typing import Any, Sequence

import sympy
import torch

from .graph import Node, Value
from .ops import OPS, IRTypeError
from .types import TensorType, Type

# The dtype torch gives a Python complex scalar, by the default float dtype.
_DEFAULT_COMPLEX = {torch.float64: torch.complex128, torch.float16: torch.complex32}


class Builder:
    def __init__(self, meta: dict | None = None, registry=None):
        self.nodes: list[Node] = []
        self.meta = dict(meta or {})
        self.registry = OPS if registry is None else registry

    def emit_multi(self, op: str, inputs: Sequence[Value], attrs: dict | None = None,
                   types: Sequence[Type] | None = None, meta: dict | None = None) -> tuple[Value, ...]:
        """Add a node. Types are inferred from the registry unless given (opaque ops)."""
        attrs = dict(attrs or {})
        if op not in self.registry:
            raise KeyError(f"unknown IR op {op!r}")
        inferred = self.registry[op].infer([v.type for v in inputs], attrs)
        if inferred is None:
            if types is None:
                raise IRTypeError(f"{op} cannot infer its result type; pass types=")
            inferred = list(types)
        outputs = tuple(Value(t) for t in inferred)
        self.nodes.append(Node(op, tuple(inputs), attrs, outputs, {**self.meta, **(meta or {})}))
        return outputs

    def emit(self, op: str, *inputs: Value, **attrs: Any) -> Value:
        outs = self.emit_multi(op, inputs, attrs)
        if len(outs) != 1:
            raise IRTypeError(f"{op} has {len(outs)} results; use emit_multi")
        return outs[0]

    def const(self, value, dtype: torch.dtype | None = None) -> Value:
        """A 0-dim constant. Python scalars get torch's default dtypes, so that
        `x * 0.5` keeps x's float dtype, as in torch (0-dim tensors promote like scalars)."""
        if dtype is None:
            if isinstance(value, bool):
                dtype = torch.bool
            elif isinstance(value, (int, sympy.Integer)) or (isinstance(value, sympy.Basic) and value.is_integer):
                dtype = torch.int64
            elif isinstance(value, complex):  # torch's default complex dtype, as for `z * 2j`
                dtype = _DEFAULT_COMPLEX.get(torch.get_default_dtype(), torch.complex64)
            else:
                dtype = torch.get_default_dtype()
        if isinstance(value, sympy.Basic) and value.is_number:
            value = int(value) if value.is_integer else float(value)
        return self.emit("const", value=value, dtype=dtype)

    def cast(self, x: Value, dtype: torch.dtype) -> Value:
        if isinstance(x.type, TensorType) and x.dtype == dtype:
            return x
        return self.emit("cast", x, dtype=dtype)


def expand_ops(graph, op: str, expand, which=None):
    """`graph` with every `op` node (for which `which(node)` holds, when given) replaced by the
    nodes `expand(node, builder)` emits into a fresh Builder; `expand` returns the values that
    stand for the node's results, in order. Those values take the node's own result values'
    identity (later nodes read them), so a fused op turns back into its composition in place
    (the unfuse of fused passes)."""
    def chosen(node):
        return node.op == op and (which is None or which(node))

    if not any(chosen(n) for n in graph.nodes):
        return graph
    nodes: list[Node] = []
    for node in graph.nodes:
        if not chosen(node):
            nodes.append(node)
            continue
        b = Builder(node.meta)
        results = expand(node, b)
        renamed = {v: old for v, old in zip(results, node.outputs)}
        for n in b.nodes:
            nodes.append(Node(n.op, tuple(renamed.get(v, v) for v in n.inputs), n.attrs,
                              tuple(renamed.get(v, v) for v in n.outputs), n.meta))
    return graph.with_nodes(nodes)
