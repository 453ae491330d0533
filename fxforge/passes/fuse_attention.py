"""fuse_attention: attention subgraphs, however a model spells them, become one
`attention(q, k, v, [bias], [slopes]) {causal, scale, softcap?, window?, alibi?}` op
(q: [B, H, Tq, D], k/v: [B, Hkv, Tk, D]).

Recognised (after cleanup has folded permutes, no-op casts, dropout and contiguous, and
put every constant last in mul/add):
  - torch's `scaled_dot_product_attention` (attn_mask, is_causal, scale, enable_gqa);
  - softmax(q @ k^T * s [+ mask]) @ v with the scale as multiply or divide, or pre-applied
    to q and/or k; softmax upcast to float32 and cast back; masks added, or applied with
    masked_fill / where (the fill a constant, or a 0-d tensor made in forward: GPT-Neo's
    torch.tensor(finfo.min)); heads folded into the batch (bmm on [B*H, T, D]);
  - K/V repeated for grouped-query attention (repeat_kv's unsqueeze+expand+view, or
    repeat_interleave): the repeat disappears, the op reads the smaller K/V;
  - a mask that depends only on shapes (built from arange/tril/comparisons, or sliced
    from a buffer) is evaluated at sample sizes, at every length up to 8 (one token
    included), and at longer ones past every number it is built from (integers, floats
    and their reciprocals, clamp bounds, small tensors' values; a number met after a
    division by c counts c times: `i // 64 - j // 64 >= 8` is probed past 512)
    and a power of two above, with two lengths each above the other (shape_eval.mask_probes:
    bottom-right causal over a memory of S keys holds only while T <= S, unless a guard
    says so): causal at all of them becomes causal=true, a band of W keys
    window=W, and
    slopes[h] * (k - q) (plus any per-row constant) on the kept entries alibi=true with the
    slopes as an f32[H] input (only if computed in float32 or wider: constants aside,
    as MPT's float16 0.0 selected into its float32 mask is one exact number);
  - a soft-cap tanh(s / c) * c between the scaled scores and the mask: softcap=c;
  - multi-query attention by a broadcasting matmul of one K/V head, in-place scalar
    scales (falcon's scores.div_(c)), heads folded into the batch around the softmax (bloom)
    or for it (XGLM: masks added to [B, H] scores, a 3-D softmax);
  - a floor under the masked scores, max(scores, c) with c <= -65504 (XGLM's
    torch.max(w, finfo.min)): moved onto the bias, softmax-equal for scores below 2**103;
  - the row max subtracted right before the softmax, softmax(s - s.max(-1, keepdim=True))
    (mimo_v2_flash): softmax does that itself, so the subtraction goes;
  - one softmax's probabilities read by several matmuls, as their left operand only
    (diffllama's two value halves): each matmul becomes an attention of its own;
  - q k^T on [B*H, T, D] (baddbmm's zeros + alpha * bmm, the exact zero dropped) viewed to
    [B, H, Tq, Tk] for the mask and the softmax, the values [B, H, T, D]
    (gpt_neox_japanese): q and k are viewed as the scores were.

Declines (the graph stays as it was): softmax over another dim, any other op between the
matmuls (a bias inside the soft-cap, say), scores or probabilities also used elsewhere, a
masked_fill whose fill value is not a large negative number, non-constant scales, scores
or probabilities rounded to a dtype narrower than the op's on the way (`scores.half().float()`,
`probs.bfloat16().float()` or a float16 softmax in a float32 model: the op would drop that
rounding), and softmax / `@ v` in a wider dtype than q k^T (float32 q, k with float64 values;
a float16 model's `softmax(s.float()) @ v.float()`: one op computes in one dtype, and q k^T
in the wider one rounds the scores differently). Casts that widen exactly or round back to
the op's dtype (softmax(s, dtype=torch.float32).to(query.dtype)) are what the op computes,
and so are q and k widened exactly before q k^T (GPT-J's query.to(torch.float32) in a
float16 model: the op computes the scores in float32 from the narrow q, k).
Masks that are not shape-only stay as an additive `bias` input. Rows whose every key is
masked are padding rows: with a finite fill (finfo.min) eager and fused agree; a softmax
over scores filled with -inf where a mask from the inputs says is declined (eager gives NaN
on a row that mask drops entirely, the fused op 0, SDPA's convention), with a report note;
so is one whose shape-only mask leaves a row no key at some probe size (j < i). A shape-only
mask whose numbers call for a length too long to probe (over shape_eval.MAX_PROBE_LENGTH:
`i * i > 90000`) is proven nothing: it stays the bias, and which rows it drops whole is
known only at run time, so it is treated as a bias from the inputs (below). An additive
bias computed from the inputs (a user's float mask holding -inf, where(m, 0, -inf), log(m))
that is not provably finite on every input (interval bounds through its ops) fuses, and NaN
is put on the rows where eager's softmax gives it: those whose bias row max is -inf (every
key dropped), +inf or NaN. Fills replace what they mask, in the model's order (a fill over
an add keeps a key the add dropped), and each finite fill is, in the bias, a number that
swamps the scores (SWAMP): a row whose every key eager fills is uniform over the keys of its
largest fill, as eager's is (not softmax of the scores: -1e9 in float64, -1e5 in float32,
float16's min do not swamp them); fills eager would weigh against each other (values closer
than LEVEL_GAP) are declined.
A number the model's masked_fill writes leaves the graph with the mask (folded into causal,
or scaled into the float32 bias): each float dtype that cannot hold it is noted in the
graph's signature (a `fill` entry of fixed_dtypes), so that OptimizedModel.to(float16)
refuses a -1e9 fill as eager's masked_fill raises on it.
"""
from __future__ import annotations

import functools
import math

import torch

from dataclasses import dataclass

from ..ir import roles
from ..ir.dtypes import finfo_name
from ..ir.edit import dead_code_elimination
from ..ir.graph import Value, readers_through
from ..ir.ops import OPS, IRTypeError, causal_keep
from ..ir.types import as_dim, dims_equal
from .cleanup import RULES as CLEANUP_RULES
from .pattern import Match, Rule, apply_rules, op, var
from .shape_eval import band_width, evaluate, mask_probes, shape_only_nodes
from .value_bounds import bound, interval, rounded

# A masked_fill value at or below this removes the key after softmax, exactly in float32.
MASK_FILL_MAX = -65504.0
# max(scores, c) with a very negative 0-d c: a floor under masked scores (XGLM's
# torch.max(attn_weights, finfo.min))
_FLOOR_TARGETS = ("aten.max.other", "aten.maximum.default")


# -- small walkers ---------------------------------------------------------------------------
def _producer(m: Match, v: Value, *ops: str):
    node = m.producers.get(v)
    return node if node is not None and node.op in ops else None


def _const_value(m: Match, v: Value):
    """The number a 0-d constant holds: a const node, or a 0-d tensor the model made in
    forward (GPT-Neo's `torch.tensor(finfo.min)` fill), which capture lifts to a parameter
    whose value is fixed from then on."""
    if v.rank != 0:
        return None
    if v.param is not None:
        t = m.graph.params.get(v.param)
        return float(t) if isinstance(t, torch.Tensor) and t.dtype.is_floating_point and t.numel() == 1 else None
    node = _producer(m, v, "const")
    if node is None:
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


# The float dtypes that hold every value of a dtype exactly (itself included).
_HOLDS = {torch.float64: (torch.float64,), torch.float32: (torch.float32, torch.float64),
          torch.float16: (torch.float16, torch.float32, torch.float64),
          torch.bfloat16: (torch.bfloat16, torch.float32, torch.float64)}


def _holds(wide, narrow) -> bool:
    """Every value of `narrow` is a value of `wide` (a cast narrow -> wide is exact)."""
    return wide in _HOLDS.get(narrow, (narrow,)) if narrow.is_floating_point else False


def _strip_casts(m: Match, v: Value, keep=None) -> Value:
    """The value under the casts that lead to `v`.

    With `keep` (the dtype the fused op computes in: the walk of the scores and the
    probabilities), only through values that hold every value of `keep`: widening (softmax
    in float32 for bf16 scores) and rounding back to `keep` itself (`.to(query.dtype)`) are
    what the op does, but a value rounded to a narrower dtype on the way
    (`scores.half().float()` in a float32 model, a softmax in float16) is not, so such a
    cast stays and the match declines.

    Without it, only through a chain that is one cast: every value between the innermost
    and `v` holds all of the innermost's values (f32 -> f64 -> f32, bf16 -> f32), never a
    round trip through a narrower dtype (f32 -> bf16 -> f32), whose rounding a walker that
    skips the casts would drop."""
    if keep is not None and not _holds(v.dtype, keep):
        return v
    outer, between = v, []  # (the dtypes of the values between the innermost and v)
    while (node := _producer(m, v, "cast")) is not None and m.uses(v) == 1 and node.inputs[0].dtype.is_floating_point:
        inner = node.inputs[0].dtype
        if v is not outer:
            between.append(v.dtype)
        if keep is not None and not _holds(inner, keep):
            break
        if keep is None and not all(_holds(d, inner) for d in between):
            break
        v = node.inputs[0]
    return v


def _widened_from(m: Match, x: Value, dtype) -> Value:
    """The `dtype` value under `x` when `x` only widens it exactly to the dtype the fused
    op computes the scores in (GPT-J's query.to(torch.float32) and key.to(torch.float32)
    before q @ k^T in a float16 model), else `x`. q k^T of the widened values is then what
    the op computes from the narrow ones (attention_reference: float32 scores from half
    q, k), so the casts go; a widening past that (float64 scores from float32 q, k) is
    not, and stays. The walk of the scores and probabilities still declines any rounding
    narrower than `dtype`."""
    if x.dtype != _score_dtype(dtype):
        return x
    inner = _strip_casts(m, x)
    return inner if inner.dtype == dtype else x


def _score_dtype(dtype):
    """The dtype the fused op computes the scores in for operands of `dtype` (as
    attention_reference does: float64 for float64, else float32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _repeated_before_transpose(m: Match, y: Value) -> tuple[Value, int] | None:
    """view(expand(unsqueeze(x, 3), [B, T, Hkv, n, D]), [B, T, Hkv*n, D]) -> (x, n): Meta's
    and llama2.c's repeat_kv, on [B, T, H, D] before the heads move to dim 1."""
    view = _producer(m, y, "view")
    if view is None or y.rank != 4:
        return None
    expand = _producer(m, view.inputs[0], "expand")
    unsq = _producer(m, expand.inputs[0], "unsqueeze") if expand is not None else None
    if unsq is None or unsq.attrs["dim"] != 3 or unsq.inputs[0].rank != 4:
        return None
    x = unsq.inputs[0]
    shape = tuple(as_dim(d) for d in expand.attrs["shape"])
    if len(shape) == 5 and shape[:3] == x.shape[:3] and shape[4] == x.shape[3] and shape[3].is_number \
            and dims_equal(y.shape[2], x.shape[2] * shape[3]) and dims_equal(y.shape[1], x.shape[1]):
        return x, int(shape[3])
    return None


def _strip_repeat_kv(m: Match, v: Value, b=None) -> tuple[Value, int]:
    """view(expand(unsqueeze(x, 2), [B, Hkv, n, T, D]), [B, Hkv*n, T, D]) -> (x, n);
    repeat_interleave(x, n, dim=1) -> (x, n); with a builder `b`, the [B, T, H, D] spelling
    transposed to [B, H, T, D] (_repeated_before_transpose) -> (x transposed, n). The kernel
    maps query heads to KV heads, so the cache holds the KV heads only."""
    perm = _producer(m, v, "permute")
    if b is not None and perm is not None and tuple(perm.attrs["dims"]) == (0, 2, 1, 3):
        found = _repeated_before_transpose(m, perm.inputs[0])
        if found is not None:
            return b.emit("permute", found[0], dims=(0, 2, 1, 3)), found[1]
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
    repeat = _producer(m, v, "repeat_interleave")
    if repeat is not None and repeat.attrs["dim"] == 1 and v.rank == 4 and isinstance(repeat.attrs["repeats"], int):
        return repeat.inputs[0], repeat.attrs["repeats"]
    call = _producer(m, v, "torch_call")  # (an IR saved before repeat_interleave was an op)
    if call is not None and call.attrs["target"] == "aten.repeat_interleave.self_int":
        args = call.attrs["args"]
        dim = args[2] if len(args) > 2 else dict(call.attrs["kwargs"]).get("dim")
        if isinstance(args[1], int) and dim in (1, -3) and v.rank == 4:
            return call.inputs[0], args[1]
    return v, 1


# -- masks -----------------------------------------------------------------------------------
# A masked_fill writes a number c in place of a score; the fused op adds its bias to the
# scores. Where eager keeps some key of a row the two agree (c removes the key either way),
# but on a row whose every key is filled (a padding query, a batch row of padding) eager's
# softmax is uniform over the keys holding the largest fill, whatever the scores, and
# softmax(s + c) is softmax(s) unless c swamps every score (s + c rounds to c: -1e9 does in
# float32 for |s| < 32, not in float64, and -1e5 or float16's -65504 do not). So the bias
# holds, in place of each finite fill, a number that swamps any score below 2**76 (float32;
# 2**850 in float64) and stays ordered with the others: the largest fill SWAMP, the next
# twice that, ... Fills whose values eager would weigh against each other, or round to one
# number in a narrower dtype (closer than LEVEL_GAP, or than LEVEL_RATIO of their size:
# -1e9 and -1e9 + 1e6 are one bfloat16), keep no such order, and the attention is not fused.
# Only fills: an add beside them (a padding mask of finfo.min added, ALiBi added after the
# fill) holds values eager orders against the fills' as written (min + 0 ties with a fill of
# min), so there the fills stay as written; a floor over fills (its max makes them the floor,
# which the op would add to the scores) is not fused.
SWAMP = {torch.float32: -2.0 ** 100, torch.float64: -2.0 ** 900}
# float32's exp underflows to 0 below -104, float64's below -745
LEVEL_GAP = 1000.0
# bfloat16 keeps 8 bits of a number: values apart by more than 2**-6 of their size stay apart
LEVEL_RATIO = 2.0 ** -6
# SWAMP * 2**(levels - 1) must stay clear of overflow when finfo(float32).min is added to it
MAX_FILL_LEVELS = 3


class _Terms:
    """The additive terms of the scores: s = q k^T * scale + sum(bias_i), with fills that
    replace what they mask, in the order the model applies them. A term added while the
    heads were folded into the batch ([B*H, Tq, Tk] scores, bloom) carries `fold` = (B, H):
    its leading dim is split into those to meet the [B, H, Tq, Tk] terms."""

    def __init__(self):
        self.adds: list[tuple[Value, float, tuple | None]] = []  # (bias, scale applied after it, fold)
        self.fills: list[tuple[Value, float, bool, tuple | None]] = []  # (mask, fill, fill where True, fold)
        # ("add" | "fill", index) in the order the walk meets them: the outermost (the
        # model's last) first. A fill replaces what the terms inside it made of a key.
        self.order: list[tuple[str, int]] = []
        # max(scores + bias, floor) with floor <= MASK_FILL_MAX (XGLM): for scores below
        # 2**103 in magnitude (a float32 `floor + s` rounds back to `floor` there) this is
        # softmax-equal to scores + max(bias, floor), so the floor moves onto the bias
        self.floor: float | None = None
        # the scales applied after the terms were added (scores and terms scaled together)
        self.post_scales: list[float] = []
        # the numbers the model's masked_fill wrote, as written (a fill above is scaled), each
        # with the dtype of the scores it filled: the fused op drops them, and a dtype that
        # cannot hold one must still refuse as eager does, where the fill happens in it
        self.model_fills: list[tuple[float, torch.dtype]] = []

    def add(self, bias: Value, post: float, fold) -> None:
        self.order.append(("add", len(self.adds)))
        self.adds.append((bias, post, fold))

    def fill(self, mask: Value, value: float | None, when: bool, fold) -> None:
        self.order.append(("fill", len(self.fills)))
        self.fills.append((mask, value, when, fold))

    def key(self) -> tuple:
        """What the bias is made of, for the per-pass caches (ids of values: each cache entry
        holds the values too, so no id is reused while it lives)."""
        return (tuple((id(v), post, fold) for v, post, fold in self.adds),
                tuple((id(v), fill, when, fold) for v, fill, when, fold in self.fills), tuple(self.order))

    def drop_threshold(self) -> float:
        """At or below this the summed terms remove a key exactly. A term added before a
        scale (CodeGen: (s + mask) / sqrt(d), its mask float16's min) is scaled together with
        the scores: what removes the key is the fill before the scale, so the threshold
        scales too, down to 1/16 (head dim 256), where float16's min is still -4094 at the
        softmax: thousands below any score. Terms added under different scales take the
        largest (a term added after the scale, unscaled, keeps the full threshold: a -4096
        there is not a fill of -65504 before it)."""
        scales = [p for p in self.post_scales if p > 0]
        return MASK_FILL_MAX * max(min(max(scales, default=1.0), 1.0), 1 / 16)

    def empty(self) -> bool:
        return not self.adds and not self.fills

    def values(self) -> list[Value]:
        return [t[0] for t in self.adds] + [t[0] for t in self.fills]

    def swamped_fills(self, acc: torch.dtype) -> dict[float, float] | None:
        """{fill: the number the bias holds in its place} (see SWAMP above; -inf stays; each
        as written where adds or a floor are beside the fills), or None when the fills'
        values are too many or too close to keep eager's order."""
        levels = sorted({f for _, f, _, _ in self.fills if math.isfinite(f)}, reverse=True)
        if self.floor is not None and levels:
            return None  # max(fill, floor) is the floor on a filled row: eager's there, not s + floor
        if self.adds or self.floor is not None:
            return {f: f for f in levels} | {-math.inf: -math.inf}
        if len(levels) > MAX_FILL_LEVELS or any(a - b < max(LEVEL_GAP, -b * LEVEL_RATIO)
                                                for a, b in zip(levels, levels[1:])):
            return None
        swamp = SWAMP.get(acc, SWAMP[torch.float32])
        return {**{f: swamp * 2.0 ** r for r, f in enumerate(levels)}, -math.inf: -math.inf}

    def replay(self, add, fill):
        """Fold the terms innermost first: `add(term, total)` and `fill(term, total)` with
        total None before the first."""
        total = None
        for kind, index in reversed(self.order):
            total = add(self.adds[index], total) if kind == "add" else fill(self.fills[index], total)
        return total

    @staticmethod
    def _unfold(t: torch.Tensor, fold, sizes) -> torch.Tensor | None:
        if fold is None or t.dim() < 3:
            return t
        if t.dim() != 3:
            return None
        b, h = (int(as_dim(d).subs(sizes)) for d in fold)
        if t.shape[0] == 1:
            return t[None]
        return t.reshape(b, h, *t.shape[1:]) if t.shape[0] == b * h else None

    class _NotEvaluable(Exception):
        pass

    def evaluate(self, m: Match, sizes) -> torch.Tensor | None:
        """The terms at `sizes` (shape-only terms), with the values the model wrote."""
        def value(v: Value, fold) -> torch.Tensor:
            t = evaluate(v, m.producers, m.graph, sizes)
            if t is None or (t := self._unfold(t, fold, sizes)) is None:
                raise _Terms._NotEvaluable
            return t

        def add(term, total):
            bias, post, fold = term
            t = value(bias, fold).float() * post
            return t if total is None else total + t

        def fill(term, total):
            mask, value_, when, fold = term
            t = value(mask, fold)
            if t.dtype != torch.bool:
                raise _Terms._NotEvaluable
            return torch.where(t if when else ~t, torch.tensor(value_), torch.tensor(0.0) if total is None else total)

        try:
            total = self.replay(add, fill)
        except _Terms._NotEvaluable:
            return None
        if self.floor is not None and total is not None:
            total = torch.clamp_min(total, self.floor)
        return total

    def evaluate_sum(self, m: Match, sizes) -> torch.Tensor | None:
        try:
            return self.evaluate(m, sizes)
        except RuntimeError:  # terms that do not broadcast at these sizes
            return None

    @staticmethod
    def _build_unfold(b, t: Value, fold) -> Value | None:
        if fold is None or t.rank < 3:
            return t
        if t.rank != 3:
            return None
        if t.shape[0] == 1:
            return b.emit("unsqueeze", t, dim=0)
        if not dims_equal(t.shape[0], fold[0] * fold[1]):
            return None
        return b.emit("view", t, shape=(fold[0], fold[1]) + tuple(t.shape[1:]))

    def build(self, m: Match, b, dtype: torch.dtype = torch.float32) -> Value | None:
        """The additive bias as IR, in `dtype` (the op's compute dtype: float32, or float64
        for a float64 attention, whose bias float32 would round), each fill the number that
        stands for it (swamped_fills) (None: a folded term that does not unfold, or fills
        that cannot keep their order)."""
        swamp = self.swamped_fills(dtype)
        if swamp is None:
            return None

        def add(term, total):
            bias, post, fold = term
            t = self._build_unfold(b, b.cast(bias, dtype), fold) if total is not False else None
            if t is None:
                return False
            if post != 1.0:
                t = b.emit("mul", t, b.const(post, dtype))
            return t if total is None else b.emit("add", total, t)

        def fill(term, total):
            mask, value, when, fold = term
            mask = self._build_unfold(b, mask, fold) if total is not False else None
            if mask is None:
                return False
            filled = b.const(swamp[value], dtype)
            kept = b.const(0.0, dtype) if total is None else total
            return b.emit("where", mask, filled, kept) if when else b.emit("where", mask, kept, filled)

        total = self.replay(add, fill)
        if total is False:
            return None
        if self.floor is not None and total is not None:  # max(total, floor), NaN kept as torch.max keeps it
            floor = b.const(self.floor, dtype)
            total = b.emit("where", b.emit("lt", total, floor), floor, total)
        return total


@dataclass(frozen=True)
class MaskForm:
    """What a shape-only mask computes, proven at sample sizes: keys dropped by causal
    and/or a sliding window of `window` keys, plus slopes[h] * (k_pos - q_pos) (ALiBi; a
    per-row constant added to it changes nothing after softmax)."""

    causal: bool
    window: int | None = None
    slopes: tuple[float, ...] | None = None
    # every kept entry was exactly 0 at every probe: the form is the mask itself, not the
    # mask up to a constant per row (which softmax ignores, but a sink would see)
    exact: bool = True


# Float dtypes an ALiBi subgraph may compute in: a narrower one rounds slope * position
# (falcon builds its ALiBi in bfloat16), which the slopes form would not reproduce at
# lengths the samples do not reach.
_EXACT_FLOATS = (torch.float32, torch.float64)


def _mask_form(m: Match, terms: _Terms, q: Value, k: Value) -> MaskForm | None:
    """Evaluate a shape-only mask at a few sizes and say what it computes, or None when it
    is not one of: plain causal (bottom-right aligned), causal with a sliding window (each
    query sees its last W keys), either of those plus an ALiBi bias, or an ALiBi bias
    alone. Dropped entries must be at most MASK_FILL_MAX; kept ones must be
    slopes[h] * (j - i) plus a constant per row, the same slopes at every size, computed in
    float32 or wider. The sizes include ones longer than any number the mask is built from:
    a sliding window of W keys (Mistral) is causal at every T <= W. Too long to evaluate:
    not proven, the mask stays a bias."""
    if terms.empty() or (q.rank == 4 and not q.shape[1].is_number):
        return None
    heads = int(q.shape[1]) if q.rank == 4 else 1  # heads folded into the batch: one "head"
    values = terms.values()
    probes = mask_probes(m.graph, values, m.producers)
    if not probes.complete:
        return None
    kinds, slopes_seen, exact = set(), [], True
    def fits(sizes, bias) -> bool:
        """The evaluated mask has the scores' [.., Tq|1, Tk] at these sizes."""
        try:
            tq, tk = int(q.shape[-2].subs(sizes)), int(k.shape[-2].subs(sizes))
        except TypeError:
            return False
        return 2 <= bias.dim() <= 4 and bias.shape[-2] in (1, tq) and bias.shape[-1] == tk

    for index, sizes in enumerate(probes.sizes):
        bias = terms.evaluate_sum(m, sizes)
        if (bias is None or not fits(sizes, bias)) and index >= probes.required:
            # a long probe the mask cannot be built at (MPT's ALiBi table of max_seq_len
            # keys at max_seq_len + 2; nanoGPT's tril buffer of block_size rows, which a
            # longer slice clamps to block_size): the model cannot run there either, so
            # probe the longest length it can (a window shows there, if it is shorter)
            sizes, bias = _longest_evaluable(m, terms, probes.sizes[probes.required - 1], sizes, fits)
        if bias is None or not fits(sizes, bias):
            return None
        tq, tk = int(q.shape[-2].subs(sizes)), int(k.shape[-2].subs(sizes))
        if q.rank == 3:
            bias = bias.reshape(-1, 1, *bias.shape[-2:])
        while bias.dim() < 4:
            bias = bias[None]
        if bias.shape[1] not in (1, heads):
            return None
        bias = bias.expand(bias.shape[0], heads, tq, tk)
        dropped = bias <= terms.drop_threshold()
        keep = ~dropped[0, 0]
        if not (dropped == ~keep).all() or not keep.any(-1).all():
            return None  # the pattern differs between rows or heads, or a row sees no key
        if tq == 1 and bool(keep.all()):
            kinds.add("one")  # one query that sees every key: no mask and causal alike (a decode step)
        elif bool(keep.all()):
            kinds.add("none")
        elif bool((keep == causal_keep(tq, tk)).all()):
            kinds.add("causal")
        else:
            width = band_width(keep)
            if width is None:
                return None
            kinds.add(width)
        kept = torch.where(keep, bias, torch.zeros(()))
        if not bool((kept == 0).all()):
            exact = False
            if int(keep.sum(-1).max()) < 2:
                continue  # no row keeps two keys (one token): a constant per row, no slope to see
            slopes = _fit_slopes(kept, keep, tq, tk)
            if slopes is None:
                return None
            slopes_seen.append((tk, slopes))
        elif tk > 1:
            slopes_seen.append((tk, torch.zeros(heads, dtype=torch.float64)))
    kinds = (kinds - {"one"}) or {"none"}
    windows = {x for x in kinds if isinstance(x, int)}
    if "none" in kinds and kinds != {"none"} or len(windows) > 1:
        return None
    if windows and not all(x == "causal" or x in windows for x in kinds):
        return None
    slopes = None
    if slopes_seen and any(bool((s != 0).any()) for _, s in slopes_seen):
        first = slopes_seen[0][1]
        if not all(torch.allclose(s, first, rtol=1e-5, atol=1e-7) for _, s in slopes_seen):
            return None  # slopes that change with the length: not ALiBi
        if not _computed_in(m, values, _EXACT_FLOATS):
            return None
        # from the probe with the most keys: the longest lever, the most precise
        slopes = tuple(float(x) for x in max(slopes_seen, key=lambda seen: seen[0])[1])
    causal = "none" not in kinds
    if not causal and slopes is None:
        return None  # no mask at all: nothing to fold
    return MaskForm(causal, next(iter(windows)) if windows else None, slopes, exact)


def _cached_mask_form(forms: dict | None, m: Match, terms: _Terms, q: Value, k: Value) -> MaskForm | None:
    """_mask_form, once per mask per pass run: every layer of a model reads the same mask
    value (after CSE), and evaluating it at the probe sizes is most of this pass's time."""
    if forms is None:
        return _mask_form(m, terms, q, k)
    key = (terms.key(), str(q.type), str(k.type))
    if key not in forms:  # the entry holds the mask values too, so no id in a key is reused
        forms[key] = (_mask_form(m, terms, q, k), terms.values())
    return forms[key][0]


def _longest_evaluable(m: Match, terms: _Terms, short: dict, long: dict, fits):
    """(sizes, bias) at the longest length between the sample `short` and the failed
    `long` probe at which the terms evaluate to a mask that `fits(sizes, bias)` the scores
    (binary search), or (long, None). Only the sizes that are long in `long` shorten (a
    probe with one length long keeps the others)."""
    lo = max(short.values())
    hi = longest = max(long.values())
    best = None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        sizes = {s: (mid if size == longest else size) for s, size in long.items()}
        bias = terms.evaluate_sum(m, sizes)
        if bias is None or not fits(sizes, bias):
            hi = mid
        else:
            lo, best = mid, (sizes, bias)
    return best if best is not None else (long, None)


def _fit_slopes(kept: torch.Tensor, keep: torch.Tensor, tq: int, tk: int) -> torch.Tensor | None:
    """slopes [H] such that kept[b, h, i, j] = slopes[h] * (j - i - (tk - tq)) + c[b, h, i]
    on the kept entries (within float32 rounding of the largest value), else None."""
    rel = (torch.arange(tk)[None, :] - torch.arange(tq)[:, None] - (tk - tq)).double()
    x = kept.double()
    # the slope of each row from its first and last kept key: the longest lever
    first = keep.float().argmax(-1)
    last = tk - 1 - keep.flip(-1).float().argmax(-1)
    rows = torch.arange(tq)
    span = (last - first).double()
    if not bool((span > 0).any()):
        return None
    widest = int(span.argmax())
    lo, hi = int(first[widest]), int(last[widest])
    slopes = (x[:, :, widest, hi] - x[:, :, widest, lo]) / (hi - lo)  # [B, H]
    slopes = slopes[0]
    resid = torch.where(keep, x - slopes[None, :, None, None] * rel, torch.zeros((), dtype=torch.float64))
    const = resid[..., rows, first][..., None]  # [B, H, Tq, 1]: c per row
    err = torch.where(keep, resid - const, torch.zeros((), dtype=torch.float64)).abs().max()
    tol = 4 * torch.finfo(torch.float32).eps * max(1.0, float(x.abs().max()))
    return slopes if float(err) <= tol else None


def _computed_in(m: Match, values: list[Value], dtypes) -> bool:
    """Every float value that the shape-only subgraphs of `values` compute or read (their
    ops' results, the parameters they read) has one of `dtypes`. Constants are exempt:
    a 0-d constant is one exact number whatever its dtype (MPT's float16 0.0 selected
    into a float32 mask by where), so it rounds no slope x position; only arithmetic
    whose result is narrower (Bloom's and Falcon's slope x position cast to half) does."""
    for value in values:
        exact: set = set()  # values made only of exact numbers (a half mask of 0 and finfo.min)
        for node in shape_only_nodes(value, m.producers) or []:
            if _is_number(m, node.outputs[0]):
                exact.add(node.outputs[0])
                continue
            if node.op in _SELECTS and all(_is_number(m, v) or v in exact for v in node.inputs[_SELECTS[node.op]:]):
                exact.update(node.outputs)  # places exact numbers without arithmetic: rounds nothing
                continue
            read = [v for v in node.inputs if not _is_number(m, v) and v not in exact]
            if any(_narrower_float(v, dtypes) for v in (*read, *node.outputs)):
                return False
    return True


# ops that place their value inputs (after a condition, for where) without arithmetic
_SELECTS = {"where": 1, "masked_fill": 0, "expand": 0, "view": 0, "unsqueeze": 0}  # op: its first value input


def _is_number(m: Match, v: Value) -> bool:
    """`v` is a 0-d constant: one exact number, whatever its dtype."""
    return v.rank == 0 and _producer(m, v, "const") is not None


def _narrower_float(v: Value, dtypes) -> bool:
    dtype = getattr(v.type, "dtype", None)
    return dtype is not None and dtype.is_floating_point and dtype not in dtypes


def _slopes_param(graph, slopes: tuple[float, ...]) -> Value:
    """A float32 [H] parameter holding `slopes`, shared by every attention with the same ones."""
    tensor = torch.tensor(slopes, dtype=torch.float32)
    for v in graph.param_values:
        if v.param.startswith("_alibi_slopes") and torch.equal(graph.params.get(v.param), tensor):
            return v
    return graph.add_param("_alibi_slopes", tensor)


# -- rows eager makes NaN -------------------------------------------------------------------
# softmax(s + bias) is NaN on a row whose bias is -inf at every key (exp(-inf - -inf)), or
# holds +inf or NaN anywhere; the fused op gives 0 for the first (SDPA's rule for a row with
# no key). A bias built from the inputs (a user's float mask, where(m, 0, -inf), log(m)) may
# do either on any call, so unless every value it can hold is finite the rewrite adds, after
# the op, NaN on the rows where the bias's row max is not finite: the same rows as eager's.
# A bound on what a value holds is worked out from its ops (passes/value_bounds.py: exact
# rationals, each result rounded to nearest into its dtype as eager rounds it): transformers'
# where(mask, 0, finfo.min) is finite (and so is bloom's ALiBi from the mask's cumsum added to
# it), so those models get no extra ops.


def _bias_is_finite(m: Match, terms: _Terms, acc: torch.dtype) -> bool:
    """Every value the bias `terms.build` makes (in `acc`, the op's compute dtype: each add
    times its scale, summed, each fill's swamped number in place of what it masks, floored)
    is finite, on any input."""
    memo: dict = {}
    swamp = terms.swamped_fills(acc)
    if swamp is None:
        return False

    def add(term, total):
        bias, post, _ = term
        t = bound(m.graph, m.producers, bias, memo) if total is not False else None
        t = None if t is None else rounded(*t, acc)
        if t is not None and post != 1.0:
            t = interval("mul", t, rounded(post, post, acc))
            t = None if t is None else rounded(*t, acc)
        if t is not None and total is not None:
            t = rounded(*interval("add", total, t), acc)
        return False if t is None else t

    def fill(term, total):
        value = swamp[term[1]]
        if total is False or not math.isfinite(value):
            return False
        lo, hi = (0.0, 0.0) if total is None else total
        return (min(lo, value), max(hi, value))

    return terms.replay(add, fill) is not False  # (a floor only narrows it)


def _from_inputs(m: Match, terms: _Terms) -> bool:
    """Some term is computed from the graph's inputs (or by ops shape_eval cannot
    evaluate): what it holds is known only at run time."""
    producers = m.graph.producers()
    return any(shape_only_nodes(v, producers) is None for v in terms.values())


def _not_probed_everywhere(m: Match, terms: _Terms) -> bool:
    """The terms are shape-only, but a number they are built from needs a length too long
    to probe (`i * i > 90000` drops every key of the rows past 300): which rows they leave
    no key is known only at run time, as for a bias from the inputs."""
    return not mask_probes(m.graph, terms.values(), m.producers).complete


def _may_make_nan_rows(m: Match, terms: _Terms, acc: torch.dtype) -> bool:
    return (_from_inputs(m, terms) or _not_probed_everywhere(m, terms)) and not _bias_is_finite(m, terms, acc)


def _cached_nan_rows(forms: dict | None, m: Match, terms: _Terms, acc: torch.dtype) -> bool:
    """The bias may make a row NaN in eager (see above) that the fused op would not: a term
    from the inputs (or shape-only, but not probed at every length that its numbers call
    for), and a bias not provably finite. Once per mask per pass run."""
    if terms.empty():
        return False
    if forms is None:
        return _may_make_nan_rows(m, terms, acc)
    key = ("nan_rows", acc, terms.key())
    if key not in forms:  # the entry holds the mask values too, so no id in a key is reused
        forms[key] = (_may_make_nan_rows(m, terms, acc), terms.values())
    return forms[key][0]


def _nan_where_eager_is(b, out: Value, bias: Value) -> Value:
    """`out` with NaN on the rows where the [.., Tq|1, Tk] bias's max over the keys is not
    finite (-inf: every key dropped; +inf or NaN: softmax is NaN there). Every layer that
    reads the same mask builds the same test, which CSE makes once."""
    top = b.emit("amax", bias, dims=(bias.rank - 1,), keepdim=True)
    finite = b.emit("lt", b.emit("abs", top), b.const(math.inf, bias.dtype))
    return b.emit("where", finite, out, b.const(math.nan, out.dtype))


# -- the rewrite -------------------------------------------------------------------------------
# forms[NAN_ROWS]: the roots of attentions declined for -inf fills from input masks
NAN_ROWS = "nan_rows"
# forms[EMPTY_ROWS]: the roots of attentions declined for a shape-only mask that leaves a
# query row no key under a -inf fill
EMPTY_ROWS = "empty_rows"
# forms[NAN_ROWS_UNKNOWN]: the roots of attentions declined for a bias from the inputs that
# may drop a row whole, in a way its row max does not tell (causal or a window besides)
NAN_ROWS_UNKNOWN = "nan_rows_unknown"


def _neg_inf_fill_from_inputs(m: Match, terms: _Terms) -> bool:
    """A term fills the scores with -inf where a mask computed from the graph's inputs says
    (a padding mask): a row that mask drops entirely is all -inf, which a softmax makes NaN
    and the attention op makes 0 (SDPA's convention for such rows). Which rows the inputs
    drop is not known ahead, so the two cannot be proven the same."""
    producers = m.graph.producers()
    return any(math.isinf(fill) and shape_only_nodes(mask, producers) is None
               for mask, fill, _, _ in terms.fills)


def _neg_inf_rows_in_shape_mask(m: Match, terms: _Terms) -> bool:
    """The shape-only terms left as the bias put -inf on every key of some query row (a
    strictly causal j < i drops all of row 0), or may: such a row is NaN in eager (softmax
    of all -inf) but 0 from fused attention. Checked at the probe sizes; a -inf fill whose
    mask cannot be evaluated at the sample sizes counts as one that may."""
    inf_fill = any(math.isinf(fill) for _, fill, _, _ in terms.fills)
    if not inf_fill and not terms.adds:
        return False
    producers = m.graph.producers()
    if any(shape_only_nodes(v, producers) is None for v in terms.values()):
        return False  # a mask from the inputs: _neg_inf_fill_from_inputs decides
    probes = mask_probes(m.graph, terms.values(), m.producers)
    for index, sizes in enumerate(probes.sizes):
        bias = terms.evaluate_sum(m, sizes)
        if bias is None:
            # a long probe the mask cannot be built at (a buffer shorter than it): the
            # model cannot run there either
            if inf_fill and index < probes.required:
                return True
            continue
        if bias.dim() > 0 and bool(torch.isneginf(bias).all(-1).any()):
            return True
    return False


def _cached_neg_inf_rows(forms: dict | None, m: Match, terms: _Terms) -> bool:
    """_neg_inf_rows_in_shape_mask, once per mask per pass run (every layer reads the same
    mask value)."""
    if forms is None or terms.empty():
        return not terms.empty() and _neg_inf_rows_in_shape_mask(m, terms)
    key = ("neg_inf_rows", terms.key())
    if key not in forms:  # the entry holds the mask values too, so no id in a key is reused
        forms[key] = (_neg_inf_rows_in_shape_mask(m, terms), terms.values())
    return forms[key][0]


def _emit_attention(m: Match, b, q, k, v, terms: _Terms, scale: float, causal: bool, softcap: float | None = None,
                    unfold: tuple | None = None, forms: dict | None = None,
                    softmax_spelled: bool = False) -> Value | None:
    """attention(q, k, v, [bias], [slopes]) {causal, scale, softcap?, window?, alibi?}.
    A shape-only mask becomes the causal / window / alibi attributes when `_mask_form`
    proves what it computes, else it stays the bias input. `unfold` = (B, H): q, k, v come
    with the heads folded into the batch but the softmax saw [B, H, Tq, Tk] (bloom): they
    are viewed as [B, H, T, D], and the result back as the root's [B*H, Tq, D]."""
    root = m.root.outputs[0]
    attrs: dict = {}
    slopes = window = None
    model_fills = terms.model_fills  # (a mask folded into causal / window leaves none in the graph)
    if q.rank not in (3, 4) or k.rank != q.rank or v.rank != q.rank:
        return None
    if not q.dtype == k.dtype == v.dtype:
        # softmax and @ v in a wider dtype than q k^T (float32 q, k with float64 values):
        # the op computes in one dtype, and neither q k^T in the wide one (a different
        # rounding of the scores) nor the values in the narrow one is what eager computes
        return None
    if unfold is not None:
        if q.rank != 3 or not all(dims_equal(x.shape[0], unfold[0] * unfold[1]) for x in (q, k, v)):
            return None
        q, k, v = (b.emit("view", x, shape=tuple(unfold) + tuple(x.shape[1:])) for x in (q, k, v))
    if not causal and not terms.empty():
        form = _cached_mask_form(forms, m, terms, q, k)
        if form is not None and m.attrs.get("exact_mask") and not form.exact:
            form = None  # (attention sinks: a constant per row changes the answer, so the mask stays a bias)
        if form is not None:
            terms, causal = _Terms(), form.causal
            window = form.window
            if form.slopes is not None:
                slopes = _slopes_param(m.graph, form.slopes)
    # (a sink column keeps a row whose keys are all -inf finite: eager gives 0 there, as the op does)
    empty_rows_ok = bool(m.attrs.get("sink_column"))
    if softmax_spelled and not empty_rows_ok and _neg_inf_fill_from_inputs(m, terms):
        if forms is not None:
            forms.setdefault(NAN_ROWS, []).append(m.root)
        return None
    if softmax_spelled and not empty_rows_ok and _cached_neg_inf_rows(forms, m, terms):
        if forms is not None:
            forms.setdefault(EMPTY_ROWS, []).append(m.root)
        return None
    # a bias from the inputs that may hold -inf (a user's float mask): NaN where eager's is
    # the op computes (and adds its bias) in float32, float64 for float64 operands
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    nan_rows = softmax_spelled and not empty_rows_ok and _cached_nan_rows(forms, m, terms, acc)
    if nan_rows and (causal or window is not None):
        # causal / window drop keys the bias does not show: the bias's row max does not say
        # which rows eager drops whole (a fill over an add is in the bias as eager has it)
        if forms is not None:
            forms.setdefault(NAN_ROWS_UNKNOWN, []).append(m.root)
        return None
    folded = q.rank == 3  # heads folded into the batch: [B*H, T, D]
    if folded and slopes is not None:
        return None  # per-head slopes need the heads apart
    bias = None if terms.empty() else terms.build(m, b, acc)
    if not terms.empty() and bias is None:
        return None
    if folded:
        q, k, v = (b.emit("unsqueeze", x, dim=0) for x in (q, k, v))
        if bias is not None and bias.rank == 3:
            bias = b.emit("unsqueeze", bias, dim=0)
    if bias is not None and bias.rank < 4:
        for _ in range(4 - bias.rank):
            bias = b.emit("unsqueeze", bias, dim=0)
    if softcap is not None:
        attrs["softcap"] = float(softcap)
    if window is not None:
        attrs["window"] = int(window)
    if slopes is not None:
        attrs["alibi"] = True
    inputs = [q, k, v] + ([bias] if bias is not None else []) + ([slopes] if slopes is not None else [])
    attrs.update(causal=causal, scale=float(scale))
    try:
        OPS["attention"].infer([x.type for x in inputs], attrs)
    except IRTypeError:
        # sizes the IR cannot prove equal (MHA's cross-attention: the memory's batch B1 is
        # B only by a guard, so its head dim reads floor(8*B1/B)): the ops run as written
        return None
    out = b.emit("attention", *inputs, **attrs)
    if nan_rows:
        out = _nan_where_eager_is(b, out, bias)
    if folded:
        out = b.emit("squeeze", out, dims=(0,))
    if unfold is not None:
        out = b.emit("view", out, shape=tuple(root.shape))
    if out.dtype != root.dtype:
        out = b.cast(out, root.dtype)
    if not out.type.same_as(root.type):
        return None
    _record_fills(m.graph, model_fills, q.dtype, m.root)
    return out


# The float dtypes OptimizedModel.to() may retype a graph to (runtime/retarget.py).
_RETARGET_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _record_fills(graph, fills: list[tuple[float, torch.dtype]], dtype: torch.dtype, root) -> None:
    """Note in the graph's signature (a `fill` entry of fixed_dtypes, ir/roles.py) each
    float dtype that cannot hold a masked_fill value the fused op now stands for: eager's
    masked_fill raises in it (-1e9 in float16), so OptimizedModel.to() must refuse it, and
    no IR line holds the number any more (a causal mask folds whole; a bias keeps it scaled,
    in float32). A value equal to a torch.finfo value of the model's dtype is left out: the
    model most likely computed it from its dtype (torch.finfo(x.dtype).min), which in
    another dtype fills that dtype's own, a key dropped all the same.

    Only a fill into scores of `dtype` (q's, the model's) counts: there the scores follow
    model.to(). Scores the model upcast first (`s.float().masked_fill(m, -1e9)` in a
    bfloat16 model) are filled in that fixed dtype whatever the model's, which held the
    value at capture, so no model dtype makes eager raise."""
    entries = list(graph.signature.get("fixed_dtypes", ()))
    for value, filled in fills:
        if filled != dtype or math.isinf(value) or math.isnan(value) or finfo_name(value, dtype):
            continue
        for target in _RETARGET_FLOATS:
            most = float(torch.finfo(target).max)
            if abs(value) <= most:
                continue
            said = f"masked_fill's value {value!r} does not fit in {target} "  # (once per value: every layer's)
            if not any(e[1] == roles.FIXED_FILL and e[2].startswith(said) for e in entries):
                entries.append((target, roles.FIXED_FILL,
                                f"{said}(max {most:g}): torch's masked_fill raises on it; a model that fills with "
                                f"torch.finfo(x.dtype).min works in every dtype (folded into fused attention"
                                f"{root.where() or ' in the model forward()'})"))
    if len(entries) != len(graph.signature.get("fixed_dtypes", ())):
        graph.signature = {**graph.signature, "fixed_dtypes": tuple(entries)}


def fuse_sdpa(m: Match, b, forms: dict | None = None) -> Value | None:
    """sdpa(q, k, v, [mask]) {causal, scale, enable_gqa} -> attention."""
    node = m.root
    q, k, v = node.inputs[:3]
    k, n_k = _strip_repeat_kv(m, k, b)
    v, n_v = _strip_repeat_kv(m, v, b)
    if n_k != n_v:
        return None
    causal = node.attrs["causal"]
    if causal and q.shape[-2] != k.shape[-2]:
        return None  # SDPA's is_causal is top-left aligned when Tq != Tk; ours is bottom-right
    terms = _Terms()
    if len(node.inputs) == 4:
        mask = node.inputs[3]
        if mask.dtype == torch.bool:
            terms.fill(mask, float("-inf"), False, None)
        else:
            terms.add(mask, 1.0, None)
    return _emit_attention(m, b, q, k, v, terms, node.attrs["scale"], causal, forms=forms)


# In-place scalar ops (torch.export keeps falcon's `scores.div_(c)` / `mul_(c)` as calls):
# on scores nobody else reads they are the out-of-place op.
_INPLACE_SCALE = {"aten.mul_.Tensor": "mul", "aten.mul_.Scalar": "mul", "aten.div_.Tensor": "div",
                  "aten.div_.Scalar": "div"}


def _made_fresh(producer) -> bool:
    """A value made by this node is a tensor of its own: not a graph input or weight (no
    producer), nor a view, whose in-place write reaches a tensor the IR reads elsewhere
    (torch.compile's graphs keep `x.mul_(3)` and `x[:, 1].mul_(3)` as such calls)."""
    return producer is not None and producer.op in OPS and OPS[producer.op].kind != "view"


def _inplace_scale(m: Match, node) -> tuple[str, float] | None:
    """('mul' | 'div', c) for an in-place scalar mul_/div_ on a value read only by it."""
    if node.op != "torch_call" or node.attrs["target"] not in _INPLACE_SCALE or len(node.inputs) != 1:
        return None
    args = node.attrs["args"]
    if len(args) != 2 or node.attrs["kwargs"] or not isinstance(args[1], (int, float)) or isinstance(args[1], bool):
        return None
    if m.uses(node.inputs[0]) != 1 or not node.inputs[0].type.same_as(node.outputs[0].type):
        return None
    if not _made_fresh(m.producers.get(node.inputs[0])):
        return None
    return _INPLACE_SCALE[node.attrs["target"]], float(args[1])


def _head_fold(inner: Value, outer: Value) -> tuple | None:
    """(B, H) when a view between `inner` and `outer` only folds or unfolds the heads of
    [B, H, Tq, Tk] scores into / out of the batch ([B*H, Tq, Tk])."""
    a, c = (inner, outer) if inner.rank == 4 else (outer, inner)
    if a.rank != 4 or c.rank != 3 or not all(dims_equal(x, y) for x, y in zip(a.shape[2:], c.shape[1:])):
        return None
    return (a.shape[0], a.shape[1]) if dims_equal(a.shape[0] * a.shape[1], c.shape[0]) else None


def fuse_matmul_softmax_matmul(m: Match, b, forms: dict | None = None) -> Value | None:
    """matmul(softmax(scores), v) where scores = q @ k^T, scaled, soft-capped and masked,
    possibly with the heads folded into the batch on one side of the softmax (bloom)."""
    p, v = m["p"], m["v"]
    # the dtype the fused op computes in (q, k and v's): every value between the scores
    # matmul and this one must hold all of its values, or a rounding would be dropped
    dtype = v.dtype
    # one softmax's probabilities read by several matmuls (diffllama's two value halves;
    # its two eager attention calls, merged by CSE): each matmul is its own attention
    shared = p if m.uses(p) > 1 and _read_as_probabilities_only(m, p, forms) else None
    if shared is not None and (cast := _producer(m, p, "cast")) is not None and cast.inputs[0].dtype.is_floating_point \
            and _holds(cast.inputs[0].dtype, dtype):
        p = cast.inputs[0]  # softmax(.., dtype=f32).to(bf16), the cast read by both
    p = _strip_casts(m, p, dtype)
    fold = None
    view = _producer(m, p, "view")
    if view is not None and m.uses(p) == 1 and p.rank == 3:
        fold = _head_fold(view.inputs[0], p)
        if fold is None:
            return None
        p = _strip_casts(m, view.inputs[0], dtype)
    soft = _producer(m, p, "softmax")
    if soft is None or soft.attrs["dim"] != p.rank - 1 or (m.uses(p) > 1 and p is not shared):
        return None
    if not (_holds(p.dtype, dtype) and _holds(soft.inputs[0].dtype, dtype)):
        return None  # a softmax in a narrower dtype than the op's: its rounding is not the op's
    s = soft.inputs[0]
    # softmax(x - max(x)) (mimo_v2_flash): the scores x are read by the max and the sub
    s, reads = (x, 2) if (x := _row_max_subtracted(m, s)) is not None else (s, 1)
    term_fold = None  # (B, H) once the walk crosses the view that unfolded [B*H] scores
    terms, post_scale = _Terms(), 1.0
    softcap = None  # the multiplier after a tanh: tanh(x) * cap
    while True:
        if m.uses(s) > reads:
            return None  # the scores are used elsewhere (e.g. returned): keep them
        reads = 1
        s = _strip_casts(m, s, dtype)
        if not _holds(s.dtype, dtype):
            return None  # scores rounded to a narrower dtype than the op computes in
        node = m.producers.get(s)
        if node is None:
            return None
        if node.op == "matmul":
            break
        scale_op = (node.op, None) if node.op in ("mul", "div") else _inplace_scale(m, node)
        if scale_op is not None:
            if scale_op[1] is None:
                x, c = node.inputs  # the constant is last (cleanup's canonical form)
                c_val = _const_value(m, c)
            else:
                x, c_val = node.inputs[0], scale_op[1]
            if c_val is None or c_val == 0:
                return None
            post_scale *= c_val if scale_op[0] == "mul" else 1.0 / c_val
            s = x
        elif node.op == "tanh" and softcap is None:
            # tanh(x) * cap: a soft-cap (Gemma2, Grok); nothing may be added before it
            if not terms_ok_for_softcap(post_scale):
                return None
            softcap, post_scale = post_scale, 1.0
            s = node.inputs[0]
        elif node.op == "view" and fold is None and term_fold is None and terms.empty() and softcap is None \
                and post_scale == 1.0 and s.rank == 3 and node.inputs[0].rank == 4:
            # [B, H, Tq, Tk] scores folded to [B*H, Tq, Tk] for a 3-D softmax (XGLM): the
            # terms before it are added unfolded, the matmuls are 3-D
            fold = _head_fold(node.inputs[0], s)
            if fold is None:
                return None
            s = node.inputs[0]
        elif node.op == "torch_call" and node.attrs["target"] in _FLOOR_TARGETS and terms.floor is None \
                and terms.empty() and softcap is None and post_scale == 1.0 and len(node.inputs) == 2:
            x, c = node.inputs
            c_val = _const_value(m, c)
            if c_val is None or c_val > MASK_FILL_MAX or not x.type.same_as(s.type):
                return None
            terms.floor = c_val
            s = x
        elif node.op == "view" and term_fold is None and s.rank == 4 and (fold is not None or node.inputs[0].rank == 3):
            # [B*H, Tq, Tk] scores unfolded to [B, H, Tq, Tk] before the softmax (bloom; with
            # [B, H, T, D] values, gpt_neox_japanese: only q k^T is folded)
            term_fold = _head_fold(node.inputs[0], s)
            if term_fold is None:
                return None
            s = node.inputs[0]
        elif node.op in ("add", "sub", "where") and softcap is not None:
            return None  # a bias before the soft-cap: not what the op computes
        elif node.op in ("add", "sub"):
            a, c = node.inputs
            # the scores side is the one that leads back to the matmul; the other is a bias
            side = _scores_side(m, a, c)
            if side is None or (node.op == "sub" and side[0] is not a):
                return None  # (bias - scores: the scores negated)
            s, bias = side
            # s - bias: the bias times -1 (exact), scaled with the scores after it
            sign = -1.0 if node.op == "sub" else 1.0
            if not (_is_zeros(m, bias) and s.type.same_as(node.outputs[0].type)):
                terms.add(bias, sign * post_scale, term_fold)  # (x + 0 is x: baddbmm's zeros)
                terms.post_scales.append(post_scale)
        elif node.op == "where":
            mask, x, y = node.inputs
            if mask.dtype != torch.bool:
                return None
            fx, fy = _const_value(m, x), _const_value(m, y)
            if fx is not None and fx <= MASK_FILL_MAX and y.rank == s.rank:
                terms.fill(mask, fx * post_scale if post_scale > 0 else None, True, term_fold)
                filled, s = x, y
            elif fy is not None and fy <= MASK_FILL_MAX and x.rank == s.rank:
                terms.fill(mask, fy * post_scale if post_scale > 0 else None, False, term_fold)
                filled, s = y, x
            else:
                return None
            if (const := _producer(m, filled, "const")) is not None and const.attrs.get("fill"):
                terms.model_fills.append((float(const.attrs["value"]), node.outputs[0].dtype))
            if terms.fills[-1][1] is None:
                return None
            terms.post_scales.append(post_scale)
        else:
            return None  # an op we cannot prove harmless
    if fold is not None and (term_fold is None or not all(dims_equal(x, y) for x, y in zip(fold, term_fold))):
        return None  # the softmax saw [B, H, Tq, Tk], the matmuls did not fold it that way
    q, kt = node.inputs
    if q.rank not in (3, 4) or kt.rank != q.rank:
        return None
    if fold is not None and (q.rank != 3 or v.rank != 3):
        return None
    # q k^T on [B*H, T, D] viewed to [B, H, Tq, Tk] for the softmax, the values [B, H, T, D]
    # (gpt_neox_japanese): q and k are viewed to [B, H, T, D] for the op
    qk_folded = term_fold if fold is None else None
    if qk_folded is not None and (q.rank != 3 or v.rank != 4 or not dims_equal(q.shape[0], qk_folded[0] * qk_folded[1])):
        return None
    q, q_scale = _strip_scale(m, q)
    q, kt = _widened_from(m, q, dtype), _widened_from(m, kt, dtype)
    swap = tuple(range(kt.rank - 2)) + (kt.rank - 1, kt.rank - 2)
    kt_node = _producer(m, kt, "permute")
    k_scale = 1.0
    n_k = 1
    if kt_node is not None and m.uses(kt) == 1:
        inner, k_scale = _strip_scale(m, kt_node.inputs[0])
        inner = _widened_from(m, inner, dtype)
        dims = tuple(kt_node.attrs["dims"][d] for d in swap)
        repeated = _repeated_before_transpose(m, inner) if dims == (0, 2, 1, 3) else None
        if repeated is not None:  # Meta's repeat_kv on [B, T, H, D], then k^T
            (inner, n_k), dims = repeated, (0, 2, 1, 3)
        k = inner if dims == tuple(range(4))[:len(dims)] and len(dims) == inner.rank else \
            b.emit("permute", inner, dims=dims)
    else:
        k = b.emit("permute", kt, dims=swap)
    if qk_folded is not None:
        if not dims_equal(k.shape[0], q.shape[0]):
            return None
        q, k = (b.emit("view", x, shape=tuple(qk_folded) + tuple(x.shape[1:])) for x in (q, k))
    if n_k == 1:
        k, n_k = _strip_repeat_kv(m, k, b)
    v, n_v = _strip_repeat_kv(m, v, b)
    if n_k != n_v or not _batch_matches(q, k, v):
        return None
    scale = post_scale * q_scale * k_scale
    if not math.isfinite(scale) or scale <= 0:
        return None
    if softcap is not None:
        # tanh(scale_in * qk) * cap == tanh(scale * qk / cap) * cap with scale = scale_in * cap
        if not (math.isfinite(softcap) and softcap > 0):
            return None
        scale *= softcap
    return _emit_attention(m, b, q, k, v, terms, scale, causal=False, softcap=softcap, unfold=fold, forms=forms,
                           softmax_spelled=True)


# The row max of x over its last dim, kept: torch.max(x, -1, keepdim=True).values, amax(x, -1, keepdim=True)
_ROW_MAX_CALLS = ("aten.max.dim",)


def _row_max_of(m: Match, mx: Value) -> Value | None:
    """x when `mx` is x's max over its last dim with keepdim (torch.max(x, dim=-1,
    keepdim=True).values, whose indices nobody reads, or amax(x, -1, keepdim=True))."""
    node = m.producers.get(mx)
    if node is None or len(node.inputs) != 1:
        return None
    x = node.inputs[0]
    last = (x.rank - 1, -1)
    if node.op == "amax":
        return x if tuple(node.attrs["dims"]) in ((d,) for d in last) and node.attrs["keepdim"] else None
    if node.op != "torch_call" or node.attrs["target"] not in _ROW_MAX_CALLS or node.outputs[0] is not mx:
        return None
    args, kwargs = node.attrs["args"], dict(node.attrs["kwargs"])
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
    if dim not in last or keepdim is not True or any(m.uses(v) for v in node.outputs[1:]):
        return None
    return x


def _row_max_subtracted(m: Match, s: Value) -> Value | None:
    """x when the softmax input `s` is x - max(x) over the softmax dim, kept (mimo_v2_flash's
    "subtract max for BF16/FP16 stability"), with x read by those two only: softmax does
    that subtraction itself, so softmax(x - max(x)) is softmax(x) -- in float32 the very
    same roundings (the second max is 0; in bf16/fp16 eager rounds x - max(x) to the
    narrow dtype, one more of the score roundings, like those of the scale and the mask,
    that the fused op computes in float32), and NaN where eager's is NaN: a row of all -inf
    (or with a +inf, or a NaN) is NaN both ways, and the masks that give such rows stay
    refused below (NAN_ROWS / EMPTY_ROWS). Neither the max of another tensor, nor over
    another dim, nor without keepdim (which would not broadcast along the keys)."""
    node = m.producers.get(s)
    if node is None or node.op != "sub" or m.uses(s) != 1:
        return None
    x, mx = node.inputs
    if not x.type.same_as(s.type) or m.uses(mx) != 1 or _row_max_of(m, mx) is not x or m.uses(x) != 2:
        return None
    return x


def _is_zeros(m: Match, v: Value) -> bool:
    """`v` is all zeros: full(0) (baddbmm's `beta * zeros` input) or a constant 0."""
    node = m.producers.get(v)
    if node is not None and node.op == "full":
        value = node.attrs.get("value")
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0
    return _const_value(m, v) == 0


def _read_as_probabilities_only(m: Match, p: Value, forms: dict | None) -> bool:
    """Every reader of `p` is a matmul with `p` as its left operand only (and `p` is no
    graph output): each such matmul fuses as an attention of its own, computing exactly
    what it did, and once all have, the softmax is dead. A softmax whose probabilities
    also reach anything else (returned attention weights) stays."""
    if p in m.graph.outputs:
        return False
    readers = _users(m.graph, forms).get(p, [])
    return len(readers) > 1 and all(n.op == "matmul" and n.inputs[0] is p and n.inputs[1] is not p for n in readers)


def _users(graph, forms: dict | None) -> dict:
    """graph.users(), once per graph per pass run (the driver hands every match of a
    sweep the same graph)."""
    if forms is None:
        return graph.users()
    key = ("users", id(graph))
    if key not in forms or forms[key][0] is not graph:  # the entry holds the graph, so no id is reused
        forms[key] = (graph, graph.users())
    return forms[key][1]


def terms_ok_for_softcap(cap: float) -> bool:
    """tanh(x) * cap with a positive finite cap (a negative one flips the scores' sign)."""
    return math.isfinite(cap) and cap > 0


def _batch_matches(q: Value, k: Value, v: Value) -> bool:
    """K/V may broadcast over query heads (one K/V head: multi-query attention written as a
    plain broadcasting matmul, falcon and gpt_bigcode), but their batch must be q's, and
    their heads must divide q's."""
    if q.rank == 4:
        if not (dims_equal(k.shape[0], q.shape[0]) and dims_equal(v.shape[0], q.shape[0])):
            return False
        return dims_equal(k.shape[1], v.shape[1])
    return dims_equal(k.shape[0], q.shape[0]) and dims_equal(v.shape[0], q.shape[0])


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
            if node.op not in ("mul", "div", "cast", "add", "sub", "where", "view", "tanh") and not (
                    node.op == "torch_call" and node.attrs["target"] in _INPLACE_SCALE and node.inputs):
                break
            # (zeros + scores: baddbmm's input first)
            x = node.inputs[1] if node.op == "where" or node.op == "add" and _is_zeros(m, node.inputs[0]) \
                else node.inputs[0]
    return None


def rules(forms: dict | None = None) -> list[Rule]:
    """The rule table; `forms` caches what each mask computes for one pass run."""
    from .attention_sinks import rules as sink_rules  # it builds on this module's walker

    # before -> after
    return sink_rules(forms) + [
        # sdpa(q, k, v, [mask]) -> attention(q, k, v, [bias]) {causal, scale}
        Rule("sdpa", op("sdpa", any_inputs=True), functools.partial(fuse_sdpa, forms=forms)),
        # matmul(softmax(q @ k^T * s [+ mask]), v) -> attention(q, k, v, [bias]) {causal, scale}
        Rule("matmul_softmax_matmul", op("matmul", var("p"), var("v")),
             functools.partial(fuse_matmul_softmax_matmul, forms=forms)),
    ]


RULES = rules()


def _which(node) -> str:
    """'the one (from <module>)', or where the model's own forward holds it: 'the one in the
    model's forward' (a node made there has no module path)."""
    return f"the one{node.where()}" if node.where() else "the one in the model's own forward()"


def fuse_attention(graph, ctx=None):
    from collections import Counter

    stats = ctx.rules if ctx is not None else Counter()
    graph = graph.with_nodes(graph.nodes)  # a copy: rules add parameters (ALiBi slopes) to it
    forms: dict = {}
    out = _drop_dead_inplace(apply_rules(graph, rules(forms=forms), stats, pass_name="fuse_attention"))
    # heads that a model folded into the batch around its matmuls (XGLM, bloom) leave view
    # pairs on both sides of the fused op ([B, H, T, D] -> [B*H, T, D] -> [B, H, T, D]);
    # collapse them now, so that the passes before the final cleanup (gqa, kv_cache) see
    # the head layout
    out = dead_code_elimination(apply_rules(out, _VIEW_RULES, stats, pass_name="fuse_attention"))
    fused = out.count("attention")
    if ctx is not None:
        ctx.details["attention_fused"] = fused
        atts = [n for n in out.nodes if n.op == "attention"]
        causal = sum(1 for n in atts if n.attrs["causal"])
        variants = {name: sum(1 for n in atts if n.attrs.get(name) not in (None, False))
                    for name in ("softcap", "window", "alibi", "sinks")}
        extra = "".join(f", {count} {name}" for name, count in variants.items() if count)
        ctx.note(f"{fused} attention ops ({causal} causal, {fused - causal} with explicit or no mask{extra})")
        nan_rows, empty_rows = _declined(forms, NAN_ROWS), _declined(forms, EMPTY_ROWS)
        unknown_rows = _declined(forms, NAN_ROWS_UNKNOWN)
        # those have a note of their own, which says why: not also "spelling not known"
        left = _unfused_attention(out, explained={n.outputs[0] for n in nan_rows + empty_rows + unknown_rows})
        if nan_rows:
            ctx.note(f"{len(nan_rows)} attention(s) left unfused, e.g. {_which(nan_rows[0])}: the scores are "
                     "filled with -inf where a mask from the inputs says, and a row it drops entirely is NaN in "
                     "eager (softmax of all -inf) but 0 from fused attention (SDPA's convention), so fusing "
                     "would change the answer there; fill with torch.finfo(dtype).min (as transformers does) or "
                     "call F.scaled_dot_product_attention to have it fused")
        if empty_rows:
            ctx.note(f"{len(empty_rows)} attention(s) left unfused, e.g. {_which(empty_rows[0])}: the "
                     "mask leaves some query row no key and fills with -inf, so eager gives NaN on that row "
                     "(softmax of all -inf) where fused attention gives 0; the ops run as written")
        if unknown_rows:
            ctx.note(f"{len(unknown_rows)} attention(s) left unfused, e.g. {_which(unknown_rows[0])}: a "
                     "bias computed from the inputs (or from the length, at lengths too long to probe) may hold -inf, and "
                     "with the causal or sliding-window mask the op applies itself it decides which query rows "
                     "keep no key (NaN in eager, 0 from fused attention) in a way the bias alone does not "
                     "show; the ops run as written. Use finite values (torch.finfo(dtype).min) to have it fused")
        returned = [n for n in left if _probabilities_returned(out, n)]
        if returned:
            ctx.note(f"{len(returned)} attention(s) left unfused, e.g. {_which(returned[0])}: the model "
                     "returns the attention probabilities too (output_attentions=True, nn.MultiheadAttention's "
                     "need_weights=True), which fused attention never makes; the ops run as written. Drop that "
                     "output to have them fused")
        left = [n for n in left if n not in returned]
        if left:
            ctx.note(f"{len(left)} softmax ops whose probabilities feed a matmul (attention, by the look of it) "
                     f"were not fused, e.g. {_which(left[0])}: its spelling is not one this pass proves the "
                     "same as attention (docs/coverage.md lists the known ones), so it runs as separate ops, "
                     "and kv_cache=True, which caches fused attention, declines the model")
    return out


def _declined(forms: dict, reason: str) -> list:
    """The roots of the attentions declined for `reason`, each once: every sweep of the
    rule driver tries a declined match again, and records it again."""
    return list({n.outputs[0]: n for n in forms.get(reason, [])}.values())


def _unfused_attention(graph, explained=frozenset()) -> list:
    """The softmax nodes left whose output reaches a matmul through casts and views alone
    (Bloom's `.to(dtype)` then `.view(B * H, T, S)` before its bmm): attention the rules did
    not take (a router's softmax feeds a top-k instead). `explained`: the results of matmuls
    declined for a reason already noted, left out."""
    users = graph.users()
    return [node for node in graph.nodes if node.op == "softmax"
            and any(n.op == "matmul" and n.outputs[0] not in explained
                    for n in readers_through(users, node.outputs, lambda n: n.op in ("cast", "view", "reshape"), 4))]


def _probabilities_returned(graph, softmax) -> bool:
    """The softmax's probabilities reach a graph output (through casts, views and pointwise
    ops: need_weights averages them over the heads)."""
    users, outputs = graph.users(), set(graph.outputs)
    seen, todo = set(), list(softmax.outputs)
    while todo and len(seen) < 64:
        v = todo.pop()
        if v in outputs:
            return True
        seen.add(v)
        for n in users.get(v, ()):
            if n.op in ("cast", "view", "reshape", "permute", "mean", "sum", "div", "mul", "squeeze", "unsqueeze"):
                todo.extend(x for x in n.outputs if x not in seen)
    return False


_VIEW_RULES = [r for r in CLEANUP_RULES if r.name in ("view_noop", "view_of_view")]


def _drop_dead_inplace(graph):
    """An in-place scalar op (falcon's scores.div_(c)) whose result nobody reads, on a value
    only it reads, changes nothing anyone sees: once its scores were fused away, drop it (dead-
    code elimination keeps in-place calls, which in general write memory others read). One on a
    graph input, weight or view stays: what it writes is read outside the value."""
    uses = graph.use_counts()
    producers = {v: n for n in graph.nodes for v in n.outputs}
    kept = [n for n in graph.nodes
            if not (n.op == "torch_call" and n.attrs["target"] in _INPLACE_SCALE and len(n.inputs) == 1
                    and uses.get(n.outputs[0], 0) == 0 and uses.get(n.inputs[0], 0) == 1
                    and n.outputs[0] not in graph.outputs and _made_fresh(producers.get(n.inputs[0])))]
    return graph if len(kept) == len(graph.nodes) else dead_code_elimination(graph.with_nodes(kept))
