"""The IR: a typed SSA graph in topological order (one equation per value, like a jaxpr).

A `Graph` has user inputs, parameter inputs (weights, buffers and constants, by their
fully qualified name in the model), a list of nodes and a list of outputs. Values are
plain objects compared by identity; names are given only when the graph is printed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

from .types import SymType, TensorType, Type


class Value:
    """One SSA value. `param` is the parameter name when the value is a weight input;
    `state` the buffer name when it is a mutable buffer the runtime allocates (a KV cache).
    `attrs` says what a graph input or state buffer means to the runtime (ir/roles.py):
    `{role="cache_len"}`, `{layer=0, kind="k", layout="dense"}`; None for plain values."""

    __slots__ = ("type", "hint", "param", "state", "attrs")

    def __init__(self, type: Type, hint: str | None = None, param: str | None = None, state: str | None = None,
                 attrs: dict | None = None):
        self.type = type
        self.hint = hint
        self.param = param
        self.state = state
        self.attrs = attrs

    @property
    def shape(self):
        return self.type.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.type.dtype

    @property
    def rank(self) -> int:
        return self.type.rank

    def __repr__(self) -> str:
        label = f" param {self.param!r}" if self.param else f" state {self.state!r}" if self.state else ""
        return f"<Value{label} {self.type}>"


@dataclass
class Node:
    op: str
    inputs: tuple[Value, ...]
    attrs: dict[str, Any]
    outputs: tuple[Value, ...]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def output(self) -> Value:
        if len(self.outputs) != 1:
            raise ValueError(f"{self.op} has {len(self.outputs)} outputs, not one")
        return self.outputs[0]

    def with_renamed_inputs(self, renamed: dict) -> "Node":
        """This node reading `renamed[v]` in place of each input v that a rewrite replaced
        (the node itself when none was)."""
        if not any(v in renamed for v in self.inputs):
            return self
        return Node(self.op, tuple(renamed.get(v, v) for v in self.inputs), self.attrs, self.outputs, self.meta)

    def where(self) -> str:
        """The model source that produced this node, for error messages."""
        src = self.meta.get("source")
        return f" (from {src})" if src else ""


@dataclass
class Graph:
    inputs: list[Value] = field(default_factory=list)
    param_values: list[Value] = field(default_factory=list)
    nodes: list[Node] = field(default_factory=list)
    outputs: list[Value] = field(default_factory=list)
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    # Mutable buffers the runtime allocates and passes after the inputs (a KV cache, one
    # value per buffer, `Value.state` its name). Their sizes may be symbolic: the runtime
    # picks them per call (e.g. the cache length S) and the program binds them.
    state_values: list[Value] = field(default_factory=list)
    input_names: list[str] = field(default_factory=list)
    # Conditions on the input size symbols under which this graph is the model's
    # computation (sympy relations such as `T >= 5`, recorded by torch.export from the
    # model's code): the runtime checks them on every call (ir/guards.py).
    guards: list = field(default_factory=list)
    # What the graph's outputs mean and the limits the runtime enforces (ir/roles.py):
    # {"outputs": ("logits",), "max_seq_len": 128, "max_batch": 8}; empty for a plain graph.
    signature: dict = field(default_factory=dict)

    # -- structure queries -------------------------------------------------------------
    def producers(self) -> dict[Value, Node]:
        return {v: n for n in self.nodes for v in n.outputs}

    def users(self) -> dict[Value, list[Node]]:
        out: dict[Value, list[Node]] = {}
        for n in self.nodes:
            for v in n.inputs:
                out.setdefault(v, []).append(n)
        return out

    def use_counts(self) -> dict[Value, int]:
        """How many times each value is read, counting graph outputs as reads."""
        counts: dict[Value, int] = {}
        for n in self.nodes:
            for v in n.inputs:
                counts[v] = counts.get(v, 0) + 1
        for v in self.outputs:
            counts[v] = counts.get(v, 0) + 1
        return counts

    def param_value(self, name: str) -> Value:
        for v in self.param_values:
            if v.param == name:
                return v
        raise KeyError(name)

    def count(self, op: str) -> int:
        return sum(1 for n in self.nodes if n.op == op)

    def op_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for n in self.nodes:
            out[n.op] = out.get(n.op, 0) + 1
        return out

    # -- building ------------------------------------------------------------------------
    def with_nodes(self, nodes: Iterable[Node], outputs: Iterable[Value] | None = None) -> "Graph":
        """A new graph sharing inputs and params, with other nodes (and outputs)."""
        return Graph(
            inputs=list(self.inputs),
            param_values=list(self.param_values),
            nodes=list(nodes),
            outputs=list(self.outputs if outputs is None else outputs),
            params=dict(self.params),
            state_values=list(self.state_values),
            input_names=list(self.input_names),
            guards=list(self.guards),
            signature=dict(self.signature),
        )

    def prune_params(self) -> "Graph":
        """Drop parameter inputs that no node reads any more (after folding or rewrites)."""
        used = {v for n in self.nodes for v in n.inputs} | set(self.outputs)
        kept = [v for v in self.param_values if v in used]
        if len(kept) == len(self.param_values):
            return self
        g = self.with_nodes(self.nodes)
        g.param_values = kept
        g.params = {v.param: self.params[v.param] for v in kept if v.param in self.params}
        return g

    def add_param(self, name: str, tensor: torch.Tensor) -> Value:
        """Register a new parameter (for example a folded constant) and return its value."""
        base, i = name, 1
        while name in self.params:
            name = f"{base}.{i}"
            i += 1
        self.params[name] = tensor
        v = Value(TensorType(tuple(tensor.shape), tensor.dtype), param=name)
        self.param_values.append(v)
        return v

    # -- views -----------------------------------------------------------------------------
    def __str__(self) -> str:
        from .printer import print_graph

        return print_graph(self)

    def to_networkx(self):
        """The dataflow DAG: one vertex per node (its index), an edge per value read."""
        import networkx as nx

        dag = nx.MultiDiGraph()
        producers = {}
        for i, n in enumerate(self.nodes):
            dag.add_node(i, op=n.op)
            for v in n.outputs:
                producers[v] = i
        for i, n in enumerate(self.nodes):
            for v in n.inputs:
                if v in producers:
                    dag.add_edge(producers[v], i)
        return dag

    def to_dot(self) -> str:
        """Graphviz source for a picture of the graph."""
        from .printer import Namer

        names = Namer(self)
        lines = ["digraph fxforge {", "  node [shape=box, fontname=monospace];"]
        for v in self.inputs + self.state_values:
            lines.append(f'  "{names[v]}" [shape=ellipse, label="{names[v]}: {v.type}"];')
        producers = {}
        for i, n in enumerate(self.nodes):
            outs = ", ".join(names[v] for v in n.outputs)
            lines.append(f'  n{i} [label="{outs} = {n.op}"];')
            for v in n.outputs:
                producers[v] = f"n{i}"
        for i, n in enumerate(self.nodes):
            for v in n.inputs:
                if v.param:
                    continue
                src = producers.get(v, f'"{names[v]}"')
                lines.append(f"  {src} -> n{i};")
        lines.append("}")
        return "\n".join(lines)


def readers_through(users: dict[Value, list[Node]], start, through, depth: int) -> list[Node]:
    """The nodes that read the `start` values, directly or through a chain of at most
    `depth` - 1 nodes that `through(node)` lets the walk pass (whose outputs it follows
    instead of reporting them), in the order found. `users`: Graph.users()."""
    frontier, seen, found = list(start), set(start), []
    for _ in range(depth):
        following = []
        for value in frontier:
            for node in users.get(value, ()):
                if not through(node):
                    found.append(node)
                    continue
                for out in node.outputs:
                    if out not in seen:
                        seen.add(out)
                        following.append(out)
        if not following:
            break
        frontier = following
    return found


def is_tensor_type(v: Value) -> bool:
    return isinstance(v.type, TensorType)


def is_sym(v: Value) -> bool:
    return isinstance(v.type, SymType)
