"""torch.einsum equations that are one batched matrix product, as a plan of IR view ops
around one `matmul` (attention spelled 'bhqd,bhkd->bhqk' / 'bhqk,bhkd->bhqd', or with the
heads in dim 2, then looks to fuse_attention like the `q @ k.transpose(-2, -1)` spelling).

An index's role follows from where it appears (`ROLES`): in both inputs and the output a
batch index, in one input and the output a free one (a row of a, a column of b), in both
inputs only the contracted one. Planned only when that covers every index, exactly one
index is contracted, no subscript repeats within an operand or the output, there is no
ellipsis, and batch and contracted sizes are provably equal in both operands (no size-1
broadcasting). An equation that sums no index ('i,j->ij', an outer product: GPT-NeoX's
and lucidrains' rotary frequencies) is a broadcast product (`product_plan`): each operand
permuted into the output's order with size-1 dims where it lacks an index, then one `mul`,
the one multiplication per element einsum makes. Anything else (a trace, a sum over one
operand, three operands, two contracted indices) gets no plan and stays the opaque call.

The plan: each operand gets size-1 dims appended (unsqueeze) for the other operand's
extra free indices (and for a missing row or column), then one permute into
[batch..., extra free of a..., extra free of b..., m, k] and [..., k, n]; a `matmul`
(broadcasting over the size-1 dims: the same products einsum's own bmm sums); the size-1
row/column squeezed out; one permute into the output's order.
"""
from __future__ import annotations

from dataclasses import dataclass

from .types import dims_equal

# (in a, in b, in the output) -> role; a combination not listed declines the plan
ROLES = {
    (True, True, True): "batch",
    (True, False, True): "free_a",
    (False, True, True): "free_b",
    (True, True, False): "contracted",
}

_ONE = None  # a size-1 dim the plan adds


@dataclass(frozen=True)
class Operand:
    unsqueeze: int              # size-1 dims appended at the end first
    dims: tuple[int, ...]       # then this permute (identity: none)


@dataclass(frozen=True)
class MatmulPlan:
    a: Operand
    b: Operand
    squeeze: tuple[int, ...]    # size-1 row/column dims of the matmul result to drop
    out_dims: tuple[int, ...]   # then this permute into the output's order


def parse(equation: str, n_operands: int) -> tuple[list[str], str] | None:
    """'ij,jk->ik' -> (['ij', 'jk'], 'ik'); implicit output ('ij,jk') as torch forms it (the
    indices seen once, sorted: upper case first). None for ellipses or non-letters."""
    eq = "".join(equation.split())
    lhs, arrow, out = eq.partition("->")
    ins = lhs.split(",")
    if len(ins) != n_operands or not all(s.isalpha() and s.isascii() for s in ins):
        return None
    if not arrow:
        letters = "".join(ins)
        out = "".join(sorted(ch for ch in set(letters) if letters.count(ch) == 1))
    elif out and not (out.isalpha() and out.isascii()):
        return None
    return ins, out


def _order(letters, order: str) -> list[str]:
    return sorted(letters, key=order.index)


def _permute_to(src: list, target: list) -> tuple[int, ...]:
    return tuple(src.index(t) for t in target)


def plan(equation: str, shapes) -> MatmulPlan | None:
    """A MatmulPlan for a two-operand einsum of operands with these shapes, or None."""
    if len(shapes) != 2:
        return None
    parsed = parse(equation, 2)
    if parsed is None:
        return None
    (sa, sb), out = parsed
    if any(len(set(s)) != len(s) for s in (sa, sb, out)):
        return None  # 'ii->i', 'ij,jj->i', 'i,j->ii': diagonals, not a matmul
    if len(sa) != len(shapes[0]) or len(sb) != len(shapes[1]):
        return None
    role = {}
    for ch in set(sa) | set(sb) | set(out):
        r = ROLES.get((ch in sa, ch in sb, ch in out))
        if r is None:
            return None  # summed within one operand, or an output index no input has
        role[ch] = r
    by_role = {r: _order([ch for ch in role if role[ch] == r], out + sa + sb) for r in ROLES.values()}
    if len(by_role["contracted"]) != 1:
        return None  # no contracted index (an outer product), or several
    batch, free_a, free_b, (k,) = (by_role[r] for r in ("batch", "free_a", "free_b", "contracted"))
    size_a = dict(zip(sa, shapes[0]))
    size_b = dict(zip(sb, shapes[1]))
    if not all(dims_equal(size_a[ch], size_b[ch]) for ch in batch + [k]):
        return None  # size-1 broadcasting (or sizes we cannot prove equal)
    m = free_a[-1] if free_a else _ONE
    n = free_b[-1] if free_b else _ONE
    extra_a, extra_b = free_a[:-1], free_b[:-1]
    # size-1 placeholders, each a distinct token: ('1', i)
    ones_a = [("1", i) for i in range(len(extra_b) + (m is _ONE))]
    ones_b = [("1", i) for i in range(len(extra_a) + (n is _ONE))]
    m_tok = ones_a[-1] if m is _ONE else m
    n_tok = ones_b[-1] if n is _ONE else n
    target_a = batch + extra_a + ones_a[:len(extra_b)] + [m_tok, k]
    target_b = batch + ones_b[:len(extra_a)] + extra_b + [k, n_tok]
    op_a = Operand(len(ones_a), _permute_to(list(sa) + ones_a, target_a))
    op_b = Operand(len(ones_b), _permute_to(list(sb) + ones_b, target_b))
    result = batch + extra_a + extra_b + [m, n]
    squeeze = tuple(i for i, ch in enumerate(result) if ch is _ONE)
    result = [ch for ch in result if ch is not _ONE]
    return MatmulPlan(op_a, op_b, squeeze, _permute_to(result, list(out)))


__all__ = ["ROLES", "MatmulPlan", "Operand", "parse", "plan"]


@dataclass(frozen=True)
class ProductOperand:
    dims: tuple[int, ...]       # a permute into the output's order (identity: none)
    unsqueeze: tuple[int, ...]  # then size-1 dims at these positions, in order


def product_plan(equation: str, ranks: list[int]) -> list[ProductOperand] | None:
    """Two operands whose every index is in the output, once per subscript, and the output
    no index of its own: their product broadcast in the output's order (None otherwise)."""
    parsed = parse(equation, len(ranks))
    if parsed is None or len(ranks) != 2:
        return None
    ins, out = parsed
    if any(len(set(x)) != len(x) for x in (*ins, out)) or set("".join(ins)) != set(out) \
            or any(len(x) != r for x, r in zip(ins, ranks)):
        return None
    plan = []
    for x in ins:
        dims = tuple(sorted(range(len(x)), key=lambda i: out.index(x[i])))
        plan.append(ProductOperand(dims, tuple(i for i, ch in enumerate(out) if ch not in x)))
    return plan
