"""fuse_linear_pointwise: a float linear and the fused pointwise groups around it become one
`linear_fused` node (ir/linear_fused.py), which a decode step runs as one GEMV kernel.

    %y = linear(%x, %W)                                  %h = linear_fused(%x, %W)
    %g = slice(%y) {start=0, end=I}             ->            {columns=((0, I), (I, 2I)),
    %u = slice(%y) {start=I, end=2I}                           epilogue=silu(in0) * in1}
    %h = fused_pointwise(%g, %u) {silu(in0) * in1}

    %s, %n = fused_pointwise(%r, %a, %w) {add, rms_norm; row=K}     %q, %s = linear_fused(%r, %a, %w, %W)
    %q = linear(%n, %W)                                      ->          {prologue=add, rms_norm; row=K}

Rules, each a declining match (the graph stays as it was when a condition fails):
  - epilogue: the linear's output is read only by one fused_pointwise E, directly or through
    static last-dim slices of step 1, and by nothing else (not returned); E is a flat group
    (no row reduction, no cat) whose results all have the shape of those slices. Any
    elementwise body fuses: SwiGLU, GELU, a residual add of another tensor.
  - prologue: the linear's input is a result of a fused_pointwise P (a row group such as
    add + RMSNorm with row=K, K <= MAX_K, or a flat group) read by this linear alone; P's
    other results (the residual sum) become extra results of the node, so whatever reads
    them must come after the place the node is written (the epilogue's, else the linear's)
    and must not be the epilogue itself. A linear can take both (Llama's gate/up: the
    second RMSNorm before, SwiGLU after); a group goes to one linear only.
  - down: a linear_fused node whose one result (the epilogue's, e.g. SwiGLU's) only a float
    `linear` reads, as its x, takes that linear too (down=true): the MLP of a decode layer
    is then one op, and one kernel at decode (codegen/kernels/decode_mlp.py). The node stays
    where it was (the down linear's weight and bias must be defined before it).

    %h, %s = linear_fused(%r, %a, %g, %Wgu) {...}    ->    %d, %s = linear_fused(%r, %a, %g, %Wgu, %Wd)
    %d = linear(%h, %Wd)                                          {..., down=true}

The linear is a `linear` on float activations of the weight's dtype (fp32/bf16/fp16), or a
`quant_linear` of a format the decode GEMV implements (QUANT_SCHEMES: w8a8, int8) on float
activations: the node then carries the packed parts in place of the weight and the format
(parts, qattrs); its kernel quantizes x per token itself. A quantized node takes no down
projection (a w8a8 down linear needs the whole activation row for its per-token scale).
Other formats (int4, nf4) stay as they are.

Exact: the node computes the same steps (ir/linear_fused.compose); the kernel rounds the
linear's output to its dtype before the epilogue, as the separate kernels did through memory.
Runs after fuse_linear (merged q/k/v and gate/up) and fuse_elementwise (the groups).
"""
from __future__ import annotations

import torch

from ..ir.edit import dead_code_elimination
from ..ir.graph import Graph, Node, Value
from ..ir.ops import OPS

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class _Uses:
    """Who reads each value (node indices), and which values the graph returns."""

    def __init__(self, graph: Graph):
        self.users: dict[Value, list[int]] = {}
        for i, n in enumerate(graph.nodes):
            for v in dict.fromkeys(n.inputs):
                self.users.setdefault(v, []).append(i)
        self.returned = set(graph.outputs)
        self.producer = {v: i for i, n in enumerate(graph.nodes) for v in n.outputs}

    def of(self, v: Value) -> list[int]:
        return [] if v in self.returned else self.users.get(v, [])

    def only(self, v: Value) -> int | None:
        """The one node reading v, if exactly one does and v is not returned."""
        users = self.of(v)
        return users[0] if len(users) == 1 and v not in self.returned else None


def _float_linear(node: Node) -> bool:
    if node.op != "linear":
        return False
    x, w = node.inputs[0], node.inputs[1]
    return (x.dtype in FLOAT_DTYPES and w.dtype == x.dtype and node.output.dtype == x.dtype and x.rank >= 1
            and w.shape[0].is_number and w.shape[1].is_number
            and all(v.dtype == x.dtype for v in node.inputs[2:]))


# quantized formats the decode GEMV implements (codegen/kernels/decode_gemv.py): w8a8 (x
# quantized per token inside, outlier columns in float) and int8 weight-only per channel;
# a linear of another format (int4, nf4) stays as it is
QUANT_SCHEMES = ("w8a8", "int8")


def _quant_linear(node: Node) -> bool:
    """A quant_linear of a format the decode GEMV implements, on float activations."""
    if node.op != "quant_linear":
        return False
    x, q = node.inputs[0], dict(node.attrs["qattrs"])
    n_parts = len(node.attrs["parts"])
    return (q.get("scheme") in QUANT_SCHEMES and tuple(node.attrs["parts"]) == ("qweight", "scale")
            and x.dtype in FLOAT_DTYPES and node.output.dtype == x.dtype and x.rank >= 1
            and all(v.param is not None for v in node.inputs[1:1 + n_parts])
            and all(v.dtype == x.dtype for v in node.inputs[1 + n_parts:]))


def _fusible_linear(node: Node) -> bool:
    return _float_linear(node) or _quant_linear(node)


def _weight_and_bias(node: Node) -> tuple[tuple, tuple, dict]:
    """(weight inputs, bias inputs, attrs) of a linear or quant_linear: a quantized one's
    weight is its packed parts, and the node records its format (parts, qattrs)."""
    if node.op == "quant_linear":
        n_parts = len(node.attrs["parts"])
        n = int(dict(node.attrs["qattrs"])["shape"][0])
        attrs = {"parts": tuple(node.attrs["parts"]), "qattrs": tuple(node.attrs["qattrs"]), "columns": ((0, n),)}
        return node.inputs[1:1 + n_parts], node.inputs[1 + n_parts:], attrs
    return node.inputs[1:2], node.inputs[2:], {"columns": ((0, int(node.inputs[1].shape[0])),)}


def _flat_group(node: Node) -> tuple | None:
    """(body, outputs) of a group that is elementwise over its output: a fused_pointwise
    without row reduction or cat, or a lone pointwise op (fuse_elementwise leaves a single
    op alone, e.g. GELU between two linears) as a body of one step. Else None."""
    if node.op == "fused_pointwise":
        if node.attrs.get("row") is not None or any(op == "cat" for op, _, _ in node.attrs["body"]) \
                or node.attrs.get("into"):  # a group that stores into a KV cache keeps its own kernel
            return None
        return tuple(node.attrs["body"]), tuple(node.attrs["outputs"])
    op = OPS.get(node.op)
    if op is None or op.kind != "pointwise" or node.op == "pow" or len(node.outputs) != 1 \
            or not node.output.dtype.is_floating_point:
        return None  # (pow: the kernel needs its exponent as a constant, not an input)
    return ((node.op, tuple(f"in{k}" for k in range(len(node.inputs))), tuple(node.attrs.items())),), ("t0",)


def _last_dim_slice(node: Node) -> tuple[int, int] | None:
    """(start, end) of a static step-1 slice along the last dim, else None."""
    if node.op != "slice":
        return None
    x = node.inputs[0]
    a = node.attrs
    if a["dim"] % x.rank != x.rank - 1 or a["step"] != 1:
        return None
    end = x.shape[-1] if a["end"] is None else a["end"]
    try:
        start, end = int(a["start"]), int(end)
    except TypeError:
        return None
    return (start, min(end, int(x.shape[-1])))


def _epilogue(graph: Graph, uses: _Uses, lin: int):
    """(epilogue node index, absorbed slice indices, attrs, extra inputs) for the linear at
    `lin`, or None when its output is not consumed by one flat group only."""
    nodes = graph.nodes
    y = nodes[lin].output
    readers = uses.of(y)
    if not readers or y in uses.returned:
        return None
    columns: dict[Value, tuple[int, int]] = {}
    slices, group = [], None
    for i in readers:
        n = nodes[i]
        if n.op != "slice":
            piece, reader = (0, int(y.shape[-1])), i
            columns[y] = piece
        else:
            piece = _last_dim_slice(n)
            reader = uses.only(n.output) if piece is not None else None
            if reader is None:
                return None
            columns[n.output] = piece
            slices.append(i)
        if group not in (None, reader):
            return None
        group = reader
    e = nodes[group]
    flat = _flat_group(e)
    if flat is None:
        return None
    e_body, e_outputs = flat
    width = {v.shape for v in columns}
    if len(width) != 1 or any(v.shape != next(iter(width)) for v in e.outputs):
        return None
    # in0..in{P-1}: the column ranges, then E's other inputs, in E's order
    pieces = [v for v in e.inputs if v in columns]
    pieces = list(dict.fromkeys(pieces))
    extra = list(dict.fromkeys(v for v in e.inputs if v not in columns))
    rename = {f"in{k}": (f"in{pieces.index(v)}" if v in columns else f"in{len(pieces) + extra.index(v)}")
              for k, v in enumerate(e.inputs)}
    body = tuple((op, tuple(rename.get(a, a) for a in args), attrs) for op, args, attrs in e_body)
    attrs = {"columns": tuple(columns[v] for v in pieces), "epilogue": body, "epilogue_outputs": e_outputs}
    return group, slices, attrs, extra


MAX_K = 16384  # longest row a GEMV program recomputes the prologue's statistics over


def _prologue(graph: Graph, uses: _Uses, lin: int, at: int):
    """(prologue node index, attrs, x inputs, extra results) for the linear at `lin` placed
    at node index `at`, or None. The group making x must be a fused_pointwise (a row group,
    e.g. add + RMSNorm with row=K, or a flat one) read by this linear alone; its other
    results (the residual sum) may go anywhere after `at`, where the fused node is written."""
    nodes = graph.nodes
    x = nodes[lin].inputs[0]
    p = uses.producer.get(x)
    if p is None or uses.only(x) != lin:
        return None
    g = nodes[p]
    if g.op != "fused_pointwise" or any(op == "cat" for op, _, _ in g.attrs["body"]) or g.attrs.get("into"):
        return None
    k = x.shape[-1]
    if not k.is_number or int(k) > MAX_K or g.attrs.get("row") not in (None, int(k)):
        return None
    lead = x.shape[:-1]
    if any(v.shape[:-1] != lead or (v.shape[-1] != k and v.shape[-1] != 1) for v in g.outputs):
        return None
    side = [v for v in g.outputs if v is not x]
    if any(u <= at for v in side for u in uses.users.get(v, ())):
        return None  # read before the fused node could write it
    steps = dict(zip(g.outputs, g.attrs["outputs"]))
    attrs = {"prologue": tuple(g.attrs["body"]), "prologue_outputs": tuple(steps[v] for v in [x] + side)}
    if g.attrs.get("row") is not None:
        attrs["row"] = int(g.attrs["row"])
    return p, attrs, list(g.inputs), side


def _candidates(graph: Graph):
    """(linear index, prologue, epilogue) for each linear that takes a neighbour; a group
    goes to one linear only (the SwiGLU group is gate/up's epilogue, not down's prologue)."""
    uses = _Uses(graph)
    taken: set[int] = set()
    for i, node in enumerate(graph.nodes):
        if not _fusible_linear(node):
            continue
        epi = _epilogue(graph, uses, i)
        if epi is not None and epi[0] in taken:
            epi = None
        at = epi[0] if epi is not None else i
        pro = _prologue(graph, uses, i, at)
        # (an epilogue reading the prologue's extra result would read the fused node's own output)
        reads_own = epi is not None and pro is not None and set(epi[3]) & set(graph.nodes[pro[0]].outputs)
        if pro is not None and (pro[0] in taken or reads_own):
            pro = None
        if epi is None and pro is None:
            continue
        taken.update(x[0] for x in (pro, epi) if x is not None)
        yield i, pro, epi


def _with_down(graph: Graph) -> tuple[Graph, int]:
    """(graph, count): each linear_fused node whose one result feeds only a float linear's x
    takes that linear as its down projection (the second step of the pass)."""
    uses = _Uses(graph)
    defined_at = {v: i for i, n in enumerate(graph.nodes) for v in n.outputs}
    replaced: dict[int, Node] = {}
    dropped: set[int] = set()
    for f, node in enumerate(graph.nodes):
        a = node.attrs
        if node.op != "linear_fused" or a.get("down") or a.get("parts") or \
                (a["epilogue"] and len(a["epilogue_outputs"]) != 1):  # (no quantized MLP kernel)
            continue
        h = node.outputs[0]
        d = uses.only(h)
        if d is None or d in dropped or not _float_linear(graph.nodes[d]):
            continue
        down = graph.nodes[d]
        if down.inputs[0] is not h or h in down.inputs[1:] or h.dtype != down.output.dtype \
                or any(defined_at.get(v, -1) >= f for v in down.inputs[1:]):
            continue  # (a weight computed after the node: it cannot be read there)
        attrs = {**a, "down": True}
        if len(down.inputs) > 2:
            attrs["down_bias"] = True
        fused = Node("linear_fused", node.inputs + down.inputs[1:], attrs, (down.output,) + node.outputs[1:],
                     node.meta)
        types = OPS["linear_fused"].infer([v.type for v in fused.inputs], attrs)
        if not all(t.same_as(v.type) for t, v in zip(types, fused.outputs)):
            raise AssertionError(f"fuse_linear_pointwise: {types} != {[v.type for v in fused.outputs]}{node.where()}")
        replaced[f] = fused
        dropped.add(d)
    if not replaced:
        return graph, 0
    nodes = [replaced.get(i, n) for i, n in enumerate(graph.nodes) if i not in dropped]
    return graph.with_nodes(nodes), len(replaced)


def fuse_linear_pointwise(graph: Graph, ctx=None) -> Graph:
    replaced: dict[int, Node] = {}  # node index -> the fused node placed there
    dropped: set[int] = set()
    counts = {"epilogue": 0, "prologue": 0}
    for lin, pro, epi in _candidates(graph):
        node = graph.nodes[lin]
        x = node.inputs[0]
        weight, bias, linear_attrs = _weight_and_bias(node)
        attrs = {"n_x": 1, "bias": bool(bias), "prologue": (), "prologue_outputs": (),
                 "columns": linear_attrs.pop("columns"), "epilogue": (), "epilogue_outputs": (), **linear_attrs}
        x_inputs, extra, outputs, side, at = [x], [], [node.output], [], lin
        if pro is not None:
            p, pro_attrs, x_inputs, side = pro
            attrs.update(pro_attrs, n_x=len(x_inputs))
            dropped.add(p)
            counts["prologue"] += 1
        if epi is not None:
            e, slices, epi_attrs, extra = epi
            attrs.update(epi_attrs)
            outputs = list(graph.nodes[e].outputs)
            dropped.update(slices)
            dropped.add(lin)
            at = e
            counts["epilogue"] += 1
        fused = Node("linear_fused", tuple(x_inputs) + tuple(weight) + tuple(bias) + tuple(extra), attrs,
                     tuple(outputs) + tuple(side), {**node.meta, "pass": "fuse_linear_pointwise"})
        types = OPS["linear_fused"].infer([v.type for v in fused.inputs], attrs)
        if not all(t.same_as(v.type) for t, v in zip(types, fused.outputs)):
            raise AssertionError(f"fuse_linear_pointwise: {types} != {[v.type for v in fused.outputs]}{node.where()}")
        replaced[at] = fused
        dropped.discard(at)
    if replaced:
        nodes = [replaced.get(i, n) for i, n in enumerate(graph.nodes) if i not in dropped]
        graph = dead_code_elimination(graph.with_nodes(nodes))
    graph, downs = _with_down(graph)
    if ctx is not None and (replaced or downs):
        ctx.rules["linear_epilogue"] += counts["epilogue"]
        ctx.rules["linear_prologue"] += counts["prologue"]
        if downs:
            ctx.rules["linear_down"] += downs
        ctx.note(f"{len(replaced)} linears take their pointwise neighbours ({counts['prologue']} prologues, "
                 f"{counts['epilogue']} epilogues, {downs} down projections): one GEMV each at decode")
    return graph


def unfuse(graph: Graph, which=None) -> Graph:
    """Every linear_fused node (for which `which(node)` holds, when given) back as its
    composition (fused_pointwise, linear, slices): the torch backend runs that (its CPU
    planners see plain linears), and it is what the graph computed before
    fuse_linear_pointwise."""
    from ..ir.builder import expand_ops
    from ..ir.linear_fused import compose

    def expand(node, b):
        def pointwise(*vs, body, outputs, row):
            if len(body) == 1 and outputs == ("t0",) and body[0][0] != "const":  # a lone op, as it was
                op, args, attrs = body[0]
                return b.emit_multi(op, [vs[int(a[2:])] for a in args], dict(attrs))
            attrs = {"body": body, "outputs": outputs}
            if row is not None:
                attrs["row"] = row
            return b.emit_multi("fused_pointwise", vs, attrs)

        def cut(y, start, end):
            whole = start == 0 and y.shape[-1].is_number and end == int(y.shape[-1])
            return y if whole else b.emit("slice", y, dim=-1, start=start, end=end, step=1)

        return compose(list(node.inputs), node.attrs, pointwise,
                       lambda x, w, bias: b.emit("linear", *([x, w] + ([bias] if bias is not None else []))), cut,
                       lambda *vs, **a: b.emit("quant_linear", *vs, **a))

    return expand_ops(graph, "linear_fused", expand, which)
