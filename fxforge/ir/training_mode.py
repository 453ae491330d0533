"""Which nodes of a captured graph compute as a model in training mode does: active dropout.

A model optimized in training mode keeps them, and its outputs are random at every call;
capture warns, and OptimizedModel.eval() refuses such a graph (it cannot switch them off).
Dropout hides in two places: the dropout ops themselves (nn.Dropout, F.dropout) and the
`dropout_p` of scaled_dot_product_attention, which transformers' attention layers pass as
`attention_dropout if self.training else 0.0` (Llama, Qwen, Mistral, GPT-2's sdpa path).
"""
from __future__ import annotations

from .graph import Graph, Node

# ops whose result is random where their train flag (argument 2) is true: dropout as a model
# in training mode runs it (in eval mode it is the identity, which cleanup removes)
DROPOUT_OPS = ("aten.dropout", "aten.feature_dropout", "aten.alpha_dropout", "aten.feature_alpha_dropout",
               "aten.native_dropout")

# attention ops that drop attention weights at random where their dropout_p (at this
# argument position, or by keyword) is not 0
ATTENTION_DROPOUT_ARG = {
    "aten.scaled_dot_product_attention": 4,
    "aten._scaled_dot_product_attention_math": 4,
    "aten._scaled_dot_product_flash_attention": 3,
    "aten._scaled_dot_product_flash_attention_for_cpu": 3,
    "aten._scaled_dot_product_efficient_attention": 5,
    "aten._scaled_dot_product_cudnn_attention": 5,
}


def _op(target: str, ops) -> str | None:
    return next((op for op in ops if target == op or target.startswith(op + ".")), None)


def is_training_mode(node: Node) -> bool:
    """Whether `node` computes at random as in training mode (true, or not a constant, at
    some call)."""
    if node.op != "torch_call":
        return False
    target = str(node.attrs.get("target", ""))
    args, kwargs = node.attrs.get("args", ()), dict(node.attrs.get("kwargs", ()) or ())
    if _op(target, DROPOUT_OPS):
        return kwargs.get("train", args[2] if len(args) > 2 else True) is not False
    attention = _op(target, ATTENTION_DROPOUT_ARG)
    if attention:
        position = ATTENTION_DROPOUT_ARG[attention]
        p = kwargs.get("dropout_p", args[position] if len(args) > position else 0.0)
        return not (isinstance(p, (int, float)) and p == 0)
    return False


def training_mode_nodes(graph: Graph) -> list[Node]:
    """The graph's nodes that compute as in training mode (active dropout), in order."""
    return [node for node in graph.nodes if is_training_mode(node)]
