"""fuse_rope_attention: the rotary of q and k, the K/V appends and the attention of a
cached layer -> one `rope_attention` op (ir/rope_attention.py), which the Triton backend
runs as ONE kernel at decode: the rotary-and-store launch between the QKV projection and
the attention goes away (issue 17).

Runs after kv_cache (it needs the appends) and before fuse_elementwise (it matches the
rotary as plain ops, before they are grouped):

  # attention(rope(q), kv_append(kc, rope(k)) {start}, kv_append(vc, v) {start}, [bias]) {causal, scale}
  #   -> rope_attention(q, k, v, cos, sin, kc, vc, [bias]) {causal, scale, start}
  # with rope(x) = x * cos + cat(-x[..., D/2:], x[..., :D/2]) * sin  (either operand order)

It fires only where it is provably the same computation: the rotate-half spelling exactly
(halves of the whole head dim, one cos/sin pair for q and k that does not vary by head),
dense caches that are state buffers read by their append alone, appends read by this
attention alone, one dtype for q, k, v, cos, sin and the caches, and an attention without
a soft-cap, window or ALiBi. Anything else keeps its graph.
"""
from __future__ import annotations

from ..ir.edit import dead_code_elimination
from ..ir.graph import Graph
from ..ir.types import dims_equal
from .pattern import Rule, apply_rules, attr, either, op, var


def _half_dim(d) -> bool:
    return d in (3, -1)


def _rope(x: str, tag: str):
    """x * cos + rotate_half(x) * sin, the rotate-half spelled first so that `x` is bound
    by the slices before the commutative products are tried (the driver does not backtrack
    across operands)."""
    hi = op("slice", var(x), dim=_half_dim, start=attr(f"{tag}_hi_start"), end=attr(f"{tag}_hi_end"), step=1)
    lo = op("slice", var(x), dim=_half_dim, start=0, end=attr(f"{tag}_lo_end"), step=1)
    rotated = op("cat", op("neg", hi), lo, dim=_half_dim)
    return op("add", op("mul", rotated, var("sin"), commutative=True),
              op("mul", var(x), var("cos"), commutative=True), commutative=True)


def _attention(*bias):
    return op("attention", _rope("q", "q"),
              op("kv_append", var("kc"), _rope("k", "k"), name="ka", start=attr("start")),
              op("kv_append", var("vc"), var("v"), name="va", start=attr("start")), *bias, name="attn")


def _fuse(m, b):
    """The replacement, or None where a side condition does not hold."""
    node = m.node("attn")
    a = node.attrs
    if a.get("softcap") is not None or a.get("window") is not None or a.get("alibi") or a.get("sinks"):
        return None  # (the fused rotary + decode kernel has none of these)
    q, k, v, cos, sin, kc, vc = (m[n] for n in ("q", "k", "v", "cos", "sin", "kc", "vc"))
    # the rotary keeps its operand's shape (cos/sin broadcast into it, not it into them)
    if not (q.type.same_as(node.inputs[0].type) and k.type.same_as(m.node("ka").inputs[1].type)):
        return None
    d = q.shape[3]
    if not d.is_number or int(d) % 2 or not all(dims_equal(x.shape[3], d) for x in (k, v)):
        return None
    h = int(d) // 2
    for tag in ("q", "k"):
        end = m.attr(f"{tag}_hi_end")
        if m.attr(f"{tag}_hi_start") != h or m.attr(f"{tag}_lo_end") != h or not (end is None or end >= int(d)):
            return None
    if len({x.dtype for x in (q, k, v, cos, sin, kc, vc)}) != 1:
        return None
    state = {s: (s.attrs or {}) for s in m.graph.state_values}
    if kc is vc or any(s not in state or state[s].get("layout", "dense") != "dense" for s in (kc, vc)):
        return None
    # the appends feed this attention alone, and the caches feed their append alone: nothing
    # else reads what the fused op now writes
    if any(m.uses(x) != 1 for x in (m["ka"], m["va"], kc, vc)):
        return None
    inputs = (q, k, v, cos, sin, kc, vc) + tuple(node.inputs[3:])
    try:
        out = b.emit("rope_attention", *inputs, causal=a["causal"], scale=a["scale"], start=m.attr("start"))
    except (TypeError, ValueError):  # a shape the op does not take (cos varying by head, ...)
        return None
    return out if out.type.same_as(node.outputs[0].type) else None


# attention(rope(q), kv_append(kc, rope(k)), kv_append(vc, v), [bias]) -> rope_attention(...)
RULES = [Rule("rope_attention", either(_attention(var("bias")), _attention()), _fuse)]


def fuse_rope_attention(graph: Graph, ctx=None) -> Graph:
    if not any(n.op == "kv_append" for n in graph.nodes):
        return graph
    out = apply_rules(graph, RULES, ctx.rules if ctx is not None else None, "fuse_rope_attention")
    return _drop_replaced_appends(out)


def _drop_replaced_appends(graph: Graph) -> Graph:
    """The appends the fused ops took over: nobody reads them now, but dead-code elimination
    keeps them (they write state), so they go here."""
    taken = {v for n in graph.nodes if n.op == "rope_attention" for v in n.inputs[5:7]}
    uses = graph.use_counts()
    kept = [n for n in graph.nodes
            if not (n.op == "kv_append" and n.inputs[0] in taken and uses.get(n.outputs[0], 0) == 0)]
    return graph if len(kept) == len(graph.nodes) else dead_code_elimination(graph.with_nodes(kept))


def unfuse(graph: Graph) -> Graph:
    """Every rope_attention node back as its composition (the rotary-and-store
    fused_pointwise, then attention): what a backend without the fused kernel runs, and what
    the graph computed before this pass (after fuse_elementwise)."""
    from ..ir.builder import expand_ops
    from ..ir.rope_attention import compose

    def expand(node, b):
        out = compose(list(node.inputs), node.attrs, lambda *vs, **a: b.emit_multi("fused_pointwise", vs, a),
                      lambda *vs, **a: b.emit("attention", *vs, **a),
                      lambda x, s, e: b.emit("slice", x, dim=3, start=s, end=e, step=1))
        return [out]

    return expand_ops(graph, "rope_attention", expand)
