"""What a value can hold on any call: a finite interval [lo, hi] worked out from the ops
that compute it, or None where they do not say. Interval arithmetic on exact rationals,
each result rounded to nearest into its dtype as eager rounds it (float16 and bfloat16
arithmetic may round through float32 first: widened for that); an integer or bool value is
bounded by its dtype. fuse_attention asks it whether an attention bias built from the inputs
is finite on every input (passes/fuse_attention.py, "rows eager makes NaN")."""
from __future__ import annotations

import functools
import math

import torch

from ..ir.graph import Graph, Value

# ops whose results hold only values of their first input
_SAME_VALUES = ("view", "expand", "unsqueeze", "squeeze", "permute", "slice", "select", "repeat_interleave")
# opaque calls that only pick elements of their first input
_PICKS = ("aten.index.Tensor", "aten.gather.default", "aten.clone.default", "aten.contiguous.default",
          "aten.flip.default", "aten.roll.default")
# (a mask subgraph is small; past this depth the bound is not worked out)
_MAX_BOUND_DEPTH = 200


def _ceil_in(x, dtype):
    """The least `dtype` value >= the rational `x`, as a Fraction; past the largest finite
    one, the value one step beyond it (fmax + its ulp), where rounding to nearest turns
    to inf halfway."""
    from fractions import Fraction

    fmax = Fraction(torch.finfo(dtype).max)
    if x > fmax:
        below = torch.nextafter(torch.tensor(torch.finfo(dtype).max, dtype=dtype), torch.tensor(0.0, dtype=dtype))
        return 2 * fmax - Fraction(float(below))
    if x <= -fmax:
        return -fmax
    v = torch.tensor(float(x), dtype=torch.float64).to(dtype)
    up = torch.tensor(math.inf, dtype=dtype)
    while Fraction(float(v)) < x:  # (float(x) and the cast each round once)
        v = torch.nextafter(v, up)
    return Fraction(float(v))


# f16 and bf16 arithmetic may round to float32 first, then to the narrow dtype
_ROUNDED_TWICE = {torch.float16: 2.0 ** -24, torch.bfloat16: 2.0 ** -24}


def _nearest_in(x, dtype, up: bool):
    """x rounded to nearest in `dtype` (a tie to the side `up` says), as a Fraction, and
    beyond the largest finite value where that rounding gives inf."""
    c, f = _ceil_in(x, dtype), -_ceil_in(-x, dtype)
    return c if (c - x < x - f) or (c - x == x - f and up) else f


def rounded(lo, hi, dtype) -> tuple[float, float] | None:
    """[lo, hi] (exact rationals) rounded into `dtype` as its arithmetic rounds (to nearest;
    monotone, so the ends bound every result), widened by a float32 rounding first where
    the dtype's arithmetic may do one; None if a result may be infinite."""
    from fractions import Fraction

    if not dtype.is_floating_point:
        return None
    lo, hi = Fraction(lo), Fraction(hi)
    twice = Fraction(_ROUNDED_TWICE.get(dtype, 0.0))
    lo, hi = lo - abs(lo) * twice, hi + abs(hi) * twice
    lo_d, hi_d = _nearest_in(lo, dtype, up=False), _nearest_in(hi, dtype, up=True)
    fmax = Fraction(torch.finfo(dtype).max)
    return (float(lo_d), float(hi_d)) if -fmax <= lo_d and hi_d <= fmax else None


def _dtype_range(dtype) -> tuple[float, float] | None:
    if dtype == torch.bool:
        return 0.0, 1.0
    if not dtype.is_floating_point and not dtype.is_complex:
        info = torch.iinfo(dtype)
        return float(info.min), float(info.max)
    return None


def interval(op: str, a, c):
    """op(x, y) over x in a, y in c, as exact rationals (None: not bounded)."""
    from fractions import Fraction

    (a0, a1), (c0, c1) = ((Fraction(lo), Fraction(hi)) for lo, hi in (a, c))
    if op == "add":
        return a0 + c0, a1 + c1
    if op == "sub":
        return a0 - c1, a1 - c0
    if op == "maximum":
        return max(a0, c0), max(a1, c1)
    if op == "minimum":
        return min(a0, c0), min(a1, c1)
    if op == "div" and (c0 > 0 or c1 < 0):
        ends = [x / y for x in (a0, a1) for y in (c0, c1)]
    elif op == "mul":
        ends = [x * y for x in (a0, a1) for y in (c0, c1)]
    else:
        return None
    return min(ends), max(ends)


def bound(graph: Graph, producers: dict, v: Value, memo: dict, depth: int = 0) -> tuple[float, float] | None:
    """(lo, hi), finite: every value `v` can hold on any call lies between them, or None
    when the ops that compute it do not say so. An integer or bool value is bounded by its
    dtype whatever its ops (a mask input, the cumsum of one)."""
    dtype = getattr(v.type, "dtype", None)
    if dtype is None:
        return None
    if (r := _dtype_range(dtype)) is not None:
        return r
    if v in memo:
        return memo[v]
    memo[v] = None  # (a cycle cannot happen in SSA; this only stops a repeat)
    memo[v] = result = _bound_of_producer(graph, producers, v, memo, depth) if depth < _MAX_BOUND_DEPTH else None
    return result


def _bound_of_producer(graph: Graph, producers: dict, v: Value, memo: dict, depth: int):
    if v.param is not None:
        t = graph.params.get(v.param)
        if not isinstance(t, torch.Tensor) or t.numel() == 0 or not bool(torch.isfinite(t).all()):
            return None
        return float(t.min()), float(t.max())
    node = producers.get(v)
    if node is None:
        return None  # a float graph input: any value at all
    sub = functools.partial(bound, graph, producers, memo=memo, depth=depth + 1)
    op = node.op
    if op in ("const", "full"):
        value = node.attrs.get("value")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return None
        return rounded(value, value, v.dtype)
    if op == "torch_call" and node.attrs.get("target") in _PICKS and node.inputs:
        op = "view"
    if op in _SAME_VALUES or op == "cast" or op in ("neg", "abs", "tril", "triu", "clamp"):
        a = sub(node.inputs[0])
        if a is None:
            return None
        lo, hi = a
        if op == "neg":
            lo, hi = -hi, -lo
        elif op == "abs":
            lo, hi = (0.0 if lo <= 0 <= hi else min(abs(lo), abs(hi))), max(abs(lo), abs(hi))
        elif op in ("tril", "triu"):
            lo, hi = min(lo, 0.0), max(hi, 0.0)
        elif op == "clamp":
            low, high = node.attrs.get("min"), node.attrs.get("max")
            if any(x is not None and not isinstance(x, (int, float)) for x in (low, high)):
                return None
            lo, hi = (lo if low is None else max(lo, low)), (hi if high is None else min(hi, high))
            lo, hi = (lo if high is None else min(lo, high)), (hi if low is None else max(hi, low))
        return rounded(lo, hi, v.dtype)
    if op == "where" or op == "cat":
        parts = [sub(x) for x in (node.inputs[1:] if op == "where" else node.inputs)]
        if not parts or any(p is None for p in parts):
            return None
        return rounded(min(p[0] for p in parts), max(p[1] for p in parts), v.dtype)
    if op in ("add", "sub", "mul", "div", "maximum", "minimum") and len(node.inputs) == 2:
        # each operand is first converted to the result's dtype (an int64 mask times a float32 slope)
        parts = [sub(x) for x in node.inputs]
        parts = [None if p is None else rounded(*p, v.dtype) for p in parts]
        if any(p is None for p in parts):
            return None
        out = interval(op, *parts)
        return None if out is None else rounded(*out, v.dtype)
    return None
