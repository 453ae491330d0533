"""fuse_attention: attention subgraphs, however a model spells them, become one
`attention(q, k, v, [bias]) {causal, scale}` op (q: [B, H, Tq, D], k/v: [B, Hkv, Tk, D]).

Recognised (after cleanup has folded permutes, no-op casts, dropout and contiguous, and
put every constant last in mul/add):
  - torch's `scaled_dot_product_attention` (attn_mask, is_causal, scale, enable_gqa);
  - softmax(q @ k^T * s [+ mask]) @ v with the scale as multiply or divide, or pre-applied
    to q and/or k; softmax upcast to float32 and cast back; masks added, or applied with
    masked_fill / where; heads folded into the batch (bmm on [B*H, T, D]);
  - K/V repeated for grouped-query attention (repeat_kv's unsqueeze+expand+view, or
    repeat_interleave): the repeat disappears, the op reads the smaller K/V;
  - a mask that depends only on shapes (built from arange/tril/comparisons, or sliced
    from a buffer) is evaluated at sample sizes and at one longer than any integer it is
    built from: if it is causal at all of them, it becomes causal=true (a sliding window
    is not: it stays a bias).

Declines (the graph stays as it was): softmax over another dim, any other op between the
matmuls (a tanh soft-cap, say), scores or probabilities also used elsewhere, a
masked_fill whose fill value is not a large negative number, non-constant scales.
Masks that are not shape-only stay as an additive `bias` input. Rows whose every key is
masked are padding rows: with a finite fill (finfo.min) eager and fused agree, with -inf
both give undefined values.
"""
from __future__ import annotations

import math

import torch

from ..ir.graph import Value
from ..ir.ops import causal_keep
from ..ir.types import as_dim
from .pattern import Match, Rule, apply_rules, op, var
from .shape_eval import evaluate, probe_sizes

# A masked_fill value at or below this removes the key after softmax, exactly in float32.
MASK_FILL_MAX = -65504.0


# -- small walkers ---------------------------------------------------------------------------
def _producer(m: Match, v: Value, *ops: str):
    node = m.producers.get(v)
    return node if node is not None and node.op in ops else None


def _const_value(m: Match, v: Value):
    node = _producer(m, v, "const")
    if node is None or v.rank != 0:
        return None
    value = node.attrs["value"]
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _strip_scale(m: Match, v: Value) -> tuple[Value, float]:
    """x * c, x / c -> (x, c): a scale applied to q or k before the matmul (cleanup has
    put constants last)."""
    scale = 1.0
    while True:
        node = _producer(m, v, "mul", "div")
        if node is None or m.uses(v) > 1:
            return v, scale
        a, b = node.inputs
        c = _const_value(m, b)
        if c is None or c == 0 or not a.type.same_as(v.type):
            return v, scale
        scale *= c if node.op == "mul" else 1.0 / c
        v = a


def _strip_casts(m: Match, v: Value) -> Value:
    while (node := _producer(m, v, "cast")) is not None and m.uses(v) == 1 and node.inputs[0].dtype.is_floating_point:
        v = node.inputs[0]
    return v


def _strip_repeat_kv(m: Match, v: Value) -> tuple[Value, int]:
    """view(expand(unsqueeze(x, 2), [B, Hkv, n, T, D]), [B, Hkv*n, T, D]) -> (x, n);
    repeat_interleave(x, n, dim=1) -> (x, n). The kernel maps query heads to KV heads."""
    view = _producer(m, v, "view")
    if view is not None and v.rank == 4:
        expand = _producer(m, view.inputs[0], "expand")
        if expand is not None:
            unsq = _producer(m, expand.inputs[0], "unsqueeze")
            if unsq is not None and unsq.attrs["dim"] == 2 and unsq.inputs[0].rank == 4:
                x = unsq.inputs[0]
                shape = tuple(as_dim(d) for d in expand.attrs["shape"])
                if (len(shape) == 5 and shape[0] == x.shape[0] and shape[1] == x.shape[1] and shape[3:] == x.shape[2:]
                        and shape[2].is_number):
                    return x, int(shape[2])
    call = _producer(m, v, "torch_call")
    if call is not None and call.attrs["target"] == "aten.repeat_interleave.self_int":
        args = call.attrs["args"]
        dim = args[2] if len(args) > 2 else dict(call.attrs["kwargs"]).get("dim")
        if isinstance(args[1], int) and dim in (1, -3) and v.rank == 4:
            return call.inputs[0], args[1]
    return v, 1


# -- masks -----------------------------------------------------------------------------------
class _Terms:
    """The additive terms of the scores: s = q k^T * scale + sum(bias_i)."""

    def __init__(self):
        self.adds: list[tuple[Value, float]] = []  # (bias, scale applied after it)
        self.fills: list[tuple[Value, float, bool]] = []  # (mask, fill, fill where mask is True)

    def empty(self) -> bool:
        return not self.adds and not self.fills

    def evaluate(self, m: Match, sizes) -> torch.Tensor | None:
        total = None
        for bias, post in self.adds:
            t = evaluate(bias, m.producers, m.graph, sizes)
            if t is None:
                return None
            t = t.float() * post
            total = t if total is None else total + t
        for mask, fill, when in self.fills:
            t = evaluate(mask, m.producers, m.graph, sizes)
            if t is None:
                return None
            hit = t if when else ~t
            t = torch.where(hit, torch.tensor(fill), torch.tensor(0.0))
            total = t if total is None else total + t
        return total

    def build(self, m: Match, b) -> Value:
        """The additive bias as IR, in float32."""
        total = None
        for bias, post in self.adds:
            t = b.cast(bias, torch.float32)
            if post != 1.0:
                t = b.emit("mul", t, b.const(post))
            total = t if total is None else b.emit("add", total, t)
        for mask, fill, when in self.fills:
            fill_v, zero = b.const(fill, torch.float32), b.const(0.0, torch.float32)
            t = b.emit("where", mask, fill_v, zero) if when else b.emit("where", mask, zero, fill_v)
            total = t if total is None else b.emit("add", total, t)
        return total


def _is_causal(m: Match, terms: _Terms, q: Value, k: Value) -> bool:
    """Evaluate a shape-only mask at a few sizes: causal (bottom-right aligned) iff every
    kept entry is 0 and every dropped one is at most MASK_FILL_MAX, at each size. The sizes
    include one longer than any integer the mask is built from: a sliding window of W keys
    (Mistral) is causal at every T <= W, and folding it to causal=true would give other
    answers beyond W. Too long to evaluate: not proven, the mask stays a bias."""
    if terms.empty():
        return False
    values = [v for v, _ in terms.adds] + [mask for mask, _, _ in terms.fills]
    all_sizes, complete = probe_sizes(m.graph, values, m.producers)
    if not complete:
        return False
    for sizes in all_sizes:
        bias = terms.evaluate(m, sizes)
        if bias is None:
            return False
        try:
            tq, tk = int(q.shape[-2].subs(sizes)), int(k.shape[-2].subs(sizes))
        except TypeError:
            return False
        if bias.dim() < 2 or bias.shape[-2] not in (1, tq) or bias.shape[-1] != tk:
            return False
        keep = causal_keep(tq, tk)
        bias = bias.expand(*bias.shape[:-2], tq, tk)
        if not (bias[..., keep] == 0).all() or not (bias[..., ~keep] <= MASK_FILL_MAX).all():
            return False
    return True


# -- the rewrite -------------------------------------------------------------------------------
def _emit_attention(m: Match, b, q, k, v, terms: _Terms, scale: float, causal: bool) -> Value | None:
    root = m.root.outputs[0]
    if not causal and not terms.empty() and _is_causal(m, terms, q, k):
        terms, causal = _Terms(), True
    folded = q.rank == 3  # heads folded into the batch: [B*H, T, D]
    if q.rank not in (3, 4) or k.rank != q.rank or v.rank != q.rank:
        return None
    bias = None if terms.empty() else terms.build(m, b)
    if folded:
        q, k, v = (b.emit("unsqueeze", x, dim=0) for x in (q, k, v))
        if bias is not None and bias.rank == 3:
            bias = b.emit("unsqueeze", bias, dim=0)
    if bias is not None and bias.rank < 4:
        for _ in range(4 - bias.rank):
            bias = b.emit("unsqueeze", bias, dim=0)
    inputs = [q, k, v] + ([bias] if bias is not None else [])
    out = b.emit("attention", *inputs, causal=causal, scale=float(scale))
    if folded:
        out = b.emit("squeeze", out, dims=(0,))
    if out.dtype != root.dtype:
        out = b.cast(out, root.dtype)
    return out if out.type.same_as(root.type) else None


def fuse_sdpa(m: Match, b) -> Value | None:
    """sdpa(q, k, v, [mask]) {causal, scale, enable_gqa} -> attention."""
    node = m.root
    q, k, v = node.inputs[:3]
    k, n_k = _strip_repeat_kv(m, k)
    v, n_v = _strip_repeat_kv(m, v)
    if n_k != n_v:
        return None
    causal = node.attrs["causal"]
    if causal and q.shape[-2] != k.shape[-2]:
        return None  # SDPA's is_causal is top-left aligned when Tq != Tk; ours is bottom-right
    terms = _Terms()
    if len(node.inputs) == 4:
        mask = node.inputs[3]
        if mask.dtype == torch.bool:
            terms.fills.append((mask, float("-inf"), False))
        else:
            terms.adds.append((mask, 1.0))
    return _emit_attention(m, b, q, k, v, terms, node.attrs["scale"], causal)


def fuse_matmul_softmax_matmul(m: Match, b) -> Value | None:
    """matmul(softmax(scores), v) where scores = q @ k^T, scaled and masked."""
    p, v = m["p"], m["v"]
    p = _strip_casts(m, p)
    soft = _producer(m, p, "softmax")
    if soft is None or soft.attrs["dim"] != p.rank - 1 or m.uses(p) > 1:
        return None
    s = soft.inputs[0]
    terms, post_scale = _Terms(), 1.0
    while True:
        if m.uses(s) > 1:
            return None  # the scores are used elsewhere (e.g. returned): keep them
        s = _strip_casts(m, s)
        node = m.producers.get(s)
        if node is None:
            return None
        if node.op == "matmul":
            break
        if node.op in ("mul", "div"):
            x, c = node.inputs  # the constant is last (cleanup's canonical form)
            c_val = _const_value(m, c)
            if c_val is None or c_val == 0:
                return None
            post_scale *= c_val if node.op == "mul" else 1.0 / c_val
            s = x
        elif node.op == "add":
            a, c = node.inputs
            # the scores side is the one that leads back to the matmul; the other is a bias
            side = _scores_side(m, a, c)
            if side is None:
                return None
            s, bias = side
            terms.adds.append((bias, post_scale))
        elif node.op == "where":
            mask, x, y = node.inputs
            if mask.dtype != torch.bool:
                return None
            fx, fy = _const_value(m, x), _const_value(m, y)
            if fx is not None and fx <= MASK_FILL_MAX and y.rank == s.rank:
                terms.fills.append((mask, fx * post_scale if post_scale > 0 else None, True))
                s = y
            elif fy is not None and fy <= MASK_FILL_MAX and x.rank == s.rank:
                terms.fills.append((mask, fy * post_scale if post_scale > 0 else None, False))
                s = x
            else:
                return None
            if terms.fills[-1][1] is None:
                return None
        else:
            return None  # an op we cannot prove harmless (tanh soft-cap, ...)
    q, kt = node.inputs
    if q.rank not in (3, 4) or kt.rank != q.rank:
        return None
    q, q_scale = _strip_scale(m, q)
    swap = tuple(range(kt.rank - 2)) + (kt.rank - 1, kt.rank - 2)
    kt_node = _producer(m, kt, "permute")
    k_scale = 1.0
    if kt_node is not None and m.uses(kt) == 1:
        inner, k_scale = _strip_scale(m, kt_node.inputs[0])
        dims = kt_node.attrs["dims"]
        k = inner if tuple(dims) == swap else b.emit("permute", inner, dims=tuple(dims[d] for d in swap))
    else:
        k = b.emit("permute", kt, dims=swap)
    k, n_k = _strip_repeat_kv(m, k)
    v, n_v = _strip_repeat_kv(m, v)
    if n_k != n_v:
        return None
    scale = post_scale * q_scale * k_scale
    if not math.isfinite(scale) or scale <= 0:
        return None
    return _emit_attention(m, b, q, k, v, terms, scale, causal=False)


def _scores_side(m: Match, a: Value, c: Value):
    """Of add(a, c), which operand carries the scores (leads to a matmul through
    scale/cast/mask ops) and which is the bias."""
    for s, bias in ((a, c), (c, a)):
        x = s
        for _ in range(8):
            node = m.producers.get(x)
            if node is None:
                break
            if node.op == "matmul":
                if bias.rank <= s.rank:
                    return s, bias
                break
            if node.op not in ("mul", "div", "cast", "add", "where"):
                break
            x = node.inputs[1] if node.op == "where" else node.inputs[0]
    return None


# before -> after
RULES = [
    # sdpa(q, k, v, [mask]) -> attention(q, k, v, [bias]) {causal, scale}
    Rule("sdpa", op("sdpa", any_inputs=True), fuse_sdpa),
    # matmul(softmax(q @ k^T * s [+ mask]), v) -> attention(q, k, v, [bias]) {causal, scale}
    Rule("matmul_softmax_matmul", op("matmul", var("p"), var("v")), fuse_matmul_softmax_matmul),
]


def fuse_attention(graph, ctx=None):
    from collections import Counter

    stats = ctx.rules if ctx is not None else Counter()
    out = apply_rules(graph, RULES, stats, pass_name="fuse_attention")
    fused = out.count("attention")
    if ctx is not None:
        ctx.details["attention_fused"] = fused
        causal = sum(1 for n in out.nodes if n.op == "attention" and n.attrs["causal"])
        ctx.note(f"{fused} attention ops ({causal} causal, {fused - causal} with explicit or no mask)")
    return out
