"""Position tables a model registers as buffers, recognised by their values.

BERT-family models (and others written the same way) keep `position_ids =
arange(max_positions).expand(1, -1)` as a buffer and slice their positions from it,
`position_ids[:, 0:T]`. Spelled that way the slice looks like a fixed table shared by the
batch; it means the positions 0..T-1, exactly what `unsqueeze(arange(0, T), 0)` means.
The kv_cache pass may treat it so only when the buffer's values prove it: this module
reads the tensor and says so, exactly (integers, every element), or declines.
"""
from __future__ import annotations

import sympy
import torch

from ..ir.graph import Graph, Node
from ..ir.ops import Arg
from ..ir.types import TensorType, broadcast_shapes, dims_equal


def arange_table_offset(graph: Graph, node: Node) -> int | None:
    """`node` is `slice(table, dim, 0, T)` giving a [1, T] tensor. If `table` is a param or
    buffer of integers [1, N] whose row is arange(N) + c, return c; otherwise None.
    Anything else (another rank, a float table, a table the graph computes, any element
    off by one) is declined: the slice then stays a table shared by the batch."""
    table = node.inputs[0]
    out = node.outputs[0]
    if table.param is None or out.rank != 2 or node.attrs["dim"] % table.rank != 1:
        return None
    if not (out.shape[0] == 1 and table.shape[0] == 1):
        return None
    value = graph.params.get(table.param)
    if not isinstance(value, torch.Tensor) or value.dim() != 2 or value.shape[0] != 1 or value.shape[1] == 0:
        return None
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        return None
    row = value[0].to("cpu", torch.int64)
    offset = int(row[0])
    if not torch.equal(row, torch.arange(offset, offset + row.numel(), dtype=torch.int64)):
        return None
    return offset


def uniform_gather_value(graph: Graph, node: Node):
    """`node` is `gather(source, dim, index)` from a param or buffer whose elements are all
    one value c (BERT's all-zero `token_type_ids` buffer, gathered at the positions):
    whatever the index, every result element is c. Returns c (a Python number), or None
    when the node is not such a gather."""
    if node.op != "torch_call" or node.attrs["target"] != "aten.gather.default" or not node.inputs:
        return None
    return uniform_value(graph, node.inputs[0])


def uniform_value(graph: Graph, source) -> int | float | bool | None:
    """The one value every element of param or buffer `source` holds (BERT-family
    `token_type_ids`, all zeros), or None: any slice or gather of it is that value."""
    value = graph.params.get(source.param) if source.param is not None else None
    if not isinstance(value, torch.Tensor) or value.numel() == 0 or value.dtype.is_complex:
        return None
    first = value.reshape(-1)[0]
    if not bool((value == first).all()):  # NaN never equals itself: declined
        return None
    return first.item()


def row_lookup(graph: Graph, node: Node, producers: dict):
    """GPT-J's sin/cos lookup, `gather(table.repeat(1, 1, 1), 1, ids.unsqueeze(-1).repeat(1, 1, D))`
    with `table` a param [N, D] (or [1, N, D]): every index along D is the same id, so the
    result is row `ids[b, t]` of the table, `embedding(table, ids)`, which a per-row `ids`
    can follow (the gather cannot: its index may not be wider than its [1, N, D] source).
    Returns (table param value, ids) or None."""
    if node.op != "torch_call" or node.attrs["target"] != "aten.gather.default" or len(node.inputs) != 2:
        return None
    args = node.attrs["args"]
    if len(args) != 3 or args[0] != Arg(0) or args[1] != 1 or args[2] != Arg(1):
        return None
    source, index = node.inputs
    table = _through_unit_repeats(source, producers)
    if source.rank != 3 or source.shape[0] != 1 or not source.shape[2].is_number:
        return None
    if table.param is None or tuple(table.shape) not in (tuple(source.shape), tuple(source.shape[1:])):
        return None
    width = int(source.shape[2])
    rep = producers.get(index)
    if rep is None or not _is_repeat(rep) or list(rep.attrs["args"][1]) != [1, 1, width]:
        return None
    unsq = producers.get(rep.inputs[0])
    if unsq is None or unsq.op != "unsqueeze" or unsq.attrs["dim"] % 3 != 2:
        return None
    ids = unsq.inputs[0]
    if ids.rank != 2 or ids.dtype != torch.int64 or node.outputs[0].shape[:2] != ids.shape:
        return None
    return table, ids


def _is_repeat(node: Node) -> bool:
    return node.op == "torch_call" and node.attrs["target"] == "aten.repeat.default" and len(node.inputs) == 1


def _through_unit_repeats(value, producers: dict):
    """`value` without the repeat(1, 1, ...) calls that produced it: copies, which may put
    leading dims of size 1 in front."""
    node = producers.get(value)
    while node is not None and _is_repeat(node) and all(r == 1 for r in node.attrs["args"][1]):
        value = node.inputs[0]
        node = producers.get(value)
    return value


# ATen calls the IR keeps opaque whose result types still follow their inputs, and which
# treat a leading batch dim row by row: Meta-style complex rotary (Llama 4, DeepSeek-V2),
# `freqs_cis = torch.polar(ones, angles)` applied as `view_as_complex(q) * freqs_cis`, reads
# the positions through them. target -> (tensor operands, rule for the result type).
def _complex_of(dtype: torch.dtype) -> torch.dtype | None:
    return {torch.float32: torch.complex64, torch.float64: torch.complex128}.get(dtype)


def _real_of(dtype: torch.dtype) -> torch.dtype | None:
    return {torch.complex64: torch.float32, torch.complex128: torch.float64}.get(dtype)


def _polar(a, b):
    dtype = _complex_of(a.dtype) if a.dtype == b.dtype else None
    return None if dtype is None else TensorType(broadcast_shapes(a.shape, b.shape), dtype)


def _as_complex(a):
    dtype = _complex_of(a.dtype)
    ok = dtype is not None and a.rank >= 1 and a.shape[-1] == 2
    return TensorType(tuple(a.shape[:-1]), dtype) if ok else None


def _as_real(a):
    dtype = _real_of(a.dtype)
    return None if dtype is None else TensorType((*a.shape, sympy.Integer(2)), dtype)


ROW_SAFE_CALLS = {"aten.polar.default": (2, _polar), "aten.view_as_complex.default": (1, _as_complex),
                  "aten.view_as_real.default": (1, _as_real)}


def row_safe_call_type(node: Node, inputs: tuple) -> TensorType | None:
    """The result type of an opaque call of ROW_SAFE_CALLS over `inputs` (its operands
    retyped), or None when it is not one, or not spelled plainly (tensor operands in order,
    no other argument)."""
    entry = ROW_SAFE_CALLS.get(node.attrs.get("target")) if node.op == "torch_call" else None
    if entry is None or len(node.outputs) != 1:
        return None
    count, rule = entry
    if tuple(node.attrs["args"]) != tuple(Arg(i) for i in range(count)) or node.attrs["kwargs"] \
            or len(inputs) != count or not all(isinstance(v.type, TensorType) for v in inputs):
        return None
    try:
        return rule(*(v.type for v in inputs))
    except Exception:  # shapes that do not broadcast: not this call's spelling
        return None


def flat_row_lookup(graph: Graph, node: Node, producers: dict):
    """XGLM's sinusoidal lookup, `table.index_select(0, ids.view(-1)).view(*ids.shape, D)` with
    `table` a param [N, D] and `ids` [R, T] integers: row `ids[r, t]` of the table for every
    (r, t), which is `embedding(table, ids)` exactly, whatever `ids` holds. Spelled so, a
    per-row `ids` can follow (the fixed views cannot). Returns (table, ids) or None."""
    if node.op != "view" or node.inputs[0] not in producers:
        return None
    select = producers[node.inputs[0]]
    if select.op != "torch_call" or select.attrs["target"] != "aten.index_select.default" \
            or tuple(select.attrs["args"]) != (Arg(0), 0, Arg(1)) or select.attrs["kwargs"]:
        return None
    table, flat = select.inputs
    flatten = producers.get(flat)
    if table.param is None or table.rank != 2 or flatten is None or flatten.op != "view":
        return None
    ids = flatten.inputs[0]
    if ids.rank != 2 or ids.dtype not in (torch.int64, torch.int32) or flat.rank != 1:
        return None
    want = (*ids.shape, table.shape[1])
    out = node.outputs[0]
    if out.rank != 3 or not all(dims_equal(a, b) for a, b in zip(out.shape, want)):
        return None
    return table, ids
