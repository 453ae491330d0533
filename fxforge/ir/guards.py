"""Guards: the conditions on a graph's size symbols under which it is the model's computation.

torch.export traces the model once, at the example's sizes. Where the model's code looks
at a size (`if x.shape[1] > 4`, a slice of a fixed-size buffer, a reshape that needs an
even length), the trace is only valid for the sizes that take the same path, and export
records that as a range (`T >= 5`, `T <= 64`) or a relation (`Eq(Mod(T, 2), 0)`). The
graph keeps them (`Graph.guards`, printed as `guard ...` lines), and the runtime checks
them on every call: a call outside them is an error, never a silently different answer.

One kind of condition is not kept: that a size is not 0 or 1 (`T >= 2`, `Ne(T, 1)`).
export traces at sizes >= 2 and records those for every dynamic size, on every model,
from its own operators (broadcasting, views), not from the model's code; keeping them
would refuse batch 1 and one-token decoding everywhere. fxforge assumes, as
torch.export's size-oblivious mode does, that code traced at a size >= 2 also holds at
1 (docs/ir.md, "Guards").
"""
from __future__ import annotations

import math
import re
from fractions import Fraction

import sympy
from sympy.printing.pycode import PythonCodePrinter

from .types import IntegerQuotients, TorchFunctions, symbol


class GuardError(ValueError):
    """A call's sizes are outside the conditions the graph was captured under."""


_SMALL = (0, 1, 2)


def is_size_specialization(rel) -> bool:
    """`e >= 2`, `e > 1`, `e >= 1`, `e > 0`, `Ne(e, 0)`, `Ne(e, 1)` (either side): the
    0/1 specialization export adds for every size, which fxforge does not guard."""
    if not isinstance(rel, sympy.core.relational.Relational):
        return False
    lhs, rhs = rel.lhs, rel.rhs
    if lhs.is_number and not rhs.is_number:
        rel = rel.reversed
        lhs, rhs = rel.lhs, rel.rhs
    if not rhs.is_number or rhs not in _SMALL:
        return False
    if not _is_size(lhs):
        # a condition on an expression of sizes (`Ne(Mod(T, 2), 0)`, `Ne(T - B, 0)`,
        # `T - B >= 2`) is the model's own branch, not export's 0/1 specialization: kept
        return _is_linear_specialization(rel)
    if isinstance(rel, sympy.Unequality):
        return rhs in (0, 1)
    if isinstance(rel, sympy.GreaterThan):  # e >= c
        return rhs <= 2
    if isinstance(rel, sympy.StrictGreaterThan):  # e > c
        return rhs <= 1
    return False


def _is_size(e) -> bool:
    """A size or a product of sizes (a flattened B*T dim): at least 1 whenever its
    factors are, which is what export's 0/1 specialization speaks of."""
    if e.is_Symbol:
        return True
    return bool(e.is_Mul) and all(f.is_Symbol or (f.is_Integer and f > 0) for f in e.args)


def _is_linear_specialization(rel) -> bool:
    """`a*T + b REL c` on one size that says only what a 0/1 specialization says of T
    (`Ne(T - 1, 0)` is `Ne(T, 1)`, `2*T >= 4` is `T >= 2`)."""
    if len(rel.free_symbols) != 1:
        return False
    (sym,) = rel.free_symbols
    diff = sympy.expand(rel.lhs - rel.rhs)
    if not diff.is_polynomial(sym) or sympy.degree(diff, sym) != 1:
        return False
    a, b = diff.coeff(sym, 1), diff.coeff(sym, 0)
    if not (a.is_Rational and b.is_Rational):
        return False
    if isinstance(rel, sympy.Unequality):
        return -b / a in (0, 1)
    if isinstance(rel, (sympy.GreaterThan, sympy.StrictGreaterThan, sympy.LessThan, sympy.StrictLessThan)):
        bound = _as_bound(rel)
        return bound is not rel and is_size_specialization(bound) and _is_size(bound.lhs)
    return False


def _is_single_symbol_bound(rel) -> bool:
    """`T > 4`, `T <= 64`, ...: a range, which export also reports in range_constraints."""
    return (isinstance(rel, (sympy.GreaterThan, sympy.StrictGreaterThan, sympy.LessThan, sympy.StrictLessThan))
            and len(rel.free_symbols) == 1 and (rel.lhs.is_Symbol or rel.rhs.is_Symbol)
            and (rel.lhs.is_number or rel.rhs.is_number))


def _as_bound(rel):
    """A linear inequality on one size as the bound it is: `-T <= -3` and `8*T >= 24` are
    `T >= 3`, `2*T <= 13` is `T <= 6` (sizes are integers): one text for one condition, so
    that the same one read twice is kept once. Anything else as it is."""
    if not (isinstance(rel, (sympy.GreaterThan, sympy.StrictGreaterThan, sympy.LessThan, sympy.StrictLessThan))
            and len(rel.free_symbols) == 1):
        return rel
    (sym,) = rel.free_symbols
    diff = sympy.expand(rel.lhs - rel.rhs)  # rel is `diff REL 0`
    if not diff.is_polynomial(sym) or sympy.degree(diff, sym) != 1 or diff.has(sympy.Float):
        return rel
    a, b = diff.coeff(sym, 1), diff.coeff(sym, 0)
    if not (a.is_Rational and b.is_Rational):
        return rel
    x = -b / a
    greater = isinstance(rel, (sympy.GreaterThan, sympy.StrictGreaterThan)) == (a > 0)
    strict = isinstance(rel, (sympy.StrictGreaterThan, sympy.StrictLessThan))
    if greater:
        return sympy.Ge(sym, sympy.floor(x) + 1 if strict else sympy.ceiling(x))
    return sympy.Le(sym, sympy.ceiling(x) - 1 if strict else sympy.floor(x))


def guards_from_export(ep, rename: dict, clean) -> list:
    """The guards of an ExportedProgram, over fxforge's size symbols.

    rename: torch's symbols -> ours (B, T, ...); clean: torch's sympy functions -> plain
    sympy (capture._clean_expr). Ranges come from `range_constraints`; the other
    relations from the ShapeEnv the trace used."""
    ours = set(rename.values())
    out: list = []

    def keep(rel):
        rel = clean(rel.xreplace(rename))
        if not rel.free_symbols <= ours:
            return  # about sizes that are not inputs' (data-dependent)
        for part in _conjuncts(rel):
            part = _as_read_back(_as_bound(part))
            if part in (sympy.true, sympy.false):
                continue  # decided (over positive integer sizes)
            if is_size_specialization(part) or any(part == g for g in out):
                continue
            out.append(part)

    for sym, vr in ep.range_constraints.items():
        if sym not in rename:
            continue
        lower, upper = vr.lower, vr.upper
        # torch's int_oo is not a sympy Integer (and says nothing of is_finite)
        if getattr(lower, "is_Integer", False) and int(lower) > 2:
            keep(sympy.Ge(sym, int(lower)))
        if getattr(upper, "is_Integer", False):
            keep(sympy.Le(sym, int(upper)))
    shape_env = _shape_env(ep)
    for guard in getattr(shape_env, "guards", ()):
        rel = guard.expr
        if not _is_single_symbol_bound(rel):
            keep(rel)
    values = getattr(shape_env, "backed_var_to_val", None)  # (torch < 2.10: var_to_val)
    if values is None:
        values = getattr(shape_env, "var_to_val", {})
    example = {rename[s]: int(v) for s, v in values.items() if s in rename}
    if example.keys() >= {s for g in out for s in g.free_symbols}:
        checker = GuardChecker(out)
        values = [example.get(s) for s in checker.symbols]
        wrong = [g for g, test in zip(out, checker._tests) if not (holds(g, example) and test(values, example))]
        if wrong:  # export traced the example: a guard false there was translated wrongly
            raise ValueError(
                f"the guards {'; '.join(map(format_guard, wrong))} that fxforge derived from torch.export's "
                f"do not hold at the example's sizes ({', '.join(f'{k}={v}' for k, v in sorted(example.items(), key=str))}): "
                "a bug in fxforge's reading of export's guards. Optimize with dynamic=False to avoid it")
    return out


# -- guards that may be stricter than the graph ------------------------------------------------
# torch's own checks that record a guard the graph may not need: a slice's index clamp
# (`x[:, :5]` at T = 3 records `T < 5`, though at T = 5 the clamp and no clamp take the same
# 5 rows) and a contiguity test (`x[:, :min(T, 5)]` records whether the slice is the whole
# row, which the values computed do not depend on). The model's own code can record the same
# relation, so such a guard is widened only where a trace at a size it refuses is the same
# graph (capture._widened_by_probes), never by its origin alone.
_LOOSE_ORIGINS = (("fake_impls.py", "_compute_slice_index"), ("__init__.py", "check_contiguous_sizes_strides"))


def loose_guards(ep, rename: dict, clean) -> list:
    """The guards of guards_from_export (in its form) that torch's slice clamp or contiguity
    test recorded (_LOOSE_ORIGINS): the ones a probe at a size they refuse may widen."""
    out = []
    for guard in getattr(_shape_env(ep), "guards", ()):
        loc = getattr(getattr(guard, "sloc", None), "framework_loc", None)
        where = (str(getattr(loc, "filename", "")), str(getattr(loc, "name", "")))
        if not any(where[0].endswith(f) and where[1] == n for f, n in _LOOSE_ORIGINS):
            continue
        rel = clean(guard.expr.xreplace(rename))
        if not rel.free_symbols <= set(rename.values()):
            continue
        for part in _conjuncts(rel):
            try:
                part = _as_read_back(_as_bound(part))
            except ValueError:
                continue
            if part not in (sympy.true, sympy.false) and part not in out:
                out.append(part)
    return out


def example_sizes(ep, rename: dict) -> dict:
    """{our size symbol: its value in the trace}."""
    shape_env = _shape_env(ep)
    values = getattr(shape_env, "backed_var_to_val", None)  # (torch < 2.10: var_to_val)
    if values is None:
        values = getattr(shape_env, "var_to_val", {})
    return {rename[s]: int(v) for s, v in values.items() if s in rename}


def nearest_refused(rel, example: dict, symbols, reach: int = 32):
    """The sizes nearest the example, one symbol of `symbols` moved (by 1..reach, not below
    2: export makes a size of 1 a constant, another graph, and sizes of 1 are size_one.py's),
    where `rel` does not hold: {symbol: value} for the whole example so moved; None where
    there is none."""
    if not holds(rel, example):
        return None
    for step in range(1, reach + 1):
        for sym in sorted(rel.free_symbols & set(symbols), key=str):
            for value in (example[sym] - step, example[sym] + step):
                if value >= 2 and not holds(rel, {**example, sym: value}):
                    return {**example, sym: value}
    return None


def union(first: list, second: list):
    """The guards that hold where all of `first` or all of `second` hold, as relations (a guard
    line is one): what they share, and the rest where it is one relation and its negation
    (nothing more) or bounds of one size (`T <= 4` or `Eq(T, 5)` is `T <= 5`). None where
    the union is no list of relations: the caller keeps `first`, never a wider guess."""
    shared = [g for g in first if g in second]
    rest = [[g for g in gs if g not in shared] for gs in (first, second)]
    if not rest[0] or not rest[1]:
        return shared
    if len(rest[0]) == len(rest[1]) == 1 and rest[0][0] == _negation(rest[1][0]):
        return shared
    merged = _merged_bounds(rest[0], rest[1])
    if merged is None:
        return None
    return shared + [g for g in merged if g not in shared]


def _negation(rel):
    try:
        return _as_read_back(_as_bound(rel.negated))
    except (AttributeError, ValueError):
        return None


def _merged_bounds(first: list, second: list):
    """`first | second` as bounds of one size, where every relation in them is on that one
    size, with integers only and no Mod, floor or ceiling (each then decided alike for every
    size past its largest number, + 2): the sizes where either holds, counted up to that number, are one interval. None
    where they are not."""
    rels = first + second
    syms = {s for r in rels for s in r.free_symbols}
    if len(syms) != 1 or any(r.has(sympy.Mod, sympy.floor, sympy.ceiling) or _in_floats(r)
                             or any(not n.is_Integer for n in r.atoms(sympy.Rational)) for r in rels):
        return None  # (a fraction's threshold can lie past the largest integer written)
    (sym,) = syms
    top = 2 + max((abs(int(n)) for r in rels for n in r.atoms(sympy.Integer)), default=0)

    def member(v) -> bool:
        return any(all(holds(r, {sym: v}) for r in part) for part in (first, second))

    inside = [v for v in range(1, top + 2) if member(v)]
    if not inside or inside != list(range(inside[0], inside[-1] + 1)):
        return None
    low, high = inside[0], (math.inf if inside[-1] == top + 1 else inside[-1])
    if low == high:
        return [sympy.Eq(sym, low)]
    out = [sympy.Ge(sym, low)] if low > 2 else []  # (>= 2 is export's 0/1 specialization: not kept)
    return out + ([sympy.Le(sym, high)] if high != math.inf else [])


def _conjuncts(rel) -> list:
    """`(a >= 0) & (a <= T)` -> [a >= 0, a <= T]: a guard line is one relation."""
    if isinstance(rel, sympy.And):
        return [part for arg in rel.args for part in _conjuncts(arg)]
    return [rel]


def _as_read_back(rel):
    """`rel` as parse_guard reads its text: a relation the IR prints, parses and prints the
    same, or sympy.true where sympy decides it holds for positive integer sizes (export
    builds some unevaluated: `floor(T/2) <= T`, `Eq(4*Mod(T + Mod(3*T, 4), 4), 0)`).
    Raises ValueError on a relation the text form cannot hold (a function of torch's that
    capture does not translate)."""
    if rel in (sympy.true, sympy.false):
        return rel
    try:
        return parse_guard(format_guard(rel))
    except ValueError as e:
        raise ValueError(f"{e}. fxforge cannot keep this condition, so it cannot check that a call's sizes are "
                         "ones this graph computes the model for: optimize with dynamic=False to capture the "
                         "example's sizes only") from None


def _shape_env(ep):
    for node in ep.graph.nodes:
        if node.op != "placeholder":
            continue
        val = node.meta.get("val")
        for size in getattr(val, "shape", ()):
            if hasattr(size, "node") and hasattr(size.node, "shape_env"):
                return size.node.shape_env
    return None


# -- text form --------------------------------------------------------------------------------
def format_guard(rel) -> str:
    return _TEXT.doprint(rel)


class _GuardText(sympy.printing.str.StrPrinter):
    def _print_Float(self, e):
        # every digit: a guard such as Eq(1/T, 0.16666666666666666) (an attention scale
        # 1 / x.shape[1], specialized by export) holds at T = 6 only with all of them
        return repr(float(e))


_TEXT = _GuardText()


_FUNCTIONS = {"floor": sympy.floor, "ceiling": sympy.ceiling, "Mod": sympy.Mod, "Max": sympy.Max,
              "Min": sympy.Min, "Eq": sympy.Eq, "Ne": sympy.Ne}


def parse_guard(text: str):
    """The inverse of format_guard: a relation over size symbols, or sympy.true where
    sympy decides that it holds for all positive integer sizes (`floor(T/2) <= T`, which
    fxforge before capture read guards back through this function wrote; a reader drops
    it). Raises ValueError on anything else, and on a relation that never holds."""
    from sympy.parsing.sympy_parser import parse_expr

    if not re.fullmatch(r"[\w\s+\-*/%(),.<>=!|&~]*", text) or "__" in text or re.search(r"\.[A-Za-z_]", text):
        raise ValueError(f"cannot read guard {text!r}: only names, numbers, arithmetic, comparisons, "
                         f"{', '.join(_FUNCTIONS)} and `|`, `&`, `~` of comparisons are allowed")
    functions = {**_FUNCTIONS, **_torch_functions()}
    unknown = sorted(set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*\(", text)) - set(functions))
    if unknown:
        raise ValueError(f"cannot read guard {text!r}: {', '.join(unknown)} is not one of the functions a guard "
                         f"may use ({', '.join(_FUNCTIONS)}, and torch's float functions of sizes: "
                         f"{', '.join(_TORCH_FUNCTIONS)})")
    names = {n: symbol(n) for n in _identifiers(text) if n not in functions}
    names.update(functions)
    try:
        rel = parse_expr(text, local_dict=names, global_dict={"Integer": sympy.Integer, "Symbol": sympy.Symbol,
                                                             "Rational": sympy.Rational, "Float": sympy.Float})
    except Exception as e:  # sympy raises many kinds
        raise ValueError(f"cannot read guard {text!r}: {e}") from None
    if rel is sympy.true:
        return rel
    if rel is sympy.false:
        raise ValueError(f"guard {text!r} holds for no sizes: no call could run")
    # a float read back has the digits' precision; as a double it is the one written
    rel = rel.xreplace({f: sympy.Float(float(f)) for f in rel.atoms(sympy.Float)})
    if not _is_condition(rel):
        raise ValueError(f"a guard is a relation such as `T >= 5` or `Eq(Mod(T, 2), 0)`, or relations joined "
                         f"by `|`, `&`, `~`, got {text!r}")
    return rel


def _is_condition(rel) -> bool:
    """A relation, or relations joined by Or, And, Not (export writes `Eq(n, 0) | (n <= m)`
    where the model's code branches on either, BigBird's block-sparse attention)."""
    if isinstance(rel, (sympy.Or, sympy.And, sympy.Not)):
        return all(_is_condition(arg) for arg in rel.args)
    return isinstance(rel, sympy.core.relational.Relational)


# torch's sympy functions (torch.utils._sympy.functions) export writes in guards on float
# arithmetic of sizes (`torch.arange(0, x.shape[1] * 0.5, 0.5)`): kept, and computed as
# torch computes them (_FloatPrinter). Its integer ones (FloorDiv, CeilToInt...) capture
# writes as sympy's (capture._clean_expr).
_TORCH_FUNCTIONS = ("ToFloat", "FloatPow", "FloatTrueDiv", "PowByNatural", "TruncToFloat", "RoundToInt",
                    "RoundDecimal")


def _torch_functions() -> dict:
    from torch.utils._sympy import functions as tf

    return {name: getattr(tf, name) for name in _TORCH_FUNCTIONS if hasattr(tf, name)}


def _identifiers(text: str) -> set[str]:
    return {n for n in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text) if n not in _FUNCTIONS}


# -- checking ---------------------------------------------------------------------------------
def holds(rel, sizes: dict) -> bool:
    """Whether `rel` is true at `sizes` ({symbol: int}); False when it cannot be decided
    there (a division by zero, a symbol without a size). A guard on floats is decided in
    Python's float arithmetic, as torch decides it (_in_floats)."""
    if _in_floats(rel):
        symbols = sorted(rel.free_symbols, key=str)
        if any(s not in sizes for s in symbols):
            return False
        return _compiled(rel, symbols)([int(sizes[s]) for s in symbols], sizes)
    try:
        value = rel.xreplace({s: sympy.Integer(int(v)) for s, v in sizes.items()})
    except Exception:  # sympy raises ZeroDivisionError (Mod by 0), TypeError (nan), ...
        return False
    return value is sympy.true


def _compiled(rel, symbols):
    """`rel` as a Python function of the sizes in `symbols` order (sympy.lambdify: a guard
    is checked for every step of a cached generate(), where sympy's own evaluation would cost
    tens of microseconds a step); falls back to `holds` where it cannot be compiled or a
    size is missing."""
    floats = _in_floats(rel)
    try:
        fn = sympy.lambdify(symbols, rel, modules=[{"Fraction": Fraction, "math": math}, "math"],
                            printer=_FloatPrinter if floats else _ExactPrinter)
    except Exception:  # noqa: BLE001 (anything sympy cannot print as Python)
        fn = None

    def test(values, sizes) -> bool:
        if floats and (fn is None or any(v is None for v in values)):
            return False  # sympy's exact arithmetic would decide it otherwise than torch
        if fn is None or any(v is None for v in values):
            return holds(rel, sizes)
        try:
            return bool(fn(*values))
        except ZeroDivisionError:  # a Mod by zero: undecidable there, as in holds
            return False
        except Exception:  # noqa: BLE001 (a function the printer wrote that Python lacks: sympy decides)
            return holds(rel, sizes)
    return test


class _ExactPrinter(IntegerQuotients, PythonCodePrinter):
    """sympy -> Python in integer arithmetic: floor/ceiling of a quotient is `//` of
    its numerator and denominator, and a fraction is a Fraction, never a float (a float's
    `(1/5)*T` is not T/5, and its ceiling is one off at T = 5k)."""

    def _print_Rational(self, e):
        return f"Fraction({e.p}, {e.q})"

    def _print_Half(self, e):
        return "Fraction(1, 2)"

    def _print_Pow(self, e, rational=False):
        if e.exp.is_Integer and e.exp < 0:
            return f"Fraction(1, ({self._print(e.base)}) ** {-int(e.exp)})"
        return super()._print_Pow(e, rational=rational)


def _in_floats(rel) -> bool:
    """Whether `rel` compares floats (`Eq(1/T, 0.16666666666666666)`, torch's ToFloat...):
    torch decided it in float arithmetic, where 1/6 is 0.16666666666666666, and an exact
    rational is not; such a guard is decided in floats."""
    return bool(rel.atoms(sympy.Float)) or any(type(f).__name__ in _TORCH_FUNCTIONS
                                               for f in rel.atoms(sympy.Function))


class _FloatPrinter(TorchFunctions, IntegerQuotients, PythonCodePrinter):
    """sympy -> Python in float arithmetic, as torch evaluates a guard on floats: a
    quotient of sizes is a float division (PythonCodePrinter's 1/T), torch's functions
    are the Python they stand for."""

    def _print_Rational(self, e):
        return f"({e.p} / {e.q})"


class GuardChecker:
    """Checks a graph's guards for a call's sizes; remembers the size combinations that
    passed, so that repeated calls at the same sizes cost one dict lookup."""

    def __init__(self, guards: list):
        self.guards = list(guards)
        self.symbols = sorted({s for g in self.guards for s in g.free_symbols}, key=str)
        self._passed: set = set()
        self._tests = [_compiled(g, self.symbols) for g in self.guards]

    def mentions(self, sym) -> bool:
        return sym in self.symbols

    def check(self, sizes: dict, what: str = "the inputs"):
        if not self.guards:
            return
        key = tuple(sizes.get(s) for s in self.symbols)
        if key in self._passed:
            return
        values = [sizes.get(sym) for sym in self.symbols]
        failed = [g for g, test in zip(self.guards, self._tests) if not test(values, sizes)]
        if failed:
            raise GuardError(self.message(failed, sizes, what))
        self._passed.add(key)

    def message(self, failed: list, sizes: dict, what: str) -> str:
        involved = sorted({s for g in failed for s in g.free_symbols}, key=str)
        given = ", ".join(f"{s}={sizes[s]}" if s in sizes else f"{s} unknown" for s in involved)
        conditions = [format_guard(g) for g in self.guards if g.free_symbols & set(involved)]
        return (f"{what} have {given}, outside the sizes this model was captured for: "
                f"{' and '.join(format_guard(g) for g in failed)} does not hold "
                f"(all conditions on {', '.join(map(str, involved))}: {'; '.join(conditions)}). "
                "They come from the model's code (a branch on a size, a slice of a fixed-size buffer, a "
                "reshape), as torch.export recorded them or as fxforge's probes found them (a size of 1 where "
                "the model computes otherwise, or where the graph cannot run: two sizes it takes as equal); "
                "call with sizes that satisfy them, or run fxforge.optimize again with example inputs of the "
                "sizes you need")
