"""Graph editing shared by every pass: dead-code elimination, and rebuilding a node on new
inputs with its types re-derived (the substitute-and-retype step gqa and kv_cache need).

Passes build new graphs; these helpers never mutate a node or a graph in place.
"""
from __future__ import annotations

from .graph import Graph, Node, Value
from .ops import OPS, is_pure


def dead_code_elimination(graph: Graph) -> Graph:
    """Drop nodes whose results nobody reads (impure nodes stay), and unread parameters."""
    live = set(graph.outputs)
    kept: list[Node] = []
    for node in reversed(graph.nodes):
        if any(v in live for v in node.outputs) or not is_pure(node):
            kept.append(node)
            live.update(node.inputs)
    if len(kept) == len(graph.nodes):
        return graph
    return graph.with_nodes(reversed(kept)).prune_params()


def retyped(node: Node, inputs: tuple, renamed: dict[Value, Value], attrs: dict | None = None,
            registry=None) -> tuple[Node, list[bool]]:
    """`node` reading `inputs` (and `attrs`, default its own), with its result types
    re-derived by the op's type rule. A result whose type changes becomes a new Value,
    recorded in `renamed` (old -> new) so that later nodes follow; one whose type stays
    keeps its Value. Returns the node and, per result, whether its type changed. The
    type rule's IRTypeError/TypeError propagates: the caller decides whether that declines
    its rewrite."""
    registry = OPS if registry is None else registry
    attrs = node.attrs if attrs is None else attrs
    types = registry[node.op].infer([v.type for v in inputs], attrs)
    if types is None:  # opaque: types are recorded, not derived
        return Node(node.op, inputs, attrs, node.outputs, node.meta), [False] * len(node.outputs)
    if len(types) != len(node.outputs):
        raise TypeError(f"{node.op} now gives {len(types)} results, the node has {len(node.outputs)}")
    outputs, changed = [], []
    for t, old in zip(types, node.outputs):
        if t.same_as(old.type):
            outputs.append(old)
            changed.append(False)
        else:
            new = Value(t, old.hint)
            renamed[old] = new
            outputs.append(new)
            changed.append(True)
    return Node(node.op, inputs, attrs, tuple(outputs), node.meta), changed
