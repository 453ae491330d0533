"""Which linear weights are mixture-of-experts routers: a linear (or matmul on a weight)
whose output reaches an op that *selects* by value (top-k, sort, max/argmax over a dim)
without first passing through another product.

Why quantize needs to know: a router's scores decide which experts run, so the small
rounding error of a quantized router flips the choice of expert for tokens near a tie, and
such a token then gets another expert's output entirely, while the routers are a few KiB
of a model's weights. So quantize keeps them float unless asked
(QuantConfig(include_routers=True)), and says so in report().

Found by what the graph computes, not by name: router modules are called `gate`,
`router`, `block_sparse_moe.gate`, `mlp.gate` (next to `gate_proj`, which is not one) ...
"""
from __future__ import annotations

from ..ir.graph import Graph, Value, readers_through

# torch_call targets that choose entries by their values
SELECTION_TARGETS = frozenset({
    "aten.topk.default", "aten.sort.default", "aten.sort.stable", "aten.argsort.default",
    "aten.argsort.stable", "aten.max.dim", "aten.min.dim", "aten.argmax.default", "aten.argmin.default",
    "aten.kthvalue.default",
})
# Ops that start a new product: a path through one of them reads another layer's output
# (a router's scores reach the selection through softmax, sigmoid, casts, views, adds)
PRODUCTS = frozenset({"linear", "matmul", "quant_linear", "linear_fused", "attention", "rope_attention"})
# How many ops a router's scores may pass through before the selection (DeepSeek-V3:
# sigmoid, add the correction bias, view, topk of groups, sum, topk, ...)
MAX_DEPTH = 12


def router_weights(graph: Graph) -> dict[str, str]:
    """{weight parameter name: the selection op its output reaches} for every linear /
    matmul on a parameter whose output reaches a selection within MAX_DEPTH ops, through
    no other product."""
    users = graph.users()
    found: dict[str, str] = {}
    for node in graph.nodes:
        if node.op not in ("linear", "matmul") or len(node.inputs) < 2:
            continue
        weight = node.inputs[1]
        if weight.param is None or weight.param in found:
            continue
        target = _selection_reached(node.outputs[0], users)
        if target is not None:
            found[weight.param] = target
    return found


def _selection_reached(start: Value, users) -> str | None:
    """The first selection op `start` reaches through no product (None: none within MAX_DEPTH)."""
    readers = readers_through(users, [start], lambda n: n.op not in PRODUCTS and not _selects(n), MAX_DEPTH)
    return next((n.attrs["target"] for n in readers if _selects(n)), None)


def _selects(node) -> bool:
    return node.op == "torch_call" and node.attrs.get("target") in SELECTION_TARGETS
