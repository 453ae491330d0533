"""fuse_linear: linear layers that read the same input become one wider linear whose output
is sliced (horizontal fusion, as gpt-fast's wqkv and Inductor's concat_linear).

    %q = linear(%x, %Wq)                       %qkv = linear(%x, %Wqkv)       Wqkv = cat(Wq, Wk, Wv)
    %k = linear(%x, %Wk)            ->         %q = slice(%qkv, -1, 0, 576)
    %v = linear(%x, %Wv)                       %k = slice(%qkv, -1, 576, 768) ...

Why: at decode time (one token) every linear is a matrix-vector product bound by reading
its weight, and each call also pays a fixed cost (a kernel launch on a GPU, a thread
fork-join on a CPU). Llama's q/k/v and gate/up projections become 2 calls instead of 5.
Quantized linears (`quant_linear`, after the quantize pass) merge the same way when packed
alike: their packed tensors are per output row, so their rows stack.

Exact: each output column is the same dot product of the same input row with the same
weight row; only which call computes it changes. Fires only when every weight (and every
bias, all or none) is a model parameter of the same dtype and device, so the concatenated
weight can be built once, here. The new weight is a copy: the model's own weights are no
longer read by the program (the report gives the bytes).
"""
from __future__ import annotations

import os
from collections import defaultdict

import torch

from ..ir.builder import Builder
from ..ir.graph import Graph, Node, Value


# runtime/cpu_int4.N_MULTIPLE (passes do not import the runtime): the row blocks of
# PyTorch's packed int4 CPU layout; an int4 weight of other widths dequantizes per call.
INT4_ROWS_MULTIPLE = 16


def fuse_linear(graph: Graph, ctx=None) -> Graph:
    groups = _sibling_linears(graph) + _sibling_quant_linears(graph)
    double = sum(1 for n in graph.nodes if n.op == "quant_linear" and dict(n.attrs["qattrs"]).get("double_quant"))
    if double and ctx is not None:  # say why q/k/v and gate/up stay apart
        ctx.note(f"{double} nf4 products with double_quant=True stay separate: their absmax is quantized in "
                 "blocks that run across rows, so stacking weights would not be stacking their packings")
    if not groups:
        return graph
    out = graph.with_nodes(graph.nodes)
    replaced: dict[int, list[Node]] = {}  # id(first member) -> the nodes that replace the group
    dropped: set[int] = set()
    renamed: dict[Value, Value] = {}
    new_bytes = 0
    for members in groups:
        nodes, outputs, nbytes = _fuse(out, members)
        replaced[id(members[0])] = nodes
        dropped.update(id(n) for n in members[1:])
        renamed.update(zip((n.output for n in members), outputs))
        new_bytes += nbytes
    nodes: list[Node] = []
    for node in graph.nodes:
        if id(node) in dropped:
            continue
        if id(node) in replaced:
            nodes.extend(replaced[id(node)])
            continue
        nodes.append(node.with_renamed_inputs(renamed))
    result = out.with_nodes(nodes, [renamed.get(v, v) for v in graph.outputs]).prune_params()
    if ctx is not None:
        fused = sum(len(m) for m in groups)
        ctx.rules["concat_linear"] += len(groups)
        ctx.details["fuse_linear"] = {"groups": [[n.inputs[1].param for n in m] for m in groups],
                                      "weight_bytes": new_bytes}
        ctx.note(f"{fused} linears -> {len(groups)} (weights concatenated: {new_bytes / 2**20:.1f} MiB, "
                 f"a copy; the model's own weights are no longer read)")
    return result


def _sibling_linears(graph: Graph) -> list[list[Node]]:
    """Groups of 2+ linear nodes reading the same input with parameter weights that can be
    concatenated (same dtype and device, bias on all or none)."""
    by_key: dict[tuple, list[Node]] = defaultdict(list)
    for node in graph.nodes:
        if node.op != "linear" or not _fusable(graph, node):
            continue
        w = graph.params[node.inputs[1].param]
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        bias_dtype = graph.params[bias.param].dtype if bias is not None else None
        by_key[(id(node.inputs[0]), w.dtype, w.device, bias_dtype)].append(node)
    return [members for members in by_key.values() if len(members) > 1]


def _sibling_quant_linears(graph: Graph) -> list[list[Node]]:
    """Groups of 2+ quantized linears (the quantize pass ran first) reading the same input,
    packed alike (scheme, group size, threshold ...: all but the shape) with the same K.
    Every packed tensor of these schemes is per output row (int8/w8a8 channel scales, int4
    and nf4 group scales, zeros and absmax along K), so stacking the rows of each is the
    packing of the stacked weight: the same numbers. Not nf4's double quantization, whose
    absmax is quantized in blocks that run across rows. int4 only where every member has a
    multiple of INT4_ROWS_MULTIPLE rows: on the CPU, runtime/cpu_int4.py puts a weight on
    PyTorch's packed kernel only then, so the merged weight takes the kernel exactly where
    its parts did (a merge never moves a product off it); its other choices depend on the
    scheme and activation dtype, not the width."""
    by_key: dict[tuple, list[Node]] = defaultdict(list)
    for node in graph.nodes:
        if node.op != "quant_linear":
            continue
        qattrs = dict(node.attrs["qattrs"])
        if qattrs.get("double_quant") or not all(v.param is not None and v.param in graph.params
                                                 for v in node.inputs[1:]):
            continue
        if qattrs.get("scheme") == "int4" and qattrs["shape"][0] % INT4_ROWS_MULTIPLE:
            continue
        rest = tuple((k, v) for k, v in node.attrs["qattrs"] if k != "shape")
        tensors = [graph.params[v.param] for v in node.inputs[1:]]
        if any(t.dim() == 0 or t.shape[0] != qattrs["shape"][0] for t in tensors):
            continue  # not one row per output channel: cannot stack
        key = (id(node.inputs[0]), node.attrs["parts"], rest, node.attrs["bias"], qattrs["shape"][1],
               tuple((t.dtype, t.device, tuple(t.shape[1:])) for t in tensors))
        by_key[key].append(node)
    return [members for members in by_key.values() if len(members) > 1]


def _fusable(graph: Graph, node: Node) -> bool:
    params = node.inputs[1:]
    if not all(v.param is not None and v.param in graph.params for v in params):
        return False
    w = graph.params[params[0].param]
    if w.dim() != 2:
        return False
    if len(params) == 2:
        b = graph.params[params[1].param]
        return b.dim() == 1 and b.shape[0] == w.shape[0] and b.device == w.device
    return True


def _fuse(graph: Graph, members: list[Node]) -> tuple[list[Node], list[Value], int]:
    """The fused linear and one slice per member (nodes, member outputs, new weight bytes)."""
    first = members[0]
    weights = [graph.params[n.inputs[1].param] for n in members]
    inputs = [first.inputs[0]]
    nbytes = 0
    for slot in range(1, len(first.inputs)):  # the weight, then the bias if there is one
        names = [n.inputs[slot].param for n in members]
        with torch.no_grad():
            joined = torch.cat([graph.params[name].detach() for name in names], dim=0)
        inputs.append(graph.add_param(_joined_name(names), joined))
        nbytes += joined.numel() * joined.element_size()
    b = Builder({**first.meta, "pass": "fuse_linear"})
    if first.op == "quant_linear":
        qattrs = dict(first.attrs["qattrs"])
        qattrs["shape"] = (sum(w.shape[0] for w in weights), qattrs["shape"][1])
        wide = b.emit("quant_linear", *inputs, parts=first.attrs["parts"], qattrs=tuple(qattrs.items()),
                      bias=first.attrs["bias"])
    else:
        wide = b.emit("linear", *inputs)
    outputs, start = [], 0
    for node, w in zip(members, weights):
        end = start + w.shape[0]
        piece = b.emit("slice", wide, dim=-1, start=start, end=end, step=1)
        if not piece.type.same_as(node.output.type):  # e.g. a dtype the linear did not promote alike
            raise AssertionError(f"fuse_linear: {piece.type} != {node.output.type}{node.where()}")
        outputs.append(piece)
        start = end
    return b.nodes, outputs, nbytes


def _joined_name(names: list[str]) -> str:
    """'m.attn.q_proj.weight', 'm.attn.k_proj.weight' -> 'm.attn.{q_proj,k_proj}.weight'."""
    parts = [n.split(".") for n in names]
    head = os.path.commonprefix(parts)
    tail = os.path.commonprefix([p[len(head):][::-1] for p in parts])[::-1]
    middles = [".".join(p[len(head):len(p) - len(tail)]) for p in parts]
    return ".".join(head + ["{" + ",".join(middles) + "}"] + tail)
