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
# the projections a chain starts at: a linear, or a linear_fused (the final norm inside it)
_PROJECTIONS = {"linear", "linear_fused"}


def _body_within_a_token(body, rank: int) -> bool:
    """A pointwise body reduces, concatenates and indexes along the last dim only (row
    groups do): anything along another dim could mix tokens."""
    for step in body or ():
        attrs = dict(step[2])
        dims = tuple(attrs.get("dims") or ()) + ((attrs["dim"],) if isinstance(attrs.get("dim"), int) else ())
        if any(d % rank != rank - 1 for d in dims):
            return False
    return True


def _within_a_token(node: Node) -> bool:
    rank = node.outputs[0].rank
    if node.op == "fused_pointwise":
        return _body_within_a_token(node.attrs["body"], rank)
    if node.op == "linear_fused":
        return (_body_within_a_token(node.attrs["prologue"], rank)
                and _body_within_a_token(node.attrs["epilogue"], rank))
    return True


def _token_inputs(node: Node, tokens) -> list[int]:
    """The inputs of the projection that carry the tokens ([B, T, ...], not parameters):
    the ones the cut slices. The weight and bias are parameters."""
    return [i for i, v in enumerate(node.inputs)
            if v.param is None and isinstance(v.type, TensorType) and v.rank == 3 and v.type.shape[1] == tokens]


def _logits_chain(graph: Graph, logits: Value) -> list[Node] | None:
    """[the projection, per-token nodes after it ..., the node making the logits]: the
    logits are a linear's (or linear_fused's first) output through per-token ops whose
    other inputs are parameters or scalars; None if they are not."""
    producers, users = graph.producers(), graph.users()
    chain, value = [], logits
    while True:
        node = producers.get(value)
        if node is None or not _within_a_token(node):
            return None
        chain.append(node)
        if node.op in _PROJECTIONS:
            if value is not node.outputs[0] or value.rank != 3:
                return None
            # its other results (a norm's residual sum) would hold one token: nobody may read them
            if any(users.get(v) or v in graph.outputs for v in node.outputs[1:]):
                return None
            break
        if node.op not in _PER_TOKEN or len(node.outputs) != 1:
            return None
        on_chain = [v for v in node.inputs if v.param is None and getattr(v.type, "rank", 0) >= 2]
        if len(on_chain) != 1 or on_chain[0].type.shape != value.type.shape:
            return None
        value = on_chain[0]
    chain.reverse()
    # nothing but the chain reads what the chain makes (it is about to hold one token)
    for node, after in zip(chain, chain[1:] + [None]):
        made = node.outputs[0]
        readers = users.get(made, [])
        if after is None:
            if readers or graph.outputs.count(made) != 1:
                return None
        elif readers != [after] or made in graph.outputs:
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
    projection = chain[0]
    tokens = projection.outputs[0].type.shape[1]
    cut_at = _token_inputs(projection, tokens)
    if tokens == 1 or not cut_at:
        return None
    cuts, inputs = [], list(projection.inputs)
    for i in cut_at:
        x = inputs[i]
        inputs[i] = Value(TensorType((x.type.shape[0], sympy.Integer(1)) + tuple(x.type.shape[2:]), x.type.dtype),
                          "last_token")
        cuts.append(Node("slice", (x,), {"dim": 1, "start": tokens - 1, "end": tokens, "step": 1}, (inputs[i],),
                         projection.meta))
    renamed: dict[Value, Value] = {}
    nodes = []
    for node in graph.nodes:
        if node is projection:
            nodes.extend(cuts)
            node = retyped(node, tuple(inputs), renamed)[0]
        elif any(v in renamed for v in node.inputs):
            node = retyped(node, tuple(renamed.get(v, v) for v in node.inputs), renamed)[0]
        nodes.append(node)
    return graph.with_nodes(nodes, [renamed.get(v, v) for v in graph.outputs])
