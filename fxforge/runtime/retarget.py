"""OptimizedModel.to(device / dtype): the optimized graph on another device or in another
float dtype. The backend's planning and the program are then rebuilt from it (build.py).

A device move copies the weights. A dtype change casts every floating weight, state
buffer and float input, then re-derives every node's type from the op registry's type
rules. That is only the model's computation in the new dtype when no node fixes a float
dtype of its own: a cast written in the model (`x.float()`, Llama's RMSNorm and rotary
embeddings), a float constant tensor, an op whose type is stored rather than derived.
Such a node pins the dtype, and `to()` refuses with the IR line that pins it, rather than
running something the model would not compute; optimize the model again after
`model.to(dtype)` then. A cast the model asks for that was a no-op at capture (`x.float()`
on a float32 x) leaves no node, but capture records it in the graph's signature
(`fixed_dtypes`, ir/roles.py): it pins the same way.
"""
from __future__ import annotations

import torch

from ..ir.graph import Graph, Node, Value
from ..ir.ops import OPS
from ..ir.printer import Namer, format_node
from ..ir.types import TensorType


# the activation dtypes the quantized linear kernels take (runtime/torch_kernels.py, codegen)
QUANT_COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class DtypePinnedError(TypeError):
    """The graph's own types fix a float dtype, so it cannot be retyped exactly."""


def graph_on(graph: Graph, device: torch.device | None = None, dtype: torch.dtype | None = None) -> Graph:
    """A new graph like `graph` with its weights on `device` and its floats in `dtype`
    (None: unchanged)."""
    if dtype is not None:
        graph = retyped(graph, dtype)
    if device is not None:
        moved = graph.with_nodes(graph.nodes)
        moved.params = _mapped(graph.params, lambda t: t.to(device))
        graph = moved
    return graph


def retyped(graph: Graph, dtype: torch.dtype) -> Graph:
    if not dtype.is_floating_point:
        raise TypeError(f"to({dtype}): an optimized model changes only to a floating dtype (its integer inputs "
                        "and quantized weights keep theirs)")
    quantized = [n for n in graph.nodes if n.op == "quant_linear" or n.attrs.get("qattrs")]
    if quantized and dtype not in QUANT_COMPUTE_DTYPES:
        names = Namer(graph)
        raise TypeError(
            f"to({dtype}): the model is quantized, and its quantized linears compute in "
            f"{', '.join(map(str, QUANT_COMPUTE_DTYPES))} only, e.g.\n  {format_node(quantized[0], names)}"
            f"{quantized[0].where()}\nUse one of those dtypes, or optimize the model without quantize= for {dtype}")
    new: dict[Value, Value] = {}
    for v in graph.inputs + graph.param_values + graph.state_values:
        new[v] = _as_dtype(v, dtype)
    fixed = [(dt, where) for dt, where in graph.signature.get("fixed_dtypes", ()) if dt != dtype]
    nodes, pinned = [], []
    for node in graph.nodes:
        inputs = tuple(new.get(v, v) for v in node.inputs)
        inferred = OPS[node.op].infer([v.type for v in inputs], node.attrs) if node.op in OPS else None
        types = inferred if inferred is not None else [v.type for v in node.outputs]
        outputs = tuple(Value(t, v.hint, v.param, v.state, v.attrs) for t, v in zip(types, node.outputs))
        new.update(zip(node.outputs, outputs))
        # where a pinned dtype starts (what follows from it is not the node to blame)
        if any(_pins(v, dtype) for v in outputs) and not any(_pins(v, dtype) for v in inputs):
            pinned.append(node)
        nodes.append(Node(node.op, inputs, node.attrs, outputs, node.meta))
    if pinned or fixed:
        raise _pinned_error(graph, pinned, dtype, fixed)
    out = graph.with_nodes(nodes, [new.get(v, v) for v in graph.outputs])
    out.inputs = [new[v] for v in graph.inputs]
    out.param_values = [new[v] for v in graph.param_values]
    out.state_values = [new[v] for v in graph.state_values]
    out.params = _mapped(graph.params, lambda t: t.to(dtype) if t.is_floating_point() else t)
    return out


def _as_dtype(v: Value, dtype: torch.dtype) -> Value:
    if isinstance(v.type, TensorType) and v.type.dtype.is_floating_point:
        return Value(TensorType(v.type.shape, dtype), v.hint, v.param, v.state, v.attrs)
    return v


def _pins(v: Value, dtype: torch.dtype) -> bool:
    """A float tensor (not a 0-dim constant, which torch's promotion lets the other
    operand's dtype win over) left in another dtype."""
    t = v.type
    return isinstance(t, TensorType) and t.dtype.is_floating_point and t.dtype != dtype and t.rank > 0


def _pinned_error(graph: Graph, pinned: list[Node], dtype: torch.dtype, fixed: list = ()) -> DtypePinnedError:
    """`fixed`: the signature's (dtype, where) no-op casts to a dtype other than `dtype`."""
    names = Namer(graph)
    lines = "\n".join(f"  {format_node(n, names)}{n.where()}" for n in pinned[:3])
    more = f"\n  ... and {len(pinned) - 3} more" if len(pinned) > 3 else ""
    what = f"{len(pinned)} node(s) of the optimized IR fix their float dtype" if pinned else ""
    if fixed:
        casts = "\n".join(f"  {where}" for _, where in fixed[:3])
        casts += f"\n  ... and {len(fixed) - 3} more" if len(fixed) > 3 else ""
        lines = "\n".join(x for x in (lines + more, casts) if x)
        more = ""
        what = (f"{what} and " if what else "") + (
            f"the model's code casts to {', '.join(sorted({str(dt) for dt, _ in fixed}))} "
            "(a no-op at capture, so no IR line shows it)")
    return DtypePinnedError(
        f"to({dtype}): {what}, so retyping the graph "
        f"would not be the model's computation in {dtype}:\n{lines}{more}\n"
        f"Convert the model instead and optimize it again: fxforge.optimize(model.to({dtype}), example_inputs)")


def _mapped(params: dict, convert) -> dict:
    """`convert` applied to each tensor once, so that tied weights stay one tensor."""
    done: dict[int, torch.Tensor] = {}
    out = {}
    for name, t in params.items():
        if id(t) not in done:
            done[id(t)] = convert(t)
        out[name] = done[id(t)]
    return out
