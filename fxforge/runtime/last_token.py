"""The program of a prefill that wants only the last token's logits.

generate(), beam search and the engine read one row of logits from a prefill: the last
token's. The graph computes them for every token, and the output projection is a large
share of a small model's work: SmolLM2-135M's lm_head (49152 x 576) is a fifth of its
weights, so a fifth of every prefill's FLOPs went into logits nobody read. transformers
does the same cut (`logits_to_keep=1`).

`last_token_graph` slices the hidden state to its last token right before the linear that
makes the logits, and re-derives the types after it (the logits become [B, 1, V]). Exact:
a linear, and the elementwise ops after it (a soft-cap, a scale), act on each token
alone, so the last token's row is the same numbers either way. Graphs where that cannot be
shown (the logits are not a linear's output, possibly through elementwise ops on it alone)
get None, and the full program runs.
"""
from __future__ import annotations

import sympy

from ..ir import roles
from ..ir.edit import retyped
from ..ir.graph import Graph, Node, Value
from ..ir.types import TensorType

# ops that act on each token's row alone, which the logits may pass through after the linear
# (fused_pointwise: its row reductions are over the last dim, within a token)
_PER_TOKEN = {"fused_pointwise", "tanh", "mul", "div", "add", "sub", "cast", "neg"}


def _within_a_token(node: Node) -> bool:
    """A fused_pointwise group reduces, concatenates and indexes along the last dim only
    (row groups do): anything along another dim could mix tokens."""
    if node.op != "fused_pointwise":
        return True
    rank = node.output.rank
    for step in node.attrs["body"]:
        attrs = dict(step[2])
        dims = attrs.get("dims", ()) if attrs.get("dims") is not None else ()
        dims = tuple(dims) + ((attrs["dim"],) if isinstance(attrs.get("dim"), int) else ())
        if any(d % rank != rank - 1 for d in dims):
            return False
    return True


def _logits_chain(graph: Graph, logits: Value) -> list[Node] | None:
    """[the linear, elementwise nodes after it ..., the node making the logits]: the
    logits are that linear's output through per-token ops whose other inputs are
    parameters or scalars; None if they are not."""
    producers, users = graph.producers(), graph.users()
    chain, value = [], logits
    while True:
        node = producers.get(value)
        if node is None or len(node.outputs) != 1:
            return None
        chain.append(node)
        if node.op == "linear":
            x = node.inputs[0]
            if not (isinstance(x.type, TensorType) and x.rank == 3):
                return None
            break
        if node.op not in _PER_TOKEN or not _within_a_token(node):
            return None
        on_chain = [v for v in node.inputs if v.param is None and getattr(v.type, "rank", 0) >= 2]
        if len(on_chain) != 1 or on_chain[0].type.shape != value.type.shape:
            return None
        value = on_chain[0]
    chain.reverse()
    # nothing but the chain reads what the chain makes (it is about to hold one token)
    for node, after in zip(chain, chain[1:] + [None]):
        readers = users.get(node.output, [])
        if after is None:
            if readers or graph.outputs.count(node.output) != 1:
                return None
        elif readers != [after] or node.output in graph.outputs:
            return None
    return chain


def last_token_graph(graph: Graph) -> Graph | None:
    """`graph` computing the logits of the last token only ([B, 1, V]); None where the
    cut cannot be shown exact."""
    index = roles.output_index(graph, roles.LOGITS)
    if index is None:
        return None
    chain = _logits_chain(graph, graph.outputs[index])
    if chain is None:
        return None
    linear, x = chain[0], chain[0].inputs[0]
    tokens = x.type.shape[1]
    if tokens == 1:
        return None
    last = Value(TensorType((x.type.shape[0], sympy.Integer(1), x.type.shape[2]), x.type.dtype), "last_token")
    cut = Node("slice", (x,), {"dim": 1, "start": tokens - 1, "end": tokens, "step": 1}, (last,), linear.meta)
    renamed: dict[Value, Value] = {}
    nodes = []
    for node in graph.nodes:
        if node is linear:
            nodes.append(cut)
            node = retyped(node, (last,) + node.inputs[1:], renamed)[0]
        elif any(v in renamed for v in node.inputs):
            node = retyped(node, tuple(renamed.get(v, v) for v in node.inputs), renamed)[0]
        nodes.append(node)
    return graph.with_nodes(nodes, [renamed.get(v, v) for v in graph.outputs])
