"""Op signatures: how many tensor inputs an op takes, and which attributes of which types.

Each registry entry (ops.OpDef) declares its signature as data:
    arity=(1, 1)      exactly one input; (2, 3) two or three; (1, None) at least one
    attrs="dims: ints, keepdim: bool, dtype?: dtype|none"
An attribute spec is `name: type` (required) or `name?: type` (may be left out), and a
type may list alternatives with `|`. The types are the keys of `ATTR_TYPES`.
`signature_problem` checks a node against it, so typecheck can reject a malformed node
with a message a person can act on before any type rule indexes into its inputs.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

import sympy
import torch


def _is_int(v) -> bool:
    # The text form cannot tell int from sympy.Integer (both print as digits), so both count.
    return (isinstance(v, int) and not isinstance(v, bool)) or isinstance(v, sympy.Integer)


def _is_float(v) -> bool:
    return _is_int(v) or isinstance(v, float)


def _is_size(v) -> bool:
    return _is_int(v) or isinstance(v, sympy.Expr)


def _is_size_condition(v) -> bool:
    return isinstance(v, sympy.logic.boolalg.Boolean) and bool(v.free_symbols)


def _tuple_of(pred: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, tuple) and all(pred(x) for x in v)


def _is_pair(v) -> bool:
    return isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str)


# type name -> (what the error message calls it, predicate)
ATTR_TYPES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "int": ("an int", _is_int),
    "float": ("a float", _is_float),
    "bool": ("a bool", lambda v: isinstance(v, bool)),
    "str": ("a string", lambda v: isinstance(v, str)),
    "dtype": ("a dtype", lambda v: isinstance(v, torch.dtype)),
    "size": ("a size (int or expression)", _is_size),
    # (a size condition, `T >= 9`, is a bool computed from the sizes at each call, as eager's
    # `x.shape[1] >= 9`)
    "scalar": ("a number", lambda v: isinstance(v, (bool, float)) or _is_size(v) or _is_size_condition(v)),
    "complex": ("a complex number", lambda v: isinstance(v, complex)),
    "none": ("none", lambda v: v is None),
    "ints": ("a tuple of ints", _tuple_of(_is_int)),
    "sizes": ("a tuple of sizes", _tuple_of(_is_size)),
    "strs": ("a tuple of strings", _tuple_of(lambda v: isinstance(v, str))),
    "pairs": ("a tuple of (name, value) pairs", _tuple_of(_is_pair)),
    "tuple": ("a tuple", lambda v: isinstance(v, tuple)),
}


@dataclass(frozen=True)
class AttrSpec:
    name: str
    types: tuple[str, ...]
    required: bool

    def accepts(self, value) -> bool:
        return any(ATTR_TYPES[t][1](value) for t in self.types)

    def describe(self) -> str:
        return " or ".join(ATTR_TYPES[t][0] for t in self.types)


_SPEC = re.compile(r"\s*([A-Za-z_]\w*)(\?)?\s*:\s*([a-z]+(?:\s*\|\s*[a-z]+)*)\s*")


def parse_attr_specs(text: str) -> dict[str, AttrSpec]:
    """'dim: int, dtype?: dtype|none' -> {name: AttrSpec}. A typo in a declaration fails
    when the OpDef is built, not when a graph happens to use the op."""
    specs: dict[str, AttrSpec] = {}
    for item in filter(str.strip, text.split(",")):
        m = _SPEC.fullmatch(item)
        if not m:
            raise ValueError(f"bad attribute spec {item.strip()!r} (want `name: type` or `name?: type`)")
        types = tuple(t.strip() for t in m.group(3).split("|"))
        unknown = [t for t in types if t not in ATTR_TYPES]
        if unknown:
            raise ValueError(f"attribute {m.group(1)!r}: unknown type {unknown[0]!r}; known: {', '.join(ATTR_TYPES)}")
        specs[m.group(1)] = AttrSpec(m.group(1), types, required=not m.group(2))
    return specs


def check_arity(arity) -> tuple[int, int | None]:
    lo, hi = arity
    if lo < 0 or (hi is not None and hi < lo):
        raise ValueError(f"bad arity {arity!r}: want (min, max) with 0 <= min <= max, or (min, None)")
    return lo, hi


def _inputs(n: int) -> str:
    return f"{n} input" if n == 1 else f"{n} inputs"


def describe_arity(lo: int, hi: int | None) -> str:
    if hi is None:
        return f"at least {_inputs(lo)}"
    if lo == hi:
        return _inputs(lo) if lo else "no inputs"
    return f"{lo} to {hi} inputs"


def signature_problem(op, n_inputs: int, attrs: dict) -> str | None:
    """What is wrong with a use of `op` (an OpDef) with `n_inputs` tensors and `attrs`,
    or None. One message, the first problem found."""
    lo, hi = op.arity
    if n_inputs < lo or (hi is not None and n_inputs > hi):
        return f"{op.name} takes {describe_arity(lo, hi)}, got {n_inputs}"
    specs = op.attr_specs
    for name in attrs:
        if name not in specs:
            known = ", ".join(specs) or "none"
            return f"unknown attribute {name!r} for {op.name} (its attributes: {known})"
    for spec in specs.values():
        if spec.name not in attrs:
            if spec.required:
                return f"{op.name} is missing attribute {spec.name!r}"
        elif not spec.accepts(attrs[spec.name]):
            return f"attribute {spec.name!r} of {op.name} must be {spec.describe()}, got {attrs[spec.name]!r}"
    return None
