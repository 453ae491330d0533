"""Attention sinks: a learned logit per query head that joins each row's softmax as one
more key whose value is zero (gpt-oss, hy_v4, flint, granite_swa):

    out_i = sum_j e^(s_ij) v_j / (sum_j e^(s_ij) + e^(sink_h))

becomes `attention(q, k, v, [bias], [slopes], sinks) {sinks=true, ...}` (sinks: [H]).
Two spellings are recognised, both rooted past the usual softmax-matmul, whose scores
(q k^T, scaled, soft-capped, masked) are then proven by fuse_attention's own walker:

  - the sink as an extra column (gpt_oss, hy_v4, flint):
      c = cat([s, sink.view(1, H, 1, 1).expand(B, H, Tq, 1)], -1)
      [c = c - c.max(-1, keepdim=True).values]       (softmax-equal; optional)
      p = softmax(c, -1)[..., :Tk]                   (exactly the sink column dropped)
      out = p @ v
  - the sink as a gate on the output (granite_swa, granitemoe_swa):
      out = (softmax(s, -1) @ v) * sigmoid(logsumexp(s, -1) - sink.view(1, H, 1)).unsqueeze(-1)
    (sigmoid(L - sink) = Z / (Z + e^sink) with Z = e^L the softmax sum).

The sink must be one value per head, the same over batch and rows: a [1, H, 1, 1]
(or [1, H, 1]) tensor broadcast by expand / the subtraction. Declines: a slice that keeps
other columns, a sink column of any other shape, softmax / max / logsumexp over another
dim, the softmax and logsumexp over different scores, and ALiBi masks (their form is
proven only up to a per-row constant, which a sink would see).
"""
from __future__ import annotations

import functools

from ..ir.builder import Builder
from ..ir.graph import Node, Value
from ..ir.types import dims_equal
from . import fuse_attention as fa
from .pattern import Match, Rule, op, var


class _Uses:
    """A use count map with a few counts overridden (the virtual match's view)."""

    def __init__(self, base, over: dict):
        self.base, self.over = base, over

    def get(self, value, default=0):
        return self.over[value] if value in self.over else self.base.get(value, default)


class _Producers(dict):
    """m.producers plus the virtual nodes (a dict, for code that reads it as one)."""

    def __init__(self, base: dict, extra: dict):
        super().__init__(extra)
        self.base = base

    def get(self, value, default=None):
        return dict.get(self, value) if dict.__contains__(self, value) else self.base.get(value, default)

    def __getitem__(self, value):
        return dict.__getitem__(self, value) if dict.__contains__(self, value) else self.base[value]

    def __contains__(self, value):
        return dict.__contains__(self, value) or value in self.base


def _last_dim(dim, rank: int) -> bool:
    return isinstance(dim, int) and not isinstance(dim, bool) and dim in (-1, rank - 1)


def _per_head(m: Match, col: Value, scores: Value, b) -> Value | None:
    """The sinks [H] from a sink column `col` [B, H, Tq, 1] that is expand(y) of a
    y [1, H, 1, 1] (one value per head, the same over batch and rows), as a new view."""
    heads = scores.shape[1]
    if col.rank != 4 or not all(dims_equal(x, y) for x, y in zip(col.shape, tuple(scores.shape[:3]) + (1,))):
        return None
    node = fa._producer(m, col, "expand")
    y = node.inputs[0] if node is not None else col
    return _flat_heads(y, heads, head_dim=1, rank=4, b=b)


def _flat_heads(y: Value, heads, head_dim: int, rank: int, b) -> Value | None:
    """view(y, [H]) when y, broadcast against a rank-`rank` tensor (aligned at the end: y
    may have fewer dims), has one non-1 dim: `head_dim`, of size `heads`."""
    if getattr(y.type, "dtype", None) is None or not y.dtype.is_floating_point or not 1 <= y.rank <= rank:
        return None
    pos = head_dim - (rank - y.rank)
    if pos < 0 or not dims_equal(y.shape[pos], heads):
        return None
    if not all(dims_equal(d, 1) for i, d in enumerate(y.shape) if i != pos):
        return None
    return y if y.rank == 1 else b.emit("view", y, shape=(heads,))


def _with_sinks(m: Match, b: Builder, root: Node, p: Value, v: Value, softmax: Node, scores: Value,
                uses_over: dict, sinks: Value, forms, sink_column: bool = False) -> Value | None:
    """fuse_attention's softmax-matmul rule run on a virtual `root` = matmul(softmax(scores), v)
    (the sink spelled around it stripped away), then its attention op given the sinks."""
    scratch = Builder()
    virtual_p = scratch.emit("softmax", scores, dim=softmax.attrs["dim"], dtype=softmax.attrs.get("dtype"))
    virtual_root = root
    if root.inputs[0] is not p:
        virtual_root = Node(root.op, (p, root.inputs[1]), root.attrs, root.outputs, root.meta)
    producers = _Producers(m.producers, {virtual_p: scratch.nodes[0]})
    uses = _Uses(m._uses, {virtual_p: 1, **uses_over})
    vm = Match(virtual_root, uses, producers, m.graph)
    vm.values = {"p": virtual_p, "v": v}
    # a shape-only mask may become causal / window only where it is exactly that: softmax
    # ignores a constant added to a row, the sink does not (it competes with the scores)
    vm.attrs["exact_mask"] = True
    # the sink as a softmax column: a row whose keys are all masked with -inf is 0 in eager
    # (the sink takes all the weight), as in the op; gated, eager's softmax of it is NaN
    vm.attrs["sink_column"] = sink_column
    # the walker strips casts between the softmax and the matmul: p is read through
    # its casts from the real graph, so hand it the softmax itself
    start = len(b.nodes)
    out = fa.fuse_matmul_softmax_matmul(vm, b, forms=forms)
    if out is None:
        return None
    found = [i for i in range(start, len(b.nodes)) if b.nodes[i].op == "attention"]
    if len(found) != 1:
        return None
    node = b.nodes[found[0]]
    q = node.inputs[0]
    if node.attrs.get("alibi") or node.attrs.get("sinks") or not dims_equal(q.shape[1], sinks.shape[0]):
        return None  # an ALiBi form holds up to a per-row constant, which the sink would see
    b.nodes[found[0]] = Node("attention", node.inputs + (sinks,), {**node.attrs, "sinks": True}, node.outputs,
                             node.meta)
    return out


def fuse_cat_sinks(m: Match, b: Builder, forms: dict | None = None) -> Value | None:
    """matmul(softmax(cat([s, sink col], -1) [- rowmax])[..., :Tk], v) -> attention {sinks}."""
    p, v = m["p"], m["v"]
    x = fa._strip_casts(m, p)
    sl = fa._producer(m, x, "slice")
    if sl is None or m.uses(x) != 1 or x.rank != 4 or not _last_dim(sl.attrs["dim"], 4) or sl.attrs["step"] != 1:
        return None
    y = fa._strip_casts(m, sl.inputs[0])
    soft = fa._producer(m, y, "softmax")
    if soft is None or m.uses(sl.inputs[0]) != 1 or m.uses(y) != 1 or not _last_dim(soft.attrs["dim"], 4):
        return None
    # c - c.max(-1, keepdim=True).values: the same softmax (fuse_attention's own check)
    c = soft.inputs[0]
    c, c_uses = (unshifted, 2) if (unshifted := fa._row_max_subtracted(m, c)) is not None else (c, 1)
    cat = fa._producer(m, c, "cat")
    if cat is None or m.uses(c) != c_uses or len(cat.inputs) != 2 or not _last_dim(cat.attrs["dim"], 4):
        return None
    a, z = cat.inputs
    start, end = sl.attrs["start"], sl.attrs["end"]
    if a.rank == 4 and dims_equal(z.shape[-1], 1) and start == 0 and end is not None and dims_equal(end, a.shape[3]):
        s, col = a, z  # [s, sink]: the slice keeps the first Tk columns
    elif z.rank == 4 and dims_equal(a.shape[-1], 1) and start == 1 and (end is None or dims_equal(end, z.shape[3] + 1)):
        s, col = z, a  # [sink, s]: the slice drops the first column
    else:
        return None
    if not dims_equal(x.shape[3], s.shape[3]) or m.uses(s) != 1:
        return None
    sinks = _per_head(m, col, s, b)
    if sinks is None:
        return None
    return _with_sinks(m, b, m.root, x, v, soft, s, {}, sinks, forms, sink_column=True)


def fuse_gated_sinks(m: Match, b: Builder, forms: dict | None = None) -> Value | None:
    """(softmax(s) @ v) * sigmoid(logsumexp(s, -1) - sink[1, H, 1]).unsqueeze(-1)
    -> attention {sinks}."""
    root = m.root.outputs[0]
    for o, g in ((m["a"], m["g"]), (m["g"], m["a"])):
        out = _gated(m, b, root, o, g, forms)
        if out is not None:
            return out
    return None


def _gated(m: Match, b: Builder, root: Value, o: Value, g: Value, forms) -> Value | None:
    o_inner = fa._strip_casts(m, o)
    mm = fa._producer(m, o_inner, "matmul")
    if mm is None or o_inner.rank != 4 or m.uses(o_inner) != 1 or m.uses(o) != 1:
        return None
    p, v = mm.inputs
    softmax_in = fa._strip_casts(m, p)
    soft = fa._producer(m, softmax_in, "softmax")
    if soft is None or not _last_dim(soft.attrs["dim"], 4):
        return None
    s = soft.inputs[0]
    # g = unsqueeze(sigmoid(lse - sink), -1)
    g = fa._strip_casts(m, g)
    unsq = fa._producer(m, g, "unsqueeze")
    if unsq is None or m.uses(g) != 1 or unsq.inputs[0].rank != 3 or unsq.attrs["dim"] not in (-1, 3):
        return None
    gate = fa._strip_casts(m, unsq.inputs[0])
    sig = fa._producer(m, gate, "sigmoid")
    if sig is None or m.uses(unsq.inputs[0]) != 1 or m.uses(gate) != 1:
        return None
    diff = fa._strip_casts(m, sig.inputs[0])
    sub = fa._producer(m, diff, "sub")
    if sub is None or m.uses(sig.inputs[0]) != 1 or m.uses(diff) != 1:
        return None
    lse, sink = sub.inputs
    lse_in = fa._strip_casts(m, lse)
    call = fa._producer(m, lse_in, "torch_call")
    if call is None or m.uses(lse) != 1 or call.attrs["target"] != "aten.logsumexp.default" or len(call.inputs) != 1:
        return None
    args, kw = call.attrs["args"], dict(call.attrs["kwargs"])
    dims = args[1] if len(args) > 1 else kw.get("dim")
    keep = args[2] if len(args) > 2 else kw.get("keepdim", False)
    if not isinstance(dims, (list, tuple)) or len(dims) != 1 or not _last_dim(dims[0], 4) or keep:
        return None
    s_lse = call.inputs[0]
    if fa._strip_casts(m, s_lse) is not fa._strip_casts(m, s) and s_lse is not s:
        return None  # the gate's logsumexp is over other scores than the softmax's
    if s_lse is not s or m.uses(s) != 2 or s.rank != 4:
        return None
    if not all(dims_equal(x, y) for x, y in zip(diff.shape, s.shape[:3])) or diff.rank != 3:
        return None
    sinks = _flat_heads(sink, s.shape[1], head_dim=1, rank=3, b=b)
    if sinks is None:
        return None
    out = _with_sinks(m, b, mm, softmax_in, v, soft, s, {s: 1}, sinks, forms)
    if out is None:
        return None
    if out.dtype != root.dtype:
        out = b.cast(out, root.dtype)
    return out if out.type.same_as(root.type) else None


def rules(forms: dict | None = None) -> list[Rule]:
    # before -> after
    return [
        # matmul(softmax(cat([s, sinks[1, H, 1, 1] expanded], -1) [- rowmax])[..., :Tk], v)
        #   -> attention(q, k, v, [bias], sinks) {sinks=true}
        Rule("attention_sinks_cat", op("matmul", var("p"), var("v")), functools.partial(fuse_cat_sinks, forms=forms)),
        # (softmax(s) @ v) * sigmoid(logsumexp(s, -1) - sinks[1, H, 1]).unsqueeze(-1)
        #   -> attention(q, k, v, [bias], sinks) {sinks=true}
        Rule("attention_sinks_gate", op("mul", var("a"), var("g")), functools.partial(fuse_gated_sinks, forms=forms)),
    ]
